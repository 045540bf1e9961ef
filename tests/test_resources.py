"""Memory and lifetime: no growth over many loads and generations, close() frees
native memory at once (no garbage collection needed), context managers, ResourceWarning
for objects left open, and a clean interpreter exit with objects left open and a
daemon thread still generating.

Everything runs in child processes (tests/children/resources.py): RSS (VmRSS from
/proc/self/status) is measured in a process that runs nothing else, and a crash at
exit shows as a signal there.
A model loaded with mmap (the default) is freed when its file is no longer mapped
(/proc/self/maps); one loaded without mmap when the RSS drops by its size.
"""

from __future__ import annotations

import pytest
from _subproc import messages_by_tag, record, run_child

pytestmark = pytest.mark.model

GROWTH_LIMIT_KB = 20 * 1024


def _ok(child) -> None:
    rc = child.proc.returncode
    assert rc == 0, f"child exited with {rc} (negative: killed by that signal)\n" + child.describe()
    assert "Fatal Python error" not in child.stderr, child.describe()


# --- no growth ------------------------------------------------------------------------------

def _growth(smol_path: str, scenario: str, name: str) -> dict:
    """Run a no-growth scenario; record and check its RSS growth and time."""
    child, msgs = run_child("resources", scenario, smol_path, timeout=600)
    _ok(child)
    res = messages_by_tag(msgs)["result"]
    growth = res["end"] - res["base"]
    record(f"resources.{name}_rss_growth_kb", growth, "kB")
    record(f"resources.{name}_seconds", round(res["seconds"], 1), "s")
    assert growth < GROWTH_LIMIT_KB, res
    return res


@pytest.mark.slow
def test_200_load_close_cycles_do_not_grow_rss(smol_path: str) -> None:
    res = _growth(smol_path, "load_close", "load_close_200")
    assert not res["mapped"]


@pytest.mark.slow
def test_2000_generations_do_not_grow_rss(smol_path: str) -> None:
    _growth(smol_path, "generations", "generations_2000")


# --- close() frees at once ------------------------------------------------------------------

def test_close_frees_native_memory_at_once(smol_path: str) -> None:
    child, msgs = run_child("resources", "close_frees", smol_path, timeout=180)
    _ok(child)
    res = messages_by_tag(msgs)["result"]
    r0, r1, r2, r3, r4, r5, r6, r7 = res["r"]
    mb = 1024
    # loading put the weights in memory, and close() gave them back
    assert r1 - r0 > 60 * mb, res
    assert r3 - r4 > 0.8 * (r1 - r0), res
    # the context's KV cache (4096 cells) was freed by ctx.close()
    assert r2 - r3 > 20 * mb, res
    assert r4 - r0 < 10 * mb, res
    # LoadedModel: session and pooled session KV caches, then the mapped file
    assert r5 - r6 > 20 * mb, res
    assert r6 - r7 > 20 * mb, res
    assert res["mapped_open"] is True and res["mapped_closed"] is False
    record("resources.close_model_freed_kb", r3 - r4, "kB")
    record("resources.close_context_freed_kb", r2 - r3, "kB")


def test_context_managers_close_everything(smol_path: str) -> None:
    child, msgs = run_child("resources", "context_managers", smol_path, timeout=120)
    _ok(child)
    got = messages_by_tag(msgs)
    assert got["core"] == {"inside": True, "closed": [True, True, True],
                           "errors": ["ClosedError"] * 3, "mapped_after": False}
    assert got["api"] == {"closed": [True, True], "errors": ["ClosedError"] * 2,
                          "mapped_after": False}


# --- ResourceWarning ------------------------------------------------------------------------

CTX_W, MODEL_W = "unclosed llamabind.Context", "unclosed llamabind.Model"


def test_unclosed_objects_warn_and_are_freed(smol_path: str) -> None:
    child, msgs = run_child("resources", "unclosed", smol_path, timeout=120)
    _ok(child)
    got = messages_by_tag(msgs)
    # each warned once, and the model's memory is released (the file is unmapped);
    # a context always goes before the model it uses
    assert got["core"]["result"] == [[CTX_W, MODEL_W], False]
    # the session's context, the pooled session's context, the model
    assert got["api"]["result"] == [[CTX_W, CTX_W, MODEL_W], False]
    assert sorted(got["cycle"]["result"][0]) == [CTX_W, MODEL_W]
    assert got["cycle"]["result"][1] is False


def test_context_in_a_reference_cycle_is_freed_before_its_model(smol_path: str) -> None:
    child, msgs = run_child("resources", "unclosed", smol_path, timeout=120)
    _ok(child)
    assert messages_by_tag(msgs)["cycle"]["result"] == [[CTX_W, MODEL_W], False]


def test_recorded_resource_warning_does_not_keep_a_dangling_object(smol_path: str) -> None:
    child, msgs = run_child("resources", "unclosed_recorded", smol_path, timeout=120)
    _ok(child)
    got = messages_by_tag(msgs)
    assert got["recorded"] == {"n": 1, "source_is_none": True}


def test_unclosed_model_is_reported_under_w_error(smol_path: str) -> None:
    child, _ = run_child("resources", "unclosed_strict", smol_path, timeout=120,
                         extra_flags=("-W", "error::ResourceWarning"))
    _ok(child)
    assert "ResourceWarning: unclosed llamabind.Model" in child.stderr


# --- interpreter exit -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["none", "generate",
                                  "eval", "both"])
def test_exit_with_unclosed_objects_and_busy_daemon_thread(smol_path: str, mode: str) -> None:
    child, msgs = run_child("resources", "shutdown", smol_path, mode, timeout=180)
    assert ("exiting", {}) in msgs, child.describe()
    _ok(child)
