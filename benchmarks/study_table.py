"""Print a benchmark's runs as one Markdown table: settings, validation (or test) numbers, timings.

    python benchmarks/study_table.py results/study-v2            # validation numbers (study runs)
    python benchmarks/study_table.py results/synthetic-default-v2  # test numbers of finished entries

Reads each run's ``config.json``, ``evaluation/metrics.json`` and ``run.json``; nothing is recomputed,
so run it only on folders the benchmark wrote.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.common import BASELINE, read_json

SETTINGS = ("prediction_type", "noise", "modalities", "learning_rate", "lr_final_fraction", "train_steps",
            "train_patch_size", "sampler", "t_start", "ddim_steps", "patch_size", "residual_norm", "median_3d",
            "min_component_voxels")


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list):
        return "+".join(str(v) for v in value) if all(isinstance(v, (int, float)) for v in value) else ",".join(map(str, value))
    return str(value)


def row(run_dir: Path) -> dict:
    config = read_json(run_dir / "config.json", "run config")
    metrics = read_json(run_dir / "evaluation" / "metrics.json", "metrics")
    timings = read_json(run_dir / "run.json", "run record")["timings"]
    section = "test" if metrics.get("test") else "validation"
    m = metrics[section]
    recon = m.get("reconstruction") or {}
    dice = m.get("dice") if section == "test" else m.get("best_dice")
    defaults = {"residual_norm": "none", "median_3d": 1, "min_component_voxels": 0, "lr_final_fraction": 1.0,
                "modalities": ["FLAIR"], "train_patch_size": None, "patch_size": None}
    return {"entry": run_dir.name, "section": section, **{k: config.get(k, defaults.get(k)) for k in SETTINGS},
            "auprc": m["auprc"], "auroc": m["auroc"], "dice": dice, "subject_auroc": m.get("subject_auroc"),
            "healthy_residual": recon.get("healthy_residual"), "residual_ratio": recon.get("residual_ratio"),
            "psnr": recon.get("psnr"), "ssim": recon.get("ssim"),
            "train_s": timings["train_seconds"], "score_s": timings["inference_seconds"]}


def markdown(rows: list[dict]) -> str:
    dice = "Dice (val. thr.)" if rows and rows[0]["section"] == "test" else "best Dice (oracle)"
    head = ["entry", "pred", "noise", "ch", "lr", "sampler", "t_L", "k", "norm", "3D med", "cc",
            "AUPRC", "AUROC", dice, "subj. AUROC", "healthy res.", "ratio", "PSNR", "SSIM", "train s", "score s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: -r["auprc"]):
        cells = [r["entry"], r["prediction_type"], r["noise"], str(len(r["modalities"] or [1])),
                 _fmt(r["learning_rate"], 4) + ("" if r["lr_final_fraction"] == 1.0 else " cos"),
                 r["sampler"] + (f" p{r['patch_size']}" if r["sampler"] == "patched" else ""), _fmt(r["t_start"]),
                 _fmt(r["ddim_steps"]), r["residual_norm"], _fmt(r["median_3d"]), _fmt(r["min_component_voxels"]),
                 _fmt(r["auprc"]), _fmt(r["auroc"]), _fmt(r["dice"]), _fmt(r["subject_auroc"]),
                 _fmt(r["healthy_residual"], 4), _fmt(r["residual_ratio"], 2), _fmt(r["psnr"], 1),
                 _fmt(r["ssim"]), f"{r['train_s']:.0f}", f"{r['score_s']:.0f}"]
        if r["sampler"] == BASELINE:
            cells[1:11] = ["-"] * 3 + ["-", "flair"] + ["-"] * 5
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results/<protocol id>")
    args = parser.parse_args()
    runs = sorted(p.parent for p in (args.results / "runs").glob("*/run.json"))
    if not runs:
        raise SystemExit(f"error: {args.results}: no finished runs")
    print(markdown([row(r) for r in runs]))


if __name__ == "__main__":
    main()
