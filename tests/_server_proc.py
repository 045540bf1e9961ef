"""A real ``llamabind serve`` process on a free loopback port, for the server tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

_LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)/v1")


class ServerProcess:
    """``python -m llamabind serve ... --port 0``; ``base_url`` once it listens.

    Its stderr (the server's logs) goes to a file, read back by ``log()``.
    """

    def __init__(self, model: str, *args: str, startup_timeout: float = 180.0) -> None:
        self._log = tempfile.NamedTemporaryFile(prefix="llamabind-serve-", suffix=".log",
                                                delete=False)
        env = dict(os.environ, GGML_NO_BACKTRACE="1", OMP_NUM_THREADS="1")
        env.pop("LLAMABIND_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llamabind", "serve", "-m", model, "--host", "127.0.0.1",
             "--port", "0", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log, env=env)
        self.port = self._wait_listening(startup_timeout)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def _wait_listening(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = _LISTENING.search(self.log())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-4000:]}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"the server did not start in {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        with open(self._log.name, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        """The server process's resident memory (VmRSS)."""
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log.name)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} (comments left out)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


def sse_events(lines: Sequence[str]) -> list[str]:
    """The ``data:`` payloads of a server-sent-events body."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]
