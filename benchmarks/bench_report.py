"""Medians, ratios to native, the targets, and the human-readable table."""

from __future__ import annotations

import statistics
from typing import Any

LABELS = {
    "llama-bench": "native llama-bench",
    "native": "native C API (native_probe)",
    "llamabind": "llamabind core",
    "peer": "llama-cpp-python",
    "llamabind-core": "llamabind TokenGenerator",
    "llamabind-generate": "llamabind generate()",
    "llamabind-stream": "llamabind stream()",
    "peer-generate": "llama-cpp-python create_completion()",
    "peer-stream": "llama-cpp-python create_completion(stream=True)",
}
SPEED_SECTIONS = [
    ("pp", "prompt processing pp{p}, t/s (core: Context.eval / Llama.eval)", "pp/llama-bench",
     ["llama-bench", "native", "llamabind", "peer"]),
    ("tg", "token generation tg{n}: single-token decodes, no sampling, t/s", "tg/llama-bench",
     ["llama-bench", "native", "llamabind", "peer"]),
    ("greedy", "generation, greedy, {n} tokens, end to end (tokenize, prompt, loop), t/s",
     "greedy/native",
     ["native", "llamabind-core", "llamabind-generate", "llamabind-stream", "peer-generate",
      "peer-stream"]),
    ("chain", "generation, full chain (penalties 1.1, top-k 40, top-p 0.95, temp 0.8, "
     "seed), t/s", "chain/native",
     ["native", "llamabind-core", "llamabind-generate", "peer-generate"]),
]
TTFT_ROWS = ["native", "llamabind-stream", "llamabind-core", "peer-stream"]
STARTUP_ROWS = ["native", "llamabind", "peer"]


def stat(samples: list[float] | None) -> dict[str, Any] | None:
    if not samples:
        return None
    med = statistics.median(samples)
    lo, hi = min(samples), max(samples)
    spread = (hi - lo) / 2.0 / abs(med) * 100.0 if med else 0.0
    return {"median": med, "min": lo, "max": hi, "spread_pct": spread, "n": len(samples)}


def _med(samples: dict[str, list[float]], key: str) -> float | None:
    s = stat(samples.get(key))
    return s["median"] if s else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per model: every sample series as median/min/max/spread, the ratios, the targets."""
    out: dict[str, Any] = {"models": {}, "targets": []}
    targets: list[dict[str, Any]] = out["targets"]
    imp = results.get("import_ms", {})
    imp_med = _med(imp, "llamabind")
    if imp_med is not None:
        targets.append(_target("all", "import llamabind < 100 ms", imp_med, "ms", imp_med < 100))
    for name, m in results.get("models", {}).items():
        if "samples" not in m:
            continue
        samples: dict[str, list[float]] = m.get("samples", {})
        outside: dict[str, list[float]] = m.get("outside_us", {})
        stats = {k: stat(v) for k, v in samples.items()}
        out_stats = {k: stat(v) for k, v in outside.items()}
        ratios: dict[str, float | None] = {}
        refs = {section: ref for section, _title, ref, _rows in SPEED_SECTIONS}
        refs.update({"scale1": "scale1/llama-bench", "scale2": "scale2/llama-bench",
                     "load": "load/native", "ctx": "ctx/native",
                     "ctx_warm": "ctx_warm/native"})
        for key in samples:
            section = key.split("/")[0]
            if section in refs:
                ratios[key] = _ratio(_med(samples, key), _med(samples, refs[section]))
            if section == "greedy":
                ratios[f"{key} vs tg/llama-bench"] = _ratio(_med(samples, key),
                                                            _med(samples, "tg/llama-bench"))
        # single-token decodes per generation run (llama.cpp's n_eval): n_gen - 1 when
        # the last generated token is not decoded (nothing needs its logits)
        decodes = {k: statistics.median(r.get("n_eval", 0) for r in runs)
                   for k, runs in m.get("runs", {}).items()
                   if isinstance(runs, list) and runs and "n_eval" in runs[0]}
        out["models"][name] = {"stats": stats, "outside_us": out_stats, "ratios": ratios,
                               "decodes": decodes}

        def t(label: str, value: float | None, unit: str, ok: bool | None,
              model: str = name) -> None:
            targets.append(_target(model, label, value, unit, ok))

        r = ratios.get("greedy/llamabind-generate")
        t("generate() greedy >= 99% of native greedy loop", r, "x",
          None if r is None else r >= 0.99)
        r = ratios.get("greedy/llamabind-stream")
        t("stream() greedy >= 99% of native greedy loop", r, "x",
          None if r is None else r >= 0.99)
        r = ratios.get("chain/llamabind-generate")
        t("generate() full chain >= 98% of native chain loop", r, "x",
          None if r is None else r >= 0.98)
        r = ratios.get("pp/llamabind")
        t("pp >= 99% of native llama-bench", r, "x", None if r is None else r >= 0.99)
        for api in ("generate", "stream"):
            s = out_stats.get(f"greedy/llamabind-{api}")
            v = s["median"] if s else None
            t(f"<= 25 us/token outside llama_decode, {api}() greedy", v, "us",
              None if v is None else v <= 25.0)
        a, b = _med(samples, "ttft-short/llamabind-stream"), _med(samples, "ttft-short/native")
        d = None if a is None or b is None else a - b
        t("time to first token, short prompt, within 1 ms of native (stream())", d, "ms",
          None if d is None else d <= 1.0)
        r = ratios.get("load/llamabind")
        t("model load within 5% of native", r, "x", None if r is None else r <= 1.05)
        r = ratios.get("scale2/llamabind")
        t("2 threads >= 95% of 2 native processes (aggregate)", r, "x",
          None if r is None else r >= 0.95)
    return out


def _target(model: str, label: str, value: float | None, unit: str,
            ok: bool | None) -> dict[str, Any]:
    return {"model": model, "target": label, "value": value, "unit": unit,
            "met": ok}


# --- the table -------------------------------------------------------------------------


def _fmt(s: dict[str, Any] | None, digits: int = 1) -> str:
    if s is None:
        return "-"
    return f"{s['median']:.{digits}f} ±{s['spread_pct']:.1f}%"


def _fr(r: float | None) -> str:
    return "-" if r is None else f"{r:.3f}"


def _with_variants(rows: list[str], stats: dict[str, Any], section: str) -> list[str]:
    """Rows, each llamabind row followed by the same row of every --variant."""
    out = []
    for row in rows:
        out.append(row)
        if row.startswith("llamabind"):
            rest = row[len("llamabind"):]
            prefix = f"{section}/llamabind["
            out += sorted({k[len(section) + 1:] for k in stats
                           if k.startswith(prefix) and k.endswith("]" + rest)})
    return out


def _label(row: str) -> str:
    if row.startswith("llamabind["):
        name, _, rest = row[len("llamabind["):].partition("]")
        return LABELS.get("llamabind" + rest, "llamabind" + rest).replace(
            "llamabind", f"llamabind[{name}]", 1)
    return LABELS.get(row, row)


def format_table(results: dict[str, Any]) -> str:
    summary = results["summary"]
    meta = results["meta"]
    args = meta["args"]
    mach = meta["machine"]
    lines = [
        f"llamabind benchmark, {meta['date']}",
        f"machine: {mach.get('Model name', '?')}, {mach.get('cpu_count')} CPUs "
        f"({mach.get('Core(s) per socket', '?')} cores/socket, "
        f"{mach.get('Thread(s) per core', '?')} thread/core), Python {mach.get('python')}",
        f"threads {args['threads']}, rounds {args['reps']} (ttft {args['ttft_reps']}, "
        f"threads test {args['scale_reps']}, start-up {args.get('startup_reps', args['reps'])}), "
        f"pp {args['n_prompt']}, tg/gen {args['n_gen']}, "
        f"n_ctx {args['n_ctx']}; llama-cpp-python: "
        f"{meta.get('llama_cpp_python') or 'not installed'}",
        "medians, ± half the min-max range; ratios are medians over the reference's median",
    ]
    p, n = args["n_prompt"], args["n_gen"]
    for name, m in results.get("models", {}).items():
        s = summary["models"].get(name)
        if s is None or "path" not in m:
            continue
        stats, ratios, outside = s["stats"], s["ratios"], s["outside_us"]
        prompts = m.get("prompts", {})
        lines += ["", "=" * 100,
                  f"{name}: {m['path'].split('/')[-1]} ({m['size_bytes'] / 2**20:.0f} MiB, "
                  f"vocab {m.get('n_vocab')})",
                  f"EOG banned: {m.get('ban_eog')}; prompt {prompts.get('short_tokens')} tokens "
                  f"({prompts.get('short_text')!r})"]
        for section, title, ref, rows in SPEED_SECTIONS:
            lines += ["", title.format(p=p, n=n)]
            gen = section in ("greedy", "chain")
            head = f"  {'':52s}{'t/s':>18s}{'vs ' + ref.split('/')[1]:>18s}"
            if gen:
                head += f"{'outside decode':>20s}{'vs llama-bench tg':>19s}{'decodes':>9s}"
            lines.append(head)
            for row in _with_variants(rows, stats, section):
                key = f"{section}/{row}"
                if key not in stats:
                    continue
                line = f"  {_label(row):52s}{_fmt(stats[key]):>18s}{_fr(ratios.get(key)):>18s}"
                if gen:
                    o = outside.get(key)
                    out_us = f"{o['median']:.0f} (min {o['min']:.0f}) us" if o else "-"
                    line += f"{out_us:>20s}"
                    line += f"{_fr(ratios.get(key + ' vs tg/llama-bench')):>19s}"
                    dec = s.get("decodes", {}).get(key)
                    line += f"{'-' if dec is None else f'{dec:.0f}':>9s}"
                lines.append(line)
        if any(k.startswith("ttft-") for k in stats):
            lines += ["", f"time to first token, ms (short: {prompts.get('short_tokens')} "
                      f"tokens, long: {prompts.get('long_tokens')} tokens)",
                      f"  {'':52s}{'short':>18s}{'- native':>10s}{'long':>18s}{'- native':>10s}"]
            for row in _with_variants(TTFT_ROWS, stats, "ttft-short"):
                a, b = stats.get(f"ttft-short/{row}"), stats.get(f"ttft-long/{row}")
                if a is None and b is None:
                    continue
                na, nb = stats.get("ttft-short/native"), stats.get("ttft-long/native")
                da = f"{a['median'] - na['median']:+.2f}" if a and na else "-"
                db = f"{b['median'] - nb['median']:+.1f}" if b and nb else "-"
                lines.append(f"  {_label(row):52s}{_fmt(a, 2):>18s}{da:>10s}"
                             f"{_fmt(b, 1):>18s}{db:>10s}")
        if any(k.startswith(("load/", "ctx_warm/")) for k in stats):
            lines += ["", "start-up (load and context: fresh processes; warm context: "
                      "created again in a running process)",
                      f"  {'':28s}{'model load ms':>17s}{'ratio':>7s}{'context ms':>16s}"
                      f"{'warm ctx ms':>16s}{'ratio':>7s}{'peak RSS MiB':>15s}"]
            for row in _with_variants(STARTUP_ROWS, stats, "load"):
                if not any(f"{k}/{row}" in stats for k in ("load", "ctx_warm")):
                    continue
                label = {"native": "native C API", "peer": "llama-cpp-python"}.get(row, row)
                ctx_label = _fmt(stats.get(f"ctx/{row}"), 1)
                if row == "peer" and f"llama_init/{row}" in stats:
                    ctx_label = "(Llama() " + f"{stats[f'llama_init/{row}']['median']:.0f})"
                lines.append(
                    f"  {label:28s}{_fmt(stats.get(f'load/{row}'), 1):>17s}"
                    f"{_fr(ratios.get(f'load/{row}')) if row != 'native' else '':>7s}"
                    f"{ctx_label:>16s}{_fmt(stats.get(f'ctx_warm/{row}'), 1):>16s}"
                    f"{_fr(ratios.get(f'ctx_warm/{row}')) if row != 'native' else '':>7s}"
                    f"{_fmt(stats.get(f'rss/{row}'), 0):>15s}")
        if any(k.startswith("scale") for k in stats):
            lines += ["", f"1 and 2 workers with n_threads=1 each (aggregate t/s, {n} tokens): "
                      "native = separate llama-bench processes; bindings = Python threads, "
                      "one shared model, a context each",
                      f"  {'':28s}{'1 worker':>18s}{'2 workers':>18s}{'2 / 1':>8s}"
                      f"{'2 vs native 2':>15s}"]
            for row in _with_variants(["llama-bench", "llamabind", "peer"], stats, "scale1"):
                one, two = stats.get(f"scale1/{row}"), stats.get(f"scale2/{row}")
                if one is None and two is None:
                    continue
                label = {"llama-bench": "native processes",
                         "peer": "llama-cpp-python threads"}.get(row, f"{row} threads")
                sc = _fr(two["median"] / one["median"]) if one and two else "-"
                vs = _fr(ratios.get(f"scale2/{row}")) if row != "llama-bench" else ""
                lines.append(f"  {label:28s}{_fmt(one):>18s}{_fmt(two):>18s}{sc:>8s}{vs:>15s}")
        if m.get("errors"):
            lines += ["", "errors:"] + [f"  {e}" for e in m["errors"][:20]]
    imp = results.get("import_ms")
    if imp:
        lines += ["", "import time, fresh interpreter, ms: " + ", ".join(
            f"{k} {_fmt(stat(v), 1)}" for k, v in imp.items() if v)]
    lines += ["", "targets"]
    for tg in summary["targets"]:
        mark = {True: "met   ", False: "MISSED", None: "n/a   "}[tg["met"]]
        v = tg["value"]
        vs = "-" if v is None else (f"{v:.3f}" if tg["unit"] == "x" else f"{v:.2f} {tg['unit']}")
        lines.append(f"  [{mark}] {tg['model']:8s} {tg['target']:66s} {vs}")
    if results.get("notes"):
        lines += ["", "notes:"] + [f"  - {x}" for x in results["notes"]]
    lines.append(f"\n(run took {meta.get('duration_s', 0):.0f} s)")
    return "\n".join(lines)
