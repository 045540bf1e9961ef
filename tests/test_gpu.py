"""llamabind on an NVIDIA GPU (CUDA), against native llama.cpp built the same way.

scripts/test_gpu.sh builds llamabind with GGML_CUDA=ON for the card's architecture,
builds the native reference tools with the same options into build/native-gpu, and runs
these with LLAMABIND_GPU_TESTS=1 and LLAMABIND_NATIVE_DIR set. Both sides run every
layer on the same GPU with the same context, batch and thread settings, so greedy
decoding must give the same token ids, as on the CPU (tests/test_fidelity.py).

In a build without CUDA conftest deselects them; run directly on one they skip, and with
LLAMABIND_GPU_TESTS=1 they fail instead.

Not here yet: the batching engine at B = 1..16 on the GPU (LoadedModel.generate_many and
concurrent generate from threads): the engine is not on main yet.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

import llamabind
from llamabind import Context, Model, TokenGenerator
from llamabind.buildinfo import build_config

pytestmark = pytest.mark.gpu

GPU_REQUIRED = os.environ.get("LLAMABIND_GPU_TESTS") == "1"
N_PREDICT = 64
PROMPTS = {
    "english": "The history of the printing press begins in the fifteenth century, when",
    "code": "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n",
}
LONG_PROMPT = " ".join(
    f"Line {i}: the keeper climbed the stairs, wiped the lens and wrote the weather down."
    for i in range(12))


def _unavailable(reason: str) -> NoReturn:
    if GPU_REQUIRED:
        pytest.fail(f"LLAMABIND_GPU_TESTS=1, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cuda_device() -> dict[str, object]:
    option = str(build_config().get("options", {}).get("GGML_CUDA", "OFF")).upper()
    if option not in ("ON", "1", "TRUE", "YES", "Y"):
        _unavailable("this llamabind was built without CUDA (scripts/test_gpu.sh builds one)")
    if "CUDA" not in llamabind.backends():
        pytest.fail(f"built with CUDA, but the backend did not start: {llamabind.backends()}")
    found = [d for d in llamabind.devices() if d["backend"] == "CUDA"]
    if not found:
        pytest.fail("the CUDA backend found no device")
    return found[0]


@pytest.fixture(scope="module")
def llamabind_ref(cuda_device: dict[str, object]) -> Path:
    native_dir = os.environ.get("LLAMABIND_NATIVE_DIR")
    if not native_dir:
        _unavailable("LLAMABIND_NATIVE_DIR is not set (scripts/test_gpu.sh builds the native "
                     "tools with CUDA and sets it)")
    binary = Path(native_dir) / "bin" / "llamabind-ref"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} is missing: scripts/build_native.py did not build it")
    stamp = json.loads((Path(native_dir) / "llamabind-native.stamp.json").read_text())
    options = stamp["configure"]["options"]
    assert options.get("GGML_CUDA") == "ON", f"{native_dir} was not built with CUDA: {options}"
    return binary


def _paths() -> dict[str, str]:
    import fetch_models  # conftest puts models/ on sys.path

    return {key: str(fetch_models.fetch(key)) for key in ("smollm2", "qwen2.5-0.5b")}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def on_gpu(cuda_device: dict[str, object]) -> Iterator[dict[str, tuple[Model, str, list[str]]]]:
    """Each model with every layer on the GPU: (model, path, llama.cpp's load log)."""
    logger = logging.getLogger("llamabind")
    loaded: dict[str, tuple[Model, str, list[str]]] = {}
    try:
        for key, path in _paths().items():
            handler, level = _Lines(), logger.level
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            try:
                model = Model(path, n_gpu_layers=-1)
            finally:
                logger.removeHandler(handler)
                logger.setLevel(level)
            loaded[key] = (model, path, handler.lines)
        yield loaded
    finally:
        for model, _, _ in loaded.values():
            model.close()


def _ours(model: Model, prompt: str, n_batch: int) -> tuple[list[int], list[int], int]:
    tokens = model.vocab.tokenize(prompt)
    with Context(model, n_ctx=512, n_batch=n_batch, n_ubatch=min(n_batch, 512)) as ctx:
        ctx.eval(tokens)
        gen = TokenGenerator(ctx, len(tokens), None, max_tokens=N_PREDICT)
        out = [tok for tok, _ in gen]
        threads = int(ctx.n_threads[0])
    return tokens, out, threads


def _native(binary: Path, path: str, prompt: str, n_batch: int, threads: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as fh:
        fh.write(prompt.encode())
    try:
        proc = subprocess.run(
            [str(binary), "generate", "--model", path, "--prompt-file", fh.name,
             "--n-predict", str(N_PREDICT), "--n-ctx", "512", "--n-batch", str(n_batch),
             "--n-ubatch", str(min(n_batch, 512)), "--threads", str(threads),
             "--n-gpu-layers", "-1", "--sampler", "greedy"],
            capture_output=True, timeout=300, check=False)
    finally:
        Path(fh.name).unlink()
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.parametrize("key", ["smollm2", "qwen2.5-0.5b"])
def test_all_layers_on_the_gpu(key: str, on_gpu: dict[str, tuple[Model, str, list[str]]],
                               cuda_device: dict[str, object]) -> None:
    model, _, lines = on_gpu[key]
    found = [m for m in (re.search(r"offloaded (\d+)/(\d+) layers to GPU", x) for x in lines)
             if m]
    assert found, "llama.cpp logged no offload summary:\n" + "\n".join(lines)
    assert int(found[-1][1]) == int(found[-1][2]) >= model.n_layer, found[-1][0]
    device = str(cuda_device["name"])
    assert any(device in x and "model buffer" in x for x in lines), "\n".join(lines)


@pytest.mark.parametrize("key", ["smollm2", "qwen2.5-0.5b"])
@pytest.mark.parametrize(("prompt", "n_batch"), [
    (PROMPTS["english"], 512), (PROMPTS["code"], 512), (LONG_PROMPT, 64)],
    ids=["english", "code", "multi-batch"])
def test_greedy_matches_native_on_gpu(key: str, prompt: str, n_batch: int,
                                      on_gpu: dict[str, tuple[Model, str, list[str]]],
                                      llamabind_ref: Path) -> None:
    model, path, _ = on_gpu[key]
    prompt_tokens, out, threads = _ours(model, prompt, n_batch)
    ref = _native(llamabind_ref, path, prompt, n_batch, threads)
    assert prompt_tokens == ref["prompt_tokens"]
    first = next((i for i, (a, b) in enumerate(zip(out, ref["tokens"], strict=False))
                  if a != b), None)
    assert out == ref["tokens"], f"{key}: first difference at token {first}"
    assert out, f"{key}: nothing generated"
