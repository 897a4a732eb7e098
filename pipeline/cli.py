"""``pipeline`` command line: the same library functions the bundle configs call.

Heavy imports (MONAI, torch) happen inside each command so ``pipeline --help`` stays instant.
Bad input ends with one line ``error: <file>: <problem>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from pathlib import Path

from .errors import InputError, find_input_error

DEFAULT_LEADERBOARD = "results/leaderboard.csv"


def _cmd_synth(args) -> None:
    from .synth import generate_dataset

    task_dir = generate_dataset(args.out, n_healthy=args.healthy, n_tumour=args.tumour, seed=args.seed,
                                spacing=args.spacing, workers=args.workers, progress=not args.quiet,
                                hidden_test_labels=args.hidden_test_labels, test_fraction=args.test_fraction)
    hidden = f"; hidden test labels in {args.hidden_test_labels}" if args.hidden_test_labels else ""
    print(f"wrote {task_dir}{hidden}")


def _cmd_prepare(args) -> None:
    from .data import PreprocessConfig, prepare_data

    cfg = PreprocessConfig(modalities=args.modalities, image_size=args.image_size,
                           pixdim=(args.spacing,) * 3, min_brain_fraction=args.min_brain_fraction)
    prepared = prepare_data(args.dataset_dir, args.split_file, args.cache_dir, cfg, split_seed=args.split_seed,
                            workers=args.workers, progress=not args.quiet)
    counts = {s: len(prepared.split[s]) for s in ("train", "validation", "test")}
    print(f"split {args.split_file}: {counts}; healthy-slice cache {prepared.cache_dir}")


def parse_overrides(tokens: list[str]) -> dict:
    """``--key value`` pairs (values read as YAML: numbers, lists, booleans) -> config overrides."""
    if len(tokens) % 2 or not all(t.startswith("--") for t in tokens[::2]):
        raise InputError("command line", f"bundle settings must come as '--key value' pairs, got {' '.join(tokens)}")
    return {key[2:]: _yaml_value(value, "command line", key) for key, value in zip(tokens[::2], tokens[1::2])}


def _yaml_value(text: str, source: str, key: str):
    """A command-line value read as YAML; a malformed one is one line, not a parser traceback."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InputError(source, f"{key}: value {text!r} is not valid YAML ({str(err).splitlines()[0]})") from None


def _cmd_bundle(workflow: str):
    """A subcommand that runs one bundle workflow, forwarding ``--key value`` settings to it."""

    def run(args) -> None:
        from .bundle import check_plain_settings

        overrides = parse_overrides(args.settings)
        check_plain_settings(overrides, "command line", args.trust_expressions, prefix="--")
        if getattr(args, "nproc", 1) > 1:
            _run_torchrun(f"multi_gpu_{workflow}", args.nproc, overrides)
            return
        from .bundle import run_bundle

        run_bundle(workflow, tracking=args.tracking, trust_expressions=args.trust_expressions, **overrides)

    return run


def _run_torchrun(workflow: str, nproc: int, overrides: dict) -> None:
    import json
    import subprocess

    from .bundle import config_files

    files = "[" + ",".join(repr(f) for f in config_files(workflow)) + "]"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "monai.bundle", "run",
           "--config_file", files]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    code = subprocess.call(cmd)
    if code:
        raise SystemExit(code)


def _cmd_benchmark(args) -> None:
    from .benchmark import load_protocol, run_benchmark, validation_only
    from .leaderboard import show

    overrides = parse_assignments(args.set)
    protocol = load_protocol(args.protocol, overrides)
    runs = run_benchmark(args.protocol, args.results, args.leaderboard, progress=not args.quiet, overrides=overrides,
                         trust_expressions=args.trust_expressions)
    print(f"{len(runs)} runs under {Path(args.results) / protocol['id']}")
    if validation_only(protocol):
        print("validation-only study protocol: nothing submitted; table: python benchmarks/study_table.py "
              f"{Path(args.results) / protocol['id']}")
        return
    print(show(args.leaderboard, protocol_id=protocol["id"]))


def parse_assignments(items: list[str] | None) -> dict:
    """``KEY=VALUE`` strings (values read as YAML) -> {dotted key: value}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError("--set", f"expects KEY=VALUE (e.g. dataset.dir=data/msd), got {item!r}")
        out[key] = _yaml_value(value, "--set", key)
    return out


def _cmd_submit(args) -> None:
    from .leaderboard import submit

    binding = _protocol_binding(args.protocol, args.set) if args.protocol else None
    row = submit(args.run_dir, args.leaderboard, binding, ground_truth_dir=getattr(args, "ground_truth", None))
    print(f"submitted {row['method']} to {args.leaderboard}: AUROC {row['auroc']:.4f}, AUPRC {row['auprc']:.4f}, "
          f"Dice {row['dice']:.4f}")


def _protocol_binding(path, assignments) -> dict:
    from .benchmark import load_protocol, protocol_for_submission

    return protocol_for_submission(load_protocol(path, parse_assignments(assignments)))


def _cmd_init(args) -> None:
    from .leaderboard import register_protocol, registry_path

    record = register_protocol(args.leaderboard, _protocol_binding(args.protocol, args.set))
    print(f"{registry_path(args.leaderboard)}: protocol {record['id']} (hash {record['hash'][:12]}, dataset "
          f"{record['dataset_fingerprint']}, {len(record['split']['test'])} test subjects)")


def _cmd_show(args) -> None:
    from .leaderboard import show

    print(show(args.leaderboard, protocol_id=args.protocol_id, metric=args.metric, html_path=args.html))


def _cmd_site(args) -> None:
    from .site import build_site

    print(f"wrote {build_site(args.csv, args.out, metric=args.metric)}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-expressions", action="store_true",
                        help="allow settings that MONAI's config parser runs as code ('$...', '@...', '%%...', "
                             "_target_); only for protocol files and values you trust")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="Unsupervised brain-tumour detection with diffusion models (MONAI). "
                                     "Each command calls the same library functions as the bundle configs.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic BraTS-like dataset in the MSD Task01 layout")
    p.add_argument("--out", required=True, help="root folder; the data goes to OUT/Task01_BrainTumour")
    p.add_argument("--healthy", type=_positive_int, default=8, help="subjects without tumour (default 8)")
    p.add_argument("--tumour", type=_positive_int, default=16, help="subjects with a tumour (default 16)")
    p.add_argument("--seed", type=int, default=0, help="generator seed: same seed, same bytes (default 0)")
    p.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (default 2.0; BraTS is 1.0)")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--hidden-test-labels", metavar="GT_DIR", default=None,
                   help="public-leaderboard dataset: list --test-fraction of the subjects as test images without "
                        "labels; their labels go to GT_DIR/labelsTs (keep GT_DIR and the seed to yourself)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of healthy and of tumour subjects held out with --hidden-test-labels (default 0.2)")
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

    p = sub.add_parser("train", help="train the diffusion model (the bundle's train config)",
                       epilog="Any bundle setting can follow as --key value, e.g. --noise simplex --epochs 30 "
                              "--dataset_dir data/msd --image_size 128 --modalities [FLAIR,T2w].")
    p.add_argument("--nproc", type=int, default=1, help="processes for DistributedDataParallel (torchrun; gloo on CPU)")
    p.add_argument("--tracking", choices=["mlflow"], default=None, help="log the run to MLflow")
    _trust_flag(p)
    p.set_defaults(func=_cmd_bundle("train"), bundle=True)

    p = sub.add_parser("score", help="anomaly maps for validation + test subjects (the bundle's inference config)",
                       epilog="Settings as --key value: --sampler x0|ddim|ddpm|patched|flair --t_start 150 --ddim_steps 10 "
                              "--n_draws 1 --model_path PATH --scores_dir DIR.")
    p.add_argument("--nproc", type=int, default=1, help="processes that share the subjects (torchrun; gloo on CPU)")
    _trust_flag(p)
    p.set_defaults(func=_cmd_bundle("inference"), bundle=True, tracking=None)

    p = sub.add_parser("evaluate", help="metrics.json, per-subject CSV, report.png from saved maps (evaluate config)",
                       epilog="Settings as --key value: --scores_dir DIR --evaluation_dir DIR --bootstrap_resamples N "
                              "--ground_truth_dir DIR (hidden test labels).")
    _trust_flag(p)
    p.set_defaults(func=_cmd_bundle("evaluate"), bundle=True, tracking=None)

    p = sub.add_parser("benchmark", help="run a benchmark protocol (train, score, evaluate every entry), "
                                         "submit to the leaderboard and print it")
    p.add_argument("protocol", help="protocol file, e.g. configs/benchmark/default.yaml")
    p.add_argument("--results", default="results", help="results root (default results/)")
    p.add_argument("--leaderboard", default=DEFAULT_LEADERBOARD, help=f"CSV (default {DEFAULT_LEADERBOARD})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a protocol value by dotted key, e.g. --set dataset.dir=data/msd --set bundle.train_steps=100")
    _trust_flag(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser("leaderboard", help="submit a run folder or show the ranked table")
    lsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = lsub.add_parser("init", help="bind the leaderboard to a protocol (its hash, data content and split)")
    q.add_argument("--protocol", required=True, help="protocol file, e.g. configs/benchmark/default.yaml")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="protocol override, as for benchmark")
    q.add_argument("--leaderboard", default=DEFAULT_LEADERBOARD)
    q.set_defaults(func=_cmd_init)
    q = lsub.add_parser("submit", help="recompute a run's metrics from its maps and append it")
    q.add_argument("run_dir")
    q.add_argument("--protocol", default=None, help="protocol file; needed only for the first submission under "
                                                    "its id (later ones are checked against the registered one)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="protocol override, as for benchmark")
    q.add_argument("--leaderboard", default=DEFAULT_LEADERBOARD)
    q.add_argument("--ground-truth", default=None, metavar="DIR",
                   help="organiser's folder with the hidden test labels (DIR/labelsTs/<subject>.nii.gz)")
    q.set_defaults(func=_cmd_submit)
    q = lsub.add_parser("show", help="ranked table (Markdown) with 95 %% intervals and paired tests")
    q.add_argument("--leaderboard", default=DEFAULT_LEADERBOARD)
    q.add_argument("--protocol-id", default=None)
    q.add_argument("--metric", default="auprc", choices=["auprc", "auroc", "dice"])
    q.add_argument("--html", default=None, help="also write the table as HTML to this file")
    q.set_defaults(func=_cmd_show)
    q = lsub.add_parser("site", help="static site (opens from the file system): ranked tables, forest plots, "
                                     "one page per run")
    q.add_argument("--csv", "--leaderboard", dest="csv", default=DEFAULT_LEADERBOARD,
                   help=f"leaderboard CSV (default {DEFAULT_LEADERBOARD})")
    q.add_argument("--out", default=None, help="site folder, replaced whole (default: site/ beside the CSV)")
    q.add_argument("--metric", default="auprc", choices=["auprc", "auroc", "dice"], help="ranking metric")
    q.set_defaults(func=_cmd_site)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "bundle", False):
        args.settings = extra
    elif extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except Exception as err:  # noqa: BLE001 - bad input -> one line; anything else re-raised
        found = find_input_error(err)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
