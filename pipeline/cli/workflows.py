"""``pipeline train | score | evaluate``: one bundle workflow each, any bundle setting as ``--key value``."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.cli.args import add_command, parse_overrides, trust_flag
from pipeline.errors import InputError


def _cmd_bundle(workflow: str):
    """A subcommand that runs one bundle workflow, forwarding ``--key value`` settings to it."""

    def run(args) -> None:
        from pipeline.bundle import check_plain_settings

        overrides = parse_overrides(args.settings)
        check_plain_settings(overrides, "command line", args.trust_expressions, prefix="--")
        if args.quiet:
            overrides["progress"] = False
        variant = _variant(args)  # a counterfactual variant of the workflow (its own overlay), or None
        if variant and getattr(args, "nproc", 1) > 1:
            raise InputError(f"--{variant.replace('_', '-')}", "runs in one process only (no multi-GPU config for it "
                                                               "yet); drop --nproc")
        if getattr(args, "nproc", 1) > 1:
            run_torchrun(f"multi_gpu_{workflow}", args.nproc, overrides, args.quiet)
            print(_bundle_summary(workflow, _config_getter(workflow, overrides)))
            return
        from pipeline.bundle import run_bundle

        flow = run_bundle(f"{workflow}_{variant}" if variant else workflow, tracking=args.tracking,
                          trust_expressions=args.trust_expressions, quiet=args.quiet, **overrides)
        print(_bundle_summary(workflow, flow.parser.get_parsed_content))

    return run


VARIANTS = ("guided", "classifier_guided")
"""Flags (``--guided``, ``--classifier-guided``) that run ``<workflow>_<variant>`` instead of the plain workflow."""


def _variant(args) -> str | None:
    chosen = [v for v in VARIANTS if getattr(args, v, False)]
    if len(chosen) > 1:
        raise InputError("--guided", "choose one of --guided and --classifier-guided")
    return chosen[0] if chosen else None


def run_torchrun(workflow: str, nproc: int, overrides: dict, quiet: bool = False) -> None:
    """``python -m monai.bundle run`` under torchrun; quiet: the ranks' stdout (logs) is dropped,
    warnings and errors reach stderr. Scoring settings missing from ``overrides`` come from the model card,
    as in a single process (:func:`pipeline.bundle.with_model_card`)."""
    import json
    import subprocess

    from pipeline.bundle import BUNDLE_DIR, config_files, with_model_card

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

    from pipeline.bundle import BUNDLE_DIR, config_files

    parser = ConfigParser(ConfigParser.load_config_files(config_files(workflow)))
    parser.update({"bundle_root": str(BUNDLE_DIR), **overrides})
    return parser.get_parsed_content


def _bundle_summary(workflow: str, get) -> str:
    """The one line a bundle subcommand ends with: what it wrote, and where."""
    from pipeline.common import read_json

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


def _bundle_command(sub, name: str, workflow: str, help: str, epilog: str):
    """A subcommand running ``workflow``; flags it does not know are bundle settings (``--key value``)."""
    import argparse

    from pipeline.bundle import settings_help

    epilog = (f"{epilog}\n\nbundle settings of this command (--key value: default, what it does; '$...' defaults are "
              f"computed from other settings):\n{settings_help(workflow)}")
    parser = add_command(sub, name, _cmd_bundle(workflow), help, epilog=epilog,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    trust_flag(parser)
    parser.set_defaults(bundle=True, tracking=None)
    return parser


def _guided_flag(parser, text: str, name: str = "--guided") -> None:
    parser.add_argument(name, action="store_true", help=text)


def add_workflow_commands(sub) -> None:
    """``train``, ``score`` and ``evaluate``."""
    p = _bundle_command(sub, "train", "train", "train the diffusion model (the bundle's train config)",
                        "Any bundle setting (a config id; dashes or underscores) can follow as --key value, e.g. "
                        "--noise simplex --epochs 30 --dataset-dir data/msd --image-size 128 --modalities [FLAIR,T2w].")
    p.add_argument("--nproc", type=int, default=1, help="processes for DistributedDataParallel (torchrun; gloo on CPU)")
    p.add_argument("--tracking", choices=["mlflow"], default=None, help="log the run to MLflow")
    _guided_flag(p, "train a class-conditional model on healthy and tumour slices with slice labels "
                    "(weakly supervised; workflow train_guided)")
    _guided_flag(p, "train the plain diffusion model, then a noisy-slice classifier with slice labels beside it "
                    "(weakly supervised; workflow train_classifier_guided)", "--classifier-guided")

    p = _bundle_command(sub, "score", "inference",
                        "anomaly maps for validation + test subjects (the bundle's inference config)",
                        "Bundle settings as --key value (config ids; dashes or underscores): "
                        "--sampler x0|ddim|ddpm|patched|flair --t-start 150 --ddim-steps 10 --n-draws 1 "
                        "--model-path PATH --scores-dir DIR.")
    p.add_argument("--nproc", type=int, default=1, help="processes that share the subjects (torchrun; gloo on CPU)")
    _guided_flag(p, "healthy counterfactuals by classifier-free guidance from a --guided model (weakly "
                    "supervised; workflow inference_guided; --guidance-scale, --t-start, --ddim-steps)")
    _guided_flag(p, "healthy counterfactuals guided by the classifier of a --classifier-guided training (weakly "
                    "supervised; workflow inference_classifier_guided; --guidance-scale, --t-start, --ddim-steps)",
                 "--classifier-guided")

    _bundle_command(sub, "evaluate", "evaluate",
                    "metrics.json, per-subject CSV, report.png from saved maps (evaluate config)",
                    "Bundle settings as --key value (config ids; dashes or underscores): --scores-dir DIR "
                    "--evaluation-dir DIR --bootstrap-resamples N --ground-truth-dir DIR (hidden test labels).")
