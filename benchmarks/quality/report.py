"""The Markdown tables of a quality payload (generated from the JSON, never typed by hand).

python -m benchmarks.quality.report [--json benchmarks/results/quality.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..common import RESULTS_DIR


def _failed(errors: dict[str, str], method: str) -> str:
    """A short cell for a method that did not run on a dataset (the JSON keeps the whole message)."""
    if method not in errors:
        return "-"
    return "not installed" if errors[method].startswith("not installed") else "failed (see JSON)"


def method_order(results: dict[str, dict]) -> list[str]:
    """Every method of any dataset (reported or failed), tracin recipes first, then in registration order."""
    names = list(dict.fromkeys(m for d in results.values() for m in [*d["methods"], *d["errors"]]))
    return sorted(names, key=lambda m: (not m.startswith("tracin"), names.index(m)))


def _detection_rows(payload: dict) -> list[str]:
    detect = payload["detection"]
    at = payload["winners"]["detection_at"]
    names = method_order(detect)
    rows = [
        f"| Flipped labels found at {at:.0%} inspected | " + " | ".join(detect) + " |",
        "|---|" + "---|" * len(detect),
    ]
    rows.append(
        "| perfect detector | "
        + " | ".join(f"{d['perfect'][d['inspect'].index(at)]:.3f}" for d in detect.values())
        + " |"
    )
    for m in names:
        cells = []
        for name, d in detect.items():
            if m not in d["methods"]:
                cells.append(_failed(d["errors"], m))
                continue
            v = d["methods"][m]["found"][d["inspect"].index(at)]
            best = v == payload["winners"]["detection_best"][name]["best"]
            cells.append(f"**{v:.3f}**" if best else f"{v:.3f}")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return rows


def _lds_rows(payload: dict) -> list[str]:
    results = payload["lds"]
    names = method_order(results)
    rows = ["| LDS (mean ± s.e.) | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for m in names:
        cells = []
        for name, d in results.items():
            if m in d["methods"]:
                r = d["methods"][m]
                best = m == payload["winners"]["lds_best"][name]["method"]
                cell = f"{r['mean']:.3f} ± {r['se']:.3f}"
                cells.append(f"**{cell}**" if best else cell)
            else:
                cells.append(_failed(d["errors"], m))
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return rows


def markdown(payload: dict) -> str:
    """Where and how it was measured, the detection table, the LDS table and the recipes that win or
    tie everywhere."""
    cfg, m, w = payload["config"], payload.get("machine", {}), payload["winners"]
    captum = payload["peers"]["captum"] or {}
    head = (
        f"Measured {m.get('time', '')} with tracin {m.get('tracin', '?')}: MLPs (one hidden layer) trained with "
        f"SGD + momentum on {', '.join(cfg['datasets'])} (standardised, 80/20 split)"
        + (
            " and, for detection only, `tracin demo`'s data and training: "
            + ", ".join(
                f"{name} ({cfg['detection'][name]['checkpoints']} checkpoints)" for name in cfg["detection_only"]
            )
            if cfg.get("detection_only")
            else ""
        )
        + ". Detection: "
        f"{cfg['noise']:.0%} of training labels flipped, mean over seeds {list(cfg['seeds'])}; best in bold. "
        f"LDS: {cfg['lds_models']} models retrained on random {cfg['lds_fraction']:.0%} subsets, Spearman "
        f"correlation of summed attribution with -test loss, up to {cfg['lds_test']} held-out examples."
    )
    if "max_abs_diff_scores" in captum:
        head += (
            f" Captum TracInCP {captum['version']} on {captum['n_test']}x{captum['n_train']} examples: max abs "
            f"difference {captum['max_abs_diff_scores']:.2e} (scores up to {captum['max_abs_scores']:.2e}), "
            f"self-influence {captum['max_abs_diff_self_influence']:.2e} "
            f"(up to {captum['max_abs_self_influence']:.2e})."
        )
    if cfg.get("quick"):
        head += " **Quick (smoke-test) settings: not meaningful as quality numbers.**"
    tail = (
        f"Within {w['tie']} of the best detector on every dataset: "
        f"{', '.join(w['detection_wins_or_ties_everywhere']) or 'none'}. Within one s.e. of the best LDS on "
        f"every dataset: {', '.join(w['lds_within_se_of_best_everywhere']) or 'none'}; of the tracin recipes: "
        f"{', '.join(w['lds_within_se_of_best_tracin_everywhere']) or 'none'}."
    )
    return "\n".join([head, "", *_detection_rows(payload), "", *_lds_rows(payload), "", tail])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "quality.json", help="quality JSON to render")
    args = p.parse_args(argv)
    try:
        payload = json.loads(args.json.read_text())
    except (OSError, json.JSONDecodeError) as e:
        p.error(f"--json: cannot read {args.json}: {e}")
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
