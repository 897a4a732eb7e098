"""Data-stage throughput, measured in one run and printed:

- synthetic subjects per minute at 1 mm and 2 mm (``pipeline synth``, 2 worker processes),
- preprocessing volumes per minute (DecathlonDataset + transforms into the slice cache),
- cached-slice loader throughput in slices/s at 64x64 (target: >= 1,000 on 2 cores).

    python benchmarks/bench_data.py [--subjects 6] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import machine, timer
from torch.utils.data import DataLoader

from pipeline.data.dataset import PreprocessConfig, load_subjects
from pipeline.data.slice_cache import SliceDataset, build_slice_cache
from pipeline.data.synth import generate_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=6, help="subjects generated per spacing")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--loader-epochs", type=int, default=5)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    t: dict = {}
    print(f"machine: {machine()}")

    for spacing in (1.0, 2.0):
        root = work / f"synth_{spacing:g}mm"
        shutil.rmtree(root, ignore_errors=True)
        half = args.subjects // 2
        with timer(t, f"synth {spacing:g} mm"):
            generate_dataset(root, n_healthy=args.subjects - half, n_tumour=half, seed=0, spacing=spacing,
                             workers=2, progress=False)
        rate = args.subjects / t[f"synth {spacing:g} mm"] * 60
        print(f"synthetic subjects at {spacing:g} mm: {rate:8.1f} per minute ({args.subjects} subjects, 2 workers)")

    for spacing in (1.0, 2.0):
        root = work / f"synth_{spacing:g}mm"
        subjects = [item["subject"] for item in load_subjects(root).data]
        split = {"train": subjects, "validation": [], "test": []}
        cfg = PreprocessConfig(image_size=64)
        cache = work / f"cache_{spacing:g}mm"
        shutil.rmtree(cache, ignore_errors=True)
        with timer(t, f"prep {spacing:g}"):
            cache_dir = build_slice_cache(root, cache, split, cfg, workers=2, progress=False)
        rate = len(subjects) / t[f"prep {spacing:g}"] * 60
        print(f"preprocessing {spacing:g} mm volumes -> 2 mm, 64x64: {rate:8.1f} volumes per minute "
              f"({len(subjects)} volumes, 2 workers)")

    dataset = SliceDataset(cache_dir, "train")
    loader = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=0)
    start, n = time.perf_counter(), 0
    for _ in range(args.loader_epochs):
        for batch in loader:
            n += batch["image"].shape[0]
    rate = n / (time.perf_counter() - start)
    print(f"cached-slice loader, 64x64, batch 32, shuffled, main process: {rate:10.0f} slices/s "
          f"({n} slices; target >= 1000)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
