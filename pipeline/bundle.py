"""Run the bundle's configs from Python: the one path the CLI, tests and benchmark share."""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from .errors import InputError

BUNDLE_NAME = "brats_diffusion_anomaly"
BUNDLE_DIR = Path(__file__).resolve().parent.parent / "bundles" / BUNDLE_NAME
CONFIGS = {
    "train": ["common.yaml", "train.yaml"],
    "multi_gpu_train": ["common.yaml", "train.yaml", "multi_gpu_train.yaml"],
    "inference": ["common.yaml", "inference.yaml"],
    "multi_gpu_inference": ["common.yaml", "inference.yaml", "multi_gpu_inference.yaml"],
    "evaluate": ["common.yaml", "evaluate.yaml"],
    "train_guided": ["common.yaml", "train.yaml", "guided_train.yaml"],
    "inference_guided": ["common.yaml", "inference.yaml", "guided_inference.yaml"],
}


def config_files(workflow: str, bundle_dir: str | Path = BUNDLE_DIR) -> list[str]:
    """Config files (common first) that make up one workflow of the bundle."""
    if workflow not in CONFIGS:
        raise KeyError(f"unknown workflow {workflow!r}; choose one of {', '.join(CONFIGS)}")
    return [str(Path(bundle_dir) / "configs" / name) for name in CONFIGS[workflow]]


@lru_cache(maxsize=None)
def setting_ids(bundle_dir: str | Path = BUNDLE_DIR) -> frozenset[str]:
    """Every top-level id of the bundle's configs, all workflows together: the names a ``--key value``
    setting may take (one list of settings then serves score and evaluate alike)."""
    from monai.bundle import ConfigParser

    ids = set()
    for workflow in CONFIGS:
        ids.update(ConfigParser.load_config_files(config_files(workflow, bundle_dir)))
    return frozenset(ids)


@contextmanager
def quiet_logs(quiet: bool = True):
    """Warnings and errors only while inside (``--quiet``; ``quiet=False`` changes nothing).

    INFO logging is switched off process-wide (``logging.disable``), not by logger levels: MONAI's
    loggers carry their own stdout handlers and reset their level to INFO whenever a handler is
    made, so only this silences config summaries and per-iteration losses wherever they log from.
    """
    if not quiet:
        yield
        return
    before = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(before)


EXPRESSION_PREFIXES = {"$": "run it as Python code", "@": "resolve it as a reference to another config item",
                       "%": "replace it with content read from a config file (a macro)"}
"""Value prefixes MONAI's config parser evaluates or resolves instead of taking the value as data."""
SPECIAL_KEY = re.compile(r"_[A-Za-z]+_")
"""``_target_`` (instantiate any importable callable), ``_requires_``, ``_disabled_``, ``_mode_``, ``_desc_``."""
WORKFLOW_ARGUMENTS = frozenset({"workflow", "workflow_name", "bundle_dir", "config_file", "args_file", "meta_file",
                                "logging_file", "tracking", "init_id", "run_id", "final_id", "workflow_type",
                                "properties_path"})
"""Keys that would reach ``create_workflow`` itself (other config files, another workflow class), not a setting."""


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _code_at(key, value, where: str) -> tuple[str, str] | None:
    """(where, why) of the first thing in one setting that the config parser would run, at any depth."""
    why = _code_key(key)
    if why:
        return where, why
    if isinstance(value, str) and value.lstrip()[:1] in EXPRESSION_PREFIXES:
        prefix = value.lstrip()[0]
        return where, (f"value {_short(value)} starts with {prefix!r}: MONAI's config parser would "
                       f"{EXPRESSION_PREFIXES[prefix]}")
    if isinstance(value, dict):
        inner = ((k, v, f"{where}.{k}") for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        inner = ((None, v, f"{where}[{i}]") for i, v in enumerate(value))
    else:
        return None
    return next((found for found in (_code_at(*args) for args in inner) if found), None)


def _code_key(key) -> str | None:
    """Why a key is not a plain setting, or None (list positions have no key)."""
    if key is None:
        return None
    parts = re.split(r"::|#", str(key))
    if any(SPECIAL_KEY.fullmatch(part) for part in parts):
        return f"key {str(key)!r} makes MONAI's config parser instantiate or control a component"
    if str(key) in WORKFLOW_ARGUMENTS:
        return f"key {str(key)!r} is an argument of the bundle workflow itself, not a setting"
    return None


def check_plain_settings(settings: dict, source: str, trust_expressions: bool = False, prefix: str = "") -> None:
    """Refuse settings that MONAI's config parser would evaluate, resolve or instantiate.

    Configs are code: a ``$`` value is passed to ``eval``, ``@``/``%`` pull in other config items or
    files, ``_target_`` calls any importable function. Values from protocol files and command lines
    must be plain data unless the user says they trust them (``trust_expressions``). ``source`` names
    where the settings came from (a file, "command line"); ``prefix`` goes before each key in the message.
    """
    if trust_expressions:
        return
    for key, value in settings.items():
        found = _code_at(key, value, f"{prefix}{key}")
        if found:
            raise InputError(source, f"{found[0]}: {found[1]}; refused unless you pass --trust-expressions "
                                     "(only for files and values you trust)")


SCORING_WORKFLOWS = ("inference", "multi_gpu_inference", "inference_guided")


def with_model_card(workflow: str, bundle_dir: Path, overrides: dict) -> dict:
    """Scoring settings the user did not give are taken from the model's card; a contradicting one
    is refused (:mod:`pipeline.model_card`). The FLAIR baseline loads no model."""
    if workflow not in SCORING_WORKFLOWS or overrides.get("sampler") == "flair":
        return overrides
    from monai.bundle import ConfigParser

    from .model_card import apply_card

    parser = ConfigParser()
    parser.read_config(config_files(workflow, bundle_dir))
    parser.update(overrides)
    return apply_card(parser.get_parsed_content("model_path"), overrides)


def make_workflow(workflow: str, bundle_dir: str | Path = BUNDLE_DIR, tracking: str | None = None,
                  trust_expressions: bool = False, **overrides):
    """An initialised ``ConfigWorkflow``, exactly what ``python -m monai.bundle run`` builds.

    The bundle's own configs are trusted; ``overrides`` must be plain data (:func:`check_plain_settings`)
    unless ``trust_expressions``.
    """
    from monai.bundle import create_workflow

    check_plain_settings(overrides, "bundle settings", trust_expressions)
    bundle_dir = Path(bundle_dir)
    overrides.setdefault("bundle_root", str(bundle_dir))
    overrides = with_model_card(workflow, bundle_dir, overrides)
    with warnings.catch_warnings():  # MONAI warns that configs run code: these are the project's own
        warnings.filterwarnings("ignore", message="parsing config_file", category=UserWarning)
        return create_workflow(config_file=config_files(workflow, bundle_dir),
                               meta_file=str(bundle_dir / "configs" / "metadata.json"),
                               logging_file=str(bundle_dir / "configs" / "logging.conf"),
                               tracking=tracking, **overrides)


def run_bundle(workflow: str, bundle_dir: str | Path = BUNDLE_DIR, tracking: str | None = None,
               trust_expressions: bool = False, quiet: bool = False, **overrides):
    """Run one workflow to the end; returns the finished workflow for inspection.

    ``quiet``: warnings and errors only (:func:`quiet_logs`) and, unless ``progress`` is given, no progress bars.
    """
    if quiet:
        overrides.setdefault("progress", False)
    with quiet_logs(quiet):
        flow = make_workflow(workflow, bundle_dir, tracking=tracking, trust_expressions=trust_expressions, **overrides)
        flow.run()
        flow.finalize()
    return flow
