"""Reproducible benchmark: one protocol file -> a matrix of methods, each trained, scored and evaluated.

Every entry runs through the bundle (train, inference, evaluate workflows) and gets one run folder
with the resolved config, environment, anomaly maps, metrics and timings. Entries already done
(their ``run.json`` exists, it is written last, and their row is on the leaderboard when one takes
the protocol's runs) are skipped; a run without its row is submitted without running it again.
Models are shared between entries that differ only in how they score (t_L, sampler), since
training does not depend on it. Protocol ids and method names become folders, so they follow
:data:`pipeline.leaderboard.registry.NAME_PATTERN` and every output folder is checked to stay
inside ``--results`` (:func:`confined`).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from pipeline.atomic import write_json
from pipeline.bundle import check_plain_settings, run_bundle
from pipeline.common import BASELINE, CLASSIFIER_GUIDED, GUIDED, read_json
from pipeline.data.dataset import dataset_fingerprint, task_paths
from pipeline.errors import InputError
from pipeline.layout import project_file
from pipeline.leaderboard.columns import METHOD_PATTERN
from pipeline.leaderboard.registry import check_name, protocol_hash, split_fingerprint
from pipeline.provenance import config_hash, environment, hashed_settings, weights_record
from pipeline.scoring.maps import read_index

PROTOCOL_KEYS = {"id", "description", "dataset", "split", "bundle", "evaluation", "methods"}
MATRIX_KEYS = ("noise", "coarse_resolution", "prediction_type", "schedule", "learning_rate", "batch_size", "train_steps", "ema_decay",
               "train_patch_size", "condition_dropout", "sampler", "t_start", "ddim_steps", "n_draws", "patch_size",
               "guidance_scale", "residual_norm", "median_3d", "min_component_voxels", "map_norm", "residual_smooth", "residual_sign", "seed")
SCORE_KEYS = ("sampler", "t_start", "ddim_steps", "n_draws", "patch_size", "guidance_scale", "score_batch_size",
              "map_reduce", "residual_norm", "erode_iters", "median_size", "median_3d", "min_component_voxels",
              "component_quantile", "map_norm", "residual_smooth", "residual_sign")
"""Bundle settings that change only how a trained model scores: entries differing only in these share a model."""
ENTRY_KEYS = ("name", "id")


# ----------------------------------------------------------------------------------------------
# protocol


def apply_overrides(content: dict, overrides: dict | None, source) -> dict:
    """Set dotted keys (``dataset.dir``, ``bundle.image_size``, ``evaluation.sections``) in a protocol.

    The overridden protocol hashes differently, so its runs never pass for the file's own.
    """
    content = json.loads(json.dumps(content))  # deep copy of plain YAML data
    for dotted, value in (overrides or {}).items():
        *parents, last = str(dotted).split(".")
        node = content
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise InputError(source, f"override {dotted!r}: {key!r} is not a section of the protocol")
            node = node[key]
        node[last] = value
    return content


def load_protocol(path: str | os.PathLike, overrides: dict | None = None) -> dict:
    """Read and check a protocol file (with optional dotted-key ``overrides``); adds ``hash`` (of the
    content actually used) and ``path``."""
    path = Path(path)
    if not path.is_file() and not path.is_absolute():
        shipped = project_file(path)  # configs/benchmark/*.yaml as shipped, run from any folder (or a wheel)
        path = shipped if shipped.is_file() else path
    if not path.is_file():
        raise InputError(path, "protocol file not found")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(path, f"malformed YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(content, dict):
        raise InputError(path, "a protocol must be a mapping")
    content = apply_overrides(content, overrides, path)
    unknown = sorted(set(content) - PROTOCOL_KEYS)
    missing = sorted({"id", "dataset", "methods"} - set(content))
    if unknown or missing:
        raise InputError(path, f"unknown keys {unknown} / missing keys {missing} (allowed: {sorted(PROTOCOL_KEYS)})")
    check_name(content["id"], path, "protocol id")  # a folder under --results
    if not isinstance(content["methods"], list) or not content["methods"]:
        raise InputError(path, "'methods' must be a non-empty list")
    dataset = content["dataset"]
    if not isinstance(dataset, dict) or "dir" not in dataset:
        raise InputError(path, "'dataset' needs 'dir' (and 'synthetic' settings to generate it)")
    return {**content, "hash": protocol_hash(content), "path": str(path)}


def check_protocol_settings(protocol: dict, overrides: dict | None, trust_expressions: bool = False) -> None:
    """Refuse protocol values MONAI's config parser would run (``$``, ``@``, ``%``, ``_target_``),
    naming ``--set`` or the file they came from, unless the user trusts them."""
    check_plain_settings(overrides or {}, "command line", trust_expressions, prefix="--set ")
    content = {k: v for k, v in protocol.items() if k not in ("description", "hash", "path")}
    check_plain_settings(content, protocol["path"], trust_expressions)


def expand_methods(protocol: dict) -> list[dict]:
    """The method matrix: list-valued settings multiply out; each entry gets a readable id."""
    entries = []
    for method in protocol["methods"]:
        if not isinstance(method, dict) or "name" not in method:
            raise InputError(protocol["path"], f"every method needs a 'name', got {method!r}")
        check_name(method["name"], protocol["path"], "method name")
        varying = {k: method[k] for k in MATRIX_KEYS if isinstance(method.get(k), list)}  # fixed order
        fixed = {k: v for k, v in method.items() if k not in varying}
        for values in itertools.product(*varying.values()):
            entry = {**fixed, **dict(zip(varying, values))}
            entry.setdefault("seed", 0)
            entry["id"] = check_name(_entry_id(entry, varying), protocol["path"], "method entry id", METHOD_PATTERN)
            entries.append(entry)
    ids = [e["id"] for e in entries]
    if len(set(ids)) != len(ids):
        raise InputError(protocol["path"], f"method entries repeat: {sorted(i for i in ids if ids.count(i) > 1)}")
    return entries


SHORT_NAMES = {"t_start": "t", "ddim_steps": "k", "n_draws": "d", "seed": "s", "learning_rate": "lr",
               "batch_size": "b", "train_steps": "n", "patch_size": "p", "train_patch_size": "tp", "median_3d": "m3d",
               "min_component_voxels": "cc", "ema_decay": "ema", "guidance_scale": "w", "condition_dropout": "cd"}


def _entry_id(entry: dict, varying: dict) -> str:
    """``name-<short><value>...``; a list value (a t_L ensemble) is written joined by '+'."""
    parts = [str(entry["name"])]
    for key in varying:
        value = entry[key]
        value = "+".join(str(v) for v in value) if isinstance(value, list) else value
        parts.append(f"{SHORT_NAMES.get(key, '')}{value}")
    if "seed" not in varying:
        parts.append(f"s{entry['seed']}")
    return "-".join(parts)


def is_baseline(entry: dict) -> bool:
    return entry.get("sampler") == BASELINE


def entry_workflows(entry: dict) -> tuple[str, str]:
    """(train, inference) bundle workflows of an entry: guided counterfactuals have their own overlays
    (a class-conditional UNet trained with slice labels, scored by DDIM inversion and guided decoding)."""
    if entry.get("sampler") == CLASSIFIER_GUIDED:  # the plain model, then a noisy-slice classifier beside it
        return "train_classifier_guided", "inference_classifier_guided"
    return ("train_guided", "inference_guided") if entry.get("sampler") == GUIDED else ("train", "inference")


def model_folder(results: Path, entry: dict, train: dict) -> Path:
    """Where an entry's model lives: one folder per distinct training (settings and workflow).

    The plain workflow is left out of the hash, so models trained before guided entries existed are reused.
    """
    if is_baseline(entry):
        return results / "models" / "none"
    workflow = entry_workflows(entry)[0]
    return results / "models" / config_hash(train if workflow == "train" else {**train, "workflow": workflow})


# ----------------------------------------------------------------------------------------------
# running


def ensure_dataset(protocol: dict, progress: bool = True) -> Path:
    """The protocol's dataset folder; a synthetic one is generated when absent."""
    dataset = protocol["dataset"]
    root, task_dir = task_paths(dataset["dir"])
    if not (task_dir / "dataset.json").is_file():
        synthetic = dataset.get("synthetic")
        if synthetic is None:
            raise InputError(task_dir, "dataset not found and the protocol gives no 'synthetic' settings")
        from pipeline.data.synth import generate_dataset
        from pipeline.data.variety import Variety, load_settings

        variety = load_settings(synthetic["variety"], f"{protocol['path']}: dataset.synthetic.variety") \
            if "variety" in synthetic else None
        generate_dataset(root, n_healthy=synthetic.get("healthy", 8), n_tumour=synthetic.get("tumour", 16),
                         seed=synthetic.get("seed", 0), spacing=synthetic.get("spacing", 2.0), progress=progress,
                         variety=variety if isinstance(variety, Variety) else None,
                         domains=None if variety is None or isinstance(variety, Variety) else variety)
    return root


def entry_train_settings(protocol: dict, entry: dict) -> dict:
    """What the model depends on (not how it is scored): entries sharing these share a model."""
    bundle = {k: v for k, v in protocol.get("bundle", {}).items() if k not in SCORE_KEYS}
    own = {k: v for k, v in entry.items() if k not in SCORE_KEYS and k not in ENTRY_KEYS}
    return {"noise": "gaussian", **bundle, **own}  # the protocol's noise, when it names one, wins over the default


def entry_score_settings(protocol: dict, entry: dict) -> dict:
    """How an entry scores (protocol bundle, then the entry's own) and which sections it scores."""
    bundle = {k: v for k, v in protocol.get("bundle", {}).items() if k in SCORE_KEYS}
    sections = protocol.get("evaluation", {}).get("sections", ["validation", "test"])
    return {**bundle, **{k: v for k, v in entry.items() if k in SCORE_KEYS}, "score_sections": sections}


def run_entry(protocol: dict, entry: dict, results: Path, dataset_root: Path, progress: bool = True,
              trust_expressions: bool = False, ground_truth_dir=None) -> Path:
    """Train (or reuse) the model, score validation + test, evaluate; write ``run.json`` last.

    ``trust_expressions`` lets settings through that MONAI's config parser evaluates
    (:func:`pipeline.bundle.check_plain_settings`); without it they are refused. ``ground_truth_dir``:
    the test labels of a hidden-label dataset (the organiser's folder; not part of the config hash)."""
    run_dir = confined(results, results / "runs" / entry["id"], protocol["path"])
    if (run_dir / "run.json").is_file():
        return run_dir
    split = protocol.get("split", {})
    shared = {"dataset_dir": str(dataset_root), "split_file": str(results / "split.json"),
              "cache_dir": str(results / "cache"), "split_seed": split.get("seed", 0), "progress": progress}
    if not Path(shared["split_file"]).is_file():  # the workflows reuse a split file they find: the bound split
        write_json(shared["split_file"], canonical_split(protocol))
    train = entry_train_settings(protocol, entry)
    train_workflow, inference_workflow = entry_workflows(entry)
    model_dir = model_folder(results, entry, train)
    train_seconds = 0.0 if is_baseline(entry) else _train_once(model_dir, train_workflow, train, shared,
                                                               trust_expressions)
    score = entry_score_settings(protocol, entry)
    settings = {**train, **score, **shared, "output_dir": str(run_dir), "ckpt_dir": str(model_dir),
                "scores_dir": str(run_dir / "scores"), "evaluation_dir": str(run_dir / "evaluation"),
                "method_name": entry["id"], "bootstrap_resamples": protocol.get("evaluation", {}).get("bootstrap_resamples", 1000)}
    if ground_truth_dir is not None:
        settings["ground_truth_dir"] = str(ground_truth_dir)
    start = time.perf_counter()
    run_bundle(inference_workflow, trust_expressions=trust_expressions, **settings)
    inference_seconds = time.perf_counter() - start
    run_bundle("evaluate", trust_expressions=trust_expressions, **settings)
    env = environment()
    hashed = hashed_settings(settings)
    write_json(run_dir / "config.json", settings)
    write_json(run_dir / "environment.json", env)
    write_json(run_dir / "run.json", {
        "method": entry["id"], "entry": entry,
        "protocol": {"id": protocol["id"], "hash": protocol["hash"], "path": protocol["path"]},
        "dataset": {"dir": str(dataset_root), "fingerprint": dataset_fingerprint(dataset_root)},
        "split": {"file": shared["split_file"],
                  "fingerprint": split_fingerprint(read_json(shared["split_file"], "split file"))},
        "supervision": _supervision(run_dir), **weights_record(model_dir),
        "config_hash": config_hash(hashed), "seed": entry["seed"], "code_version": env["code_version"],
        "hardware": env["hardware"],
        "timings": {"train_seconds": round(train_seconds, 3), "inference_seconds": round(inference_seconds, 3)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return run_dir


def _supervision(run_dir: Path) -> str:
    """What the scored method learnt from, as the score stage recorded it (older indexes: unsupervised)."""
    index = read_index(run_dir / "scores")
    return index.get("settings", {}).get("supervision", "unsupervised")


def _train_once(model_dir: Path, workflow: str, train: dict, shared: dict, trust_expressions: bool = False) -> float:
    """Train (bundle ``workflow``) unless ``model_dir`` already holds a finished model; return the training seconds."""
    record = model_dir / "train.json"
    if (model_dir / "model.pt").is_file() and record.is_file():
        return read_json(record, "training record")["seconds"]
    start = time.perf_counter()
    run_bundle(workflow, **train, **shared, output_dir=str(model_dir), ckpt_dir=str(model_dir),
               trust_expressions=trust_expressions)
    seconds = time.perf_counter() - start
    write_json(record, {"seconds": round(seconds, 3), "workflow": workflow, "settings": train})
    return seconds


def run_benchmark(protocol_path: str | os.PathLike, results_dir: str | os.PathLike = "results",
                  leaderboard: str | os.PathLike | None = None, progress: bool = True,
                  overrides: dict | None = None, trust_expressions: bool = False, ground_truth_dir=None) -> list[Path]:
    """Run every entry of the protocol; submit runs whose row is not yet on ``leaderboard`` (if given).
    ``ground_truth_dir``: where a hidden-label dataset's test labels are (an organiser's run, evaluated
    and submitted with them)."""
    from pipeline.leaderboard.registry import bound_protocol
    from pipeline.leaderboard.submission import submit

    protocol = load_protocol(protocol_path, overrides)
    check_protocol_settings(protocol, overrides, trust_expressions)
    entries = expand_methods(protocol)
    results = confined(Path(results_dir), Path(results_dir) / protocol["id"], protocol["path"])
    run_dirs = [confined(results, results / "runs" / entry["id"], protocol["path"]) for entry in entries]
    dataset_root = ensure_dataset(protocol, progress)
    board = None if leaderboard is None or validation_only(protocol) else leaderboard
    binding = None if board is None else protocol_for_submission(protocol)
    if board is not None:
        bound_protocol(board, protocol["id"], binding, write=False)  # refused before any training if it cannot land
    write_json(results / "protocol.json", {k: v for k, v in protocol.items() if k != "path"})
    for i, (entry, run_dir) in enumerate(zip(entries, run_dirs), 1):
        state = entry_state(run_dir, board)
        if progress:
            print(f"[{i}/{len(entries)}] {entry['id']}: {state}", flush=True)
        if state == RUNNING:
            run_entry(protocol, entry, results, dataset_root, progress, trust_expressions, ground_truth_dir)
        if board is not None and state != DONE:
            submit(run_dir, board, binding, ground_truth_dir=ground_truth_dir,
                   n_boot=protocol.get("evaluation", {}).get("bootstrap_resamples", 1000))
    if board is not None and Path(board).is_file():
        from pipeline.leaderboard.site import build_site

        site = build_site(board)
        if progress:
            print(f"leaderboard site: {site}", flush=True)
    return run_dirs


RUNNING, SUBMITTING, DONE = "running", "run found, submitting its missing row", "already done"


def entry_state(run_dir: Path, board) -> str:
    """An entry is done when its run record exists and (when a leaderboard takes its runs) its row is
    on the leaderboard: a run killed between its record and its row is submitted next time, not lost."""
    from pipeline.leaderboard.submission import on_leaderboard

    if not (run_dir / "run.json").is_file():
        return RUNNING
    return DONE if board is None or on_leaderboard(board, run_dir) else SUBMITTING


def confined(root: Path, path: Path, source) -> Path:
    """``path``, refused unless it lies strictly inside ``root`` once resolved: names from a protocol
    file decide output folders, and nothing may be written outside ``--results``."""
    base, resolved = root.resolve(), path.resolve()
    if resolved == base or not resolved.is_relative_to(base):
        raise InputError(source, f"output folder {path} leaves the results folder {base}")
    return path


def validation_only(protocol: dict) -> bool:
    """Study protocols score validation subjects only; their runs never reach the leaderboard."""
    return "test" not in protocol.get("evaluation", {}).get("sections", ["test"])


def canonical_split(protocol: dict) -> dict:
    """The patient split the protocol defines (its seed and method over the dataset's subjects), computed
    afresh: what a leaderboard binds to, never a split file found in a results folder. ``split.method``
    defaults to ``random``, the method every protocol written before stratified splits is bound to."""
    from pipeline.data.dataset import dataset_split  # a hidden-label dataset's listed test subjects stay the test

    split = protocol.get("split", {})
    return dataset_split(protocol["dataset"]["dir"], seed=split.get("seed", 0), train_domains=split.get("train_domains"),
                         method=split.get("method", "random"))


def protocol_for_submission(protocol: dict) -> dict:
    """What a leaderboard binds to (:func:`pipeline.leaderboard.registry.register_protocol`): the protocol's
    id, hash and content, its dataset folder and its canonical split."""
    root, _ = task_paths(protocol["dataset"]["dir"])
    content = {k: v for k, v in protocol.items() if k not in ("hash", "path")}
    return {"id": protocol["id"], "hash": protocol["hash"], "content": content, "dataset_dir": str(root),
            "split": canonical_split(protocol)}
