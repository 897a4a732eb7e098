"""Protocol registry: what a leaderboard checks every run against, bound at its first submission.

A leaderboard must never check a run against files the submitter brings (a split file beside the
run, a protocol path in its ``run.json``). So the first submission under a protocol id, or
``pipeline leaderboard init --protocol FILE``, records in ``<name>.protocols.json`` beside the CSV
the protocol's content and hash, the dataset folder with a fingerprint of its file contents, and
the canonical split computed from the protocol; :func:`check_provenance` then holds every run to
that record. Registering is done under the leaderboard's own write lock (:func:`locked`).

Test labels are bound too: the first submission records which labels its test subjects were scored
against (the dataset's own, or a content fingerprint of a hidden ground-truth folder's labels for
the registered test subjects, :func:`bind_ground_truth`), so two rows of one protocol are never
ranked against different labels.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.atomic import write_json
from pipeline.common import SECTIONS, is_real, read_json
from pipeline.errors import InputError

LOCK_TIMEOUT_S = 300
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
"""Protocol ids and method names: they become folder names under ``--results``, so no path
separators, no leading dot, no ``..`` (checked by :func:`check_name`)."""


def check_name(value, source, what: str, pattern: re.Pattern = NAME_PATTERN) -> str:
    """Refuse a name that could leave the folder it names (``../x``, ``/abs``, ``.hidden``)."""
    if not isinstance(value, str) or not pattern.fullmatch(value) or ".." in value:
        raise InputError(source, f"{what} {value!r} must match {pattern.pattern} without '..' (letters, digits, "
                                 "'._-', starting with a letter or digit, at most 80 characters)")
    return value


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def split_fingerprint(split: dict) -> str:
    """sha256 of the canonical JSON of the sorted train / validation / test subject lists."""
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in SECTIONS):
        raise InputError("split", "needs lists 'train', 'validation' and 'test'")
    return _sha256({k: sorted(split[k]) for k in SECTIONS})


def protocol_hash(protocol_content: dict) -> str:
    """sha256 of the protocol file's content as canonical JSON (sorted keys, compact; dates etc. as str)."""
    return _sha256(protocol_content)


def field(record: dict, dotted: str, source: Path):
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise InputError(source, f"missing {dotted!r}")
        value = value[key]
    return value


@contextlib.contextmanager
def locked(csv_path):
    """The leaderboard's write lock (CSV, sidecars and protocol registry share it)."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(csv_path) + ".lock", timeout=LOCK_TIMEOUT_S):
            yield
    except Timeout:
        raise InputError(csv_path, f"still locked by another submitter after {LOCK_TIMEOUT_S} s") from None



def registry_path(csv_path) -> Path:
    """``<name>.protocols.json`` beside the CSV: the protocols this leaderboard is bound to."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.stem + ".protocols.json")


def read_registry(csv_path) -> dict:
    """{protocol id: record} (empty for a leaderboard that has none yet)."""
    path = registry_path(csv_path)
    if not path.exists():
        return {}
    registry = read_json(path, "protocol registry")
    if not isinstance(registry, dict) or not all(isinstance(r, dict) and "hash" in r for r in registry.values()):
        raise InputError(path, "not a protocol registry (expected {protocol id: record})")
    return registry


def protocol_record(binding: dict) -> dict:
    """What a leaderboard records for a protocol. ``binding``: ``{"id", "hash", "content",
    "dataset_dir", "split"}`` from the protocol file itself (see
    :func:`pipeline.protocols.protocol_for_submission`); the data are fingerprinted now."""
    from pipeline.data.dataset import dataset_fingerprint

    missing = [k for k in ("id", "hash", "content", "dataset_dir", "split") if k not in binding]
    if missing:
        raise InputError("protocol", f"missing {', '.join(missing)}")
    check_name(binding["id"], "protocol", "protocol id")
    split = {k: sorted(binding["split"][k]) for k in SECTIONS}
    return {"id": binding["id"], "hash": binding["hash"], "content": binding["content"],
            "dataset_dir": str(Path(binding["dataset_dir"]).resolve()),
            "dataset_fingerprint": dataset_fingerprint(binding["dataset_dir"]),
            "split": split, "split_fingerprint": split_fingerprint(split),
            "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _same_binding(old: dict, new: dict) -> bool:
    return all(old[k] == new[k] for k in ("hash", "dataset_fingerprint", "split_fingerprint"))


def register_protocol(csv_path, binding: dict, ground_truth_dir=None, review_ceiling: float | None = None) -> dict:
    """Bind the leaderboard to a protocol (``pipeline leaderboard init``); returns the record.

    Registering the same protocol, data and split again is a no-op; another hash, data, split or
    labels under a registered id is refused (a new protocol needs a new id). A dataset with hidden
    test labels is bound only together with them (``ground_truth_dir``, the organiser's folder), so a
    participant's first submission can never claim its id. ``review_ceiling``: the test AUPRC at or above
    which rows are held for review (:mod:`pipeline.leaderboard.clones`; set or changed by the organiser here)."""
    record = protocol_record(binding)
    if review_ceiling is not None:
        if not is_real(review_ceiling) or not 0 < float(review_ceiling) <= 1:
            raise InputError("review_ceiling", f"must be a number in (0, 1], got {review_ceiling!r}")
        record["review_ceiling"] = float(review_ceiling)
    hidden = has_hidden_test_labels(binding["dataset_dir"])
    labels = _init_labels(hidden, ground_truth_dir, record)
    path = registry_path(csv_path)
    with locked(csv_path):
        registry = read_registry(csv_path)
        old = registry.get(record["id"])
        if old is None:
            if hidden and labels is None:
                raise InputError(path, unbound_hidden(record["id"]))
            record = {**record, **({"ground_truth": labels} if labels else {})}
            write_json(path, {**registry, record["id"]: record})
            return record
        if not _same_binding(old, record) or old.get("ground_truth") not in (None, labels or old.get("ground_truth")):
            raise InputError(path, f"protocol id {record['id']!r} is registered with protocol hash "
                                   f"{old['hash'][:12]}, dataset {old['dataset_fingerprint']}, split "
                                   f"{old['split_fingerprint'][:12]} and {_labels_text(old.get('ground_truth'))}; "
                                   "this protocol differs (give it a new id)")
        if review_ceiling is not None and old.get("review_ceiling") != record["review_ceiling"]:
            old = {**old, "review_ceiling": record["review_ceiling"]}
            registry = {**registry, record["id"]: old}
            write_json(path, registry)
        if labels is not None and old.get("ground_truth") is None:
            write_json(path, {**registry, record["id"]: {**old, "ground_truth": labels}})
    return old


def unbound_hidden(protocol_id: str) -> str:
    return (f"protocol {protocol_id!r} is not bound on this leaderboard and its dataset hides its test labels: only "
            "the organiser binds it, with `pipeline leaderboard init --protocol FILE --ground-truth GT_DIR`")


def has_hidden_test_labels(dataset_dir) -> bool:
    """Whether the dataset lists its test images without labels (``hiddenTestLabels``)."""
    from pipeline.data.dataset import read_dataset_json, task_paths
    from pipeline.layout import HIDDEN_TEST_KEY

    return read_dataset_json(task_paths(dataset_dir)[1]).get(HIDDEN_TEST_KEY) is True


def _init_labels(hidden: bool, ground_truth_dir, record: dict) -> str | None:
    """The fingerprint of the organiser's hidden labels (checked complete), or None without a folder."""
    from pipeline.layout import ground_truth_label

    if ground_truth_dir is None:
        return None
    if not hidden:
        raise InputError(ground_truth_dir, "--ground-truth is for datasets with hidden test labels; this "
                                           "dataset's own labels are the ground truth")
    missing = [s for s in record["split"]["test"] if not ground_truth_label(ground_truth_dir, s).is_file()]
    if missing:
        raise InputError(ground_truth_dir, f"no hidden label for test subject(s) {', '.join(missing[:5])}")
    return ground_truth_fingerprint(ground_truth_dir, record["split"]["test"])


def bound_protocol(csv_path, protocol_id: str, binding: dict | None = None, write: bool = True) -> dict | None:
    """The registered record of ``protocol_id``; the first submission under an id registers
    ``binding`` (the protocol file the submitter named), later ones are checked against it.
    ``write=False`` only checks that ``binding`` could be bound (a runner asks before it trains)."""
    record = read_registry(csv_path).get(protocol_id)
    if record is None:
        if binding is None:
            raise InputError(registry_path(csv_path), f"protocol {protocol_id!r} is not registered on this "
                                                      "leaderboard; pass --protocol FILE or run "
                                                      "`pipeline leaderboard init --protocol FILE`")
        if not write:
            if has_hidden_test_labels(binding["dataset_dir"]):
                raise InputError(registry_path(csv_path), unbound_hidden(protocol_id))
            return None
        return register_protocol(csv_path, binding)
    if binding is not None and binding["hash"] != record["hash"]:
        raise InputError(registry_path(csv_path), f"protocol {protocol_id!r} is registered with hash "
                                                  f"{record['hash'][:12]}, the given protocol file hashes to "
                                                  f"{binding['hash'][:12]}")
    return record


DATASET_LABELS = "dataset labels"


def ground_truth_fingerprint(ground_truth_dir, test_subjects) -> str:
    """Content hash of the hidden labels of ``test_subjects`` in ``ground_truth_dir`` (a missing
    label hashes as such; evaluation refuses it later with its own message)."""
    from pipeline.fingerprint import sha256_files
    from pipeline.layout import ground_truth_label

    paths = {subject: ground_truth_label(ground_truth_dir, subject) for subject in sorted(test_subjects)}
    hashes = sha256_files(paths.values())
    return _sha256({s: hashes.get(str(p.resolve()), "missing") for s, p in paths.items()})[:16]


def bind_ground_truth(csv_path, protocol_id: str, ground_truth_dir=None, write: bool = True) -> str:
    """Refuse a submission whose test labels (:data:`DATASET_LABELS` without a folder, or a hidden folder's
    fingerprint) differ from those the protocol's rows were scored against; with ``write``, record
    them if none are yet (call it so only once the labels have scored a run). Returns the labels."""
    with locked(csv_path):
        registry = read_registry(csv_path)
        record = registry[protocol_id]
        labels = (ground_truth_fingerprint(ground_truth_dir, record["split"]["test"]) if ground_truth_dir
                  else DATASET_LABELS)
        bound = record.get("ground_truth")
        if bound is not None and bound != labels:
            source = ground_truth_dir or registry_path(csv_path)
            raise InputError(source, f"protocol {protocol_id!r} is scored against {_labels_text(bound)}; "
                                     f"this submission brings {_labels_text(labels)}")
        if bound is None and write:
            write_json(registry_path(csv_path), {**registry, protocol_id: {**record, "ground_truth": labels}})
    return labels


def _labels_text(labels: str | None) -> str:
    if labels is None:
        return "no labels bound yet"
    return labels if labels == DATASET_LABELS else f"hidden labels with fingerprint {labels}"


def hides_test_labels(record) -> bool:
    """Whether a registered protocol is scored against hidden labels: its public pages then show
    nothing derived per test subject from them."""
    return isinstance(record, dict) and record.get("ground_truth") not in (None, DATASET_LABELS)


def check_registered_data(record: dict) -> str:
    """The registered dataset's fingerprint, refused if its content changed since the protocol was bound."""
    from pipeline.data.dataset import dataset_fingerprint

    current = dataset_fingerprint(record["dataset_dir"])
    if current != record["dataset_fingerprint"]:
        raise InputError(record["dataset_dir"], f"dataset content changed since protocol {record['id']!r} was "
                                                f"registered (fingerprint {current} != {record['dataset_fingerprint']})")
    return current


def check_provenance(run: dict, run_json: Path, run_dir: Path, record: dict) -> None:
    """Refuse a run made under another protocol, on other data, another split or other subjects."""
    from pipeline.evaluation.evaluate import checked_index

    for key in ("id", "hash"):
        if field(run, f"protocol.{key}", run_json) != record[key]:
            raise InputError(run_json, f"protocol {key} {run['protocol'][key]!r} differs from the registered "
                                       f"protocol's {record[key]!r}; rerun under this protocol")
    current = check_registered_data(record)
    if field(run, "dataset.fingerprint", run_json) != current:
        raise InputError(run_json, f"dataset fingerprint {run['dataset']['fingerprint']!r} differs from "
                                   f"{current!r} of {record['dataset_dir']} (other or changed data)")
    if field(run, "split.fingerprint", run_json) != record["split_fingerprint"]:
        raise InputError(run_json, f"split fingerprint differs from the split registered for {record['id']!r} "
                                   "(other patients)")
    subjects = checked_index(run_dir / "scores")["subjects"]
    for section in ("validation", "test"):
        scored = {s for s, item in subjects.items() if item["section"] == section}
        if scored != set(record["split"][section]):
            raise InputError(run_dir / "scores" / "index.json",
                             f"{section} subjects scored ({len(scored)}) are not exactly the registered split's "
                             f"{len(record['split'][section])} {section} subjects")
