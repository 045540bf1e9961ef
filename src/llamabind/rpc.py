"""``llamabind rpc-server``: a ggml RPC worker from this very build.

A worker offers its devices (its GPUs, else its CPU) to clients that load a model
with ``rpc_servers=["host:port", ...]``; it serves one client at a time. The worker
is ggml's own server function, run with the GIL released in a thread of its own
while the main thread waits for SIGINT or SIGTERM, which end the process at once:
ggml's server loop has no way to be stopped, and a client loses its connection
either way. The protocol has no authentication: a worker belongs on loopback or a
private network only, and binding to any other address prints a warning saying so.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["add_command", "cache_directory", "run_server"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50052

_WARNING = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
WARNING: this RPC worker listens on {host}, not on loopback (127.0.0.1).
         ggml's RPC protocol has no authentication and no encryption: anyone
         who can reach this port can run code on its devices and read or
         change what they hold. Never expose it to an open network; use a
         private network (or a firewall that admits only your clients).
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def cache_directory() -> Path:
    """Where ``--cache`` keeps tensors a client sent: the directory llama.cpp's own
    ``rpc-server -c`` uses (``$LLAMA_CACHE``, else ``$XDG_CACHE_HOME/llama.cpp``, else
    ``~/.cache/llama.cpp``, then ``rpc/``), so that both share one cache."""
    base = os.environ.get("LLAMA_CACHE")
    if base:
        return Path(base) / "rpc"
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg else Path.home() / ".cache"
    return root / "llama.cpp" / "rpc"


def add_command(sub: Any) -> None:
    """Register ``rpc-server`` on the ``llamabind`` command's subparsers."""
    p = sub.add_parser(
        "rpc-server", help="run a ggml RPC worker (layers offloaded from other machines)",
        description="Run a ggml RPC worker from this build. Clients load a model with "
                    "rpc_servers=['HOST:PORT'] (or `llamabind run --rpc HOST:PORT`). The "
                    "protocol has no authentication: keep workers on a private network.")
    p.add_argument("-H", "--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}; any other prints "
                        "a security warning)")
    p.add_argument("-p", "--port", type=int, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="threads of the CPU device (default: the physical cores)")
    p.add_argument("-d", "--device", default=None,
                   help="comma-separated devices to offer (default: the GPUs, else the CPU; "
                        "names as `llamabind info` lists them)")
    p.add_argument("-c", "--cache", action="store_true",
                   help=f"keep large tensors on disk, so a client's reload skips sending "
                        f"them ({cache_directory()})")
    p.set_defaults(func=run_server)


def _fail(message: str, status: int = 1) -> int:
    print(f"llamabind rpc-server: {message}", file=sys.stderr)
    return status


def run_server(args: argparse.Namespace) -> int:
    """Run the worker until SIGINT or SIGTERM (exit status 0), or until ggml's server
    stops on its own (exit status 1)."""
    from llamabind import _llama, default_threads

    if not 1 <= args.port <= 65535:
        return _fail(f"--port must be in [1, 65535], got {args.port}", 2)
    threads = default_threads() if args.threads is None else args.threads
    if threads < 1:
        return _fail(f"--threads must be >= 1, got {threads}", 2)
    try:
        # ggml's server binds an IPv4 address given as digits
        address = socket.getaddrinfo(args.host, args.port, socket.AF_INET,
                                     socket.SOCK_STREAM)[0][4][0]
    except OSError as exc:
        return _fail(f"--host {args.host!r} is not an IPv4 address or a name of one ({exc})",
                     2)
    if not ipaddress.ip_address(address).is_loopback:
        sys.stderr.write(_WARNING.format(host=address))
        sys.stderr.flush()
    names = [n for n in args.device.split(",") if n] if args.device else None
    cache = None
    if args.cache:
        cache_path = cache_directory()
        try:
            cache_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return _fail(f"cannot create the cache directory {cache_path}: {exc}")
        cache = str(cache_path)
    # ggml's server says only "Failed to create server socket": try the address first
    # to say why (in use, not an address of this machine, no permission)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((address, args.port))
    except OSError as exc:
        return _fail(f"cannot listen on {address}:{args.port}: {exc.strerror or exc}")

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("llamabind rpc-server: %(message)s"))
    handler.setLevel(logging.WARNING)
    logging.getLogger("llamabind").addHandler(handler)

    failure: list[BaseException] = []

    def serve() -> None:
        try:
            _llama._rpc_serve(f"{address}:{args.port}", cache, threads, names)
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    stop = {signal.SIGINT, signal.SIGTERM}
    # blocked before the thread starts, so that it inherits the mask: the signals reach
    # only sigtimedwait below, and never interrupt ggml's accept() or recv()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        worker = threading.Thread(target=serve, name="llamabind-rpc-server", daemon=True)
        worker.start()
        while worker.is_alive():
            received = signal.sigtimedwait(stop, 0.5)
            if received is not None:
                name = signal.Signals(received.si_signo).name
                sys.stdout.flush()
                print(f"llamabind rpc-server: stopped ({name})", file=sys.stderr, flush=True)
                # ggml's server thread cannot be joined; ending the process here also
                # skips C++ static destructors that the thread might still be using
                os._exit(0)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if failure:
        from llamabind.errors import LlamaError

        if isinstance(failure[0], LlamaError):
            return _fail(str(failure[0]))
        raise failure[0]
    print(f"llamabind rpc-server: ggml's server stopped on {address}:{args.port} "
          "(see its message above)", file=sys.stderr)
    return 1
