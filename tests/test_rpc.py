"""ggml's RPC backend on loopback: ``llamabind rpc-server`` workers and models split
across them.

* Two worker processes plus the local CPU, layers split across all three: greedy
  tokens equal to the local run, on both test models.
* Faults: an unreachable worker, a worker of another protocol version (a fake server),
  workers that hang up at each stage of a load (a fake server: these reach the failure
  paths patched into ggml's client, which used to abort the process), a worker killed
  mid-generation (a typed error; the model loads again once the worker is back) and
  interpreter exit with a dead worker (no hang). The ones that could crash run in a
  child process.
* ``rpc_servers`` that are not a list of "host:port" strings: InvalidArgumentError.
* The command: a non-loopback address prints the security warning; SIGINT and SIGTERM
  stop a worker with exit status 0.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _rpc_workers import FakeWorker, Worker, free_port
from _subproc import run_python

import llamabind
from llamabind.cli import main as cli_main
from llamabind.rpc import cache_directory

TESTS = str(Path(__file__).resolve().parent)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        started.append(Worker())
        started.append(Worker())
        yield started
    finally:
        results = [w.stop(signal.SIGTERM) for w in started]
    for rc, err in results:
        # a clean stop: SIGTERM ends the worker with status 0 and says so
        assert rc == 0, err
        assert "stopped (SIGTERM)" in err


# --- a model split across two workers and the local CPU ------------------------------


def greedy(model: llamabind.Model, n: int = 16) -> list[int]:
    with llamabind.Context(model, n_ctx=512, n_threads=1) as ctx:
        prompt = model.vocab.tokenize(PROMPT)
        ctx.eval(prompt)
        return [t for t, _ in llamabind.TokenGenerator(ctx, len(prompt), max_tokens=n)]


@pytest.mark.model
@pytest.mark.parametrize("which", ["smol", "qwen"])
def test_split_across_two_workers_and_cpu_matches_local(
        which: str, workers: list[Worker], request: pytest.FixtureRequest,
        caplog: pytest.LogCaptureFixture) -> None:
    path: str = request.getfixturevalue(f"{which}_path")
    # use_extra_bufts=False on both sides: by default this CPU repacks some of Qwen's
    # Q4_K weights for faster kernels that sum in another order, which a worker never
    # does, and greedy decoding then parts after a few tokens (measured: logits differ
    # by up to 0.5, token 3 of this prompt); with the same layouts the logits are equal
    # to the bit
    with llamabind.Model(path, use_extra_bufts=False) as local:
        want = greedy(local)
        n_layer = local.n_layer
    # two thirds of the layers (and the output layer) go to the workers, half each;
    # the first third stays on this CPU
    offloaded = (n_layer + 1) * 2 // 3
    endpoints = [w.endpoint for w in workers]
    caplog.set_level(logging.INFO, logger="llamabind")
    with llamabind.Model(path, rpc_servers=endpoints, n_gpu_layers=offloaded,
                         tensor_split=[1, 1], use_extra_bufts=False) as split:
        assert split.rpc_servers == tuple(endpoints)
        got = greedy(split)
    buffers = [r.getMessage() for r in caplog.records if "model buffer size" in r.getMessage()]
    # weights on all three: this CPU and each worker
    assert any("CPU" in line for line in buffers), buffers
    for endpoint in endpoints:
        assert any(f"[{endpoint}]" in line for line in buffers), (endpoint, buffers)
    assert len(want) == 16
    assert got == want


def test_high_level_load_offloads_all_layers_to_workers(
        smol_path: str, workers: list[Worker], caplog: pytest.LogCaptureFixture) -> None:
    """LoadedModel.load with rpc_servers and no n_gpu_layers: every layer goes to the
    workers (their devices count as GPUs); SmolLM2's Q4_1 weights are never repacked,
    so the defaults give the local tokens."""
    # one thread: on a busy 2-core machine, two threads of a context spin at ggml's
    # barriers while the other waits for a core (measured here: 7x slower)
    context = llamabind.ContextConfig(n_threads=1)
    with llamabind.LoadedModel.load(smol_path, n_gpu_layers=0, context=context) as local:
        want = local.generate(PROMPT, temperature=0, max_tokens=12)
        n_layer = local.native.n_layer
    caplog.set_level(logging.INFO, logger="llamabind")
    with llamabind.LoadedModel.load(smol_path, rpc_servers=[w.endpoint for w in workers],
                                    context=context) as split:
        assert split.config.rpc_servers == tuple(w.endpoint for w in workers)
        got = split.generate(PROMPT, temperature=0, max_tokens=12)
    assert any(f"offloaded {n_layer + 1}/{n_layer + 1} layers" in r.getMessage()
               for r in caplog.records)
    assert got.tokens == want.tokens


@pytest.mark.model
def test_models_in_one_process_share_a_workers_connection(smol_path: str,
                                                          workers: list[Worker]) -> None:
    """ggml keeps one connection per worker, shared by the models of a process, and a
    worker serves one connection at a time: a second model (or a device listing) on a
    worker this process already uses must not wait for a probe answer that cannot come
    (it did: 5 s, then BackendError 'busy with another client')."""
    endpoint = workers[0].endpoint
    first = llamabind.Model(smol_path, rpc_servers=[endpoint], n_gpu_layers=-1)
    try:
        assert [d["description"] for d in llamabind.devices(rpc_servers=[endpoint])
                if d["backend"] == "RPC"] == [endpoint]
        with llamabind.Model(smol_path, rpc_servers=[endpoint], n_gpu_layers=-1) as second:
            assert greedy(second, 8) == greedy(first, 8)
    finally:
        first.close()
    # no model holds the connection any more: the next load probes the worker again
    with llamabind.Model(smol_path, rpc_servers=[endpoint], n_gpu_layers=-1) as third:
        assert len(greedy(third, 8)) == 8


def test_devices_and_info_list_the_workers(workers: list[Worker],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    local = llamabind.devices()
    listed = llamabind.devices(rpc_servers=[w.endpoint for w in workers])
    assert listed[:len(local)] == local
    remote = listed[len(local):]
    assert [d["backend"] for d in remote] == ["RPC", "RPC"]
    assert [d["description"] for d in remote] == [w.endpoint for w in workers]
    assert [d["index"] for d in remote] == [len(local), len(local) + 1]
    assert all(d["memory_total"] > 0 for d in remote)
    assert cli_main(["info", "--build-only", "--json", "--rpc", workers[0].endpoint]) == 0
    build = json.loads(capsys.readouterr().out)["build"]
    assert build["rpc_protocol"] == list(llamabind._llama.rpc_protocol_version())
    assert [d["description"] for d in build["devices"] if d["backend"] == "RPC"] == [
        workers[0].endpoint]


# --- faults ----------------------------------------------------------------------------


def test_unreachable_worker_is_a_backend_error_naming_it(smol_path: str) -> None:
    endpoint = f"127.0.0.1:{free_port()}"   # nothing listens there
    with pytest.raises(llamabind.BackendError, match=rf"{re.escape(endpoint)}.*connection refused"):
        llamabind.Model(smol_path, rpc_servers=[endpoint], n_gpu_layers=-1)
    with pytest.raises(llamabind.BackendError, match=r"nosuch\.invalid"):
        llamabind.devices(rpc_servers=["nosuch.invalid:50052"])


def test_a_server_that_is_no_worker_is_refused(smol_path: str) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    endpoint = f"127.0.0.1:{server.getsockname()[1]}"

    def answer_like_http() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(64)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer_like_http, daemon=True)
    thread.start()
    try:
        with pytest.raises(llamabind.BackendError, match="not an RPC worker") as info:
            llamabind.devices(rpc_servers=[endpoint])
    finally:
        thread.join(30)
        server.close()
    assert endpoint in str(info.value)


@pytest.mark.parametrize("version", [(6, 0, 0), (8, 0, 0), (7, 99, 0)])
def test_worker_of_another_protocol_version_is_refused(smol_path: str,
                                                       version: tuple[int, int, int]) -> None:
    fake = FakeWorker(lambda n: (version, None))
    try:
        with pytest.raises(llamabind.BackendError) as info:
            llamabind.Model(smol_path, rpc_servers=[fake.endpoint], n_gpu_layers=-1)
    finally:
        fake.close()
    message = str(info.value)
    ours = ".".join(map(str, llamabind._llama.rpc_protocol_version()))
    assert fake.endpoint in message
    assert "speaks RPC protocol " + ".".join(map(str, version)) in message
    assert f"this build speaks {ours}" in message and "different build" in message


# Each case: a fake worker that answers the probe, then misbehaves at one stage of
# connecting or loading. In ggml's client each of these aborted the process; now each
# is a BackendError naming the worker. Run in a child: a regression is a crash there.
FAKE_STAGES = r'''
import sys
sys.path.insert(0, TESTS)
import llamabind
from _rpc_workers import (FakeWorker, ALLOC_BUFFER, BUFFER_GET_BASE, DEVICE_COUNT,
                          GET_ALIGNMENT, HELLO)

V = (7, 0, 0)
cases = {
    # ggml's own handshake meets another version (the probe saw the right one)
    "handshake": lambda n: (V if n == 0 else (6, 0, 0), None),
    # hangs up when ggml connects after the probe
    "hello": lambda n: (V, None if n == 0 else HELLO),
    "device_count": lambda n: (V, DEVICE_COUNT),
    "buffer_type": lambda n: (V, GET_ALIGNMENT),
    "alloc": lambda n: (V, ALLOC_BUFFER),
    "buffer_base": lambda n: (V, BUFFER_GET_BASE),
}
for name, plan in cases.items():
    fake = FakeWorker(plan)
    try:
        llamabind.Model(PATH, rpc_servers=[fake.endpoint], n_gpu_layers=-1)
        report(case=name, outcome="loaded")
    except llamabind.LlamaError as exc:
        report(case=name, outcome=type(exc).__name__, message=str(exc),
               endpoint=fake.endpoint, commands=sorted(set(fake.commands)))
    fake.close()
'''


def test_worker_failing_at_each_stage_of_a_load_is_a_backend_error(smol_path: str) -> None:
    snippet = f"TESTS = {TESTS!r}\nPATH = {smol_path!r}\n" + FAKE_STAGES
    outcome = run_python(snippet, timeout=120)
    assert outcome.kind == "ok", outcome.describe()
    cases = {r["case"]: r for r in outcome.reports if "case" in r}
    assert list(cases) == ["handshake", "hello", "device_count", "buffer_type", "alloc",
                           "buffer_base"]
    for name, r in cases.items():
        assert r["outcome"] == "BackendError", (name, r)
        assert r["endpoint"] in r["message"], (name, r)
    assert "6.0.0" in cases["handshake"]["message"]
    # the last case reached the stage it was meant to fail at
    assert 3 in cases["buffer_base"]["commands"]


KILLED_MID_GENERATION = r'''
import sys
import threading
sys.path.insert(0, TESTS)
import llamabind
from _rpc_workers import Worker

def load(worker):
    return llamabind.LoadedModel.load(PATH, rpc_servers=[worker.endpoint], n_gpu_layers=-1,
                                      context=llamabind.ContextConfig(n_threads=1))

local = llamabind.LoadedModel.load(PATH, n_gpu_layers=0,
                                   context=llamabind.ContextConfig(n_threads=1))
want = local.generate("The capital of France is", temperature=0, max_tokens=8).tokens
local.close()

worker = Worker()
model = load(worker)
pieces = 0
try:
    for piece in model.stream("Once upon a time", temperature=0, max_tokens=200):
        pieces += 1
        if pieces == 3:
            worker.kill()
    report(step="killed", outcome="finished")
except llamabind.LlamaError as exc:
    report(step="killed", outcome=type(exc).__name__, message=str(exc), pieces=pieces,
           endpoint=worker.endpoint)
try:
    model.generate("Hello", max_tokens=2)
    report(step="again", outcome="generated")
except llamabind.LlamaError as exc:
    report(step="again", outcome=type(exc).__name__)

worker = Worker(port=worker.port)     # back on the same address
try:
    model.create_session()
    report(step="old model", outcome="usable")
except llamabind.LlamaError as exc:
    report(step="old model", outcome=type(exc).__name__)
reloaded = load(worker)
got = reloaded.generate("The capital of France is", temperature=0, max_tokens=8).tokens
report(step="reloaded", same=list(got) == list(want))
model.close()

# killed from another thread while the client most likely waits inside a decode
no_eog = {t: float("-inf") for t in range(reloaded.vocab.n_tokens) if reloaded.vocab.is_eog(t)}
timer = threading.Timer(0.5, worker.kill)
timer.start()
try:
    reloaded.generate("Once upon a time", temperature=0, max_tokens=5000, logit_bias=no_eog)
    report(step="killed in a decode", outcome="finished")
except llamabind.LlamaError as exc:
    report(step="killed in a decode", outcome=type(exc).__name__)
timer.join()

# exit with the worker dead and the model still open: must not hang
report(step="exit")
'''


@pytest.mark.model
def test_worker_killed_mid_generation_then_back(smol_path: str) -> None:
    snippet = f"TESTS = {TESTS!r}\nPATH = {smol_path!r}\n" + KILLED_MID_GENERATION
    outcome = run_python(snippet, timeout=180)
    assert outcome.kind == "ok", outcome.describe()
    steps = {r["step"]: r for r in outcome.reports if "step" in r}
    killed = steps["killed"]
    assert killed["outcome"] == "BackendError", killed
    assert killed["endpoint"] in killed["message"] and "load it again" in killed["message"]
    assert killed["pieces"] == 3
    assert steps["again"]["outcome"] == "BackendError"
    assert steps["old model"]["outcome"] == "BackendError"
    assert steps["reloaded"]["same"] is True
    assert steps["killed in a decode"]["outcome"] == "BackendError"
    assert "exit" in steps


FORKED = r'''
import os, sys
sys.path.insert(0, TESTS)
import llamabind
from _rpc_workers import Worker

worker = Worker()
model = llamabind.Model(PATH, rpc_servers=[worker.endpoint], n_gpu_layers=-1)
pid = os.fork()
if pid == 0:
    try:
        llamabind.Model(PATH, rpc_servers=[worker.endpoint], n_gpu_layers=-1)
        code = 1
    except llamabind.ForkError:
        code = 0
    except BaseException:
        code = 2
    os._exit(code)
_, status = os.waitpid(pid, 0)
report(child=os.waitstatus_to_exitcode(status))
model.close()
worker.stop()
'''


@pytest.mark.model
def test_forked_child_cannot_reuse_the_parents_worker_connection(smol_path: str) -> None:
    """The child inherits ggml's connection object without its thread: using it would
    hang, so loading on that worker in the child is a ForkError."""
    outcome = run_python(f"TESTS = {TESTS!r}\nPATH = {smol_path!r}\n" + FORKED, timeout=120)
    assert outcome.kind == "ok", outcome.describe()
    assert [r["child"] for r in outcome.reports if "child" in r] == [0]


# --- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("servers, named", [
    ("127.0.0.1:50052", "'127.0.0.1:50052'"),          # a string, not a list
    ({"127.0.0.1:50052"}, "{'127.0.0.1:50052'}"),
    ([50052], "50052"),
    ([b"127.0.0.1:50052"], "b'127.0.0.1:50052'"),
    (["127.0.0.1"], "'127.0.0.1'"),
    ([":50052"], "':50052'"),
    (["127.0.0.1:"], "'127.0.0.1:'"),
    (["127.0.0.1:0"], "'127.0.0.1:0'"),
    (["127.0.0.1:65536"], "'127.0.0.1:65536'"),
    (["127.0.0.1:-1"], "'127.0.0.1:-1'"),
    (["127.0.0.1:5e4"], "'127.0.0.1:5e4'"),
    (["[::1]:50052"], "'[::1]:50052'"),
    (["bad host:50052"], "'bad host:50052'"),
    (["a\x00b:50052"], "'a\\x00b:50052'"),
    (["h:1", "H:01"], "'H:01'"),
    ([f"h:{i}" for i in range(1, 18)], "'h:17'"),
])
def test_bad_rpc_servers_are_invalid_argument_errors(smol_path: str, servers: object,
                                                      named: str) -> None:
    with pytest.raises(llamabind.InvalidArgumentError) as info:
        llamabind.Model(smol_path, rpc_servers=servers, n_gpu_layers=-1)
    assert named in str(info.value)
    with pytest.raises(llamabind.InvalidArgumentError, match=r"rpc_servers"):
        llamabind.ModelConfig(path=smol_path, rpc_servers=servers)  # type: ignore[arg-type]


def test_same_worker_under_two_names_and_no_offloaded_layer_are_refused(
        smol_path: str, workers: list[Worker]) -> None:
    with pytest.raises(llamabind.InvalidArgumentError, match="same worker"):
        llamabind.Model(smol_path, n_gpu_layers=-1, rpc_servers=[
            workers[0].endpoint, f"localhost:{workers[0].port}"])
    with pytest.raises(llamabind.InvalidArgumentError, match="n_gpu_layers"):
        llamabind.Model(smol_path, n_gpu_layers=0, rpc_servers=[workers[0].endpoint])
    # a weight for this CPU: two workers are two devices
    with pytest.raises(llamabind.InvalidArgumentError, match=r"3 weights for 2 devices"):
        llamabind.Model(smol_path, n_gpu_layers=-1, tensor_split=[1, 1, 1],
                        rpc_servers=[w.endpoint for w in workers])
    config = llamabind.ModelConfig(path=smol_path, rpc_servers=[workers[0].endpoint])
    assert config.rpc_servers == (workers[0].endpoint,)


# --- the command -------------------------------------------------------------------


def test_rpc_server_warns_off_loopback_and_names_a_busy_port() -> None:
    port = free_port()
    # holding the port (bound, not listening: nothing is exposed) makes the worker fail
    # right after its warning
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("0.0.0.0", port))
        done = subprocess.run(
            [sys.executable, "-m", "llamabind", "rpc-server", "-H", "0.0.0.0", "-p", str(port)],
            capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "WARNING" in done.stderr and "no authentication" in done.stderr
    assert f"cannot listen on 0.0.0.0:{port}" in done.stderr


def test_rpc_server_stops_cleanly_on_sigint() -> None:
    worker = Worker()
    rc, err = worker.stop(signal.SIGINT)
    assert rc == 0, err
    assert "stopped (SIGINT)" in err
    assert "WARNING" not in err      # loopback: no warning


def test_rpc_server_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["rpc-server", "-p", "0"]) == 2
    assert cli_main(["rpc-server", "-t", "0"]) == 2
    assert cli_main(["rpc-server", "-H", "not an address"]) == 2
    err = capsys.readouterr().err
    assert "--port must be in [1, 65535], got 0" in err
    assert "--threads must be >= 1, got 0" in err
    assert "--host 'not an address'" in err


@pytest.mark.model
def test_rpc_server_cache_keeps_large_tensors(smol_path: str, tmp_path: Path) -> None:
    """With --cache, a tensor over ggml's 10 MiB threshold (SmolLM2's output weights,
    17 MB) is written to the cache directory when a client first sends it."""
    worker = Worker(cache_env={"LLAMA_CACHE": str(tmp_path)})
    try:
        with llamabind.Model(smol_path, rpc_servers=[worker.endpoint], n_gpu_layers=-1):
            pass
    finally:
        rc, err = worker.stop()
    assert rc == 0, err
    cached = list((tmp_path / "rpc").iterdir())
    assert cached and all(f.stat().st_size > 10 * 2**20 for f in cached), cached


def test_rpc_server_cache_is_llama_cpps(monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "lc"))
    assert cache_directory() == tmp_path / "lc" / "rpc"
    monkeypatch.delenv("LLAMA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_directory() == tmp_path / "xdg" / "llama.cpp" / "rpc"
