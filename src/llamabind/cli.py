"""The ``llamabind`` command: generate, chat, info, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


# The flags come from the parameter table (llamabind.config): each option with
# command-line flags there (llama.cpp's own: -c/--ctx-size, -t/--threads, --temp...)
# becomes a flag here, with its rule and default stated once, in the table.

def _add_options(p: argparse.ArgumentParser, cls: type, title: str,
                 skip: frozenset[str] = frozenset()) -> None:
    from dataclasses import fields

    from llamabind.config import default_option

    group = p.add_argument_group(title)
    for f in fields(cls):
        spec = f.metadata["spec"]
        if not spec.cli or f.name in skip:
            continue
        default = default_option(cls, f.name)
        help_text = spec.doc or spec.expected()
        if f.name == "path":
            help_text += " (default: $LLAMABIND_MODEL or the fetched SmolLM2-135M)"
        elif default is not None and default != () and spec.kind != "bool":
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if spec.kind == "bool":
            kwargs.update(action="store_true")
        elif spec.kind == "int":
            kwargs.update(type=int, metavar="N")
        elif spec.kind == "float":
            kwargs.update(type=float, metavar="X")
        elif spec.kind == "choice":
            kwargs.update(choices=spec.choices)
        elif f.name == "stop":
            kwargs.update(action="append", metavar="TEXT")
        elif f.name in ("tensor_split", "devices", "rpc_servers"):
            kwargs.update(type=_comma_list(float if f.name == "tensor_split" else str),
                          metavar="A,B,...")
        else:
            kwargs.update(metavar="PATH" if f.name == "path" else "TEXT")
        group.add_argument(*spec.cli, **kwargs)


def _comma_list(kind: type) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None
    return parse


def _model_args(p: argparse.ArgumentParser) -> None:
    from llamabind.config import ContextConfig, EngineConfig, ModelConfig

    _add_options(p, ModelConfig, "model")
    _add_options(p, ContextConfig, "context")
    _add_options(p, EngineConfig, "engine")
    p.add_argument("-md", "--model-draft", dest="model_draft", default=None, metavar="PATH",
                   help="a draft model of the same vocabulary for speculative decoding "
                        "(then --spec-type draft-simple is the default)")


def _rpc_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpc", dest="rpc_servers", default=None, metavar="HOST:PORT,...",
                   type=_comma_list(str),
                   help="ggml RPC workers (`llamabind rpc-server`) whose devices to list")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    from llamabind.config import GenerationConfig, SamplingConfig

    _add_options(p, SamplingConfig, "sampling")
    _add_options(p, GenerationConfig, "generation")


def _given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` given on the command line (the rest keep their
    defaults from the table)."""
    out = {}
    for name in cls.names():  # type: ignore[attr-defined]
        value = getattr(args, name, None)
        if value is not None:
            out[name] = tuple(value) if name == "stop" else value
    return out


def _load(args: argparse.Namespace) -> Any:
    from llamabind import LoadedModel
    from llamabind.config import ContextConfig, EngineConfig, ModelConfig

    options = {**_given(args, ModelConfig), **_given(args, ContextConfig),
               **_given(args, EngineConfig)}
    path = options.pop("path", None)
    return LoadedModel.load(path, progress=True, draft=getattr(args, "model_draft", None),
                            **options)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    from llamabind.config import GenerationConfig, SamplingConfig

    return {**_given(args, SamplingConfig), **_given(args, GenerationConfig)}


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
                       "generation_ms": round(result.generation_ms, 3),
                       "draft_tokens": result.draft_tokens,
                       "draft_tokens_accepted": result.draft_tokens_accepted},
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

    info: dict[str, Any] = {"build": llamabind.build_info(rpc_servers=args.rpc_servers or ())}
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
    p.add_argument("-m", "--model", default=None, dest="model")
    p.add_argument("--build-only", action="store_true", help="no model information")
    p.add_argument("--metadata", action="store_true", help="include all GGUF metadata")
    p.add_argument("--json", action="store_true")
    _rpc_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="benchmark against native llama.cpp (benchmarks/)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    from llamabind.server.command import add_parser as add_serve_parser

    add_serve_parser(sub)  # `llamabind serve` (its code lives in llamabind.server)

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
