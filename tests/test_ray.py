"""llamabind.ray on a local Ray cluster (this machine, 2 CPUs, loopback only): the
OpenAI server as 2 Serve replicas and batch inference with 2 Ray Data actors give the
outputs of greedy generation in this process, token counts and text exactly.

What makes the comparison exact: every engine here (each replica's, each actor's and
the reference's in this process) is loaded with the same options, one thread and one
slot (``n_parallel=1``), so each request is decoded alone, as the reference decodes it.
Several sequences in one decode batch sum in another order, and SmolLM2's greedy
choice can flip at a near tie (tests/test_engine.py allows for that); a request decoded
alone gives the same logits whatever ran before it (its slot's reused prefix is
bit-identical to a fresh computation). Requests still run on two replicas/actors at
once, and each actor's batch still goes through its engine's queue together: what is
checked is what Ray adds (placement, transport, columns), against exact references.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from openai import OpenAI
from ray import serve

import llamabind.ray
from llamabind import InvalidArgumentError, LoadedModel

pytestmark = pytest.mark.model

LOAD = {"n_ctx": 512, "n_parallel": 1, "n_threads": 1}
MAX_TOKENS = 16
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "The quick brown fox",
    "In 1969, the first person to walk on the moon was",
    "A list of fruits: apple,",
]
QUESTIONS = [
    "What is 2 + 2?",
    "Name three primary colors.",
    "Say hello in Spanish.",
    "What is the largest planet in the solar system?",
    "Give me a synonym for happy.",
    "Write one sentence about the sea.",
]
CHATS = [[{"role": "user", "content": q}] for q in QUESTIONS]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A Ray cluster of this process's own (``address="local"``: never one that
    ``ray start`` left running), 2 CPUs, no dashboard, no usage reporting."""
    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"   # read by the processes ray.init starts
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved


@pytest.fixture(scope="module")
def reference(smol_path: str) -> Iterator[LoadedModel]:
    with LoadedModel.load(smol_path, **LOAD) as model:
        yield model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _same(row: dict[str, Any], ref: llamabind.GenerationResult) -> None:
    got = (row["text"], row["prompt_tokens"], row["completion_tokens"], row["finish_reason"])
    assert got == (ref.text, ref.prompt_tokens, ref.completion_tokens, ref.finish_reason)


def test_import_needs_nothing_of_ray_and_names_the_extra(tmp_path: Any) -> None:
    code = (
        "import sys\n"
        "import llamabind\n"
        "assert 'ray' not in sys.modules, 'import llamabind imported ray'\n"
        "sys.modules['ray'] = None  # as if the extra were not installed\n"
        "try:\n"
        "    import llamabind.ray\n"
        "except ImportError as exc:\n"
        "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "pip install 'llamabind[ray]'" in out.stdout, out.stdout


def test_serve_two_replicas_answer_like_one_process(cluster: None, smol_path: str,
                                                    reference: LoadedModel) -> None:
    port = _free_port()
    llamabind.ray.serve_openai(smol_path, num_replicas=2, port=port, route_prefix="/llm",
                               app_name="smol", alias="smol", **LOAD)
    try:
        status = serve.status().applications["smol"].deployments["llamabind"]
        assert status.replica_states == {"RUNNING": 2}
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/llm/v1", api_key="none",
                        max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["smol"]
        answers: dict[int, Any] = {}
        errors: list[BaseException] = []

        def ask(i: int) -> None:
            try:
                answers[i] = client.chat.completions.create(
                    model="smol", messages=CHATS[i], temperature=0,
                    max_tokens=MAX_TOKENS)
            except BaseException as exc:
                errors.append(exc)

        # all at once: a replica takes one at a time (max_ongoing_requests defaults to
        # n_parallel), so Serve runs them on both
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(CHATS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i, chat in enumerate(CHATS):
            ref = reference.chat(chat, temperature=0, max_tokens=MAX_TOKENS)
            a = answers[i]
            assert (a.choices[0].message.content, a.usage.prompt_tokens,
                    a.usage.completion_tokens, a.choices[0].finish_reason) == (
                        ref.text, ref.prompt_tokens, ref.completion_tokens, ref.finish_reason)
        # a streamed text completion: the pieces join to the reference's text
        stream = client.completions.create(model="smol", prompt=PROMPTS[0], temperature=0,
                                           max_tokens=MAX_TOKENS, stream=True)
        text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        assert text == reference.generate(PROMPTS[0], temperature=0,
                                          max_tokens=MAX_TOKENS).text
    finally:
        serve.delete("smol")
    # the replicas are gone (their models closed at the ASGI shutdown): the 2 CPUs are free
    assert "smol" not in serve.status().applications


def test_dataset_of_prompts_on_two_actors(cluster: None, smol_path: str,
                                          reference: LoadedModel) -> None:
    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    out = llamabind.ray.generate_dataset(ds, smol_path, concurrency=2, batch_size=3,
                                         temperature=0, max_tokens=MAX_TOKENS, **LOAD)
    rows = sorted(out.take_all(), key=lambda r: r["id"])   # Ray Data keeps no order
    assert [r["prompt"] for r in rows] == PROMPTS
    for row, prompt in zip(rows, PROMPTS, strict=True):
        _same(row, reference.generate(prompt, temperature=0, max_tokens=MAX_TOKENS))


def test_dataset_of_chats_on_two_actors(cluster: None, smol_path: str,
                                        reference: LoadedModel) -> None:
    ds = ray.data.from_items([{"id": i, "messages": c} for i, c in enumerate(CHATS)])
    out = llamabind.ray.generate_dataset(ds, smol_path, messages_column="messages",
                                         concurrency=2, batch_size=2, temperature=0,
                                         max_tokens=MAX_TOKENS, **LOAD)
    rows = sorted(out.take_all(), key=lambda r: r["id"])
    assert [r["messages"] for r in rows] == CHATS
    for row, chat in zip(rows, CHATS, strict=True):
        _same(row, reference.chat(chat, temperature=0, max_tokens=MAX_TOKENS))


def test_bad_options_are_refused_before_anything_runs(cluster: None, smol_path: str) -> None:
    ds = ray.data.from_items([{"prompt": "x"}])
    with pytest.raises(InvalidArgumentError, match="tempreature"):
        llamabind.ray.generate_dataset(ds, smol_path, tempreature=0)
    with pytest.raises(InvalidArgumentError, match="top_k"):
        llamabind.ray.generate_dataset(ds, smol_path, top_k=-3)
    with pytest.raises(InvalidArgumentError, match="n_ubatch"):
        llamabind.ray.generate_dataset(ds, smol_path, n_batch=8, n_ubatch=16)
    with pytest.raises(InvalidArgumentError, match="concurrency"):
        llamabind.ray.generate_dataset(ds, smol_path, concurrency=0)
    with pytest.raises(InvalidArgumentError, match="'text'"):
        llamabind.ray.generate_dataset(ds, smol_path, prompt_column="text")
    with pytest.raises(InvalidArgumentError, match="generation option"):
        llamabind.ray.openai_app(smol_path, temperature=0)
    with pytest.raises(InvalidArgumentError, match="num_replicas"):
        llamabind.ray.openai_app(smol_path, num_replicas=0)
    with pytest.raises(InvalidArgumentError, match="num_cpus"):
        llamabind.ray.openai_app(smol_path, num_cpus=-1)
    with pytest.raises(InvalidArgumentError, match="port"):
        llamabind.ray.serve_openai(smol_path, port=70000)
