"""What this installation of llamabind was built with and what it finds at run time."""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

from llamabind import _llama

__all__ = ["build_config", "build_info"]


def build_config() -> dict[str, Any]:
    """The CMake configuration recorded at build time (llama.cpp pin, GGML_*/LLAMA_*
    options, compiler)."""
    path = resources.files("llamabind").joinpath("build_config.json")
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        import os

        # an editable install keeps the file next to the compiled module
        alt = os.path.join(os.path.dirname(_llama.__file__), "build_config.json")
        with open(alt, encoding="utf-8") as fh:
            data = json.load(fh)
    return data


def build_info(rpc_servers: Sequence[str] | None = None) -> dict[str, Any]:
    """llama.cpp version and commit, the backends compiled in, the devices found now
    (name, type, memory; with ``rpc_servers``, also those RPC workers' devices), the
    CPU features in use, and the build options."""
    config = build_config()
    native = _llama.native_info()
    return {
        "llamabind_version": _version(),
        "llama_cpp_commit": native["llama_cpp_commit"],
        "llama_cpp_version": native["llama_cpp_version"],
        "ggml_version": native["ggml_version"],
        "backends": _llama.backends(),
        "devices": _llama.devices(rpc_servers=rpc_servers or None),
        "rpc_protocol": _llama.rpc_protocol_version(),
        "cpu_features": [k for k, v in _llama.cpu_features().items() if v],
        "system_info": _llama.system_info(),
        "supports_gpu_offload": native["supports_gpu_offload"],
        "supports_mmap": native["supports_mmap"],
        "supports_mlock": native["supports_mlock"],
        "supports_rpc": native["supports_rpc"],
        "build_type": config.get("build_type"),
        "compiler": config.get("compiler"),
        "options": config.get("options", {}),
    }


def _version() -> str:
    from llamabind import __version__

    return __version__
