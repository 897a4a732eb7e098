"""One row per method entry across several study conditions: each condition's figure, the mean and the worst.

    python benchmarks/robustness_table.py results/study-v3-mixed results/study-v3-shift [--metric auprc]

A condition is one benchmark results folder (one protocol: its data, split and shift); entries are matched
by their id, so the study protocols give the same method list. The worst condition sits beside the mean
because a setting is chosen for what holds across conditions, not for its best case. Reads each run's
``evaluation/metrics.json``; nothing is recomputed. Validation-only folders give validation figures
(Dice there is the best Dice over thresholds on the same subjects: a tuning figure, never a result).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from pipeline.common import read_json

FIGURES = {"auprc": "AUPRC", "auroc": "AUROC", "dice": "Dice", "fp_ml": "FP ml/healthy",
           "small": "det. <1 ml", "medium": "det. 1-10 ml", "large": "det. >=10 ml", "fp_lesions": "FP lesions/subj."}
LOWER_IS_BETTER = {"fp_ml", "fp_lesions"}


def figures(run_dir: Path) -> dict:
    """The study figures of one run (None where the run's metrics lack one)."""
    metrics = read_json(run_dir / "evaluation" / "metrics.json", "metrics")
    m = metrics["test"] if metrics.get("test") else metrics["validation"]
    lesions = m.get("lesions") or {}
    rates = lesions.get("detection_rate") or {}
    return {"auprc": m.get("auprc"), "auroc": m.get("auroc"), "dice": m.get("dice", m.get("best_dice")),
            "fp_ml": m.get("false_positive_ml_healthy"), **{b: rates.get(b) for b in ("small", "medium", "large")},
            "fp_lesions": lesions.get("false_positive_lesions_per_subject")}


def collect(folders: list[Path]) -> dict[str, dict[str, dict]]:
    """{entry id: {condition: figures}} over every finished run of every folder."""
    table: dict[str, dict[str, dict]] = {}
    for folder in folders:
        for record in sorted((folder / "runs").glob("*/run.json")):
            table.setdefault(record.parent.name, {})[folder.name] = figures(record.parent)
    return table


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def summary(values: list, key: str) -> tuple[float | None, float | None]:
    """(mean, worst) of the conditions that have the figure."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    worst = max(present) if key in LOWER_IS_BETTER else min(present)
    return sum(present) / len(present), worst


def markdown(table: dict, conditions: list[str], metric: str) -> str:
    head = ["entry", *[f"{metric} {c}" for c in conditions], f"{metric} mean", f"{metric} worst"]
    others = [k for k in FIGURES if k != metric]
    head += [f"{FIGURES[k]} mean / worst" for k in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def order(item):
        mean, worst = summary([item[1].get(c, {}).get(metric) for c in conditions], metric)
        return -(worst if worst is not None else -math.inf)
    for entry, by_condition in sorted(table.items(), key=order):
        values = [by_condition.get(c, {}).get(metric) for c in conditions]
        cells = [entry, *map(_fmt, values), *map(_fmt, summary(values, metric))]
        for key in others:
            mean, worst = summary([by_condition.get(c, {}).get(key) for c in conditions], key)
            cells.append(f"{_fmt(mean)} / {_fmt(worst)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results/<protocol id> folders, one per condition")
    parser.add_argument("--metric", default="auprc", choices=sorted(FIGURES), help="the figure rows are sorted by "
                                                                                    "(its worst condition)")
    args = parser.parse_args()
    table = collect(args.results)
    if not table:
        raise SystemExit(f"error: {', '.join(map(str, args.results))}: no finished runs")
    print(markdown(table, [f.name for f in args.results], args.metric))


if __name__ == "__main__":
    main()
