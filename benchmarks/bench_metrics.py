"""Pixel metrics at 10^8 voxels: time and peak memory of ours versus scikit-learn, in one run.

Scores are float32 (standard normal, +1.5 on tumour), labels bool with ~3 % positives, generated
in chunks from a fixed seed so every worker sees the same data. Each side runs in its own
subprocess, so one's peak cannot hide the other's:

- ours: ``pixel_metrics`` (AUROC + AUPRC + best Dice from one sort), then ``auroc`` and ``auprc``
  as two calls (the pair scikit-learn is timed on), then a ``ScoreAccumulator`` over 100 subjects:
  exact summary and 1000 bootstrap replicates of AUROC, AUPRC and Dice;
- scikit-learn: ``roc_auc_score`` + ``average_precision_score``.

Memory is the peak beyond the inputs: tracemalloc (NumPy buffers, per call) and the growth of
``ru_maxrss`` over the RSS once the data exist (whole worker; sees non-NumPy buffers too).

    python benchmarks/bench_metrics.py [--voxels 1e8] [--skip-sklearn]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import tracemalloc

import numpy as np

GEN_CHUNK = 1 << 22
POSITIVE_RATE = 0.03
SUBJECTS = 100


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float32 scores and bool labels, filled chunk by chunk (no float64 copy of the whole)."""
    scores, labels = np.empty(n, np.float32), np.empty(n, bool)
    for i, a in enumerate(range(0, n, GEN_CHUNK)):
        rng = np.random.default_rng([seed, i])
        m = min(GEN_CHUNK, n - a)
        labels[a:a + m] = rng.random(m, dtype=np.float32) < POSITIVE_RATE
        scores[a:a + m] = rng.standard_normal(m, dtype=np.float32) + np.float32(1.5) * labels[a:a + m]
    return scores, labels


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(fn, record: dict, key: str):
    """Run ``fn``; record wall time and tracemalloc peak (MB) under ``key``."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    result = fn()
    record[key] = {"s": time.perf_counter() - start, "mb": (tracemalloc.get_traced_memory()[1] - base) / 2**20}
    return result


def worker_ours(scores: np.ndarray, labels: np.ndarray) -> dict:
    from pipeline.evaluation.metrics import auprc, auroc, pixel_metrics
    from pipeline.evaluation.pooled import ScoreAccumulator

    rec: dict = {}
    rec["values"] = measure(lambda: pixel_metrics(scores, labels), rec, "pixel_metrics (1 sort)")
    pair = measure(lambda: (auroc(scores, labels), auprc(scores, labels)), rec, "auroc + auprc")
    rec["values"].update(auroc=pair[0], auprc=pair[1])
    rec["rss_mb_metrics"] = rss_peak_mb()

    acc = ScoreAccumulator()
    bounds = np.linspace(0, scores.size, SUBJECTS + 1).astype(np.int64)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        acc.add(f"s{i:03d}", scores[a:b], labels[a:b])
    summary = measure(acc.summary, rec, "accumulator summary")
    ci = measure(lambda: acc.bootstrap(threshold=summary["best_threshold"], n_boot=1000, seed=0),
                 rec, f"bootstrap 1000 x {SUBJECTS} subjects")
    rec["bootstrap"] = ci
    return rec


def worker_sklearn(scores: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    rec: dict = {}
    values = measure(lambda: (roc_auc_score(labels, scores), average_precision_score(labels, scores)),
                     rec, "roc_auc_score + average_precision_score")
    rec["values"] = {"auroc": values[0], "auprc": values[1]}
    rec["rss_mb_metrics"] = rss_peak_mb()
    return rec


def run_worker(side: str, n: int) -> dict:
    import sklearn.metrics  # noqa: F401

    import pipeline.evaluation.pooled  # noqa: F401  imports first (metrics too), so RSS growth counts only the computation

    scores, labels = make_data(n)
    rss_data = rss_peak_mb()
    tracemalloc.start()
    rec = worker_ours(scores, labels) if side == "ours" else worker_sklearn(scores, labels)
    rec["rss_mb_data"] = rss_data
    rec["input_mb"] = (scores.nbytes + labels.nbytes) / 2**20
    return rec


def spawn(side: str, n: int) -> dict:
    from common import run_worker  # here, not at the top: a worker must not load torch

    return run_worker(__file__, ["--voxels", str(n), "--worker", side], f"{side} worker")


def report(side: str, rec: dict, n: int) -> None:
    for key, val in rec.items():
        if isinstance(val, dict) and "s" in val:
            print(f"  {side:7s} {key:42s} {val['s']:8.2f} s   tracemalloc peak {val['mb']:8.0f} MB"
                  f"  ({val['mb'] * 2**20 / n:5.2f} B/voxel)")
    grow = rec["rss_mb_metrics"] - rec["rss_mb_data"]
    print(f"  {side:7s} ru_maxrss growth over the data (metric calls): {grow:8.0f} MB"
          f"  (inputs {rec['input_mb']:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=float, default=1e8)
    parser.add_argument("--skip-sklearn", action="store_true", help="only time ours")
    parser.add_argument("--worker", choices=("ours", "sklearn"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = int(args.voxels)
    if args.worker:
        print(json.dumps(run_worker(args.worker, n)))
        return

    import os
    import platform

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}")
    print(f"{n:.3g} voxels, float32 scores, {POSITIVE_RATE:.0%} positives, each side in its own process")
    ours = spawn("ours", n)
    report("ours", ours, n)
    print("  ours    values:", {k: round(v, 6) for k, v in ours["values"].items()})
    print("  ours    bootstrap 95% CIs:", {k: tuple(round(x, 4) for x in v) for k, v in ours["bootstrap"].items()})
    if args.skip_sklearn:
        return
    theirs = spawn("sklearn", n)
    report("sklearn", theirs, n)
    d_roc = abs(ours["values"]["auroc"] - theirs["values"]["auroc"])
    d_ap = abs(ours["values"]["auprc"] - theirs["values"]["auprc"])
    print(f"  |ours - sklearn|: AUROC {d_roc:.2e}, AUPRC {d_ap:.2e}")
    t_ours, t_sk = ours["auroc + auprc"], theirs["roc_auc_score + average_precision_score"]
    rss_ours = max(ours["rss_mb_metrics"] - ours["rss_mb_data"], 1.0)
    rss_sk = theirs["rss_mb_metrics"] - theirs["rss_mb_data"]
    print(f"ratio sklearn / ours (auroc + auprc): time {t_sk['s'] / t_ours['s']:.1f}x, "
          f"tracemalloc peak {t_sk['mb'] / t_ours['mb']:.1f}x, ru_maxrss growth {rss_sk / rss_ours:.1f}x")


if __name__ == "__main__":
    main()
