"""The Vulkan backend, end to end: compiled in, a device found, a model run on it.

These tests need llamabind built with GGML_VULKAN=ON (scripts/build_vulkan.sh) and a
Vulkan device. With no GPU, Mesa's lavapipe (mesa-vulkan-drivers) is a Vulkan device
that runs on the CPU: slow, but every layer really runs through ggml-vulkan's shaders.
scripts/test_vulkan.sh builds and runs them:

    pytest -m vulkan tests/test_vulkan.py

In a CPU-only build they skip, so the ordinary test run is unaffected. With
LLAMABIND_VULKAN_TESTS=1 they fail instead: whoever sets it expects a Vulkan build, and a
silent skip would hide one that came out CPU-only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# ggml-vulkan passes over CPU-type devices such as lavapipe unless they are named here,
# and reads this once, when the backend starts: it must be set before llamabind first
# touches the backend. A value from the environment (another device) wins.
os.environ.setdefault("GGML_VK_VISIBLE_DEVICES", "0")

import llamabind  # noqa: E402

pytestmark = pytest.mark.vulkan

MODEL = Path(__file__).resolve().parent.parent / "models" / "gguf" / (
    "SmolLM2-135M-Instruct-Q4_1.gguf")
PROMPT = "The capital of France is"
MAX_TOKENS = 8
VULKAN_REQUIRED = os.environ.get("LLAMABIND_VULKAN_TESTS") == "1"


def _unavailable(reason: str) -> None:
    """Skip, or fail when the run asked for the Vulkan tests."""
    if VULKAN_REQUIRED:
        pytest.fail(f"LLAMABIND_VULKAN_TESTS=1, but {reason}")
    pytest.skip(reason)


def _vulkan_devices() -> list[dict[str, object]]:
    return [d for d in llamabind.devices() if d["backend"] == "Vulkan"]


@pytest.fixture(scope="module")
def vulkan_device() -> dict[str, object]:
    backends = llamabind.backends()
    if "Vulkan" not in backends:
        _unavailable(
            f"this llamabind was built without the Vulkan backend (backends: {backends}); "
            "build one with scripts/build_vulkan.sh")
    found = _vulkan_devices()
    if not found:
        _unavailable(
            "the Vulkan backend found no device (GGML_VK_VISIBLE_DEVICES="
            f"{os.environ.get('GGML_VK_VISIBLE_DEVICES')!r}; it takes effect only if set "
            "before llamabind's backend starts; for lavapipe install mesa-vulkan-drivers)")
    return found[0]


@pytest.fixture(scope="module")
def model_path() -> str:
    if not MODEL.is_file():
        pytest.skip(f"{MODEL.name} is missing: run python models/fetch_models.py")
    return str(MODEL)


def _generate(model: llamabind.Model) -> tuple[list[int], str, str | None]:
    """Greedy-decode MAX_TOKENS tokens after PROMPT: (tokens, text, finish reason)."""
    prompt = model.vocab.tokenize(PROMPT)
    with llamabind.Context(model, n_ctx=256) as ctx:
        ctx.eval(prompt)
        gen = llamabind.TokenGenerator(ctx, len(prompt), max_tokens=MAX_TOKENS)
        tokens: list[int] = []
        pieces: list[bytes] = []
        for token, piece in gen:
            tokens.append(token)
            pieces.append(piece)
        return tokens, b"".join(pieces).decode("utf-8", "replace"), gen.finish_reason


@pytest.fixture(scope="module")
def cpu_run(model_path: str) -> tuple[list[int], str, str | None]:
    # devices=[] gives the model no device but the CPU, so nothing runs on Vulkan even
    # in a Vulkan build: the reference the offloaded run is compared with.
    with llamabind.Model(model_path, n_gpu_layers=0, devices=[]) as model:
        return _generate(model)


@pytest.fixture(scope="module")
def offloaded_model(
        vulkan_device: dict[str, object], model_path: str) -> Iterator[llamabind.Model]:
    with llamabind.Model(model_path, n_gpu_layers=-1) as model:
        yield model


def test_vulkan_backend_compiled_in(vulkan_device: dict[str, object]) -> None:
    assert "Vulkan" in llamabind.backends()
    assert "CPU" in llamabind.backends()


def test_vulkan_device_listed(vulkan_device: dict[str, object]) -> None:
    assert str(vulkan_device["name"]).startswith("Vulkan")
    assert vulkan_device["description"]
    assert isinstance(vulkan_device["memory_total"], int)
    assert vulkan_device["memory_total"] > 0


def test_lavapipe_is_a_vulkan_device(vulkan_device: dict[str, object]) -> None:
    descriptions = [str(d["description"]) for d in _vulkan_devices()]
    if not any("llvmpipe" in d for d in descriptions):
        # On a machine with a real GPU the chosen device is that GPU, not lavapipe.
        pytest.skip(f"lavapipe is not among the visible Vulkan devices: {descriptions}")
    assert any("llvmpipe" in d for d in descriptions)


def test_generation_offloaded_to_vulkan(
        offloaded_model: llamabind.Model,
        cpu_run: tuple[list[int], str, str | None]) -> None:
    tokens, text, finish = _generate(offloaded_model)
    cpu_tokens, cpu_text, cpu_finish = cpu_run

    assert tokens, f"no token generated on Vulkan (finish_reason={finish!r})"
    assert text.strip(), f"Vulkan generated only blank text: {text!r}"
    assert len(tokens) == MAX_TOKENS or finish == "stop"
    # Greedy decoding of the same prompt: Vulkan and CPU kernels round differently, so a
    # late near-tie could legitimately flip a token. Here they agree token for token; the
    # first token, decided by a clear margin, must agree wherever this runs.
    assert tokens[0] == cpu_tokens[0], (text, cpu_text)
    assert tokens == cpu_tokens, (
        f"Vulkan {tokens} {text!r} vs CPU {cpu_tokens} {cpu_text!r}")
    assert finish == cpu_finish
