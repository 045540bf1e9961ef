"""The Vulkan backend, end to end: compiled in, a device found, both models run on it
and compared with the CPU build.

These tests need llamabind built with GGML_VULKAN=ON (scripts/build_vulkan.sh) and a
Vulkan device. With no GPU, Mesa's lavapipe (mesa-vulkan-drivers) is a Vulkan device
that runs on the CPU: slow, but every layer really runs through ggml-vulkan's shaders.
scripts/test_vulkan.sh builds and runs them, and scripts/test.sh (so CI) runs that:

    LLAMABIND_CPU_PYTHON=.venv/bin/python pytest -m vulkan tests/test_vulkan.py

The reference is the CPU build's greedy decoding (tests/_greedy.py run by the CPU
build's interpreter, LLAMABIND_CPU_PYTHON); without that variable it is this build's
own CPU backend (devices=[]), which gives the same tokens and logits.

In a CPU-only build conftest deselects them, so the ordinary test run is unaffected
(run directly on such a build, they skip). With LLAMABIND_VULKAN_TESTS=1 they fail
instead: whoever sets it expects a Vulkan build, and a silent skip would hide one that
came out CPU-only. A Vulkan build whose backend finds no device fails either way.

Tolerance. ggml-vulkan's kernels are not bit-equal to the CPU's: for these models'
Q4_1/Q4_K weights the CPU quantizes the activations to Q8 and multiplies in integers,
while the shaders dequantize the weights and multiply in f16/f32, and they sum in
another order. Measured on lavapipe (Mesa 22.3.6) at llama.cpp 0c1e57098, 24 steps of
each model with the CPU's tokens fed to both: the largest logit difference at any step
was 1.58 (SmolLM2; Qwen 0.46), the lowest correlation of a step's logits 0.9987, against
logits whose spread is about 2-4 and whose best is about 17-23. Greedy decoding can only
take another token where the CPU's best two logits are closer than the two errors
together: SmolLM2's texts part at step 5 (" Paris.\n\nThe" then " United" on the CPU,
" answer" on Vulkan), where the CPU's margin is 0.26; Qwen's 24 tokens are the same. So:
  * free-running greedy tokens must equal the CPU build's up to the first step where
    they differ, and the CPU's margin there must be under NEAR_TIE (1.0 logit, about
    four times the 0.26 seen): the texts may part at a near tie, nowhere else;
  * at every step of the teacher-forced run (the CPU's tokens fed to Vulkan one at a
    time, the generation kernels) Vulkan's pick must be a token the CPU rates within
    NEAR_TIE of its best, the logits must differ by less than MAX_ABS (3.0, about twice
    the worst seen) and correlate above 0.99. A broken kernel misses these by far: its
    errors are of the order of the logits themselves.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, NoReturn

import numpy as np
import pytest

# ggml-vulkan passes over CPU-type devices such as lavapipe unless they are named here,
# and reads this once, when the backend starts: it must be set before llamabind first
# touches the backend. A value from the environment (another device) wins.
os.environ.setdefault("GGML_VK_VISIBLE_DEVICES", "0")

import _greedy
from _greedy import PROMPTS, Trace

import llamabind
from llamabind.buildinfo import build_config

pytestmark = pytest.mark.vulkan

MODELS = tuple(PROMPTS)
VULKAN_REQUIRED = os.environ.get("LLAMABIND_VULKAN_TESTS") == "1"
CPU_PYTHON = os.environ.get("LLAMABIND_CPU_PYTHON")
GREEDY_SCRIPT = Path(_greedy.__file__).resolve()

# the bounds of the module docstring (measured there: 1.58, 0.26, 0.9987)
MAX_ABS = 3.0
NEAR_TIE = 1.0
MIN_CORRELATION = 0.99


class Offloaded(NamedTuple):
    model: llamabind.Model
    log: list[str]


def _unavailable(reason: str) -> NoReturn:
    """Skip, or fail when the run asked for the Vulkan tests."""
    if VULKAN_REQUIRED:
        pytest.fail(f"LLAMABIND_VULKAN_TESTS=1, but {reason}")
    pytest.skip(reason)


def _vulkan_devices() -> list[dict[str, object]]:
    return [d for d in llamabind.devices() if d["backend"] == "Vulkan"]


def _vulkan_compiled_in() -> bool:
    # From the build record, not from backends(): ggml leaves out of backends() a
    # backend that is compiled in but fails to start (no Vulkan loader or driver, or a
    # GGML_VK_VISIBLE_DEVICES naming no device), and that must fail, not skip.
    option = str(build_config().get("options", {}).get("GGML_VULKAN", "OFF"))
    return option.upper() in ("ON", "1", "TRUE", "YES", "Y")


@pytest.fixture(scope="module")
def vulkan_device() -> dict[str, object]:
    if not _vulkan_compiled_in():
        _unavailable(
            "this llamabind was built without the Vulkan backend (GGML_VULKAN is off); "
            "build one with scripts/build_vulkan.sh")
    visible = os.environ.get("GGML_VK_VISIBLE_DEVICES")
    backends = llamabind.backends()
    if "Vulkan" not in backends:
        pytest.fail(
            f"llamabind was built with Vulkan, but the backend did not start (backends: "
            f"{backends}): no Vulkan loader or driver (for lavapipe: apt-get install "
            f"mesa-vulkan-drivers), or GGML_VK_VISIBLE_DEVICES={visible!r} names no device")
    found = _vulkan_devices()
    if not found:
        pytest.fail(
            f"the Vulkan backend found no device it will use (GGML_VK_VISIBLE_DEVICES="
            f"{visible!r}; ggml-vulkan uses a CPU-type device such as lavapipe only when "
            "named there, and reads it once, before llamabind's backend starts)")
    return found[0]


def _model_path(key: str) -> str:
    import fetch_models  # conftest puts models/ on sys.path

    return str(fetch_models.fetch(key))


def _cpu_build_trace(key: str, out: Path) -> Trace:
    """The CPU build's greedy run, from its own interpreter."""
    assert CPU_PYTHON is not None
    proc = subprocess.run([CPU_PYTHON, str(GREEDY_SCRIPT), key, str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.fail(f"the CPU build's reference run failed ({CPU_PYTHON}, exit "
                    f"{proc.returncode}):\n{proc.stderr[-4000:]}", pytrace=False)
    with np.load(out) as data:
        backends = [str(b) for b in data["backends"]]
        # RPC is in every default build: it computes nothing on this machine
        assert sorted(set(backends) - {"RPC"}) == ["CPU"], (
            f"LLAMABIND_CPU_PYTHON={CPU_PYTHON} has a llamabind with backends {backends}, "
            "not a CPU-only build")
        return Trace(data["tokens"].copy(), data["logits"].copy())


@pytest.fixture(scope="module")
def cpu_traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trace]:
    traces = {}
    for key in MODELS:
        if CPU_PYTHON:
            out = tmp_path_factory.mktemp("cpu-build") / f"{key}.npz"
            traces[key] = _cpu_build_trace(key, out)
        else:
            # devices=[] gives the model no device but the CPU: nothing runs on Vulkan
            with llamabind.Model(_model_path(key), n_gpu_layers=0, devices=[]) as model:
                traces[key] = _greedy.decode(model, PROMPTS[key])
    return traces


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def offloaded(vulkan_device: dict[str, object]) -> Iterator[dict[str, Offloaded]]:
    """Each model with every layer on the Vulkan device, and what llama.cpp logged
    loading it."""
    logger = logging.getLogger("llamabind")
    models: dict[str, Offloaded] = {}
    try:
        for key in MODELS:
            handler, level = _Lines(), logger.level
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            try:
                # only this device: a build with CUDA too would otherwise split the
                # layers over both
                model = llamabind.Model(_model_path(key), n_gpu_layers=-1,
                                        devices=[str(vulkan_device["name"])])
            finally:
                logger.removeHandler(handler)
                logger.setLevel(level)
            models[key] = Offloaded(model, handler.lines)
        yield models
    finally:
        for entry in models.values():
            entry.model.close()


@pytest.fixture(scope="module")
def vulkan_free(offloaded: dict[str, Offloaded]) -> dict[str, Trace]:
    return {key: _greedy.decode(offloaded[key].model, PROMPTS[key]) for key in MODELS}


@pytest.fixture(scope="module")
def vulkan_forced(offloaded: dict[str, Offloaded],
                  cpu_traces: dict[str, Trace]) -> dict[str, Trace]:
    return {key: _greedy.decode(offloaded[key].model, PROMPTS[key],
                                forced=cpu_traces[key].tokens) for key in MODELS}


def _margins(logits: np.ndarray) -> np.ndarray:
    """Best minus second-best logit at each step."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    return np.asarray(top2[:, 1] - top2[:, 0])


def test_vulkan_backend_compiled_in(vulkan_device: dict[str, object]) -> None:
    assert "Vulkan" in llamabind.backends()
    assert "CPU" in llamabind.backends()


def test_vulkan_device_listed(vulkan_device: dict[str, object]) -> None:
    assert str(vulkan_device["name"]).startswith("Vulkan")
    assert vulkan_device["description"]
    assert isinstance(vulkan_device["memory_total"], int)
    assert vulkan_device["memory_total"] > 0


def test_lavapipe_is_a_vulkan_device(vulkan_device: dict[str, object]) -> None:
    devices = _vulkan_devices()
    lavapipe = [d for d in devices if "llvmpipe" in str(d["description"])]
    if not lavapipe:
        # With a real GPU, device 0 is that GPU rather than lavapipe.
        pytest.skip("lavapipe is not among the visible Vulkan devices: "
                    f"{[d['description'] for d in devices]}")
    # ggml-vulkan lists the CPU-type device as a GPU, which is what lets llama.cpp's
    # default device choice (GPUs and iGPUs) put n_gpu_layers on it.
    assert lavapipe[0]["type"] in ("gpu", "igpu"), lavapipe[0]


@pytest.mark.parametrize("key", MODELS)
def test_all_layers_offloaded(key: str, offloaded: dict[str, Offloaded],
                              vulkan_device: dict[str, object]) -> None:
    # llama.cpp says where the layers went only in its log ("offloaded 31/31 layers to
    # GPU"); a model that quietly stayed on the CPU would make the comparisons below
    # compare the CPU with itself.
    model, lines = offloaded[key]
    counts = [re.search(r"offloaded (\d+)/(\d+) layers to GPU", line) for line in lines]
    found = [m for m in counts if m]
    assert found, "llama.cpp logged no offload summary:\n" + "\n".join(lines)
    done, total = int(found[-1][1]), int(found[-1][2])
    assert done == total >= model.n_layer, found[-1][0]
    device = str(vulkan_device["name"])
    assert any(device in line and "model buffer" in line for line in lines), (
        f"no model buffer on {device}:\n" + "\n".join(lines))


def test_generation_offloaded_to_vulkan(offloaded: dict[str, Offloaded],
                                        vulkan_free: dict[str, Trace]) -> None:
    # a real generation through ggml-vulkan says something true
    vocab = offloaded["smollm2"].model.vocab
    text = vocab.detokenize(vulkan_free["smollm2"].tokens.tolist())
    assert "Paris" in text, text


@pytest.mark.parametrize("key", MODELS)
def test_greedy_tokens_match_cpu_build(key: str, vulkan_free: dict[str, Trace],
                                       cpu_traces: dict[str, Trace]) -> None:
    cpu, vk = cpu_traces[key], vulkan_free[key]
    differ = np.flatnonzero(vk.tokens != cpu.tokens)
    if differ.size == 0:
        return
    # from the first difference on, the two decode different texts: nothing to compare
    step = int(differ[0])
    margin = float(_margins(cpu.logits)[step])
    assert margin < NEAR_TIE, (
        f"{key}: Vulkan took token {int(vk.tokens[step])} at step {step}, where the CPU "
        f"build's {int(cpu.tokens[step])} led by {margin:.3f} logits (near tie: under "
        f"{NEAR_TIE}); Vulkan {vk.tokens.tolist()}, CPU {cpu.tokens.tolist()}")


@pytest.mark.parametrize("key", MODELS)
def test_teacher_forced_logits_match_cpu_build(key: str, vulkan_forced: dict[str, Trace],
                                               cpu_traces: dict[str, Trace]) -> None:
    cpu, vk = cpu_traces[key], vulkan_forced[key]
    assert vk.logits.shape == cpu.logits.shape
    assert np.isfinite(vk.logits).all()
    diff = np.abs(vk.logits.astype(np.float64) - cpu.logits)
    worst = float(diff.max())
    assert worst < MAX_ABS, f"{key}: largest logit difference {worst:.3f} at step " \
        f"{int(diff.max(axis=1).argmax())}"
    for step, (v, c) in enumerate(zip(vk.logits, cpu.logits, strict=True)):
        corr = float(np.corrcoef(v, c)[0, 1])
        assert corr > MIN_CORRELATION, f"{key} step {step}: correlation {corr:.4f}"
        pick = int(v.argmax())
        assert c[pick] >= c.max() - NEAR_TIE, (
            f"{key} step {step}: Vulkan picks {pick}, which the CPU rates "
            f"{c.max() - c[pick]:.3f} below its best {int(c.argmax())}")


def test_engine_decodes_two_sequences_on_vulkan(vulkan_device: dict[str, object]) -> None:
    """The batching engine on Vulkan: two requests decoded together in one context on
    the Vulkan device (every layer offloaded). Each gives the tokens it gives alone on
    the same device, or parts from them only where two tokens are within float noise
    (a batch of two sums in another order than one alone), and both run in the same
    steps."""
    path = _model_path("smollm2")
    prompts = [PROMPTS["smollm2"], "Once upon a time, in a small village,"]
    with llamabind.LoadedModel.load(path, n_gpu_layers=-1, n_ctx=256, n_parallel=2,
                                    devices=[str(vulkan_device["name"])]) as model:
        alone = [model.generate(p, temperature=0, max_tokens=12, logprobs=5, ignore_eos=True)
                 for p in prompts]
        steps = model.stats()["steps"]
        both = model.generate_many(prompts, temperature=0, max_tokens=12, ignore_eos=True)
        # together: about 12 steps for 24 tokens (fewer than one step per token)
        assert model.stats()["steps"] - steps < 24
    assert "Paris" in alone[0].text
    for one, two in zip(alone, both, strict=True):
        assert two.completion_tokens == 12
        if two.tokens == one.tokens:
            continue
        d = next(i for i, (a, b) in enumerate(zip(one.tokens, two.tokens, strict=True))
                 if a != b)
        assert one.logprobs is not None
        top = {t: lp for t, _, lp in one.logprobs[d].top}
        assert two.tokens[d] in top and one.logprobs[d].logprob - top[two.tokens[d]] < 0.5, (
            one.tokens, two.tokens)
