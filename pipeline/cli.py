"""``pipeline`` command line: the same library functions the bundle configs call.

Heavy imports (MONAI, torch) happen inside each command so ``pipeline --help`` stays instant.
Bad input ends with one line ``error: <file>: <problem>`` and exit code 2.

One flag grammar for every subcommand: ``--dataset-dir`` is the spelling help shows, ``--dataset_dir``
the same flag (bundle settings are config ids, so ``--t-start`` sets ``t_start``); ``--key=value``
works too. A flag that is neither an option of the subcommand nor, for train/score/evaluate, a
setting of the bundle is an error with the closest known flag. ``--quiet`` everywhere: warnings
and errors only, and the final summary line.
"""

from __future__ import annotations

import argparse
import difflib
import sys

from pathlib import Path

from .errors import InputError, find_input_error

DEFAULT_LEADERBOARD = "results/leaderboard.csv"


def _cmd_synth(args) -> None:
    from .synth import HiddenTest, generate_dataset

    task_dir = generate_dataset(args.out, n_healthy=args.healthy, n_tumour=args.tumour, seed=args.seed,
                                spacing=args.spacing, workers=args.workers, progress=not args.quiet,
                                hidden_test=HiddenTest(args.hidden_test_labels, args.test_fraction)
                                if args.hidden_test_labels else None)
    hidden = f"; hidden test labels in {args.hidden_test_labels}" if args.hidden_test_labels else ""
    print(f"wrote {task_dir}{hidden}")


def _cmd_prepare(args) -> None:
    from .common import SECTIONS
    from .data import PreprocessConfig, prepare_data

    cfg = PreprocessConfig(modalities=args.modalities, image_size=args.image_size,
                           pixdim=(args.spacing,) * 3, min_brain_fraction=args.min_brain_fraction)
    prepared = prepare_data(args.dataset_dir, args.split_file, args.cache_dir, cfg, split_seed=args.split_seed,
                            workers=args.workers, progress=not args.quiet)
    counts = {s: len(prepared.split[s]) for s in SECTIONS}
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
        if args.quiet:
            overrides["progress"] = False
        guided = getattr(args, "guided", False)  # the guided-counterfactual variant of the workflow
        if guided and getattr(args, "nproc", 1) > 1:
            raise InputError("--guided", "runs in one process only (no multi-GPU config for it yet); drop --nproc")
        if getattr(args, "nproc", 1) > 1:
            _run_torchrun(f"multi_gpu_{workflow}", args.nproc, overrides, args.quiet)
            print(_bundle_summary(workflow, _config_getter(workflow, overrides)))
            return
        from .bundle import run_bundle

        flow = run_bundle(f"{workflow}_guided" if guided else workflow, tracking=args.tracking,
                          trust_expressions=args.trust_expressions, quiet=args.quiet, **overrides)
        print(_bundle_summary(workflow, flow.parser.get_parsed_content))

    return run


def _run_torchrun(workflow: str, nproc: int, overrides: dict, quiet: bool = False) -> None:
    """``python -m monai.bundle run`` under torchrun; quiet: the ranks' stdout (logs) is dropped,
    warnings and errors reach stderr. Scoring settings missing from ``overrides`` come from the model card,
    as in a single process (:func:`pipeline.bundle.with_model_card`)."""
    import json
    import subprocess

    from .bundle import BUNDLE_DIR, config_files, with_model_card

    overrides = with_model_card(workflow, BUNDLE_DIR, {"bundle_root": str(BUNDLE_DIR), **overrides})
    files = "[" + ",".join(repr(f) for f in config_files(workflow)) + "]"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "monai.bundle", "run",
           "--config_file", files]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    code = subprocess.call(cmd, stdout=subprocess.DEVNULL if quiet else None)
    if code:
        raise SystemExit(code)


def _config_getter(workflow: str, overrides: dict):
    """Resolves config items as the workflow would (what a torchrun run used), without running it."""
    from monai.bundle import ConfigParser

    from .bundle import BUNDLE_DIR, config_files

    parser = ConfigParser(ConfigParser.load_config_files(config_files(workflow)))
    parser.update({"bundle_root": str(BUNDLE_DIR), **overrides})
    return parser.get_parsed_content


def _bundle_summary(workflow: str, get) -> str:
    """The one line a bundle subcommand ends with: what it wrote, and where."""
    from .common import read_json

    if workflow == "train":
        return f"trained model {get('model_path')}"
    if workflow == "inference":
        index = read_json(Path(get("scores_dir")) / "index.json", "scores index")
        return f"scored {len(index['subjects'])} subjects into {get('scores_dir')}"
    metrics = read_json(Path(get("evaluation_dir")) / "metrics.json", "metrics")
    section = "test" if metrics.get("test") else "validation"
    figures = metrics[section]
    labels = {"auroc": "AUROC", "auprc": "AUPRC", "dice": "Dice"}
    numbers = ", ".join(f"{label} {figures[k]:.4f}" for k, label in labels.items()
                        if isinstance(figures.get(k), (int, float)))
    return f"evaluated {section}: {numbers}; {Path(get('evaluation_dir')) / 'metrics.json'}"


def _cmd_benchmark(args) -> None:
    from .benchmark import load_protocol, run_benchmark, validation_only
    from .bundle import quiet_logs
    from .ranking import show

    overrides = parse_assignments(args.set)
    protocol = load_protocol(args.protocol, overrides)
    with quiet_logs(args.quiet):
        runs = run_benchmark(args.protocol, args.results, args.leaderboard, progress=not args.quiet,
                             overrides=overrides, trust_expressions=args.trust_expressions,
                             ground_truth_dir=args.ground_truth)
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
    from .registry import register_protocol, registry_path

    record = register_protocol(args.leaderboard, _protocol_binding(args.protocol, args.set))
    print(f"{registry_path(args.leaderboard)}: protocol {record['id']} (hash {record['hash'][:12]}, dataset "
          f"{record['dataset_fingerprint']}, {len(record['split']['test'])} test subjects)")


def _cmd_show(args) -> None:
    from .ranking import show

    print(show(args.leaderboard, protocol_id=args.protocol_id, metric=args.metric, html_path=args.html))


def _cmd_site(args) -> None:
    from .site import build_site

    print(f"wrote {build_site(args.csv, args.out, metric=args.metric)}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _bundle_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of a subcommand that runs a bundle workflow; any bundle setting may follow as ``--key value``."""
    _trust_flag(parser)
    _quiet_flag(parser)
    parser.set_defaults(bundle=True)


def _guided_flag(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--guided", action="store_true", help=text)


def _quiet_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="warnings and errors only: no progress bars or logs, just the final summary")


def _trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-expressions", action="store_true",
                        help="allow settings that MONAI's config parser runs as code ('$...', '@...', '%%...', "
                             "_target_); only for protocol files and values you trust")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", allow_abbrev=False,
        description="Unsupervised brain-tumour detection with diffusion models (MONAI). "
                    "Each command calls the same library functions as the bundle configs.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_data_commands(sub)
    _add_bundle_commands(sub)
    _add_benchmark_command(sub)
    _add_leaderboard_commands(sub)
    return parser


def _add_data_commands(sub) -> None:
    """``synth`` and ``prepare``."""
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
    _quiet_flag(p)
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
    _quiet_flag(p)
    p.set_defaults(func=_cmd_prepare)


def _add_bundle_commands(sub) -> None:
    """``train``, ``score`` and ``evaluate``: one bundle workflow each, any bundle setting as ``--key value``."""
    p = sub.add_parser("train", help="train the diffusion model (the bundle's train config)",
                       epilog="Any bundle setting (a config id; dashes or underscores) can follow as --key value, e.g. "
                              "--noise simplex --epochs 30 --dataset-dir data/msd --image-size 128 "
                              "--modalities [FLAIR,T2w].")
    p.add_argument("--nproc", type=int, default=1, help="processes for DistributedDataParallel (torchrun; gloo on CPU)")
    p.add_argument("--tracking", choices=["mlflow"], default=None, help="log the run to MLflow")
    _guided_flag(p, "train a class-conditional model on healthy and tumour slices with slice labels "
                    "(weakly supervised; workflow train_guided)")
    _bundle_flags(p)
    p.set_defaults(func=_cmd_bundle("train"))

    p = sub.add_parser("score", help="anomaly maps for validation + test subjects (the bundle's inference config)",
                       epilog="Bundle settings as --key value (config ids; dashes or underscores): "
                              "--sampler x0|ddim|ddpm|patched|flair --t-start 150 --ddim-steps 10 --n-draws 1 "
                              "--model-path PATH --scores-dir DIR.")
    p.add_argument("--nproc", type=int, default=1, help="processes that share the subjects (torchrun; gloo on CPU)")
    _guided_flag(p, "healthy counterfactuals by classifier-free guidance from a --guided model (weakly "
                    "supervised; workflow inference_guided; --guidance-scale, --t-start, --ddim-steps)")
    _bundle_flags(p)
    p.set_defaults(func=_cmd_bundle("inference"), tracking=None)

    p = sub.add_parser("evaluate", help="metrics.json, per-subject CSV, report.png from saved maps (evaluate config)",
                       epilog="Bundle settings as --key value (config ids; dashes or underscores): --scores-dir DIR "
                              "--evaluation-dir DIR --bootstrap-resamples N --ground-truth-dir DIR "
                              "(hidden test labels).")
    _bundle_flags(p)
    p.set_defaults(func=_cmd_bundle("evaluate"), tracking=None)


def _add_benchmark_command(sub) -> None:
    """``benchmark PROTOCOL``."""
    p = sub.add_parser("benchmark", help="run a benchmark protocol (train, score, evaluate every entry), "
                                         "submit to the leaderboard and print it")
    p.add_argument("protocol", help="protocol file, e.g. configs/benchmark/default.yaml")
    p.add_argument("--results", default="results", help="results root (default results/)")
    p.add_argument("--leaderboard", default=DEFAULT_LEADERBOARD, help=f"CSV (default {DEFAULT_LEADERBOARD})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a protocol value by dotted key, e.g. --set dataset.dir=data/msd --set bundle.train_steps=100")
    p.add_argument("--ground-truth", metavar="GT_DIR", default=None,
                   help="hidden test labels of a public-leaderboard dataset (GT_DIR/labelsTs; the organiser's runs)")
    _trust_flag(p)
    _quiet_flag(p)
    p.set_defaults(func=_cmd_benchmark)


def _add_leaderboard_commands(sub) -> None:
    """``leaderboard init | submit | show | site``."""
    p = sub.add_parser("leaderboard", help="submit a run folder or show the ranked table")
    lsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = lsub.add_parser("init", help="bind the leaderboard to a protocol (its hash, data content and split)")
    q.add_argument("--protocol", required=True, help="protocol file, e.g. configs/benchmark/default.yaml")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="protocol override, as for benchmark")
    q.add_argument("--leaderboard", default=DEFAULT_LEADERBOARD)
    _quiet_flag(q)
    q.set_defaults(func=_cmd_init)
    q = lsub.add_parser("submit", help="recompute a run's metrics from its maps and append it")
    q.add_argument("run_dir")
    q.add_argument("--protocol", default=None, help="protocol file; needed only for the first submission under "
                                                    "its id (later ones are checked against the registered one)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="protocol override, as for benchmark")
    q.add_argument("--leaderboard", default=DEFAULT_LEADERBOARD)
    q.add_argument("--ground-truth", default=None, metavar="DIR",
                   help="organiser's folder with the hidden test labels (DIR/labelsTs/<subject>.nii.gz)")
    _quiet_flag(q)
    q.set_defaults(func=_cmd_submit)
    q = lsub.add_parser("show", help="ranked table (Markdown) with 95 %% intervals and paired tests")
    q.add_argument("--leaderboard", default=DEFAULT_LEADERBOARD)
    q.add_argument("--protocol-id", default=None)
    q.add_argument("--metric", default="auprc", choices=["auprc", "auroc", "dice"])
    q.add_argument("--html", default=None, help="also write the table as HTML to this file")
    _quiet_flag(q)
    q.set_defaults(func=_cmd_show)
    q = lsub.add_parser("site", help="static site (opens from the file system): ranked tables, forest plots, "
                                     "one page per run")
    q.add_argument("--csv", "--leaderboard", dest="csv", default=DEFAULT_LEADERBOARD,
                   help=f"leaderboard CSV (default {DEFAULT_LEADERBOARD})")
    q.add_argument("--out", default=None, help="site folder, replaced whole (default: site/ beside the CSV)")
    q.add_argument("--metric", default="auprc", choices=["auprc", "auroc", "dice"], help="ranking metric")
    _quiet_flag(q)
    q.set_defaults(func=_cmd_site)


def _subcommands(parser: argparse.ArgumentParser) -> dict | None:
    """The subcommand parsers by name, or None for a parser that takes no subcommand."""
    found = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return found[0] if found else None


def _leaf(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.ArgumentParser, int]:
    """(the innermost subcommand's parser, where its arguments start in ``argv``)."""
    start = 0
    while (choices := _subcommands(parser)) is not None and start < len(argv) and argv[start] in choices:
        parser, start = choices[argv[start]], start + 1
    return parser, start


def _setting_key(name: str) -> str:
    """A bundle setting's config id: underscores, ``::`` as ``#`` (``--network-def#channels``)."""
    return name.replace("-", "_").replace("::", "#")


def canonical_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with every flag in its one spelling: options dashed, bundle settings as config ids.

    Raises :class:`InputError` naming the first flag the subcommand does not know, with the closest one.
    """
    leaf, start = _leaf(parser, argv)
    if _subcommands(leaf) is not None:
        return argv  # no subcommand named (or --help, --version): argparse says what is missing
    out, tokens = argv[:start], iter(argv[start:])
    for token in tokens:
        if token == "--":
            return [*out, token, *tokens]
        if not token.startswith("--"):
            out.append(token)
            continue
        name, eq, value = token[2:].partition("=")
        option = "--" + name.replace("_", "-")
        if option in leaf._option_string_actions:
            out.append(option + eq + value)
        elif leaf.get_default("bundle") and _setting_key(name).split("#")[0] in _known_settings():
            value = value if eq else next(tokens, None)
            out += ["--" + _setting_key(name)] + ([] if value is None else [value])
        else:
            raise InputError("command line", _unknown_flag(token.partition("=")[0], leaf))
    return out


def _known_settings() -> frozenset[str]:
    """Config ids of the bundle, and the workflow's own arguments (refused later, with their reason)."""
    from .bundle import WORKFLOW_ARGUMENTS, setting_ids

    return setting_ids() | WORKFLOW_ARGUMENTS


def _unknown_flag(flag: str, leaf: argparse.ArgumentParser) -> str:
    """Names ``flag`` and the closest flag ``leaf`` knows (its options, and bundle settings)."""
    from .bundle import WORKFLOW_ARGUMENTS

    known = [s for s in leaf._option_string_actions if s.startswith("--")]
    what = "option"
    if leaf.get_default("bundle"):
        known += ["--" + s.replace("_", "-") for s in sorted(_known_settings() - WORKFLOW_ARGUMENTS)]
        what = "option or bundle setting"
    close = difflib.get_close_matches("--" + flag[2:].replace("_", "-"), known, n=1)
    hint = f"did you mean {close[0]}?" if close else f"see '{leaf.prog} --help'"
    return f"{flag}: unknown {what} of '{leaf.prog}'; {hint}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = canonical_arguments(parser, argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
