"""The ``llamabind`` command: generate, chat, info, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file (default: $LLAMABIND_MODEL or the fetched SmolLM2-135M)")
    p.add_argument("-c", "--n-ctx", type=int, default=2048, help="context length (2048)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=None,
                   help="layers to offload (default: all with a GPU backend, else 0)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (physical cores)")
    _rpc_arg(p)


def _rpc_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpc", default=None, metavar="HOST:PORT,...",
                   help="ggml RPC workers (`llamabind rpc-server`) to offload layers to")


def _rpc_servers(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(s for s in (args.rpc or "").split(",") if s)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=256)
    p.add_argument("--temperature", "--temp", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _load(args: argparse.Namespace) -> Any:
    from llamabind import ContextConfig, LoadedModel

    return LoadedModel.load(args.model, n_gpu_layers=args.n_gpu_layers,
                            context=ContextConfig(context_length=args.n_ctx,
                                                  threads=args.threads),
                            rpc_servers=_rpc_servers(args), progress=True)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "repeat_penalty": args.repeat_penalty, "seed": args.seed,
            "stop": tuple(args.stop)}


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    with _load(args) as model:
        if args.json:
            result = model.generate(prompt, **_options(args))
            json.dump({"text": result.text, "prompt_tokens": result.prompt_tokens,
                       "completion_tokens": result.completion_tokens,
                       "finish_reason": result.finish_reason,
                       "tokens_per_second": round(result.tokens_per_second, 2),
                       "prompt_eval_ms": round(result.prompt_eval_ms, 3),
                       "generation_ms": round(result.generation_ms, 3)},
                      sys.stdout, ensure_ascii=False)
            sys.stdout.write("\n")
            return 0
        if args.echo:
            sys.stdout.write(prompt)
        for piece in model.stream(prompt, **_options(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    with _load(args) as model:
        session = model.create_session()
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            pieces = []
            try:
                for piece in session.stream_chat(messages, **_options(args)):
                    pieces.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                sys.stdout.write(" [interrupted]")
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(pieces)})
        session.close()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import llamabind

    info: dict[str, Any] = {"build": llamabind.build_info(rpc_servers=_rpc_servers(args))}
    if args.model or not args.build_only:
        path = args.model or llamabind.default_model_path()
        if os.path.exists(path):
            model = llamabind.Model(path, vocab_only=False)
            try:
                info["model"] = {
                    "path": path, "description": model.description, "ftype": model.ftype,
                    "n_params": model.n_params, "size": model.size,
                    "n_ctx_train": model.n_ctx_train, "n_embd": model.n_embd,
                    "n_layer": model.n_layer, "n_head": model.n_head,
                    "n_vocab": model.n_vocab,
                    "has_chat_template": model.chat_template() is not None,
                    "metadata": model.metadata if args.metadata else None,
                }
            finally:
                model.close()
    if args.json:
        json.dump(info, sys.stdout, indent=2, ensure_ascii=False, default=str)
        sys.stdout.write("\n")
        return 0
    build = info["build"]
    print(f"llamabind {build['llamabind_version']}  llama.cpp {build['llama_cpp_version']} "
          f"({build['llama_cpp_commit']}), ggml {build['ggml_version']}")
    print(f"backends: {', '.join(build['backends'])}")
    for d in build["devices"]:
        mem = d["memory_total"] / 2**30
        print(f"device {d['index']}: {d['name']} ({d['type']}, {d['description']}, "
              f"{mem:.1f} GiB)")
    print(f"cpu features: {' '.join(build['cpu_features'])}")
    print(f"build: {build['build_type']}, {build['compiler']}")
    if "model" in info:
        m = info["model"]
        print(f"model: {m['path']}\n  {m['description']}, {m['n_params']:,} parameters, "
              f"{m['size'] / 2**20:.1f} MiB, n_ctx_train {m['n_ctx_train']}, "
              f"{m['n_layer']} layers, vocab {m['n_vocab']}")
        if m["metadata"]:
            for k, v in m["metadata"].items():
                print(f"  {k} = {v[:100]}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from llamabind_bench import main as bench_main  # type: ignore[import-not-found]
    except ImportError:
        here = os.path.dirname(os.path.abspath(__file__))
        bench_dir = os.path.normpath(os.path.join(here, "..", "..", "benchmarks"))
        if not os.path.isdir(bench_dir):
            print("llamabind bench needs a source checkout (benchmarks/ directory)",
                  file=sys.stderr)
            return 2
        sys.path.insert(0, bench_dir)
        from bench import main as bench_main  # type: ignore[import-not-found]
    return int(bench_main(args.bench_args))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamabind", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", aliases=["run"], help="stream a completion to stdout")
    p.add_argument("prompt", nargs="?", default=None, help="prompt (default: read stdin)")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON result")
    p.add_argument("--echo", action="store_true", help="print the prompt first")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with history")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="build, device and model information")
    p.add_argument("-m", "--model", default=None)
    p.add_argument("--build-only", action="store_true", help="no model information")
    p.add_argument("--metadata", action="store_true", help="include all GGUF metadata")
    p.add_argument("--json", action="store_true")
    _rpc_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="benchmark against native llama.cpp (benchmarks/)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    from llamabind.rpc import add_command as add_rpc_server_command

    add_rpc_server_command(sub)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from llamabind.errors import LlamaError

        if isinstance(exc, LlamaError):
            print(f"llamabind: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
