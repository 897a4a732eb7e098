"""``pipeline`` command line: the same library functions the bundle configs call.

Heavy imports (MONAI, torch) happen inside each command so ``pipeline --help`` stays instant.
Bad input ends with one line ``error: <file>: <problem>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import InputError


def _cmd_synth(args) -> None:
    from .synth import generate_dataset

    task_dir = generate_dataset(args.out, n_healthy=args.healthy, n_tumour=args.tumour, seed=args.seed,
                                spacing=args.spacing, workers=args.workers, progress=not args.quiet)
    print(f"wrote {task_dir}")


def _cmd_prepare(args) -> None:
    from .data import PreprocessConfig, prepare_data

    cfg = PreprocessConfig(modalities=args.modalities, image_size=args.image_size,
                           pixdim=(args.spacing,) * 3, min_brain_fraction=args.min_brain_fraction)
    prepared = prepare_data(args.dataset_dir, args.split_file, args.cache_dir, cfg, split_seed=args.split_seed,
                            workers=args.workers, progress=not args.quiet)
    counts = {s: len(prepared.split[s]) for s in ("train", "validation", "test")}
    print(f"split {args.split_file}: {counts}; healthy-slice cache {prepared.cache_dir}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic BraTS-like dataset in the MSD Task01 layout")
    p.add_argument("--out", required=True, help="root folder; the data goes to OUT/Task01_BrainTumour")
    p.add_argument("--healthy", type=_positive_int, default=8, help="subjects without tumour (default 8)")
    p.add_argument("--tumour", type=_positive_int, default=16, help="subjects with a tumour (default 16)")
    p.add_argument("--seed", type=int, default=0, help="generator seed: same seed, same bytes (default 0)")
    p.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (default 2.0; BraTS is 1.0)")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="patient-level split + healthy-slice cache (what training reads)")
    p.add_argument("--dataset-dir", required=True, help="folder holding Task01_BrainTumour (or that folder)")
    p.add_argument("--split-file", required=True, help="split JSON: reused if it exists, written otherwise")
    p.add_argument("--cache-dir", required=True, help="where the slice cache goes")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--modalities", default="FLAIR", help="comma-separated, from FLAIR,T1w,T1gd,T2w (default FLAIR)")
    p.add_argument("--image-size", type=int, default=64, help="in-plane size in pixels (default 64)")
    p.add_argument("--spacing", type=float, default=2.0, help="resampling voxel size in mm (default 2.0)")
    p.add_argument("--min-brain-fraction", type=float, default=0.15)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
