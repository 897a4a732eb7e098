"""Run the bundle's configs from Python: the one path the CLI, tests and benchmark share."""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from pipeline.common import BASELINE
from pipeline.errors import InputError
from pipeline.layout import project_file

BUNDLE_NAME = "brats_diffusion_anomaly"
BUNDLE_DIR = project_file(f"bundles/{BUNDLE_NAME}")  # the checkout's bundles/, or a wheel's installed copy
CONFIGS = {
    "train": ["train.yaml"],
    "multi_gpu_train": ["train.yaml", "multi_gpu_train.yaml"],
    "inference": ["inference.yaml"],
    "multi_gpu_inference": ["inference.yaml", "multi_gpu_inference.yaml"],
    "evaluate": ["common.yaml", "evaluate.yaml"],
    "train_guided": ["train.yaml", "guided_train.yaml"],
    "inference_guided": ["inference.yaml", "guided_inference.yaml"],
    "train_classifier_guided": ["train.yaml", "classifier_train.yaml"],
    "inference_classifier_guided": ["inference.yaml", "classifier_guided_inference.yaml"],
}
"""Config files of each workflow, merged in order. ``train.yaml`` and ``inference.yaml`` are complete
(each holds a copy of ``common.yaml``, see :data:`STANDALONE_CONFIGS`), so each reads alone as MONAI's and
model-zoo's tools read them; the other files are overlays on them (``evaluate.yaml`` on ``common.yaml``)."""

SHARED_CONFIG = "common.yaml"
STANDALONE_CONFIGS = ("train.yaml", "inference.yaml")
"""Configs that carry ``common.yaml`` verbatim between :data:`SHARED_BEGIN` and :data:`SHARED_END`."""
SHARED_BEGIN = "# >>> common.yaml, copied by `python -m pipeline.bundle sync`: edit common.yaml, not this block\n"
SHARED_END = "# <<< common.yaml\n"


def bundle_root() -> str:
    """The bundle folder a config works in when no ``bundle_root`` is given (common.yaml's default).

    MONAI gives a config no access to its own path, so a fixed relative default can only be right from
    one working directory. This finds the folder wherever the command runs: the parent of the config
    folder of the MONAI workflow being run (``python -m monai.bundle run --config_file <bundle>/configs/..``,
    from any folder); else, for a config read by other tools, the working directory when it is a bundle
    (it holds ``configs/metadata.json``); else the bundle this package ships."""
    import inspect

    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigWorkflow):
            return str(Path(owner.config_root_path).resolve().parent)
        frame = frame.f_back
    here = Path.cwd()
    return str(here if (here / "configs" / "metadata.json").is_file() else BUNDLE_DIR)


def config_files(workflow: str, bundle_dir: str | Path = BUNDLE_DIR) -> list[str]:
    """Config files (a complete config first, then its overlays) that make up one workflow of the bundle."""
    if workflow not in CONFIGS:
        raise KeyError(f"unknown workflow {workflow!r}; choose one of {', '.join(CONFIGS)}")
    return [str(Path(bundle_dir) / "configs" / name) for name in CONFIGS[workflow]]


def standalone_text(name: str, bundle_dir: str | Path = BUNDLE_DIR) -> str:
    """What ``configs/<name>`` must hold: its own text with the marked block replaced by ``common.yaml``."""
    configs = Path(bundle_dir) / "configs"
    text = (configs / name).read_text()
    begin, end = text.find(SHARED_BEGIN), text.find(SHARED_END)
    if begin < 0 or end < begin:
        raise InputError(configs / name, f"no block between the lines {SHARED_BEGIN.strip()!r} and "
                                         f"{SHARED_END.strip()!r} to hold {SHARED_CONFIG}")
    shared = (configs / SHARED_CONFIG).read_text()
    return text[:begin] + SHARED_BEGIN + shared.rstrip("\n") + "\n" + text[end:]


def stale_configs(bundle_dir: str | Path = BUNDLE_DIR) -> list[str]:
    """Standalone configs whose copy of ``common.yaml`` differs from it (empty when all are in sync)."""
    configs = Path(bundle_dir) / "configs"
    return [name for name in STANDALONE_CONFIGS if (configs / name).read_text() != standalone_text(name, bundle_dir)]


def sync_configs(bundle_dir: str | Path = BUNDLE_DIR) -> list[str]:
    """Copy ``common.yaml`` into each standalone config; returns the files that changed."""
    changed = stale_configs(bundle_dir)
    for name in changed:
        path = Path(bundle_dir) / "configs" / name
        path.write_text(standalone_text(name, bundle_dir))
    return changed


@lru_cache(maxsize=None)
def _top_level_defaults(bundle_dir: str | Path = BUNDLE_DIR) -> dict:
    """Every top-level config id of the bundle with its default as written, all workflows together (the first
    workflow's value where two differ): parsed once per process."""
    from monai.bundle import ConfigParser

    defaults: dict = {}
    for workflow in CONFIGS:
        for key, value in ConfigParser.load_config_files(config_files(workflow, bundle_dir)).items():
            defaults.setdefault(key, value)
    return defaults


def setting_defaults(bundle_dir: str | Path = BUNDLE_DIR) -> dict:
    """``{config id: default as written}`` of every top-level setting (a copy: callers may not change the cache)."""
    return dict(_top_level_defaults(bundle_dir))


def setting_ids(bundle_dir: str | Path = BUNDLE_DIR) -> frozenset[str]:
    """Every top-level id of the bundle's configs, all workflows together: the names a ``--key value``
    setting may take (one list of settings then serves score and evaluate alike)."""
    return frozenset(_top_level_defaults(bundle_dir))


SETTING_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):[ \t]+(\S.*?)(?:[ \t]+#[ \t]*(.*))?$")


def settings_help(workflow: str, bundle_dir: str | Path = BUNDLE_DIR) -> str:
    """One line per top-level setting of ``workflow``'s configs: ``--key  default  what it does`` (the
    config line's own comment), for the subcommand's ``--help``. Plain text reading: no MONAI import."""
    seen, lines = set(), []
    for path in config_files(workflow, bundle_dir):
        for text in Path(path).read_text(encoding="utf-8").splitlines():
            match = SETTING_LINE.match(text)
            if not match or match.group(1) in seen or match.group(1) in WORKFLOW_ARGUMENTS | {"imports"}:
                continue
            key, value, comment = match.groups()
            seen.add(key)
            lines.append(f"  --{key.replace('_', '-'):<26} {value:<28} {comment or ''}".rstrip())
    return "\n".join(sorted(lines))


def list_setting_ids(bundle_dir: str | Path = BUNDLE_DIR) -> frozenset[str]:
    """Top-level ids whose default is a list (``modalities``, ``pixdim``, ``unet_channels``, ``t_start``-like
    lists): where the command line reads ``a,b,c`` as ``[a, b, c]``."""
    return frozenset(k for k, v in _top_level_defaults(bundle_dir).items() if isinstance(v, list) and k != "imports")


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


SCORING_WORKFLOWS = ("inference", "multi_gpu_inference", "inference_guided", "inference_classifier_guided")


def with_model_card(workflow: str, bundle_dir: Path, overrides: dict) -> dict:
    """Scoring settings the user did not give are taken from the model's card; a contradicting one
    is refused (:mod:`pipeline.model.model_card`). The FLAIR baseline loads no model."""
    if workflow not in SCORING_WORKFLOWS or overrides.get("sampler") == BASELINE:
        return overrides
    from monai.bundle import ConfigParser

    from pipeline.model.model_card import apply_card

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


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.bundle sync [--check]``: copy common.yaml into the standalone configs
    (``--check``: only report the stale ones, exit 1 if any). ``large-files --url URL``: after uploading
    ``models/model.pt``, write its sha256 and that URL into ``large_files.yml`` (model-zoo's format)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.bundle", description=main.__doc__)
    parser.add_argument("command", choices=["sync", "large-files"])
    parser.add_argument("--check", action="store_true", help="sync: change nothing; exit 1 if a copy is stale")
    parser.add_argument("--url", default="", help="large-files: where models/model.pt can be downloaded")
    parser.add_argument("--bundle-dir", type=Path, default=BUNDLE_DIR, help=f"the bundle folder (default {BUNDLE_DIR})")
    args = parser.parse_args(argv)
    if args.command == "large-files":
        return _large_files(args.bundle_dir, args.url)
    stale = stale_configs(args.bundle_dir) if args.check else sync_configs(args.bundle_dir)
    for name in stale:
        print(f"{'stale' if args.check else 'updated'}: {args.bundle_dir / 'configs' / name}")
    return 1 if args.check and stale else 0


def _large_files(bundle_dir: Path, url: str) -> int:
    from pipeline.model.large_files import write_large_files

    model = bundle_dir / "models" / "model.pt"
    if not model.is_file():
        print(f"error: {model}: no weights to list (train first)")
        return 2
    print(f"updated: {write_large_files(bundle_dir, model, url)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
