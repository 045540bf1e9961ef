"""scripts/test_gpu.sh on a machine with no GPU: it must name what is missing and stop
at once, with a distinct exit code, and never hang on a probe.

Stand-in ``nvcc`` and ``nvidia-smi`` scripts (in a temporary bin directory put first on
PATH) play the toolkit and the driver, so these run the same on any machine: without
a GPU, as in CI, and on a GPU machine alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "test_gpu.sh"

FAKE_NVCC = """#!/bin/sh
echo "nvcc: NVIDIA (R) Cuda compiler driver"
echo "Cuda compilation tools, release 13.0, V13.0.48"
"""
NO_DRIVER = """#!/bin/sh
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." >&2
exit 9
"""
HANGS = """#!/bin/sh
sleep 60
"""
ONE_H200 = """#!/bin/sh
echo "NVIDIA H200, 9.0, 143771 MiB, 580.159.04"
"""


def _tool(bin_dir: Path, name: str, text: str) -> Path:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def _run(tmp_path: Path, *args: str, nvidia_smi: str | None,
         cudacxx: str, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi is not None:
        _tool(bin_dir, "nvidia-smi", nvidia_smi)
    # the script's Python checks run under this interpreter; nothing else of the
    # machine's PATH (which may hold a real nvcc or nvidia-smi) is seen
    _tool(bin_dir, "python3", f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path),
                "CUDACXX": cudacxx, "OUT": str(tmp_path / "out"), **env}
    for name in ("cmake", "ninja"):
        found = _which(name)
        if found:
            _tool(bin_dir, name, f'#!/bin/sh\nexec {found} "$@"\n')
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


def _which(name: str) -> str | None:
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def test_no_cuda_toolkit(tmp_path: Path) -> None:
    proc = _run(tmp_path, nvidia_smi=NO_DRIVER, cudacxx=str(tmp_path / "no" / "nvcc"))
    assert proc.returncode == 3, proc.stderr
    assert "no CUDA toolkit" in proc.stderr
    assert f"CUDACXX={tmp_path / 'no' / 'nvcc'} is not an executable" in proc.stderr
    # every missing piece is named, not only the first
    assert "no NVIDIA GPU" in proc.stderr
    assert "nothing was built or run" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_toolkit_but_no_gpu(tmp_path: Path) -> None:
    nvcc = _tool(tmp_path / "cuda", "nvcc", FAKE_NVCC)
    proc = _run(tmp_path, nvidia_smi=NO_DRIVER, cudacxx=str(nvcc))
    assert proc.returncode == 4, proc.stderr
    assert "found: CUDA toolkit 13.0" in proc.stderr
    assert "no NVIDIA GPU: nvidia-smi found none (exit 9: NVIDIA-SMI has failed" in proc.stderr
    assert "no CUDA toolkit" not in proc.stderr


def test_no_driver_at_all(tmp_path: Path) -> None:
    nvcc = _tool(tmp_path / "cuda", "nvcc", FAKE_NVCC)
    proc = _run(tmp_path, nvidia_smi=None, cudacxx=str(nvcc))
    assert proc.returncode == 4, proc.stderr
    assert "no NVIDIA GPU: nvidia-smi is not on PATH" in proc.stderr


def test_a_probe_that_hangs_is_cut_off(tmp_path: Path) -> None:
    nvcc = _tool(tmp_path / "cuda", "nvcc", FAKE_NVCC)
    proc = _run(tmp_path, nvidia_smi=HANGS, cudacxx=str(nvcc), timeout_s=40,
                LLAMABIND_GPU_PROBE_TIMEOUT="2")
    assert proc.returncode == 4, proc.stderr
    assert "no NVIDIA GPU: nvidia-smi did not answer within 2 s" in proc.stderr


def test_dry_run_reads_the_cards_architecture(tmp_path: Path) -> None:
    nvcc = _tool(tmp_path / "cuda", "nvcc", FAKE_NVCC)
    proc = _run(tmp_path, "--dry-run", "--no-vulkan", nvidia_smi=ONE_H200, cudacxx=str(nvcc))
    assert "found: GPU: NVIDIA H200, compute capability 9.0 (CUDA architecture 90)" in (
        proc.stderr)
    assert "no NVIDIA GPU" not in proc.stderr and "no CUDA toolkit" not in proc.stderr
    if proc.returncode == 0:
        assert "plan: CUDA architecture 90, Vulkan off" in proc.stderr
        assert "dry run: the checks passed" in proc.stderr
    else:
        # this interpreter lacks a build package (Cython is a build-time requirement,
        # not a test extra): named, and nothing started
        assert proc.returncode == 5, proc.stderr
        assert "MISSING:" in proc.stderr and "nothing was built or run" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--arch", "ninety", nvidia_smi=None, cudacxx="/none")
    assert proc.returncode == 2
    assert "--arch: 'ninety' is not like 90" in proc.stderr
    proc = _run(tmp_path, "--frobnicate", nvidia_smi=None, cudacxx="/none")
    assert proc.returncode == 2
    assert "unknown argument: --frobnicate" in proc.stderr
