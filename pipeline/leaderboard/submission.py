"""Leaderboard stage: recompute a run's numbers from its maps, append them to a CSV, rank them.

Trust. A submission never uses the run's own ``evaluation/metrics.json``: :func:`submission_row`
recomputes every number with :func:`pipeline.evaluation.evaluate.compute_metrics` from the saved maps.
Nothing the submitter brings decides *what* a run is checked against. A leaderboard is bound to
its protocols: the first submission under a protocol id (or ``pipeline leaderboard init``)
records, in ``<name>.protocols.json`` beside the CSV, the protocol's content and hash, the dataset
folder and its content fingerprint (:func:`pipeline.data.dataset.dataset_fingerprint`) and the canonical
patient split computed from the protocol (never a split file from a results folder). Later runs
under that id must carry the same protocol hash, the registered data (unchanged since) and split,
and maps that cover exactly the registered validation and test subjects (a run cannot drop hard
test patients). Map paths must stay inside the run's ``scores/`` folder and maps must sit on their
image's grid (:func:`pipeline.evaluation.evaluate.checked_index`); the same test maps under another name are
a duplicate (``maps_hash``), and so are maps that rank the voxels as an earlier row's do
(:mod:`pipeline.leaderboard.clones`). With ``ground_truth_dir`` the test labels come from a folder that
participants never receive, as on challenge platforms.

The CSV (one row per submission, columns :data:`COLUMNS`). Appends go through :func:`append_row`
under ``filelock.FileLock(<csv>.lock)``: existing rows are read, the new row added and the whole
file rewritten to a temporary file that replaces the CSV (``os.replace``), so concurrent
submitters never lose a row and readers never see half a file. Spreadsheet safety (OWASP
"CSV injection"): a text cell starting with ``= + - @``, tab or carriage return is stored with a
leading ``'``; numbers are written as numbers. Line breaks and control characters are refused in
every text field, method names must match :data:`METHOD_PATTERN`; Markdown output escapes HTML. A
CSV written before the :data:`LATER_COLUMNS` existed still reads (those cells empty) and is
upgraded on its next append. Crash hygiene: the per-subject sidecar is written before the CSV row
that names it, so a row never lacks its sidecar; a writer killed in between leaves a sidecar with
no row and perhaps a temporary file, which the next writer removes while it holds the lock (every
writer holds it while writing, so whatever it finds is a dead writer's).

Ranking and the paired test over patients live in :mod:`pipeline.leaderboard.ranking`.
"""

from __future__ import annotations

import csv
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_path, write_json
from pipeline.common import check_schema, is_int, read_json
from pipeline.errors import InputError
from pipeline.evaluation.metrics import METRICS, pixel_metrics
from pipeline.leaderboard.clones import CLONE_SPEARMAN, MapsHash, RankSample, copied_row, write_sample
from pipeline.leaderboard.registry import (bind_ground_truth, bound_protocol, check_provenance, field, locked,
                                           registry_path)
from pipeline.leaderboard.run_files import check_run_files

from pipeline.leaderboard.columns import (  # noqa: F401 - re-exported: the CSV's column list
    ADDED_COLUMNS, COLUMNS, COMPARABLE, DUPLICATE_KEY, LATER_COLUMNS, METHOD_PATTERN, NUMERIC_COLUMNS, ROW_ID_PATTERN,
    REPRODUCED, SELF_REPORTED, SOURCES, SUPERVISION, cell, check_method_name, check_text, serialise)

if TYPE_CHECKING:  # evaluate imports MONAI: loaded only when a submission is evaluated
    from pipeline.evaluation.evaluate import Evaluation


# ----------------------------------------------------------------------------- building a row


def _check_run_dir(run_dir) -> Path:
    check_text("run_dir", str(run_dir), "run_dir")
    path = Path(run_dir).resolve()
    check_text("run_dir", str(path), "run_dir")
    if not path.is_dir():
        raise InputError(path, "run folder not found")
    scores = (path / "scores").resolve()
    if not scores.is_relative_to(path):
        raise InputError(path / "scores", f"scores folder leaves the run folder (-> {scores})")
    check_run_files(path)
    return path


def _per_subject(result: Evaluation) -> dict:
    """Per test subject: AUROC / AUPRC (None where undefined), Dice at the validation threshold."""
    dice = result.metrics["test"]["per_subject_dice"]
    out = {}
    for name, scores, tumour in result.voxels.items():
        n_pos = int(tumour.sum())
        px = pixel_metrics(scores, tumour) if 0 < n_pos < tumour.size else {}
        out[name] = {"auroc": px.get("auroc"), "auprc": px.get("auprc"), "dice": dice[name], "tumour_voxels": n_pos}
    return out


def read_run_record(run_dir) -> tuple[Path, dict]:
    """(checked run folder, its ``run.json`` validated against the published schema: every malformed field in
    one error)."""
    run_dir = _check_run_dir(run_dir)
    run = read_json(run_dir / "run.json", "run record")
    check_schema(run, "run_record", run_dir / "run.json")
    return run_dir, run


def submission_row(run_dir, record: dict, n_boot: int = 1000, seed: int = 0, ground_truth_dir=None,
                   run: dict | None = None) -> dict:
    """One leaderboard row for ``run_dir``, every number recomputed from its maps (see module doc).

    ``record``: the registered protocol (:func:`bound_protocol`). ``ground_truth_dir``: where the
    test labels are when participants never had them. ``run``: the record as :func:`read_run_record` returned it
    for ``run_dir`` (``submit`` has read it already), else read here. The row holds :data:`COLUMNS` plus
    ``"subjects"`` (per-test-subject values for the paired test).
    """
    from pipeline.evaluation.evaluate import compute_metrics

    run_dir, run = read_run_record(run_dir) if run is None else (Path(run_dir), run)
    run_json = run_dir / "run.json"
    row = {"row_id": uuid.uuid4().hex,
           "method": check_method_name(field(run, "method", run_json), run_json),
           "protocol_id": field(run, "protocol.id", run_json),
           "protocol_hash": field(run, "protocol.hash", run_json),
           "dataset_fingerprint": field(run, "dataset.fingerprint", run_json),
           "split_fingerprint": field(run, "split.fingerprint", run_json),
           "config_hash": field(run, "config_hash", run_json), "seed": field(run, "seed", run_json),
           "code_version": field(run, "code_version", run_json), "hardware": run.get("hardware"),
           "train_seconds": (run.get("timings") or {}).get("train_seconds"),
           "inference_seconds": (run.get("timings") or {}).get("inference_seconds"),
           "run_dir": str(run_dir), "supervision": field(run, "supervision", run_json),
           "source": run.get("source", SOURCES[0]), "description": run.get("description"),
           "code_url": run.get("code_url"), "reproduced": ""}
    if row["supervision"] not in SUPERVISION:
        raise InputError(run_json, f"supervision {row['supervision']!r} is not one of {', '.join(SUPERVISION)}")
    if not is_int(row["seed"]):
        raise InputError(run_json, f"seed must be an integer, got {row['seed']!r}")
    for column, value in row.items():  # fail before the expensive part
        cell(column, value, run_json)
    check_provenance(run, run_json, run_dir, record)

    maps, ranks = MapsHash(), RankSample()  # exact copies, then monotone ones (pipeline.leaderboard.clones)

    def visit(name, data, threshold):
        maps.add(name, data, threshold)
        ranks.add(name, data, threshold)

    result = compute_metrics(record["dataset_dir"], run_dir / "scores", row["method"], n_boot=n_boot, seed=seed,
                             progress=False, ground_truth_dir=ground_truth_dir or None, on_test_subject=visit)
    metrics, test = result.metrics, result.metrics["test"]

    for m in METRICS:
        row[m] = test[m]
        row[f"{m}_ci_low"], row[f"{m}_ci_high"] = test["ci95"][m]
    row.update({column: field(metrics, dotted, run_dir) for column, dotted in ADDED_COLUMNS.items()})
    if row["source"] != SOURCES[0]:  # maps made elsewhere: nothing about them is stated but the maps
        row.update({column: None for column in SELF_REPORTED})
    row["self_reported"] = " ".join(c for c in SELF_REPORTED if row[c] is not None) or None
    row.update(dice_oracle=test["dice_oracle"], test_subjects=test["subjects"], n_boot=n_boot,
               maps_hash=maps.hexdigest(), submitted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               subjects=_per_subject(result), rank_sample=ranks.values())
    return {c: row[c] for c in [*COLUMNS, "subjects", "rank_sample"]}


# ----------------------------------------------------------------------------- writing


def subjects_dir(csv_path) -> Path:
    """``<name>.subjects/`` beside ``<name>.csv``: one per-test-subject JSON per row."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.stem + ".subjects")


def _column_positions(header: list[str], source) -> list[int | None]:
    """Where each of :data:`COLUMNS` sits in ``header`` (None: an older CSV without that added column)."""
    if header != [c for c in COLUMNS if c in header] or set(COLUMNS) - set(header) - LATER_COLUMNS:
        raise InputError(source, f"not a leaderboard of this version (columns {header[:4]}...)")
    return [header.index(c) if c in header else None for c in COLUMNS]


def _read_rows(csv_path: Path) -> list[list[str]]:
    """Raw cells of the existing data rows (kept byte for byte) in :data:`COLUMNS` order; checks the header."""
    if not csv_path.exists():
        return []
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    positions = _column_positions(rows[0], csv_path)
    if any(len(r) != len(rows[0]) for r in rows[1:]):
        raise InputError(csv_path, f"a row does not have the header's {len(rows[0])} cells")
    return [["" if i is None else r[i] for i in positions] for r in rows[1:]]


def _remove_dead_writers_files(csv_path: Path, rows: list[list[str]]) -> None:
    """Under the lock: temporary files of killed writers, and sidecars whose row never landed."""
    for tmp in csv_path.parent.glob(f".{csv_path.name}.*.tmp.csv"):
        tmp.unlink(missing_ok=True)
    for tmp in csv_path.parent.glob(f".{registry_path(csv_path).name}.*.tmp"):
        tmp.unlink(missing_ok=True)
    folder = subjects_dir(csv_path)
    if folder.is_dir():
        landed = {r[0] for r in rows}
        for path in folder.iterdir():  # <row_id>.json and <row_id>.ranks.npy
            row_id = path.name.split(".", 1)[0]
            ours = ROW_ID_PATTERN.fullmatch(row_id) and path.name in (f"{row_id}.json", f"{row_id}.ranks.npy")
            if path.name.startswith(".") or (ours and row_id not in landed):
                path.unlink(missing_ok=True)


def _refuse_duplicates(csv_path: Path, rows: list[list[str]], cells: list[str], row: dict) -> None:
    key = [COLUMNS.index(c) for c in DUPLICATE_KEY]
    same_maps = [COLUMNS.index(c) for c in ("protocol_hash", "maps_hash")]
    for old in rows:
        if [old[i] for i in key] == [cells[i] for i in key]:
            raise InputError(csv_path, f"{row['method']} (seed {row['seed']}) with this config, code version "
                                       f"and protocol is already on the leaderboard (row {old[0]})")
        if row.get("maps_hash") and [old[i] for i in same_maps] == [cells[i] for i in same_maps]:
            raise InputError(csv_path, f"the test maps of {row['method']} are identical to those of "
                                       f"{old[COLUMNS.index('method')]} (row {old[0]}) already on the leaderboard")
    if row.get("rank_sample") is not None:
        protocol = COLUMNS.index("protocol_hash")
        earlier = [(old[0], old[COLUMNS.index("method")]) for old in rows if old[protocol] == cells[protocol]]
        copy = copied_row(subjects_dir(csv_path), row["rank_sample"], earlier)
        if copy is not None:
            raise InputError(csv_path, f"the test maps of {row['method']} rank voxels as those of {copy[1]} (row "
                                       f"{copy[0]}) do (Spearman {copy[2]:.6f} >= {CLONE_SPEARMAN}): a monotone "
                                       "transform of an entry already on the leaderboard")


RUN_KEY = {"method": "method", "protocol_hash": "protocol.hash", "dataset_fingerprint": "dataset.fingerprint",
           "split_fingerprint": "split.fingerprint", "config_hash": "config_hash", "seed": "seed",
           "code_version": "code_version"}
"""Where each column of :data:`DUPLICATE_KEY` sits in a run's ``run.json``."""


def on_leaderboard(csv_path, run_dir) -> bool:
    """Whether the run's row has landed: a row equal on :data:`DUPLICATE_KEY` (the row a new
    submission of this run would be refused as a repeat of)."""
    csv_path, run_json = Path(csv_path), Path(run_dir) / "run.json"
    if not csv_path.is_file():
        return False
    run = read_json(run_json, "run record")
    cells = [cell(c, field(run, RUN_KEY[c], run_json), run_json) for c in DUPLICATE_KEY]
    key = [COLUMNS.index(c) for c in DUPLICATE_KEY]
    return any([old[i] for i in key] == cells for old in _read_rows(csv_path))


def append_row(csv_path, row: dict) -> None:
    """Append one row (its ``subjects`` go to the sidecar first), safe against concurrent writers
    and against a writer killed at any instant (see module doc)."""
    csv_path = Path(csv_path)
    cells = serialise(row)
    with locked(csv_path):
        rows = _read_rows(csv_path)
        _remove_dead_writers_files(csv_path, rows)
        _refuse_duplicates(csv_path, rows, cells, row)
        if row.get("rank_sample") is not None:
            write_sample(subjects_dir(csv_path), row["row_id"], row["rank_sample"])
        if row.get("subjects") is not None:
            write_json(subjects_dir(csv_path) / f"{row['row_id']}.json",
                       {"row_id": row["row_id"], "method": row["method"], "subjects": row["subjects"]})
        _write_rows(csv_path, [*rows, cells])


def set_reproduced(csv_path, row_id: str, verdict: str) -> None:
    """Record the organiser's re-run of one row (``reproduced`` / ``not reproduced``); every other cell stays
    byte for byte. Under the write lock, through a temporary file, as :func:`append_row`."""
    if verdict not in REPRODUCED:
        raise InputError("reproduced", f"must be one of {', '.join(REPRODUCED)}, got {verdict!r}")
    csv_path = Path(csv_path)
    with locked(csv_path):
        rows = _read_rows(csv_path)
        matches = [r for r in rows if r[0] == row_id]
        if len(matches) != 1:
            raise InputError(csv_path, f"no row {row_id!r} on this leaderboard")
        matches[0][COLUMNS.index("reproduced")] = verdict
        _write_rows(csv_path, rows)


def _write_rows(csv_path: Path, rows: list[list[str]]) -> None:
    """The whole CSV (header and ``rows``) through a temporary file that replaces it (call under the lock)."""
    with atomic_path(csv_path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows([COLUMNS, *rows])


def submit(run_dir, csv_path, protocol: dict | None = None, n_boot: int = 1000, seed: int = 0,
           ground_truth_dir=None) -> dict:
    """Validate and recompute ``run_dir`` (:func:`submission_row`) against the protocol registered
    under its protocol id (``protocol``, a binding from the protocol file, registers it the first
    time and must agree with the record later); append it; returns the row."""
    run_dir, run = read_run_record(run_dir)  # every malformed field at once, before binding anything
    protocol_id = field(run, "protocol.id", run_dir / "run.json")
    record = bound_protocol(csv_path, protocol_id, protocol)
    bind_ground_truth(csv_path, protocol_id, ground_truth_dir, write=False)  # fail before scoring
    row = submission_row(run_dir, record, n_boot=n_boot, seed=seed, ground_truth_dir=ground_truth_dir, run=run)
    bind_ground_truth(csv_path, protocol_id, ground_truth_dir)
    append_row(csv_path, row)
    return row


# ----------------------------------------------------------------------------- reading and ranking


def read_leaderboard(csv_path) -> pd.DataFrame:
    """All rows as stored (text cells keep their protective quote); numeric columns as numbers."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(csv_path, "leaderboard not found; submit a run first")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_values=[])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(csv_path, f"cannot be read as CSV ({err})") from None
    _column_positions(list(df.columns), csv_path)
    df = df.reindex(columns=COLUMNS, fill_value="")
    for column in NUMERIC_COLUMNS:
        try:
            df[column] = pd.to_numeric(df[column].replace("", np.nan))
        except ValueError as err:
            raise InputError(csv_path, f"column {column}: {err}") from None
    return df
