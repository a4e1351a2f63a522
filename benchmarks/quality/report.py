"""The Markdown tables of a quality payload (generated from the JSON, never typed by hand).

python -m benchmarks.quality.report [--json benchmarks/results/quality.json]
"""

from __future__ import annotations

import argparse
import json
import re
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


def seed_se(per_seed: list[list[float]] | None, j: int) -> float | None:
    """Standard error over the seeds of column j of per-seed curves (seeds, fractions): the sample
    deviation (ddof=1) over sqrt(seeds); None with fewer than two seeds."""
    values = [row[j] for row in per_seed or ()]
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def _detection_rows(payload: dict) -> list[str]:
    """The detection table: per method the mean fraction found at the winners' `detection_at`, with
    its s.e. over the seeds where there are several (the seed-to-seed spread is what a tie is read
    against)."""
    detect = payload["detection"]
    at = payload["winners"]["detection_at"]
    best_of = detection_winners(detect, at, payload["winners"]["tie"])["detection_best"]
    names = method_order(detect)
    seeds = {len(r["per_seed"]) for d in detect.values() for r in d["methods"].values() if "per_seed" in r}
    spread = " (mean ± s.e. over seeds)" if max(seeds, default=0) > 1 else ""
    rows = [
        f"| Flipped labels found at {at:.0%} inspected{spread} | " + " | ".join(detect) + " |",
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
            j = d["inspect"].index(at)
            v, se = d["methods"][m]["found"][j], seed_se(d["methods"][m].get("per_seed"), j)
            cell = f"{v:.3f}" if se is None else f"{v:.3f} ± {se:.3f}"
            best = m in best_of.get(name, {}).get("methods", ())
            cells.append(f"**{cell}**" if best else cell)
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return rows


def _lds_rows(payload: dict) -> list[str]:
    results = payload["lds"]
    best_of = {name: w["method"] for name, w in lds_winners(results)["lds_best"].items()}
    names = method_order(results)
    rows = ["| LDS (mean ± s.e.) | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for m in names:
        cells = []
        for name, d in results.items():
            if m in d["methods"]:
                r = d["methods"][m]
                best = m == best_of.get(name)
                cell = f"{r['mean']:.3f} ± {r['se']:.3f}"
                cells.append(f"**{cell}**" if best else cell)
            else:
                cells.append(_failed(d["errors"], m))
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return rows


WHITENED = re.compile(r"^tracin whitened \(damping ([0-9.e+-]+)\)$")
PEER_NAMES = {"trak": "TRAK (traker)", "dattri": "dattri"}  # payload["peers"] key -> the name printed
PLAIN = "tracin all checkpoints"  # what whitening is compared with: the same checkpoints, unwhitened


def _best(methods: dict[str, dict]) -> str | None:
    """The method of highest mean LDS among those not a fixed point of the whitened damping sweep
    (the best of six dampings on the test rows would be chosen on them; TRAK's and dattri's settings,
    and the whitened row 'damping chosen on validation', are chosen on the validation rows)."""
    fair = [m for m in methods if not WHITENED.match(m)]
    return max(fair, key=lambda m: methods[m]["mean"]) if fair else None


def detection_winners(detect: dict[str, dict], at: float, tie: float) -> dict:
    """Per dataset the best fraction of flipped labels found at `at` inspected ("detection_best": best and
    the methods reaching it), by the rule of the LDS table (_best): the fixed whitened dampings are left
    out of "best", as the best of six settings would be picked on the flipped labels themselves; and the
    methods (those too) within `tie`, or one s.e. over the seeds (the larger of the two methods'), of that
    best on every dataset (recomputed from the results, so records made under earlier rules, which counted
    the dampings or ignored the seed spread, render by this one)."""
    out: dict = {"detection_best": {}}
    ties: list[set] = []
    for name, d in detect.items():
        j = d["inspect"].index(at)
        found = {m: r["found"][j] for m, r in d["methods"].items()}
        spread = {m: seed_se(r.get("per_seed"), j) or 0.0 for m, r in d["methods"].items()}
        fair = [v for m, v in found.items() if not WHITENED.match(m)]
        if not fair:
            continue
        best = max(fair)
        leaders = sorted(m for m, v in found.items() if v == best and not WHITENED.match(m))
        out["detection_best"][name] = {"best": best, "methods": leaders}
        best_se = max(spread[m] for m in leaders)
        ties.append({m for m, v in found.items() if v >= best - max(tie, best_se, spread[m])})
    out["detection_wins_or_ties_everywhere"] = sorted(set.intersection(*ties)) if ties else []
    return out


def _within_se_of_best(lds_results: dict[str, dict], prefix: str) -> list[str]:
    """Methods named `prefix`... within one s.e. (the larger of the two) of _best of those on every dataset."""
    ties = []
    for d in lds_results.values():
        scores = {m: r for m, r in d["methods"].items() if m.startswith(prefix)}
        best = _best(scores)
        if best is None:
            return []
        b = scores[best]
        ties.append({m for m, r in scores.items() if r["mean"] >= b["mean"] - max(b["se"], r["se"])})
    return sorted(set.intersection(*ties)) if ties else []


def lds_winners(lds_results: dict[str, dict]) -> dict:
    """Per dataset the _best LDS ("lds_best": method, mean, se), and the methods within one s.e. of it on
    every dataset, of all methods and of the tracin recipes (recomputed from the results, so records
    made before the fixed dampings were left out are rendered by the same rule)."""
    out: dict = {"lds_best": {}}
    for name, d in lds_results.items():
        best = _best(d["methods"])
        if best is not None:
            out["lds_best"][name] = {"method": best, **{k: d["methods"][best][k] for k in ("mean", "se")}}
    out["lds_within_se_of_best_everywhere"] = _within_se_of_best(lds_results, "")
    out["lds_within_se_of_best_tracin_everywhere"] = _within_se_of_best(lds_results, "tracin")
    return out


def damping_ranks(payload: dict) -> dict:
    """Per whitened damping (ascending): its LDS rank among the dampings on each LDS dataset (1 = best
    mean), the mean rank, the mean LDS and the mean fraction of flipped labels found at the winners'
    `detection_at` over the detection settings; "best": the damping of lowest mean rank, ties broken
    by the higher mean LDS (None without whitened results on every LDS dataset)."""
    lds, detect, at = payload["lds"], payload["detection"], payload["winners"]["detection_at"]
    names = {float(m[1]): m[0] for m in (WHITENED.match(n) for n in method_order(lds)) if m}
    names = {d: n for d, n in sorted(names.items()) if all(n in r["methods"] for r in lds.values())}
    rows: dict = {d: {"ranks": []} for d in names}
    for r in lds.values():
        order = sorted(names, key=lambda d: -r["methods"][names[d]]["mean"])
        for d in names:
            rows[d]["ranks"].append(order.index(d) + 1)
    for d, n in names.items():
        rows[d]["mean_rank"] = sum(rows[d]["ranks"]) / len(lds)
        rows[d]["mean_lds"] = sum(r["methods"][n]["mean"] for r in lds.values()) / len(lds)
        found = [x["methods"][n]["found"][x["inspect"].index(at)] for x in detect.values() if n in x["methods"]]
        rows[d]["mean_found"] = sum(found) / len(found) if found else None
    best = min(rows, key=lambda d: (rows[d]["mean_rank"], -rows[d]["mean_lds"])) if rows else None
    return {"dampings": rows, "names": names, "best": best}


def whitening_markdown(payload: dict) -> str:
    """The whitened methods per damping beside plain TracIn (all checkpoints): LDS per dataset, mean LDS,
    mean rank, mean fraction of flipped labels found; the damping chosen by damping_ranks in bold.
    Empty when the payload has no whitened results."""
    choice = damping_ranks(payload)
    if choice["best"] is None:
        return ""
    lds, detect, at = payload["lds"], payload["detection"], payload["winners"]["detection_at"]
    rows = [
        f"| Whitened TracIn (all checkpoints) | LDS {' | LDS '.join(lds)} | mean LDS | mean LDS rank | "
        f"flipped labels found at {at:.0%} inspected (mean of {len(detect)} settings) |",
        "|---|" + "---|" * (len(lds) + 3),
    ]
    plain_found = [x["methods"][PLAIN]["found"][x["inspect"].index(at)] for x in detect.values()]
    plain_lds = [r["methods"][PLAIN]["mean"] for r in lds.values()]
    rows.append(
        f"| not whitened | {' | '.join(f'{v:.3f}' for v in plain_lds)} | {sum(plain_lds) / len(lds):.3f} | - | "
        f"{sum(plain_found) / len(plain_found):.3f} |"
    )
    for d, r in choice["dampings"].items():
        cells = [f"{lds[k]['methods'][choice['names'][d]]['mean']:.3f}" for k in lds]
        label = f"damping {d:g}"
        rows.append(
            f"| {f'**{label}**' if d == choice['best'] else label} | {' | '.join(cells)} | {r['mean_lds']:.3f} | "
            f"{r['mean_rank']:.2f} | {r['mean_found']:.3f} |"
        )
    rule = (
        f"Rank: 1 = the best damping's LDS on a dataset. Chosen (lowest mean rank, ties: higher mean LDS): "
        f"damping {choice['best']:g}."
    )
    return "\n".join([*rows, "", rule])


def _split_text(split: dict | None) -> str:
    """How the rows were split, and where the held-out peak was found; records without "split" (before
    the validation rows) chose it on the test rows the LDS is measured on."""
    if split is None:
        return (
            "standardised, 80/20 split; the held-out peak chosen on the test rows, which the LDS is also "
            "measured on: recorded before the suite held validation rows out of training"
        )
    parts = "/".join(f"{round(100 * split[k])}" for k in ("train", "validation", "test"))
    return f"standardised, {parts} train/validation/test split; the held-out peak chosen on the validation rows"


def _sweeps_text(results: dict[str, dict]) -> str:
    """The setting each sweep chose per dataset, on the validation rows, and the projection dimension."""
    names = list(dict.fromkeys(m for d in results.values() for m in d.get("sweeps", {})))
    if not names:
        return ""
    parts = []
    for m in names:
        first = next(d["sweeps"][m] for d in results.values() if m in d.get("sweeps", {}))
        values = first["values"]
        chosen = ", ".join(
            f"{name} {d['sweeps'][m]['chosen']:g}" for name, d in results.items() if m in d.get("sweeps", {})
        )
        parts.append(f"{m}: {first['parameter']} {chosen} (of {', '.join(f'{v:g}' for v in values)})")
    rows = ", ".join(f"{name} {d['validation_examples']}" for name, d in results.items())
    dims = ", ".join(f"{name} {d['projection_dim']}" for name, d in results.items())
    return (
        f"Settings chosen per dataset by the best LDS on the validation rows ({rows}), never the test rows: "
        + "; ".join(parts)
        + f". TRAK and dattri project to the dimension whitened TracIn works in ({dims})."
    )


def markdown(payload: dict) -> str:
    """Where and how it was measured, the detection table, the LDS table and the recipes that win or
    tie everywhere."""
    cfg, m = payload["config"], payload.get("machine", {})
    w = payload["winners"]
    w = {**w, **detection_winners(payload["detection"], w["detection_at"], w["tie"]), **lds_winners(payload["lds"])}
    captum = payload["peers"]["captum"] or {}
    head = (
        f"Measured {m.get('time', '')} with tracin {m.get('tracin', '?')}: MLPs (one hidden layer) trained with "
        f"SGD + momentum on {', '.join(cfg['datasets'])} ({_split_text(payload.get('split'))})"
        + (
            " and, for detection only, `tracin demo`'s data and training at two checkpoint counts: "
            + ", ".join(
                f"{name} ({cfg['detection'][name]['checkpoints']} checkpoints)" for name in cfg["detection_only"]
            )
            if cfg.get("detection_only")
            else ""
        )
        + ". Detection: "
        f"{cfg['noise']:.0%} of training labels flipped, mean over seeds {list(cfg['seeds'])}. "
        f"LDS: {cfg['lds_models']} models retrained on random {cfg['lds_fraction']:.0%} subsets, Spearman "
        f"correlation of summed attribution with -test loss, up to {cfg['lds_test']} held-out examples (s.e. "
        "over those examples, for one model trained on all rows and one set of subset models). In both "
        "tables the best is in bold among the methods whose settings are not picked on the data they are "
        "measured on (the fixed whitened dampings, six settings of one method, are never marked)."
    )
    if "max_abs_diff_scores" in captum:
        head += (
            f" Captum TracInCP {captum['version']} on {captum['n_test']}x{captum['n_train']} examples: max abs "
            f"difference {captum['max_abs_diff_scores']:.2e} (scores up to {captum['max_abs_scores']:.2e}), "
            f"self-influence {captum['max_abs_diff_self_influence']:.2e} "
            f"(up to {captum['max_abs_self_influence']:.2e})."
        )
    versions = [
        f"{name} {version}"
        for key, name in PEER_NAMES.items()
        if (version := (payload["peers"].get(key) or {}).get("version"))
    ]
    head += f" Peers: {', '.join(versions) or 'none installed'}."
    code = payload.get("code") or {}
    if code.get("commit"):
        changes = code["uncommitted_changes"]
        head += f" Code: commit {code['commit'][:12]}" + (
            "." if changes is False else " with uncommitted changes." if changes else " (checkout state not recorded)."
        )
    if payload.get("provenance"):
        head += f" {payload['provenance']}"
    if cfg.get("quick"):
        head += " **Quick (smoke-test) settings: not meaningful as quality numbers.**"
    tail = (
        f"Within {w['tie']} (or one s.e. over seeds) of the best detector on every dataset: "
        f"{', '.join(w['detection_wins_or_ties_everywhere']) or 'none'}. Within one s.e. of the best LDS on "
        f"every dataset: {', '.join(w['lds_within_se_of_best_everywhere']) or 'none'}; of the tracin recipes: "
        f"{', '.join(w['lds_within_se_of_best_tracin_everywhere']) or 'none'}."
    )
    sweeps = _sweeps_text(payload["lds"])
    return "\n".join(
        [head, "", *_detection_rows(payload), "", *_lds_rows(payload), "", *([sweeps, ""] if sweeps else []), tail]
    )


# what markdown() reads of a record, beyond the keys that make it a quality record: {key: its required keys}
REQUIRED = {
    "config": ("datasets", "noise", "seeds", "lds_models", "lds_fraction", "lds_test"),
    "winners": ("detection_at", "tie"),
    "peers": ("captum",),
}


def _missing(payload: dict) -> list[str]:
    """The keys of REQUIRED that `payload` lacks (or that are not objects), as 'config' or 'config.noise'."""
    missing = []
    for key, inner in REQUIRED.items():
        value = payload.get(key)
        if not isinstance(value, dict):
            missing.append(key)
        else:
            missing += [f"{key}.{k}" for k in inner if k not in value]
    return missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "quality.json", help="quality JSON to render")
    args = p.parse_args(argv)
    try:
        payload = json.loads(args.json.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:  # a PNG or other binary file given by mistake
        p.error(
            f"--json: cannot read {args.json}: not UTF-8 text (byte {e.object[e.start]:#04x} at {e.start}), "
            "expected the quality JSON"
        )
    except (OSError, ValueError) as e:  # ValueError: json.JSONDecodeError, text that is not JSON
        p.error(f"--json: cannot read {args.json}: {e}")
    if not isinstance(payload, dict) or not {"detection", "lds", "winners"} <= payload.keys():
        kind = payload.get("benchmark") if isinstance(payload, dict) else None
        p.error(f"--json: {args.json} is not a quality record (its benchmark: {kind!r}); render it with its own report")
    if missing := _missing(payload):
        p.error(
            f"--json: {args.json} is not a complete quality record: it lacks {', '.join(map(repr, missing))} "
            "(expected the JSON python -m benchmarks.quality writes)"
        )
    try:
        print(markdown(payload))
        whitened = whitening_markdown(payload)
        if whitened:
            print(f"\n{whitened}")
        sys.stdout.flush()  # a reader gone away (| head) fails here, not at exit
    except BrokenPipeError:  # quietly, with the exit code the tracin CLI gives
        from tracin.cli import BROKEN_PIPE_EXIT, drop_output

        drop_output(sys.stdout)
        return BROKEN_PIPE_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
