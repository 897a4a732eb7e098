"""Time noise draws, and with ``--unet`` their share of one training step measured in the same run.

    python benchmarks/bench_noise.py [--unet] [--device cuda] [--repeats 20]

The first simplex call loads (or, on a fresh install, compiles) opensimplex's numba kernels; it is
reported apart from the warm timings.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.noise import make_noise

SHAPES = [(32, 1, 64, 64), (16, 1, 128, 128)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device, repeats: int) -> float:
    """Median wall time of ``fn`` in ms, after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _train_step(shape, device):
    """One epsilon-prediction step of the train stage's default UNet, as a closure."""
    from monai.networks.nets import DiffusionModelUNet

    net = DiffusionModelUNet(spatial_dims=2, in_channels=shape[1], out_channels=shape[1], channels=(32, 64, 64),
                             attention_levels=(False, False, True), num_res_blocks=1, num_head_channels=32).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.randn(shape, device=device)
    eps = torch.randn(shape, device=device)
    t = torch.randint(0, 1000, (shape[0],), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(net(x + eps, t), eps).backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--unet", action="store_true", help="also time a training step for the noise share")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={device} torch_threads={torch.get_num_threads()}")

    start = time.perf_counter()
    make_noise("simplex", image_size=64)((1, 1, 8, 8))
    print(f"first simplex call (numba load/compile): {(time.perf_counter() - start) * 1e3:.0f} ms")

    for shape in SHAPES:
        row = {kind: _time_ms(lambda g=make_noise(kind, image_size=shape[-1]): g(shape, device=device), device,
                              args.repeats) for kind in ("gaussian", "simplex")}
        line = f"{shape}: gaussian {row['gaussian']:.2f} ms, simplex {row['simplex']:.2f} ms"
        if args.unet:
            step = _time_ms(_train_step(shape, device), device, args.repeats)
            line += f", train step {step:.1f} ms, simplex/step {100 * row['simplex'] / step:.1f} %"
        print(line)


if __name__ == "__main__":
    main()
