"""Peak memory of the evaluate stage on 1 and on 20 test subjects, measured in one run and printed.

Evaluation streams subjects (validation first, then test, one at a time), so its peak should be one
subject's volumes plus the pooled brain voxels (5 B/voxel), not every volume at once. The data are
synthetic BraTS-like subjects (``pipeline.data.synth``, 1 mm by default: the real 240x240x155 grid) and
fake anomaly maps (tumour indicator plus noise, as the leaderboard tests make them). Both cases
share 2 validation subjects and differ only in the number of test subjects. Each case runs
``pipeline.evaluation.evaluate.evaluate_scores`` (metrics, 1000 bootstrap resamples, CSV, masks, report) in
its own process, which reports:

- ``ru_maxrss``: peak resident memory of the whole process, and its growth over the process after
  the imports (torch and MONAI come with ``pipeline.data.dataset``);
- the tracemalloc peak: NumPy buffers and Python objects allocated during the evaluation.

    python benchmarks/bench_evaluate.py [--spacing 1.0] [--subjects 20] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np

VALIDATION = 2
"""Validation subjects of both cases (they fix the threshold; one has a tumour)."""


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_dataset(root: Path, subjects: int, spacing: float) -> list[dict]:
    """The synthetic dataset (generated once per work folder) and its subjects."""
    from pipeline.common import TASK
    from pipeline.data.dataset import load_subjects
    from pipeline.data.synth import generate_dataset

    if not (root / TASK / "dataset.json").is_file():
        healthy = max(1, subjects // 4)
        generate_dataset(root, n_healthy=healthy, n_tumour=subjects - healthy, seed=0, spacing=spacing,
                         workers=os.cpu_count() or 2, progress=False)
    return sorted(load_subjects(root).data, key=lambda item: item["subject"])


def fake_map(label_path: str, path: Path, rng: np.random.Generator) -> None:
    """A good method's map on the label's grid: tumour indicator plus uniform noise (float32)."""
    label = nib.load(label_path)
    score = (np.asarray(label.dataobj) > 0).astype(np.float32) + 0.3 * rng.random(label.shape, dtype=np.float32)
    nib.save(nib.Nifti1Image(score, label.affine), str(path))


def make_run(scores: Path, maps: Path, validation: list[str], test: list[str]) -> Path:
    """A scores folder with index.json as the score stage writes it; map files are hard links."""
    index = {}
    for section, names in (("validation", validation), ("test", test)):
        (scores / section).mkdir(parents=True, exist_ok=True)
        for name in names:
            target = scores / section / f"{name}_score.nii.gz"
            if not target.exists():
                os.link(maps / f"{name}_score.nii.gz", target)
            index[name] = {"section": section, "files": {"score": f"{section}/{name}_score.nii.gz"}}
    (scores / "index.json").write_text(json.dumps({"format": 1, "settings": {"sampler": "fake"}, "subjects": index}))
    return scores


def prepare(work: Path, n_test: int, spacing: float) -> dict[str, Path]:
    """Dataset, maps and the two scores folders (1 and ``n_test`` test subjects)."""
    items = make_dataset(work / "data", VALIDATION + n_test, spacing)
    tumour = [it for it in items if np.asarray(nib.load(it["label"]).dataobj).any()]
    validation = [tumour[0]["subject"], next(it["subject"] for it in items if it not in tumour)]
    test = [it["subject"] for it in items if it["subject"] not in validation][:n_test]
    maps = work / "maps"
    maps.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for item in items:
        if not (maps / f"{item['subject']}_score.nii.gz").exists():
            fake_map(item["label"], maps / f"{item['subject']}_score.nii.gz", rng)
    return {"data": work / "data",
            "1": make_run(work / "run-1" / "scores", maps, validation, test[:1]),
            str(n_test): make_run(work / f"run-{n_test}" / "scores", maps, validation, test)}


def run_worker(data: Path, scores: Path) -> dict:
    """Evaluate one scores folder; report peak memory (imports first, so growth counts the evaluation)."""
    import matplotlib.pyplot  # noqa: F401  the report's import, as the evaluate stage pays it

    from pipeline.evaluation.evaluate import evaluate_scores

    base = rss_mb()
    tracemalloc.start()
    start = time.perf_counter()
    metrics = evaluate_scores(data, scores, scores.parent / "evaluation", n_boot=1000, progress=False)
    seconds = time.perf_counter() - start
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    shape = nib.load(next((scores / "test").glob("*.nii.gz"))).shape
    return {"rss_mb": rss_mb(), "rss_after_imports_mb": base, "traced_mb": traced, "seconds": seconds,
            "subjects": metrics["test"]["subjects"], "brain_voxels": metrics["test"]["brain_voxels"],
            "volume_voxels": int(np.prod(shape)), "auroc": metrics["test"]["auroc"]}


def spawn(data: Path, scores: Path) -> dict:
    from common import run_worker  # here, not at the top: a worker must not load torch

    return run_worker(__file__, ["--worker", str(data), str(scores)])


def show(rec: dict) -> None:
    pooled = 5 * rec["brain_voxels"] / 2**20
    print(f"  {rec['subjects']:3d} test subjects: ru_maxrss {rec['rss_mb']:7.0f} MB "
          f"(+{rec['rss_mb'] - rec['rss_after_imports_mb']:5.0f} MB over the imports), "
          f"tracemalloc peak {rec['traced_mb']:6.0f} MB, pooled test voxels {pooled:5.0f} MB, "
          f"{rec['seconds']:5.1f} s, AUROC {rec['auroc']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, default=1.0, help="mm; 1.0 is the BraTS grid")
    parser.add_argument("--subjects", type=int, default=20, help="test subjects of the large case")
    parser.add_argument("--workdir", type=Path, default=None, help="reused between runs (data, maps)")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(*args.worker)))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    paths = prepare(work, args.subjects, args.spacing)
    print(f"evaluate stage at {args.spacing:g} mm, {VALIDATION} validation subjects, each case in its own process "
          f"({work})")
    one, many = spawn(paths["data"], paths["1"]), spawn(paths["data"], paths[str(args.subjects)])
    print(f"  volume: {one['volume_voxels']:,} voxels")
    show(one)
    show(many)
    growth = [rec["rss_mb"] - rec["rss_after_imports_mb"] for rec in (one, many)]
    print(f"ratio {args.subjects} / 1 subject: ru_maxrss {many['rss_mb'] / one['rss_mb']:.2f}x (target <= 1.5x), "
          f"growth over the imports {growth[1] / growth[0]:.2f}x, tracemalloc peak "
          f"{many['traced_mb'] / one['traced_mb']:.2f}x")


if __name__ == "__main__":
    main()
