"""Training throughput for each setting tried, and where a step's time goes, in one run.

Builds the bundle's own train workflow (same loader, prepare-batch, network, optimiser and
inferer as ``monai.bundle run``) on a scratch synthetic dataset, then times each part of a step:
data (loader), noise + timesteps (prepare-batch), model (forward, loss, backward, step).
The noise share must stay under 5 %. Settings: the first release's UNet (the 26.7 slices/s
reference), the study's smaller UNet, channels_last, one thread, torch.compile, and the glibc
allocator left as it is (a subprocess with PIPELINE_KEEP_MALLOC=1, see pipeline/runtime.py).

    python benchmarks/bench_train.py [--steps 10] [--noise simplex]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import machine, scratch_dataset, timer

from pipeline.bundle import make_workflow

SMALL_UNET = {"unet_channels": [16, 32, 64], "attention_levels": [False, False, False], "norm_num_groups": 16,
              "prediction_type": "sample"}
SETTINGS = {  # name -> (image size, batch, bundle overrides, channels_last, threads, compile)
    "v1 UNet [32,64,64]+attn": (64, 32, {}, False, None, False),
    "study UNet [16,32,64]": (64, 16, SMALL_UNET, False, None, False),
    "study UNet, 4 channels": (64, 16, {**SMALL_UNET, "modalities": ["FLAIR", "T1w", "T1gd", "T2w"]}, False, None, False),
    "study UNet, channels_last": (64, 16, SMALL_UNET, True, None, False),
    "study UNet, 1 thread": (64, 16, SMALL_UNET, False, 1, False),
    "study UNet, torch.compile": (64, 16, SMALL_UNET, False, None, True),
    "v1 UNet at 128 px": (128, 16, {}, False, None, False),
}


def measure(dataset: Path, work: Path, name: str, noise: str, steps: int) -> dict:
    image_size, batch_size, overrides, channels_last, threads, compile_ = SETTINGS[name]
    tag = "".join(c for c in name if c.isalnum())
    flow = make_workflow("train", dataset_dir=str(dataset), output_dir=str(work / f"out{tag}"),
                         ckpt_dir=str(work / f"ckpt{tag}"), cache_dir=str(work / "cache"),
                         split_file=str(work / "split.json"), image_size=image_size, noise=noise,
                         batch_size=batch_size, progress=False, **overrides)
    get = flow.parser.get_parsed_content
    loader, prepare, network = get("train#dataloader"), get("train#prepare_batch"), get("network")
    optimizer, inferer, loss_fn, device = get("optimizer"), get("inferer"), get("loss"), get("device")
    network.train()
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    if channels_last:
        network.to(memory_format=torch.channels_last)
    model = torch.compile(network) if compile_ else network
    try:
        return _time_steps(loader, prepare, model, optimizer, inferer, loss_fn, device, steps, channels_last, batch_size)
    finally:
        torch.set_num_threads(threads_before)


def _time_steps(loader, prepare, network, optimizer, inferer, loss_fn, device, steps, channels_last, batch_size):
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
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
        with timer(t, "model"):
            pred = inferer(images, network, **kwargs)
            loss = loss_fn(pred, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if step >= 2:
            done += images.shape[0]
    total = sum(t.values())
    return {"slices_per_s": done / total, **{k: v / total for k, v in t.items()}, "batch": batch_size,
            "size": images.shape[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--noise", default="simplex", choices=["gaussian", "simplex"])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only", default=None, help="one setting name (used for the allocator subprocess)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_train_"))
    dataset = scratch_dataset(work / "data", n_healthy=4, n_tumour=4, spacing=2.0)
    names = [args.only] if args.only else list(SETTINGS)
    if not args.only:
        print(f"machine: {machine()}")
        print(f"{'setting':<34} {'size':>4} {'batch':>5} {'slices/s':>9} {'vs 26.7':>8} {'data %':>7} {'noise %':>8} {'model %':>8}")
    for name in names:
        try:
            r = measure(dataset, work, name, args.noise, args.steps)
        except Exception as err:  # noqa: BLE001 - e.g. torch.compile without a working compiler
            print(f"{name:<34} failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}", flush=True)
            continue
        _print(name + (" (glibc mmap default)" if args.only else ""), r)
    if not args.only:  # the same setting with the allocator untouched, in a fresh process
        env = {**os.environ, "PIPELINE_KEEP_MALLOC": "1"}
        subprocess.run([sys.executable, __file__, "--only", "study UNet [16,32,64]", "--steps", str(args.steps),
                        "--noise", args.noise, "--workdir", str(work)], env=env, check=True)


def _print(name: str, r: dict) -> None:
    size = r["size"]
    print(f"{name:<34} {size:>4} {r['batch']:>5} {r['slices_per_s']:9.1f} {r['slices_per_s'] / 26.7:7.2f}x "
          f"{100 * r['data']:7.2f} {100 * r['noise']:8.2f} {100 * r['model']:8.2f}", flush=True)
    if r["noise"] >= 0.05:
        print(f"  WARNING: noise takes {100 * r['noise']:.1f} % of a step (target < 5 %)")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
