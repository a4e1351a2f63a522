"""The benchmark's figure: MRR and recall@10 against the projected dim, one line per TracIn variant and
projection kind, exact gradients at the right, BM25 and random ranking as horizontal bands."""

from __future__ import annotations

from pathlib import Path

COLOURS = {"plain": "tab:blue", "adam": "tab:orange", "cosine": "tab:green", "adam+cosine": "tab:red"}
STYLES = {"kronecker": "-", "sparse": ":"}


def _kind(r: dict) -> str:
    return "+".join([p for p in (r["preconditioner"], "cosine" if r["normalize"] else None) if p]) or "plain"


def plot(payload: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracin = [r for r in payload["contenders"].values() if r["family"] == "tracin"]
    projected = sorted({r["dim"] for r in tracin if r["projection"] != "exact"})
    exact_x = projected[-1] * 4 if projected else 1
    ticks = [*projected, *([exact_x] if any(r["projection"] == "exact" for r in tracin) else [])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("mrr", "recall@10"), strict=True):
        for kind, colour in COLOURS.items():
            for projection, style in STYLES.items():
                pts = sorted(
                    (r["dim"], r[metric], r[metric + "_se"])
                    for r in tracin
                    if _kind(r) == kind and r["projection"] == projection
                )
                if pts:
                    xs, ys, es = zip(*pts, strict=True)
                    ax.errorbar(
                        xs,
                        ys,
                        es,
                        color=colour,
                        linestyle=style,
                        marker="o",
                        ms=3,
                        capsize=2,
                        label=f"{kind}, {projection}",
                    )
            for r in tracin:
                if _kind(r) == kind and r["projection"] == "exact":
                    ax.errorbar([exact_x], [r[metric]], [r[metric + "_se"]], color=colour, marker="s", capsize=2)
        for family, colour in (("bm25", "black"), ("random", "gray")):
            r = payload["contenders"].get(family)
            if r:
                ax.axhline(r[metric], color=colour, linestyle="--", linewidth=1, label=family)
                ax.axhspan(r[metric] - r[metric + "_se"], r[metric] + r[metric + "_se"], color=colour, alpha=0.1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [*map(str, projected), "exact"][: len(ticks)])
        ax.set_xlabel("gradient dim per checkpoint")
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7, ncol=2)
    c = payload["corpus"]
    fig.suptitle(
        f"Fact tracing: {c['queries']} queries, {c['passages']} passages; GPT-2 answering "
        f"{payload['training']['query_accuracy']:.1%} of the queries"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
