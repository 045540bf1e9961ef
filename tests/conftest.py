"""Shared fixtures: the real test models (fetched on demand), loaded once per run."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))

import fetch_models  # noqa: E402

import llamabind  # noqa: E402


def _model_path(key: str) -> str:
    return str(fetch_models.fetch(key))


@pytest.fixture(scope="session")
def smol_path() -> str:
    return _model_path("smollm2")


@pytest.fixture(scope="session")
def qwen_path() -> str:
    return _model_path("qwen2.5-0.5b")


@pytest.fixture(scope="session")
def smol(smol_path: str) -> Iterator[llamabind.Model]:
    model = llamabind.Model(smol_path)
    yield model
    model.close()


@pytest.fixture(scope="session")
def qwen(qwen_path: str) -> Iterator[llamabind.Model]:
    model = llamabind.Model(qwen_path)
    yield model
    model.close()


@pytest.fixture
def ctx(smol: llamabind.Model) -> Iterator[llamabind.Context]:
    context = llamabind.Context(smol, n_ctx=512, n_batch=512, n_threads=2)
    yield context
    context.close()


@pytest.fixture(scope="session")
def loaded_smol(smol_path: str) -> Iterator[llamabind.LoadedModel]:
    model = llamabind.LoadedModel.load(smol_path, n_ctx=1024)
    yield model
    model.close()


@pytest.fixture(scope="session")
def loaded_qwen(qwen_path: str) -> Iterator[llamabind.LoadedModel]:
    model = llamabind.LoadedModel.load(qwen_path, n_ctx=1024)
    yield model
    model.close()


@pytest.fixture(autouse=True)
def _collect_between_tests() -> Iterator[None]:
    yield
    gc.collect()


def _option_on(name: str) -> bool:
    from llamabind.buildinfo import build_config

    option = str(build_config().get("options", {}).get(name, "OFF"))
    return option.upper() in ("ON", "1", "TRUE", "YES", "Y")


def _vulkan_build() -> bool:
    return _option_on("GGML_VULKAN")


def _cuda_build() -> bool:
    return _option_on("GGML_CUDA")


def _deselect(config: pytest.Config, items: list[pytest.Item], marker: str) -> None:
    chosen = [item for item in items if item.get_closest_marker(marker)]
    if chosen:
        config.hook.pytest_deselected(items=chosen)
        items[:] = [item for item in items if not item.get_closest_marker(marker)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Vulkan tests need a Vulkan build (scripts/test_vulkan.sh makes one and runs
    them), the GPU tests a CUDA build (scripts/test_gpu.sh, on a machine with an NVIDIA
    GPU). In a build without that backend they are deselected, not skipped: nothing in
    the suite a build can run is skipped. LLAMABIND_VULKAN_TESTS=1 and
    LLAMABIND_GPU_TESTS=1 keep them (they then fail loudly on a build without it)."""
    import os

    if os.environ.get("LLAMABIND_VULKAN_TESTS") != "1" and not _vulkan_build():
        _deselect(config, items, "vulkan")
    if os.environ.get("LLAMABIND_GPU_TESTS") != "1" and not _cuda_build():
        _deselect(config, items, "gpu")


def pytest_report_header(config: pytest.Config) -> str:
    built = [name for name, on in (("Vulkan", _vulkan_build()), ("CUDA", _cuda_build())) if on]
    if built:
        return f"llamabind build: {' and '.join(built)} backend compiled in"
    return ("llamabind build: CPU only; the Vulkan and GPU tests are deselected "
            "(scripts/test_vulkan.sh and scripts/test_gpu.sh build with them and run them)")
