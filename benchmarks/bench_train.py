"""Training throughput at 64x64 and 128x128, and where a step's time goes, in one run.

Builds the bundle's own train workflow (same loader, prepare-batch, network, optimiser and
inferer as ``monai.bundle run``) on a scratch synthetic dataset, then times each part of a step:
data (loader), noise + timesteps (prepare-batch), model (forward, loss, backward, step).
The noise share must stay under 5 %.

    python benchmarks/bench_train.py [--steps 10] [--noise simplex] [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import machine, scratch_dataset, timer

from pipeline.bundle import make_workflow


def measure(dataset: Path, work: Path, image_size: int, noise: str, steps: int, batch_size: int) -> dict:
    flow = make_workflow("train", dataset_dir=str(dataset), output_dir=str(work / f"out{image_size}"),
                         ckpt_dir=str(work / f"ckpt{image_size}"), image_size=image_size, noise=noise,
                         batch_size=batch_size, progress=False)
    get = flow.parser.get_parsed_content
    loader, prepare, network = get("train#dataloader"), get("train#prepare_batch"), get("network")
    optimizer, inferer, loss_fn, device = get("optimizer"), get("inferer"), get("loss"), get("device")
    network.train()
    t: dict = {}
    batches = iter(())
    done = 0
    for step in range(steps + 2):  # two warm-up steps (numba load, allocator)
        if step == 2:
            t.clear()
        with timer(t, "data"):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
        with timer(t, "noise"):
            images, target, _, kwargs = prepare(batch, device)
        with timer(t, "model"):
            pred = inferer(images, network, **kwargs)
            loss = loss_fn(pred, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if step >= 2:
            done += images.shape[0]
    total = sum(t.values())
    return {"slices_per_s": done / total, **{k: v / total for k, v in t.items()}, "batch": batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--noise", default="simplex", choices=["gaussian", "simplex"])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_train_"))
    dataset = scratch_dataset(work / "data", n_healthy=4, n_tumour=4, spacing=2.0)
    print(f"machine: {machine()}")
    print(f"{'size':>8} {'noise':>8} {'batch':>5} {'slices/s':>9} {'data %':>7} {'noise %':>8} {'model %':>8}")
    for size, batch in ((64, 32), (128, 16)):
        r = measure(dataset, work, size, args.noise, args.steps, batch)
        print(f"{size:>4}x{size:<3} {args.noise:>8} {r['batch']:>5} {r['slices_per_s']:9.1f} {100 * r['data']:7.2f} "
              f"{100 * r['noise']:8.2f} {100 * r['model']:8.2f}")
        if r["noise"] >= 0.05:
            print(f"  WARNING: noise takes {100 * r['noise']:.1f} % of a step (target < 5 %)")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
