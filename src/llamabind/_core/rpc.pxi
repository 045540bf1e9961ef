# RPC: ggml's RPC backend, which runs a model's layers in worker processes
# (`llamabind rpc-server`) on other machines. Here: the checks of "host:port"
# endpoints, a probe of each worker (connect and HELLO, with a timeout) before ggml
# connects to it, the workers' devices made through the RPC backend's registry
# (ggml_backend_rpc_add_server), and the worker side (ggml's server function).
#
# ggml's own connect has no timeout and aborted the process on any failure; the
# patches in vendor/llama-cpp-patches.json make a failed connection an error and count
# failures per endpoint, and a Model compares those counts to learn that a worker went
# away. The workers' devices are not added to ggml's global registry: a later model
# that names no workers must not get them.

from libc.stdio cimport _IOLBF, setvbuf, stdout

from ggml_rpc cimport *

import socket as _socket
import struct as _struct

# How long a worker has to accept the connection, and then to answer the HELLO.
cdef double _RPC_TIMEOUT = 5.0

# The HELLO exchange as ggml-rpc.cpp frames it at the pinned commit (protocol 7.x):
# the client sends the command byte 14, the request's size (8 bytes, host order) and
# the request (24 bytes of transport capabilities, all zero: plain TCP); the worker
# answers with its reply's size (8 bytes) and the reply: major, minor, patch, one
# padding byte, 24 bytes of capabilities.
cdef int _RPC_CMD_HELLO = 14
cdef int _RPC_CAPS_SIZE = 24
cdef int _RPC_HELLO_REPLY_SIZE = 4 + 24

# The workers this process is connected to through loaded models. ggml keeps one
# connection per endpoint, shared by every model on it, and a worker serves one
# connection at a time: a probe of such a worker would wait for this very process, so
# it is skipped while the connection is held and has not failed since.
# endpoint -> [fork generation, models loaded, ggml's failure count at the last load]
cdef dict _rpc_held = {}


def rpc_protocol_version():
    """The ggml RPC protocol version this build speaks, e.g. ``(7, 0, 0)``; ``None``
    when the build has no RPC backend."""
    if not llama_supports_rpc():
        return None
    return (RPC_PROTO_MAJOR_VERSION, RPC_PROTO_MINOR_VERSION, RPC_PROTO_PATCH_VERSION)


cdef str _rpc_endpoint(object item):
    """One "host:port" checked and normalised (host lower-cased, port as a number)."""
    if not isinstance(item, str):
        raise InvalidArgumentError(
            f"rpc_servers items must be 'host:port' strings, got {item!r}")
    host, sep, port = item.rpartition(":")
    if not sep:
        raise InvalidArgumentError(f"rpc_servers item {item!r} is not 'host:port'")
    if not host:
        raise InvalidArgumentError(f"rpc_servers item {item!r} has an empty host")
    if (len(host) > 253 or not host.isascii() or not host.isprintable()
            or any(c in host for c in " :[]/@")):
        raise InvalidArgumentError(
            f"rpc_servers item {item!r}: the host must be a host name or an IPv4 address "
            "(ggml's RPC transport speaks IPv4 only)")
    if not (port.isascii() and port.isdigit()) or len(port) > 5 or not 1 <= int(port) <= 65535:
        raise InvalidArgumentError(
            f"rpc_servers item {item!r}: the port must be a number in [1, 65535]")
    return f"{host.lower()}:{int(port)}"


def _rpc_parse_servers(servers):
    """Check ``rpc_servers`` (a list or tuple of "host:port" strings) and return the
    endpoints normalised, as a tuple; ``None`` is no workers."""
    if servers is None:
        return ()
    if not isinstance(servers, (list, tuple)):
        raise InvalidArgumentError(
            f"rpc_servers must be a list of 'host:port' strings, got {servers!r}")
    # (a build without the backend has no limit to check: loading says it has no backend)
    if GGML_RPC_MAX_SERVERS and len(servers) > GGML_RPC_MAX_SERVERS:
        raise InvalidArgumentError(
            f"rpc_servers names {len(servers)} workers; ggml's RPC backend takes at most "
            f"{GGML_RPC_MAX_SERVERS}: {list(servers)!r}")
    endpoints = [_rpc_endpoint(item) for item in servers]
    repeat = _first_repeat(endpoints, list(servers))
    if repeat is not None:
        raise InvalidArgumentError(
            f"rpc_servers names the worker {repeat[0]!r} twice ({repeat[1]!r} and {repeat[2]!r})")
    return tuple(endpoints)


cdef tuple _first_repeat(list keys, list items):
    """The first key that comes twice: (key, the item of its first, of its second), or
    None."""
    cdef dict seen = {}
    for key, item in zip(keys, items):
        if key in seen:
            return key, seen[key], item
        seen[key] = item
    return None


cdef bytes _rpc_recv_exactly(object sock, int n):
    cdef list parts = []
    cdef int got = 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


cdef tuple _rpc_probe(str endpoint):
    """Connect to a worker and exchange HELLO messages, within _RPC_TIMEOUT each, as
    ggml would (its connect has no timeout, so an unreachable host would hang it for
    minutes). Returns the worker's (IPv4, port); raises BackendError naming it."""
    host, _, port_text = endpoint.rpartition(":")
    cdef int port = int(port_text)
    cdef str where = f"RPC worker {endpoint}"
    try:
        infos = _socket.getaddrinfo(host, port, _socket.AF_INET, _socket.SOCK_STREAM)
    except OSError as exc:
        raise BackendError(f"{where}: cannot resolve the host {host!r} ({exc})") from None
    address = infos[0][4]
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        sock.settimeout(_RPC_TIMEOUT)
        try:
            sock.connect(address)
        except ConnectionRefusedError:
            raise BackendError(
                f"{where}: connection refused (nothing listens there; start a worker on "
                f"that machine with: llamabind rpc-server -H <its address> -p {port})") from None
        except TimeoutError:
            raise BackendError(
                f"{where}: no answer to the connection within {_RPC_TIMEOUT:g} s (the host "
                "is down or unreachable, or a firewall drops the packets)") from None
        except OSError as exc:
            raise BackendError(f"{where}: cannot connect ({exc.strerror or exc})") from None
        try:
            sock.sendall(_struct.pack("=BQ", _RPC_CMD_HELLO, _RPC_CAPS_SIZE)
                         + bytes(_RPC_CAPS_SIZE))
            reply = _rpc_recv_exactly(sock, 8 + _RPC_HELLO_REPLY_SIZE)
        except TimeoutError:
            raise BackendError(
                f"{where} accepted the connection but did not answer the RPC HELLO within "
                f"{_RPC_TIMEOUT:g} s: it is not an RPC worker, or it is busy with another "
                "client (a worker serves one client at a time)") from None
        except OSError as exc:
            raise BackendError(
                f"{where}: the connection failed during the RPC HELLO "
                f"({exc.strerror or exc})") from None
    finally:
        sock.close()
    ours = f"{RPC_PROTO_MAJOR_VERSION}.{RPC_PROTO_MINOR_VERSION}.{RPC_PROTO_PATCH_VERSION}"
    same_build = ("start the worker from the same llamabind build (llamabind rpc-server) "
                  f"or from llama.cpp {LLAMABIND_LLAMA_COMMIT.decode()}")
    if len(reply) < 8:
        raise BackendError(
            f"{where} closed the connection without answering the RPC HELLO: it is not "
            f"an RPC worker, or one from a different build that refuses protocol {ours}; "
            f"{same_build}")
    size = _struct.unpack("=Q", reply[:8])[0]
    if size > 4096:
        raise BackendError(
            f"{where} answered the RPC HELLO with something that is no RPC reply "
            f"({reply[:16]!r}...): it is not an RPC worker")
    if size != _RPC_HELLO_REPLY_SIZE or len(reply) < 8 + 3:
        raise BackendError(
            f"{where} answered the RPC HELLO with a {size}-byte reply where protocol "
            f"{ours} has {_RPC_HELLO_REPLY_SIZE}: a worker from a different build; {same_build}")
    major, minor, patch = reply[8], reply[9], reply[10]
    if major != RPC_PROTO_MAJOR_VERSION or minor > RPC_PROTO_MINOR_VERSION:
        raise BackendError(
            f"{where} speaks RPC protocol {major}.{minor}.{patch}, this build speaks {ours}: "
            f"a worker from a different build; {same_build}")
    return address


cdef bint _rpc_connection_held(str endpoint) except -1:
    entry = _rpc_held.get(endpoint)
    if entry is None or entry[1] == 0:
        return False
    if entry[0] != _fork_generation:
        raise ForkError(
            f"this process was forked while a model used RPC worker {endpoint}: ggml's "
            "connection to it belongs to the parent process (and would hang here); load "
            "models on it in a process that did not inherit one")
    return entry[2] == _rpc_failure_counts((endpoint,))[0]


cdef int _rpc_hold(tuple endpoints, tuple failures) except -1:
    """A model on these workers loaded: their connections are held."""
    for endpoint, count in zip(endpoints, failures):
        entry = _rpc_held.get(endpoint)
        if entry is None or entry[0] != _fork_generation:
            entry = _rpc_held[endpoint] = [_fork_generation, 0, count]
        entry[1] += 1
        entry[2] = count
    return 0


cdef void _rpc_release(tuple endpoints) noexcept:
    """A model on these workers was freed (in the process that loaded it)."""
    try:
        for endpoint in endpoints:
            entry = _rpc_held.get(endpoint)
            if entry is not None and entry[0] == _fork_generation and entry[1] > 0:
                entry[1] -= 1
    except BaseException:
        pass


cdef int _rpc_require_backend() except -1:
    _ensure_backend()
    if not llama_supports_rpc():
        raise BackendError(
            "this build of llamabind has no RPC backend (it was built with GGML_RPC=OFF)")
    return 0


cdef tuple _rpc_address(str endpoint):
    """The worker's (IPv4, port), probed unless this process holds a connection to it."""
    if _rpc_connection_held(endpoint):
        host, _, port = endpoint.rpartition(":")
        return (_socket.gethostbyname(host), int(port))
    return _rpc_probe(endpoint)


cdef list _rpc_connect(tuple endpoints):
    """Probe each worker and make its devices. Returns ``[(endpoint, device address)]``
    in the order of ``endpoints`` (a worker may offer several devices)."""
    _rpc_require_backend()
    cdef list out = []
    cdef ggml_backend_reg_t reg
    cdef ggml_backend_dev_t dev
    cdef ggml_backend_buffer_type_t buft
    cdef const char * c_endpoint
    cdef size_t i, n
    repeat = _first_repeat([_rpc_address(endpoint) for endpoint in endpoints], list(endpoints))
    if repeat is not None:
        address, first, second = repeat
        raise InvalidArgumentError(
            f"rpc_servers {first!r} and {second!r} are the same worker "
            f"({address[0]}:{address[1]})")
    for endpoint in endpoints:
        b_endpoint = endpoint.encode()
        c_endpoint = b_endpoint
        _take_recent_errors()
        with nogil:
            reg = ggml_backend_rpc_add_server(c_endpoint)
        if reg == NULL:
            raise _native_error(BackendError, f"RPC worker {endpoint}: ggml could not add it",
                                "it offers no devices")
        n = ggml_backend_reg_dev_count(reg)
        for i in range(n):
            dev = ggml_backend_reg_dev_get(reg, i)
            # the buffer type is made (and kept by ggml) here, where a failure can be
            # reported: later, llama.cpp would dereference the NULL a lost worker gives
            with nogil:
                buft = ggml_backend_dev_buffer_type(dev)
            if buft == NULL:
                raise _native_error(
                    BackendError, f"RPC worker {endpoint}: its device {i} could not be set up")
            out.append((endpoint, <uintptr_t>dev))
    return out


cdef tuple _rpc_failure_counts(tuple endpoints):
    """ggml's count of failed connections, per endpoint (vendor patch)."""
    cdef list counts = []
    for endpoint in endpoints:
        b_endpoint = endpoint.encode()
        counts.append(ggml_backend_rpc_endpoint_failures(b_endpoint))
    return tuple(counts)


cdef ggml_backend_dev_t * _rpc_model_devices(tuple endpoints, object names,
                                             size_t n_dev_max, object tensor_split) except NULL:
    """The workers' devices first (llama.cpp's own order: fewer network transfers),
    then the local ones: those named, or the GPUs llama.cpp would choose itself."""
    local = _device_addresses(names) if names is not None else _local_default_devices()
    remote = [address for _, address in _rpc_connect(endpoints)]
    cdef size_t n = len(remote) + len(local)
    if n > n_dev_max:
        raise InvalidArgumentError(
            f"rpc_servers={list(endpoints)!r} offer {len(remote)} devices, and this machine "
            f"{len(local)}: llama.cpp takes at most {n_dev_max}")
    if tensor_split is not None and len(tensor_split) > n:
        # llama.cpp would ignore the extra weights; a weight meant for this CPU is the
        # likely mistake (the CPU takes what n_gpu_layers leaves, not a share)
        listed = [ggml_backend_dev_name(<ggml_backend_dev_t><uintptr_t>a).decode()
                  for a in remote + local]
        raise InvalidArgumentError(
            f"tensor_split={list(tensor_split)!r} has {len(tensor_split)} weights for "
            f"{n} devices {listed}: this CPU is not one of them (it keeps the first layers "
            "when n_gpu_layers leaves some)")
    return _device_array(remote + local)


cdef list _rpc_lost(tuple endpoints, tuple counts):
    """The endpoints whose connection failed since ``counts`` were taken."""
    return [endpoint for endpoint, before, now in
            zip(endpoints, counts, _rpc_failure_counts(endpoints)) if now != before]


cdef list _local_default_devices():
    """The local devices llama.cpp offloads to when a model names none: the GPUs (one
    per device id, when two backends see the same GPU), else the integrated GPUs of
    one backend. Mirrors llama_prepare_model_devices, which cannot be asked for it."""
    cdef list gpus = [], ids = [], igpus = []
    cdef ggml_backend_dev_t dev
    cdef ggml_backend_dev_props props
    cdef ggml_backend_dev_type kind
    cdef size_t i
    for i in range(ggml_backend_dev_count()):
        dev = ggml_backend_dev_get(i)
        kind = ggml_backend_dev_get_type(dev)
        if kind == GGML_BACKEND_DEVICE_TYPE_GPU:
            with nogil:
                ggml_backend_dev_get_props(dev, &props)
            device_id = None if props.device_id == NULL else <bytes>props.device_id
            if device_id is not None and device_id in ids:
                continue
            ids.append(device_id)
            gpus.append(<uintptr_t>dev)
        elif kind == GGML_BACKEND_DEVICE_TYPE_IGPU:
            if not igpus or ggml_backend_dev_backend_reg(dev) == ggml_backend_dev_backend_reg(
                    <ggml_backend_dev_t><uintptr_t>igpus[len(igpus) - 1]):
                igpus.append(<uintptr_t>dev)
    return gpus if gpus else igpus


cdef list _rpc_device_info(tuple endpoints, size_t first_index):
    """devices() entries for the workers' devices."""
    cdef list out = []
    cdef ggml_backend_dev_t dev
    cdef size_t free_mem, total_mem
    for endpoint, address in _rpc_connect(endpoints):
        dev = <ggml_backend_dev_t><uintptr_t>address
        free_mem = total_mem = 0
        with nogil:
            ggml_backend_dev_memory(dev, &free_mem, &total_mem)
        out.append({
            "index": first_index + len(out),
            "name": ggml_backend_dev_name(dev).decode("utf-8", "replace"),
            "description": ggml_backend_dev_description(dev).decode("utf-8", "replace"),
            "type": _DEVICE_TYPES.get(ggml_backend_dev_get_type(dev), "unknown"),
            "backend": "RPC",
            "memory_free": free_mem,
            "memory_total": total_mem,
        })
    return out


def _rpc_serve(str endpoint, cache_dir, int n_threads, device_names):
    """Run ggml's RPC worker on ``endpoint`` ("IPv4:port"), with the GIL released,
    until the process ends; returns only when ggml's server gives up (it could not
    listen). ``device_names``: the local devices to offer, or None for ggml's tool's
    choice (every GPU and accelerator-free device, else the CPU). ggml prints its
    banner and each client connection to stdout, made line-buffered here."""
    _rpc_require_backend()
    if n_threads < 1:
        raise InvalidArgumentError(f"threads must be >= 1, got {n_threads}")
    cdef list chosen = []
    cdef ggml_backend_dev_t dev
    cdef ggml_backend_dev_type kind
    cdef size_t i
    if device_names:
        chosen = _device_addresses(device_names)
    else:
        for i in range(ggml_backend_dev_count()):
            dev = ggml_backend_dev_get(i)
            kind = ggml_backend_dev_get_type(dev)
            if kind != GGML_BACKEND_DEVICE_TYPE_CPU and kind != GGML_BACKEND_DEVICE_TYPE_ACCEL:
                chosen.append(<uintptr_t>dev)
        if not chosen:
            for i in range(ggml_backend_dev_count()):
                dev = ggml_backend_dev_get(i)
                if ggml_backend_dev_get_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU:
                    chosen.append(<uintptr_t>dev)
                    break
    if not chosen:
        raise BackendError("no device to offer: ggml found none")
    b_endpoint = endpoint.encode()
    b_cache = None if cache_dir is None else os.fsencode(cache_dir)
    cdef const char * c_endpoint = b_endpoint
    cdef const char * c_cache = NULL
    if b_cache is not None:
        c_cache = b_cache
    cdef size_t n = len(chosen)
    cdef size_t threads = n_threads
    cdef ggml_backend_dev_t * devs = _device_array(chosen)
    setvbuf(stdout, NULL, _IOLBF, 0)
    with nogil:
        ggml_backend_rpc_start_server(c_endpoint, c_cache, threads, n, devs)
    free(devs)
