"""Scoring cost and quality on one trained model, in one run: seconds per subject and AUPRC for
the AnoDDPM protocol (DDPM over every step from t_L) and for DDIM at k = 10 and k = 25.

Uses the bundle's own objects (network, scheduler, noise, preprocessing) and the model trained by
the README's `pipeline train` (bundles/brats_diffusion_anomaly/models/model.pt) unless told otherwise.
AUPRC is pooled over the brain voxels of the same test subjects for every setting.

Then, in the same run, the metric cost at 10^8 voxels against scikit-learn (benchmarks/bench_metrics.py).

    python benchmarks/bench_score.py [--subjects 1] [--t-start 250] [--model-path PATH] [--metric-voxels 1e8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from common import machine

from pipeline.bundle import BUNDLE_DIR, make_workflow
from pipeline.data import load_subjects, preprocess_transforms
from pipeline.metrics import ScoreAccumulator
from pipeline.score import load_model, score_subject


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=1, help="test subjects (with tumour) scored by every setting")
    parser.add_argument("--metric-voxels", type=float, default=1e8, help="0 skips the metric benchmark")
    parser.add_argument("--t-start", type=int, default=250)
    parser.add_argument("--model-path", default=str(BUNDLE_DIR / "models" / "model.pt"))
    parser.add_argument("--dataset-dir", default="data/synthetic")
    parser.add_argument("--noise", default="simplex", help="noise the model was trained with")
    args = parser.parse_args()
    flow = make_workflow("inference", dataset_dir=args.dataset_dir, noise=args.noise, progress=False)
    get = flow.parser.get_parsed_content
    split, preprocess = get("prepared").split, get("preprocess")
    model = load_model(get("network"), args.model_path)
    scheduler, noise, device = get("scheduler"), get("noise_generator"), get("device")
    items = {item["subject"]: item for item in load_subjects(args.dataset_dir).data}
    with_tumour = [s for s in split["test"] if (np.asarray(nib.load(items[s]["label"]).dataobj) > 0).any()]
    subjects = [items[s] for s in with_tumour[: args.subjects]]  # AUPRC needs tumour voxels
    transform = preprocess_transforms(preprocess)
    settings = [("AnoDDPM (DDPM every step)", "ddpm", 0), ("DDIM k=10", "ddim", 10), ("DDIM k=25", "ddim", 25)]
    print(f"machine: {machine()}")
    print(f"model {args.model_path}, {len(subjects)} test subjects with tumour, t_L={args.t_start}, noise {args.noise}")
    print(f"{'setting':<28} {'network calls':>13} {'s/subject':>10} {'AUPRC':>7} {'AUROC':>7}")
    for name, sampler, steps in settings:
        acc, seconds = ScoreAccumulator(), []
        for item in subjects:
            start = time.perf_counter()
            result = score_subject(item, transform, model, scheduler, noise, sampler, args.t_start,
                                   max(steps, 1), 1, 64, device)
            seconds.append(time.perf_counter() - start)
            label = np.asarray(nib.load(item["label"]).dataobj) > 0
            brain = (np.asarray(nib.load(item["image"]).dataobj) != 0).any(axis=-1)
            acc.add(item["subject"], result.score[brain], label[brain])
        calls = args.t_start + 1 if sampler == "ddpm" else steps
        print(f"{name:<28} {calls:>13} {np.mean(seconds):10.1f} {acc.auprc():7.3f} {acc.auroc():7.3f}", flush=True)
    if args.metric_voxels:
        print("\nmetric computation (exact AUROC + AUPRC):", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_metrics.py")), "--voxels",
                        str(args.metric_voxels)], check=True)


if __name__ == "__main__":
    main()
