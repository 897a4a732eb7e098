"""``pipeline leaderboard verify ROW_ID``: the organiser re-runs a pipeline row and marks it ``reproduced``.

A row's numbers are recomputed from its maps at submission, but the maps themselves, and the
self-reported reconstruction figures, are the submitter's. Verification re-scores the row's validation
and test subjects from its recorded bundle settings (``config.json``, checked against the row's config
hash) and model weights (the run's model folder), recomputes the metrics against the registered protocol
(its data, split and labels), and compares them with the row: every metric and reconstruction figure within
``tolerance`` -> ``reproduced``, else ``not reproduced`` with what differed. External maps have nothing to
re-run and stay unverified. Wiring (it runs bundle workflows), so it lives beside :mod:`pipeline.protocols`.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from pipeline.common import read_json
from pipeline.errors import InputError

COMPARED = ("auroc", "auprc", "dice", "dice_oracle", "subject_auroc", "fp_ml_healthy",
            "healthy_residual", "residual_ratio", "psnr", "ssim")
"""Row columns a re-run must give again (metrics recomputed from the new maps, reconstruction figures from the new
scoring)."""


def _row(csv_path, row_id: str) -> dict:
    from pipeline.leaderboard.submission import read_leaderboard

    table = read_leaderboard(csv_path)
    found = table[table["row_id"] == row_id]
    if len(found) != 1:
        raise InputError(csv_path, f"no row {row_id!r} on this leaderboard")
    row = found.iloc[0].to_dict()
    if str(row.get("source") or "pipeline run") != "pipeline run":
        raise InputError(csv_path, f"row {row_id} holds external maps: there is no run to repeat (it stays unverified)")
    return row


def _recorded_settings(row: dict, run_dir: Path) -> dict:
    """The run's bundle settings, refused unless they hash to the row's config hash."""
    from pipeline.provenance import config_hash, hashed_settings

    settings = read_json(run_dir / "config.json", "recorded settings")
    if config_hash(hashed_settings(settings)) != row["config_hash"]:
        raise InputError(run_dir / "config.json", f"settings do not hash to the row's config hash {row['config_hash']}")
    return settings


def _model_dir(settings: dict, run_dir: Path) -> str:
    """The recorded model folder: as recorded if it exists, else the same name under the run's results root
    (a relative path was relative to where the benchmark ran)."""
    recorded = Path(settings["ckpt_dir"])
    if recorded.is_dir():
        return str(recorded.resolve())
    return str(run_dir.parent.parent / "models" / recorded.name)


def _check_weights(run: dict, model_dir: Path) -> None:
    """Refuse weights other than those the run recorded (a run from before weights were recorded: unchecked)."""
    from pipeline.fingerprint import sha256_file

    recorded = (run.get("model") or {}).get("sha256")
    if recorded is None:
        return
    path = model_dir / run["model"].get("file", "model.pt")
    if not path.is_file():
        raise InputError(path, "the run's weights are gone; nothing to re-run")
    current = sha256_file(path)
    if current != recorded:
        raise InputError(path, f"weights changed since the run (sha256 {current[:12]} != recorded "
                               f"{recorded[:12]}): re-running them would verify other weights")


def rescore(row: dict, record: dict, work: Path, ground_truth_dir=None, trust_expressions: bool = False) -> dict:
    """Score and evaluate the row's subjects again under ``work``; the recomputed row values of :data:`COMPARED`."""
    from pipeline.bundle import run_bundle
    from pipeline.evaluation.evaluate import compute_metrics
    from pipeline.leaderboard.columns import ADDED_COLUMNS
    from pipeline.leaderboard.registry import field
    from pipeline.protocols import entry_workflows
    from pipeline.atomic import write_json

    run_dir = Path(row["run_dir"])
    settings = _recorded_settings(row, run_dir)
    run = read_json(run_dir / "run.json", "run record")
    entry = run.get("entry") or {}
    model_dir = _model_dir(settings, run_dir)
    _check_weights(run, Path(model_dir))
    write_json(work / "split.json", {**record["split"], "seed": settings.get("split_seed", 0)})
    settings.update(dataset_dir=record["dataset_dir"], split_file=str(work / "split.json"), cache_dir=str(work / "cache"),
                    output_dir=str(work), scores_dir=str(work / "scores"), ckpt_dir=model_dir,
                    evaluation_dir=str(work / "evaluation"), progress=False)
    settings.pop("ground_truth_dir", None)
    run_bundle(entry_workflows(entry)[1], trust_expressions=trust_expressions, **settings)
    metrics = compute_metrics(record["dataset_dir"], work / "scores", row["method"], n_boot=int(row["n_boot"]),
                              progress=False, ground_truth_dir=ground_truth_dir).metrics
    again = {m: metrics["test"][m] for m in ("auroc", "auprc", "dice", "dice_oracle")}
    again.update({c: field(metrics, dotted, work) for c, dotted in ADDED_COLUMNS.items()})
    return again


def differences(row: dict, again: dict, tolerance: float) -> list[str]:
    """``column row -> again`` for every compared value that moved by more than ``tolerance`` (or appeared)."""
    out = []
    for column in COMPARED:
        old, new = row.get(column), again.get(column)
        old_missing = old is None or (isinstance(old, float) and math.isnan(old))
        if old_missing and new is None:
            continue
        if old_missing or new is None or abs(float(old) - float(new)) > tolerance:
            out.append(f"{column} {old} -> {new}")
    return out


def verify_row(csv_path, row_id: str, tolerance: float = 1e-6, ground_truth_dir=None,
               trust_expressions: bool = False) -> tuple[str, list[str]]:
    """Re-run row ``row_id`` of ``csv_path``, record the verdict in its ``reproduced`` cell; returns
    (verdict, differences)."""
    from pipeline.leaderboard.registry import bind_ground_truth, bound_protocol
    from pipeline.leaderboard.submission import set_reproduced

    row = _row(csv_path, row_id)
    record = bound_protocol(csv_path, row["protocol_id"])
    if record["hash"] != row["protocol_hash"] or record["split_fingerprint"] != row["split_fingerprint"]:
        raise InputError(csv_path, f"row {row_id} was made under another binding of {row['protocol_id']!r}")
    bind_ground_truth(csv_path, row["protocol_id"], ground_truth_dir, write=False)
    with tempfile.TemporaryDirectory(prefix="verify-") as work:
        again = rescore(row, record, Path(work), ground_truth_dir, trust_expressions)
    diffs = differences(row, again, tolerance)
    verdict = "not reproduced" if diffs else "reproduced"
    set_reproduced(csv_path, row_id, verdict)
    return verdict, diffs
