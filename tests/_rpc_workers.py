"""RPC workers for the tests: ``llamabind rpc-server`` processes on free loopback ports,
and a fake worker that speaks ggml's RPC framing and can answer a chosen way or hang
up at a chosen command (to reach the client's failure paths without a real crash).

Imported by tests/test_rpc.py and by the child processes it starts.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import llamabind

# ggml-rpc.cpp's commands (enum rpc_cmd) and the sizes of the replies the client waits
# for (commands missing here get no reply)
ALLOC_BUFFER, GET_ALIGNMENT, GET_MAX_SIZE, BUFFER_GET_BASE = 0, 1, 2, 3
GET_DEVICE_MEMORY, GET_ALLOC_SIZE, HELLO, DEVICE_COUNT = 11, 13, 14, 15
SET_TENSOR_HASH, GET_TENSOR, COPY_TENSOR = 7, 8, 9


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Worker:
    """A ``python -m llamabind rpc-server`` process on 127.0.0.1."""

    def __init__(self, port: int | None = None, threads: int = 1,
                 cache_env: dict[str, str] | None = None) -> None:
        """``cache_env``: run with ``--cache`` and these environment variables added."""
        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "llamabind", "rpc-server", "-p", str(self.port),
               "-t", str(threads)]
        env = None
        if cache_env is not None:
            cmd.append("--cache")
            env = dict(os.environ, **cache_env)
        # ggml prints two lines per client connection to stdout: not kept, lest a full
        # pipe block the worker
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=env)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                llamabind.devices(rpc_servers=[self.endpoint])
                return
            except llamabind.BackendError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    _, err = self.proc.communicate()
                    raise RuntimeError(f"rpc-server on {self.endpoint} did not start: "
                                       f"{err}") from None
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, str]:
        """Send ``sig``; returns the exit status and stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            _, err = self.proc.communicate()
            return -999, err
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _recv(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client closed")
        data += chunk
    return data


def _reply(cmd: int, version: tuple[int, int, int]) -> bytes | None:
    u64 = struct.Struct("=Q")
    if cmd == HELLO:
        body = bytes([*version, 0]) + bytes(24)
    elif cmd == DEVICE_COUNT:
        body = struct.pack("=I", 1)
    elif cmd in (GET_ALIGNMENT,):
        body = u64.pack(32)
    elif cmd == GET_MAX_SIZE:
        body = u64.pack(1 << 40)
    elif cmd == GET_DEVICE_MEMORY:
        body = u64.pack(1 << 30) * 2
    elif cmd == ALLOC_BUFFER:
        body = u64.pack(0x10000) + u64.pack(1 << 30)
    elif cmd == BUFFER_GET_BASE:
        body = u64.pack(0x7F0000000000)
    elif cmd == GET_ALLOC_SIZE:
        body = u64.pack(0)
    elif cmd in (SET_TENSOR_HASH, COPY_TENSOR):
        body = b"\x00"
    else:
        return None
    return u64.pack(len(body)) + body


class FakeWorker:
    """A loopback server framed like a ggml RPC worker. ``plan(n)`` gives, for the
    n-th connection (0: llamabind's probe), ``(version, hang_up_at)``: the protocol
    version its HELLO answers with, and the command at which it closes the connection
    without answering (None: never)."""

    def __init__(self, plan: Callable[[int], tuple[tuple[int, int, int], int | None]]) -> None:
        self._plan = plan
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(4)
        self.endpoint = f"127.0.0.1:{self._server.getsockname()[1]}"
        self.commands: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            version, hang_up_at = self._plan(n)
            n += 1
            with conn:
                try:
                    self._serve(conn, version, hang_up_at)
                except (ConnectionError, OSError):
                    pass

    def _serve(self, conn: socket.socket, version: tuple[int, int, int],
               hang_up_at: int | None) -> None:
        while True:
            cmd = _recv(conn, 1)[0]
            size = struct.unpack("=Q", _recv(conn, 8))[0]
            _recv(conn, size)
            self.commands.append(cmd)
            if cmd == hang_up_at:
                return
            reply = _reply(cmd, version)
            if reply is not None:
                conn.sendall(reply)

    def close(self) -> None:
        self._server.close()
