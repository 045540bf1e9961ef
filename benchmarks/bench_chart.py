"""The chart: llamabind's (and llama-cpp-python's) speed as a ratio to native."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (label, ratio key in the summary, target or None); higher is better for all
BARS = [
    ("pp (Context.eval)", "pp/{impl}", 0.99),
    ("tg decode loop", "tg/{impl}", None),
    ("greedy, core loop", "greedy/{impl}-core", None),
    ("greedy, generate()", "greedy/{impl}-generate", 0.99),
    ("greedy, stream()", "greedy/{impl}-stream", 0.99),
    ("full chain, generate()", "chain/{impl}-generate", 0.98),
    ("2 threads vs 2 processes", "scale2/{impl}", 0.95),
]


def draw(results: dict[str, Any], path: Path) -> str | None:
    """Write the PNG; return a message instead when matplotlib is not available."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("chart skipped: matplotlib is not installed "
                "(pip install matplotlib to get benchmarks/results/<timestamp>.png)")
    models = results["summary"]["models"]
    if not models:
        return "chart skipped: no results"
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5.6), squeeze=False,
                             sharey=True)
    for ax, (name, summ) in zip(axes[0], models.items(), strict=False):
        ratios = summ["ratios"]
        shown = [ratios.get(key.format(impl=impl)) for _l, key, _t in BARS
                 for impl in ("llamabind", "peer")]
        low = min([v for v in shown if v is not None] + [0.9])
        labels = [b[0] for b in BARS]
        ys = list(range(len(BARS)))
        for offset, impl, color, legend in ((-0.2, "llamabind", "#2b6cb0", "llamabind"),
                                            (0.2, "peer", "#c05621", "llama-cpp-python")):
            vals = []
            for _label, key, _target in BARS:
                vals.append(ratios.get(key.format(impl=impl)))
            pos = [y + offset for y, v in zip(ys, vals, strict=True) if v is not None]
            got = [v for v in vals if v is not None]
            if got:
                ax.barh(pos, got, height=0.38, color=color, label=legend)
                for y, v in zip(pos, got, strict=True):
                    ax.text(v + 0.005, y, f"{v:.3f}", va="center", fontsize=7)
        for y, (_label, _key, target) in zip(ys, BARS, strict=True):
            if target is not None:
                ax.plot([target, target], [y - 0.45, y + 0.45], color="black", lw=1,
                        ls=":")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels)
        ax.invert_yaxis()
        ax.set_xlim(max(0.0, round(low - 0.1, 1)), 1.15)
        ax.set_xlabel("ratio to native (1.0 = native speed; dotted: target)")
        ax.set_title(name)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8,
                  frameon=False)
    meta = results["meta"]
    fig.suptitle(f"llamabind vs native llama.cpp, {meta['date'][:10]}, "
                 f"{meta['machine'].get('Model name', '')}, {meta['args']['threads']} threads",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
