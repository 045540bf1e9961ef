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


def _vulkan_build() -> bool:
    from llamabind.buildinfo import build_config

    option = str(build_config().get("options", {}).get("GGML_VULKAN", "OFF"))
    return option.upper() in ("ON", "1", "TRUE", "YES", "Y")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Vulkan tests need a Vulkan build (scripts/test_vulkan.sh makes one and runs
    them). In a CPU build they are deselected, not skipped: nothing in the suite a build
    can run is skipped. LLAMABIND_VULKAN_TESTS=1 keeps them (they then fail loudly on a
    build without Vulkan)."""
    import os

    if os.environ.get("LLAMABIND_VULKAN_TESTS") == "1" or _vulkan_build():
        return
    vulkan = [item for item in items if item.get_closest_marker("vulkan")]
    if vulkan:
        config.hook.pytest_deselected(items=vulkan)
        items[:] = [item for item in items if not item.get_closest_marker("vulkan")]


def pytest_report_header(config: pytest.Config) -> str:
    if _vulkan_build():
        return "llamabind build: Vulkan backend compiled in"
    return ("llamabind build: CPU only; the Vulkan tests are deselected "
            "(scripts/test_vulkan.sh builds with Vulkan and runs them)")
