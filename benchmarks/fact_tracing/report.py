"""The README table of a fact-tracing payload, and the recommended default read from it."""

from __future__ import annotations


def _cell(r: dict, key: str) -> str:
    return f"{r[key]:.3f} ± {r[key + '_se']:.3f}"


def markdown(payload: dict) -> str:
    """One row per contender, best MRR first: MRR and recall@10 (± standard error), seconds per 1000
    passages to export (all checkpoints) and to score (all queries)."""
    rows = sorted(payload["contenders"].items(), key=lambda kv: -kv[1]["mrr"])
    lines = [
        "| contender | dim | MRR | recall@10 | export s / 1000 | score s / 1000 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        dim = str(r.get("dim", "")) if r["family"] == "tracin" else ""
        export = f"{r['export_s_per_1000']:.2f}" if "export_s_per_1000" in r else ""
        lines.append(
            f"| {name} | {dim} | {_cell(r, 'mrr')} | {_cell(r, 'recall@10')} | {export} | {r['score_s_per_1000']:.4f} |"
        )
    return "\n".join(lines)
