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
