"""Tool calling with the model's own chat template (Qwen2.5-Coder, whose template has
tools): single, parallel, required and named calls, a follow-up turn with the tool's
result, streamed deltas, and the same request through llama.cpp natively."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from _native import native_tools

import llamabind
from llamabind import structured
from llamabind.errors import InvalidArgumentError, UnsupportedSchemaError

pytestmark = pytest.mark.model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name", "maxLength": 32},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 32}}, "required": ["city"]}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(message: dict[str, Any], tools: list[dict[str, Any]]) -> list[Any]:
    """Every call is OpenAI-shaped and its arguments validate; returns (name, args)."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    out = []
    for call in message["tool_calls"]:
        assert call["type"] == "function"
        assert call["id"].startswith("call_") and len(call["id"]) == 29
        name, args = call["function"]["name"], call["function"]["arguments"]
        assert isinstance(args, str)
        jsonschema.validate(json.loads(args), schemas[name])
        out.append((name, json.loads(args)))
    return out


def test_named_call(loaded_qwen: llamabind.LoadedModel) -> None:
    r = loaded_qwen.chat(ASK, tools=TOOLS, temperature=0, max_tokens=64, tool_choice={
        "type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False)
    assert r.finish_reason == "stop"
    assert r.message["content"] is None
    calls = _check_calls(r.message, TOOLS)
    assert len(calls) == 1 and calls[0][0] == "get_weather" and calls[0][1]["city"] == "Paris"


def test_required_single_call(loaded_qwen: llamabind.LoadedModel) -> None:
    msgs = [{"role": "user", "content": "What time is it in Tokyo?"}]
    r = loaded_qwen.chat(msgs, tools=TOOLS, tool_choice="required",
                         parallel_tool_calls=False, temperature=0, max_tokens=64)
    calls = _check_calls(r.message, TOOLS)
    assert len(calls) == 1 and calls[0][1]["city"] == "Tokyo"


def test_parallel_calls(loaded_qwen: llamabind.LoadedModel) -> None:
    msgs = [{"role": "user", "content": "What is the weather in Paris and in Tokyo?"}]
    r = loaded_qwen.chat(msgs, tools=[WEATHER], tool_choice="required", temperature=0,
                         max_tokens=48)
    calls = _check_calls(r.message, [WEATHER])
    # this small model goes on calling for more cities until max_tokens; a call cut
    # short is left out of the message
    assert [c[1]["city"] for c in calls[:2]] == ["Paris", "Tokyo"]
    assert len({c["id"] for c in r.message["tool_calls"]}) == len(calls)


def test_follow_up_with_tool_result(loaded_qwen: llamabind.LoadedModel) -> None:
    first = loaded_qwen.chat(ASK, tools=[WEATHER], tool_choice="required",
                             parallel_tool_calls=False, temperature=0, max_tokens=48)
    call = first.message["tool_calls"][0]
    history = [*ASK, first.message,
               llamabind.tools.tool_result(call, {"temperature": 21, "sky": "sunny"})]
    r = loaded_qwen.chat(history, tools=[WEATHER], temperature=0, max_tokens=40)
    assert "tool_calls" not in r.message
    assert "21" in r.message["content"]
    prompt = loaded_qwen._planner.plan(messages=history, tools=[WEATHER]).prompt
    assert prompt is not None and "<tool_response>" in prompt and call["function"][
        "arguments"] in prompt


def test_none_and_auto_free_text(loaded_qwen: llamabind.LoadedModel) -> None:
    msgs = [{"role": "user", "content": "Say hello."}]
    r = loaded_qwen.chat(msgs, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=8)
    assert "tool_calls" not in r.message and r.message["content"]
    plan = loaded_qwen._planner.plan(messages=msgs, tools=TOOLS)
    assert plan is not None and plan.grammar_lazy and plan.trigger_patterns
    r = loaded_qwen.chat(msgs, tools=TOOLS, temperature=0, max_tokens=8)
    assert r.message["content"] and "tool_calls" not in r.message


def test_streamed_deltas_rebuild_the_message(loaded_qwen: llamabind.LoadedModel) -> None:
    options: dict[str, Any] = {"tools": TOOLS, "tool_choice": "required", "temperature": 0,
                               "max_tokens": 96, "parallel_tool_calls": True}
    msgs = [{"role": "user", "content": "Weather and local time in Rome?"}]
    whole = loaded_qwen.chat(msgs, **{**options, "parallel_tool_calls": False})
    deltas = list(loaded_qwen.stream_chat_deltas(msgs, **{**options,
                                                          "parallel_tool_calls": False}))
    assert deltas[-1] == {"finish_reason": "tool_calls"}
    calls: dict[int, dict[str, Any]] = {}
    content = ""
    for d in deltas[:-1]:
        content += d.get("content", "")
        for tc in d.get("tool_calls", ()):
            slot = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
            if "id" in tc:
                assert slot["id"] is None  # the id comes once, with the name
                slot["id"] = tc["id"]
                slot["name"] = tc["function"]["name"]
            slot["arguments"] += tc["function"]["arguments"]
    want = whole.message["tool_calls"]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (w["function"]["name"], w["function"]["arguments"]) for w in want]
    assert content == (whole.message["content"] or "")


def test_tool_arguments_checked(loaded_qwen: llamabind.LoadedModel) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "number", "maximum": 3}}}}}
    with pytest.raises(UnsupportedSchemaError, match="tool 'f'"):
        loaded_qwen.chat(ASK, tools=[bad])
    with pytest.raises(InvalidArgumentError, match="tool_choice names"):
        loaded_qwen.chat(ASK, tools=TOOLS, tool_choice={"type": "function",
                                                        "function": {"name": "nope"}})
    with pytest.raises(InvalidArgumentError, match="two tools are named"):
        loaded_qwen.chat(ASK, tools=[WEATHER, WEATHER])
    with pytest.raises(InvalidArgumentError, match="needs a chat"):
        loaded_qwen.generate("x", tools=TOOLS)
    with pytest.raises(InvalidArgumentError, match="tool_choice must be"):
        loaded_qwen.chat(ASK, tools=TOOLS, tool_choice="always")
    with pytest.raises(InvalidArgumentError, match="tool message needs"):
        loaded_qwen.chat([*ASK, {"role": "tool", "content": "1"}], tools=TOOLS)
    # the caller's tools and messages are not modified
    tools = json.loads(json.dumps(TOOLS))
    msgs = json.loads(json.dumps(ASK))
    loaded_qwen._planner.plan(messages=msgs, tools=tools, tool_choice="required")
    assert tools == TOOLS and msgs == ASK


def test_stream_parser_on_text(qwen: llamabind.Model) -> None:
    """llama.cpp's parser on given text, piece by piece (no generation)."""
    plan = structured.Planner(qwen).plan(messages=ASK, tools=TOOLS)
    assert plan is not None
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}'
            '\n</tool_call>')
    parser = plan.stream_parser()
    deltas = [d for i in range(0, len(text), 5) for d in parser.feed(text[i:i + 5])]
    deltas += parser.finish()
    whole = plan.parse(text)
    assert parser.result is not None
    assert [c["function"] for c in parser.result.tool_calls] == [
        c["function"] for c in whole.tool_calls] == [
        {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"name": "get_time", "arguments": '{"city": "Oslo"}'}]
    assert "".join(d.get("content", "") for d in deltas) == whole.content == "Let me check.\n"
    firsts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d
              and "id" in d["tool_calls"][0]]
    assert [f["index"] for f in firsts] == [0, 1]


# --- the same request through llama.cpp natively -----------------------------------------


def _native_chat(qwen_path: str, request: dict[str, Any]) -> dict[str, Any]:
    binary = Path(native_tools()["bin_dir"]) / "llamabind-chat-ref"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(request, fh)
    try:
        proc = subprocess.run([str(binary), "--model", qwen_path, "--request", fh.name,
                               "--n-ctx", "1024", "--threads", "2"],
                              capture_output=True, text=True, timeout=600, check=False)
    finally:
        Path(fh.name).unlink()
    assert proc.returncode == 0, proc.stderr[-2000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def test_same_as_native(loaded_qwen: llamabind.LoadedModel) -> None:
    """llama-server's path through common/chat and common/sampling (native/chat_ref.cpp):
    the same prompt, text and parsed message. For tool_choice="required" llamabind
    starts the turn with the template's call marker; llama-server does the same when the
    request ends with that assistant prefill."""
    msgs = [{"role": "user", "content": "What is the weather in Paris and in Tokyo?"}]
    cases: list[tuple[dict[str, Any], list[dict[str, Any]]]] = [
        ({"tool_choice": "auto"}, []),
        ({"tool_choice": "required", "parallel_tool_calls": True},
         [{"role": "assistant", "content": "<tool_call>\n"}]),
    ]
    for options, prefill in cases:
        native = _native_chat(loaded_qwen.config.path, {
            "messages": msgs + prefill, "tools": TOOLS, "max_tokens": 40, **options})
        plan = loaded_qwen._planner.plan(messages=msgs, tools=TOOLS, **options)
        assert plan is not None and plan.prompt == native["prompt"]
        r = loaded_qwen.chat(msgs, tools=TOOLS, temperature=0, max_tokens=40, **options)
        assert r.text == native["text"]
        theirs = native["message"].get("tool_calls", [])
        ours = r.message.get("tool_calls", [])
        complete = [c for c in theirs if _is_json(c["function"]["arguments"])]
        assert [c["function"] for c in ours] == [c["function"] for c in complete]
        assert (r.message["content"] or "") == native["message"]["content"]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
