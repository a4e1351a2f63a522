"""Tables of a fact-tracing payload: every contender (printed by the run) and the README's summary."""

from __future__ import annotations

from .metrics import paired_difference

VARIANTS = {(None, False): "plain", ("adam", False): "adam", (None, True): "cosine", ("adam", True): "adam + cosine"}


def _best_tracin(contenders: dict) -> str:
    return max((n for n, r in contenders.items() if r["family"] == "tracin"), key=lambda n: contenders[n]["mrr"])


def markdown(payload: dict) -> str:
    """One row per contender, best MRR first: MRR and recall@10 (± standard error), the paired MRR
    difference to the best TracIn contender, seconds per 1000 passages to export (all checkpoints)
    and to score (all queries)."""
    contenders = payload["contenders"]
    best = _best_tracin(contenders)
    lines = [
        f"| contender | dim | MRR | recall@10 | MRR - best TracIn ({best}) | export s / 1000 | score s / 1000 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in sorted(contenders.items(), key=lambda kv: -kv[1]["mrr"]):
        diff, se = paired_difference(r["reciprocal_ranks"], contenders[best]["reciprocal_ranks"])
        dim = str(r["dim"]) if r["family"] == "tracin" else ""
        export = f"{r['export_s_per_1000']:.2f}" if "export_s_per_1000" in r else ""
        lines.append(
            f"| {name} | {dim} | {r['mrr']:.3f} ± {r['mrr_se']:.3f} | {r['recall@10']:.3f} ± {r['recall@10_se']:.3f} "
            f"| {diff:+.3f} ± {se:.3f} | {export} | {r['score_s_per_1000']:.3f} |"
        )
    return "\n".join(lines)


def summary_table(payload: dict) -> str:
    """The README table: MRR / recall@10 per TracIn variant (rows) and gradient dim (columns), export
    seconds per 1000 passages at each dim, then BM25 and random ranking."""
    tracin = [r for r in payload["contenders"].values() if r["family"] == "tracin"]
    dims = sorted({r["dim"] for r in tracin if r["projection"] != "exact"})
    exact_dim = next((r["dim"] for r in tracin if r["projection"] == "exact"), None)
    columns = [*(str(d) for d in dims), *([f"exact ({exact_dim})"] if exact_dim else [])]
    lines = [
        "| contender | gradients | " + " | ".join(columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for projection in ("kronecker", "sparse", "exact"):
        for key, variant in VARIANTS.items():
            cells = {}
            for r in tracin:
                if (r["preconditioner"], r["normalize"]) == key and r["projection"] == projection:
                    column = str(r["dim"]) if projection != "exact" else columns[-1]
                    cells[column] = f"{r['mrr']:.3f} / {r['recall@10']:.3f}"
            if cells:
                lines.append(
                    f"| TracIn {variant} | {projection} | " + " | ".join(cells.get(c, "") for c in columns) + " |"
                )
    for projection in ("kronecker", "sparse", "exact"):
        times: dict[str, dict] = {}
        for r in tracin:
            if r["projection"] == projection and r["normalize"] is False:
                column = str(r["dim"]) if projection != "exact" else columns[-1]
                times.setdefault(column, {})[r["preconditioner"]] = r["export_s_per_1000"]
        if times:
            cells = [
                " / ".join(f"{times[c][p]:.2f}" if p in times[c] else "-" for p in (None, "adam")) if c in times else ""
                for c in columns
            ]
            lines.append(f"| export s / 1000 passages (plain / adam) | {projection} | " + " | ".join(cells) + " |")
    for projection in ("kronecker", "sparse", "exact"):  # the recommended contender's own scoring times
        score = {
            str(r["dim"]) if projection != "exact" else columns[-1]: r["score_s_per_1000"]
            for r in tracin
            if r["projection"] == projection and (r["preconditioner"], r["normalize"]) == ("adam", True)
        }
        if score:
            cells = " | ".join(f"{score[c]:.3f}" if c in score else "" for c in columns)
            lines.append(f"| score s / 1000 passages (adam + cosine) | {projection} | {cells} |")
    for family in ("bm25", "random"):
        r = payload["contenders"][family]
        lines.append(f"| {family.upper() if family == 'bm25' else family} | | {r['mrr']:.3f} / {r['recall@10']:.3f} |")
    return "\n".join(lines)
