"""Tool calling through ``llamabind serve``: a Qwen2.5-Coder server (its template has
tools) driven by the official ``openai`` client, sync and streaming. Greedy tool calls
equal ``LoadedModel.chat(..., tools=...)`` in this process; streamed ``delta.tool_calls``
join to the same calls; ``n`` choices are read each on its own; a tool's result goes
back for the answer. (Bad tools and schemas are refused in test_server.py's table, on
its server.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from _server_proc import ServerProcess

import llamabind

pytestmark = pytest.mark.model

ALIAS = "qwen"      # as in the README's example

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
# a named call, one call only: the output ends with the call
NAMED: dict[str, Any] = {"tools": TOOLS, "parallel_tool_calls": False, "tool_choice": {
    "type": "function", "function": {"name": "get_weather"}}}


@pytest.fixture(scope="module")
def server(qwen_path: str) -> Iterator[ServerProcess]:
    # n_ctx as loaded_qwen's (the reference); two slots for n=2
    proc = ServerProcess(qwen_path, "-np", "2", "-c", "1024", "--alias", ALIAS)
    yield proc
    rc = proc.stop()
    log = proc.log()
    proc.close()
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0,
                       timeout=300) as c:
        yield c


def _valid_calls(calls: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every call is OpenAI-shaped and its arguments validate; (name, arguments)."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    out = []
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
        jsonschema.validate(args, schemas[name])
        out.append((name, args))
    return out


def _functions(calls: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [c["function"] for c in calls]


def _join(chunks: list[Any]) -> dict[int, dict[str, Any]]:
    """Streamed chunks -> each choice's content, tool calls and finish_reason, checking
    the deltas' shape: a call's first delta has its index, id, type and name, later
    ones only add to its arguments."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for ch in chunk.choices:
            got = out.setdefault(ch.index, {"content": None, "calls": [], "finish": []})
            delta = ch.delta
            if delta.content:
                got["content"] = (got["content"] or "") + delta.content
            for tc in delta.tool_calls or ():
                calls = got["calls"]
                if tc.index == len(calls):              # a new call
                    assert tc.id and tc.type == "function" and tc.function.name, tc
                    calls.append({"id": tc.id, "type": "function", "function": {
                        "name": tc.function.name, "arguments": tc.function.arguments or ""}})
                else:
                    assert tc.index == len(calls) - 1 and tc.id is None, tc
                    assert tc.function.name is None, tc
                    calls[-1]["function"]["arguments"] += tc.function.arguments or ""
            if ch.finish_reason is not None:
                got["finish"].append(ch.finish_reason)
    return out


def test_tool_call_equals_library(client: openai.OpenAI,
                                  loaded_qwen: llamabind.LoadedModel) -> None:
    """A greedy named call: the same call as LoadedModel.chat, OpenAI-shaped, exact
    usage; streamed, the deltas join to it; the tool's result goes back, and the
    answer equals the library's too."""
    want = loaded_qwen.chat(ASK, **NAMED, temperature=0, max_tokens=48)
    assert want.message["tool_calls"]
    r = client.chat.completions.create(model=ALIAS, messages=ASK, **NAMED, temperature=0,
                                       max_tokens=48)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls"
    message = choice.message.model_dump(exclude_none=True)
    assert message["role"] == "assistant" and choice.message.content is None
    assert _functions(message["tool_calls"]) == _functions(want.message["tool_calls"])
    assert [name for name, _ in _valid_calls(message["tool_calls"])] == ["get_weather"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens,
                                                                  want.completion_tokens)

    chunks = list(client.chat.completions.create(
        model=ALIAS, messages=ASK, **NAMED, temperature=0, max_tokens=48, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    joined = _join(chunks[:-1])[0]
    assert joined["finish"] == ["tool_calls"] and joined["content"] is None
    assert _functions(joined["calls"]) == _functions(message["tool_calls"])
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    # the follow-up turn: the assistant message as the client returned it, the result
    call = choice.message.tool_calls[0]
    history: list[Any] = [*ASK, choice.message, {
        "role": "tool", "tool_call_id": call.id,
        "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    answer = client.chat.completions.create(model=ALIAS, messages=history, tools=TOOLS,
                                            temperature=0, max_tokens=32)
    lib_history = [*ASK, want.message, llamabind.tools.tool_result(
        want.message["tool_calls"][0], {"temperature": 21, "sky": "sunny"})]
    lib_answer = loaded_qwen.chat(lib_history, tools=TOOLS, temperature=0, max_tokens=32)
    assert answer.choices[0].message.content == lib_answer.message["content"]
    assert "21" in lib_answer.message["content"]
    assert answer.choices[0].message.tool_calls is None
    assert answer.usage.prompt_tokens == lib_answer.prompt_tokens


def test_n_choices_each_read(client: openai.OpenAI) -> None:
    """n=2 sampled choices, streamed and not: each choice is parsed on its own (its own
    calls and finish_reason)."""
    options: dict[str, Any] = {"model": ALIAS, "tools": TOOLS, "tool_choice": "required",
                               "n": 2, "temperature": 1.0, "seed": 3, "max_tokens": 40,
                               "messages": [{"role": "user",
                                             "content": "Weather and local time in Rome?"}]}
    r = client.chat.completions.create(**options)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        calls = c.message.model_dump()["tool_calls"]
        assert calls and _valid_calls(calls)    # a call cut short by max_tokens is left out
        assert c.finish_reason in ("tool_calls", "length")
    chunks = list(client.chat.completions.create(**options, stream=True))
    joined = _join(chunks)
    assert sorted(joined) == [0, 1]
    for got in joined.values():
        assert len(got["finish"]) == 1 and got["finish"][0] in ("tool_calls", "length")
        complete = [c for c in got["calls"] if _is_json(c["function"]["arguments"])]
        assert complete and _valid_calls(complete)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_readme_tools_example(server: ServerProcess) -> None:
    """The README's tool-calling client example, run against this server."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (code,) = re.findall(r"```python\n(import json\nfrom openai import OpenAI\n.*?)```",
                         readme, re.S)
    assert 'base_url="http://127.0.0.1:8080/v1"' in code and f'model="{ALIAS}"' in code
    code = code.replace("http://127.0.0.1:8080", server.base_url)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "get_weather {'city': 'Paris'}", out.stdout
    assert len(lines) > 1 and lines[1].strip()
