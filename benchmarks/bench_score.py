"""Scoring cost and quality on one trained model, in one run: seconds per subject and validation
AUPRC for the AnoDDPM protocol (DDPM over every step from t_L: at the entry's t_L and at AnoDDPM's
published t_L = 250), DDIM k=10 and the fast sampler (x0: one network call per slice).

The model and every setting come from a benchmark protocol's first diffusion entry (the model the
benchmark trained, under results/<protocol id>/models/); AUPRC is pooled over the brain voxels of the
same validation subjects with a tumour for every sampler. Seconds per subject are reported whole
(preprocessing, reconstruction, map, inversion) and for the reconstruction alone.

Then, in the same run, the metric cost at 10^8 voxels against scikit-learn (benchmarks/bench_metrics.py).

    python benchmarks/bench_score.py [--protocol configs/benchmark/synthetic-default-v2.yaml] [--subjects 2] [--metric-voxels 1e8]
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from common import machine

from pipeline.protocols import (config_hash, entry_score_settings, entry_train_settings, expand_methods, is_baseline,
                                load_protocol)
from pipeline.bundle import make_workflow
from pipeline.data.dataset import load_subjects
from pipeline.data.transforms import preprocess_transforms
from pipeline.evaluation.pooled import ScoreAccumulator
from pipeline.scoring.score import Scorer, load_model, noise_streams, reconstruct, score_subject


def _workflow(protocol: dict, results: Path):
    entry = next(e for e in expand_methods(protocol) if not is_baseline(e))
    train = entry_train_settings(protocol, entry)
    model_dir = results / "models" / config_hash(train)
    if not (model_dir / "model.pt").is_file():
        raise SystemExit(f"error: {model_dir}: no trained model; run `pipeline benchmark {protocol['path']}` first")
    root = protocol["dataset"]["dir"]
    flow = make_workflow("inference", **train, **entry_score_settings(protocol, entry), dataset_dir=root,
                         split_file=str(results / "split.json"), cache_dir=str(results / "cache"),
                         model_path=str(model_dir / "model.pt"), progress=False)
    return entry, flow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default="configs/benchmark/synthetic-default-v2.yaml")
    parser.add_argument("--results", default="results")
    parser.add_argument("--subjects", type=int, default=2, help="validation subjects with a tumour, scored by every sampler")
    parser.add_argument("--metric-voxels", type=float, default=1e8, help="0 skips the metric benchmark")
    parser.add_argument("--anoddpm-depth", type=int, default=250,
                        help="also time AnoDDPM at its published noise level (0: only at the entry's t_L)")
    args = parser.parse_args()
    protocol = load_protocol(args.protocol)
    entry, flow = _workflow(protocol, Path(args.results) / protocol["id"])
    get = flow.parser.get_parsed_content
    base, preprocess = get("score_settings"), get("preprocess")
    model = load_model(get("network"), get("model_path"))
    scheduler, noise, device = get("scheduler"), get("noise_generator"), get("device")
    items = {item["subject"]: item for item in load_subjects(protocol["dataset"]["dir"]).data}
    sick = [s for s in get("split")["validation"] if (np.asarray(nib.load(items[s]["label"]).dataobj) > 0).any()]
    subjects = [items[s] for s in sick[: args.subjects]]
    transform = preprocess_transforms(preprocess)
    t = base.levels[0]
    settings = [("AnoDDPM (DDPM every step)", dataclasses.replace(base, sampler="ddpm", t_start=t), t + 1),
                ("DDIM k=10", dataclasses.replace(base, sampler="ddim", t_start=t, ddim_steps=10), 10),
                ("fast sampler (x0, 1 call)", dataclasses.replace(base, sampler="x0", t_start=t), 1)]
    if args.anoddpm_depth and args.anoddpm_depth != t:  # AnoDDPM's own depth (Wyatt et al.: lambda = 250)
        depth = args.anoddpm_depth
        settings.insert(1, (f"AnoDDPM at its t_L={depth}", dataclasses.replace(base, sampler="ddpm", t_start=depth),
                            depth + 1))
    print(f"machine: {machine()}")
    print(f"protocol {protocol['id']}, entry {entry['id']}: {len(subjects)} validation subjects with tumour, t_L={t}, "
          f"residual_norm={base.residual_norm} (off here: no calibration), median_3d={base.median_3d}")
    print(f"{'sampler':<28} {'calls/slice':>11} {'s/subject':>10} {'recon s/subject':>16} {'AUPRC':>7} {'AUROC':>7}")
    rows = {}
    for name, setting, calls in settings:
        setting = dataclasses.replace(setting, residual_norm="none", min_component_voxels=0)
        scorer = Scorer(model, scheduler, noise, setting, preprocess, device)
        acc, seconds, recon_seconds = ScoreAccumulator(), [], []
        for item in subjects:
            start = time.perf_counter()
            result = score_subject(item, transform, scorer)
            seconds.append(time.perf_counter() - start)
            recon_seconds.append(_reconstruction_seconds(scorer, result.grid, item["subject"]))
            label = np.asarray(nib.load(item["label"]).dataobj) > 0
            brain = (np.asarray(nib.load(item["image"]).dataobj) != 0).any(axis=-1)
            acc.add(item["subject"], result.score[brain], label[brain])
        rows[name] = np.mean(seconds)
        print(f"{name:<28} {calls:>11} {np.mean(seconds):10.2f} {np.mean(recon_seconds):16.3f} {acc.auprc():7.3f} "
              f"{acc.auroc():7.3f}", flush=True)
    fast = rows[settings[-1][0]]
    for name, _, _ in settings:
        if name.startswith("AnoDDPM"):
            print(f"fast sampler vs {name}, whole subject: {rows[name] / fast:.1f}x faster")
    if args.metric_voxels:
        print("\nmetric computation (exact AUROC + AUPRC):", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_metrics.py")), "--voxels",
                        str(args.metric_voxels)], check=True)


def _reconstruction_seconds(scorer: Scorer, grid: dict, subject: str) -> float:
    """Time of the sampler alone on the subject's brain slices (one batch per ``score_batch_size``)."""
    z = np.nonzero(grid["brain"][0].any(axis=(0, 1)))[0]
    x_all = torch.from_numpy(np.moveaxis(grid["image"][..., z], -1, 0).copy()).float()
    streams, batch = noise_streams(scorer, subject), scorer.settings.batch_size
    start = time.perf_counter()
    for i in range(0, len(x_all), batch):
        reconstruct(scorer, x_all[i:i + batch].to(scorer.device), streams)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
