"""Fork safety: objects made before os.fork() raise ForkError in the child (never
deadlock, never crash), closing them there is harmless, and a model loaded in the
child works, also while the parent was generating in another thread at fork time and
under multiprocessing's 'fork' start method.

The forking runs in a child Python process (tests/children/fork.py: forking pytest
itself, with its threads, is not something to do in a test); every forked process runs
under a timeout, so a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import pytest
from _subproc import messages_by_tag, run_child

pytestmark = pytest.mark.model

# forked children per run: each loads the model anew and generates (~0.4 s)
BUSY_FORKS = 8


def test_fork_child_gets_fork_error_and_can_load_anew(smol_path: str) -> None:
    child, msgs = run_child("fork", "uses", smol_path, timeout=600)
    assert child.proc.returncode == 0, child.describe()
    got = messages_by_tag(msgs)

    uses = got["uses"]["results"]
    wrong = {name: res for name, res in uses.items() if res.get("exc") != "ForkError"}
    assert not wrong, f"not ForkError in the forked child: {wrong}"
    assert all("fork" in res["msg"] for res in uses.values())

    assert got["close"]["result"] == {"ok": "closed"}

    new = got["new-model"]
    assert new["result"] == {"ok": new["expected"]}

    assert got["parent"] == {"tokens": new["expected"], "eval_ok": True}


def test_fork_while_another_thread_decodes(smol_path: str) -> None:
    """Forks taken while a parent thread is inside llama_decode/sampling: every child
    loads the model anew and generates the same tokens; none deadlocks on a lock the
    busy thread held at the fork. (scripts/asan_check.sh leaves this test out: GCC 12's
    ASan allocator has no fork handlers, so a child deadlocks in ASan's own malloc lock;
    see the script.)"""
    child, msgs = run_child("fork", "busy", smol_path, str(BUSY_FORKS), timeout=600)
    assert child.proc.returncode == 0, child.describe()
    got = messages_by_tag(msgs)
    busy = got["busy-parent"]
    assert busy["results"] == [{"ok": busy["expected"]}] * BUSY_FORKS, busy["results"]
    assert got["parent"] == {"tokens": busy["expected"], "eval_ok": True}


def test_multiprocessing_fork_start_method(smol_path: str) -> None:
    child, msgs = run_child("fork", "multiprocessing", smol_path, timeout=600)
    assert child.proc.returncode == 0, child.describe()
    res = messages_by_tag(msgs)["result"]
    assert res["inherited"] == ["ForkError"] * 4
    assert res["own"] == [res["expected"]] * 4
    assert res["single"] == ["ForkError", res["expected"]]
    assert res["exitcode"] == 0
