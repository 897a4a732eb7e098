"""Maps made anywhere, submitted as a row: ``pipeline leaderboard submit-maps MAPS_DIR --protocol-id ID ...``.

A participant's code need not be this tool's: it writes one ``<subject>.nii.gz`` float map per validation
and test subject of a registered protocol (the subjects and grids of its kit, :mod:`pipeline.leaderboard.kit`).
:func:`submit_maps` checks every map against its image's grid before anything is written (one line naming
the file on any fault), builds the run folder itself (``scores/index.json`` and ``run.json`` with the
provenance of the registered protocol, never the submitter's), then submits it as any run
(:func:`pipeline.leaderboard.submission.submission_row`: metrics recomputed from the maps, the Dice threshold
chosen on the validation maps). The row says ``source: external maps``; it states no timings or
reconstruction figures, which nothing could check. The folder is assembled in a temporary place and moved in
whole, and removed again if the row is refused, so a failed submission leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_dir, write_json
from pipeline.common import check_schema
from pipeline.errors import InputError
from pipeline.leaderboard.columns import SOURCES, SUPERVISION, check_method_name, check_text
from pipeline.leaderboard.registry import bind_ground_truth, bound_protocol, check_name

NIFTI = re.compile(r"(.+)\.nii(\.gz)?$")
CODE_URL = re.compile(r"https?://\S{1,300}")
EXTERNAL = SOURCES[1]


def found_maps(maps_dir: Path) -> dict[str, Path]:
    """``{subject: file}`` of the NIfTI files in ``maps_dir`` (not recursive); a subject twice is refused."""
    if not maps_dir.is_dir():
        raise InputError(maps_dir, "maps folder not found")
    maps: dict[str, Path] = {}
    for path in sorted(maps_dir.iterdir()):
        match = NIFTI.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        if match.group(1) in maps:
            raise InputError(path, f"a second map of subject {match.group(1)} (also {maps[match.group(1)].name})")
        maps[match.group(1)] = path
    return maps


def expected_maps(maps_dir: Path, record: dict) -> dict[str, tuple[str, Path]]:
    """``{subject: (section, map file)}`` for exactly the registered validation and test subjects."""
    maps = found_maps(maps_dir)
    sections = {s: section for section in ("validation", "test") for s in record["split"][section]}
    missing = sorted(set(sections) - set(maps))
    extra = sorted(set(maps) - set(sections))
    if missing or extra:
        parts = ([f"no map for {len(missing)} subject(s): {', '.join(missing[:5])}"] if missing else []) + \
                ([f"{len(extra)} file(s) of no registered validation or test subject: {', '.join(extra[:5])}"]
                 if extra else [])
        raise InputError(maps_dir, "; ".join(parts))
    return {s: (sections[s], maps[s]) for s in sorted(sections)}


def check_map(path: Path, image: Path) -> None:
    """A map on its image's grid (same spatial shape and affine), 3D, finite: else one line naming the file."""
    from pipeline.data.transforms import AFFINE_TOLERANCE_MM, check_header
    from pipeline.leaderboard.kit import spatial_grid

    shape, affine, _ = spatial_grid(image)
    img = check_header(path, "anomaly map")
    if list(img.shape) != shape:
        raise InputError(path, f"map shape {tuple(img.shape)} is not the grid of {image.name} {tuple(shape)}")
    if not np.allclose(img.affine, affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        worst = float(np.abs(img.affine - affine).max())
        raise InputError(path, f"map affine differs from that of {image.name} by up to {worst:.3g} (shifted, flipped "
                               "or resampled map); copy the header of the kit's grids/ file")
    try:
        data = np.asarray(img.dataobj, dtype=np.float64)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for broken files
        raise InputError(path, f"cannot read the map ({type(err).__name__}: {err})") from None
    if not np.isfinite(data).all():
        raise InputError(path, "map contains NaN or Inf")


def _checked_details(method, supervision, description, code_url) -> dict:
    check_method_name(method, "--method")
    if supervision not in SUPERVISION:
        raise InputError("--supervision", f"{supervision!r} is not one of: {', '.join(SUPERVISION)}")
    details = {}
    if description:
        check_text("description", description, "--description")
        if len(description) > 500:
            raise InputError("--description", f"at most 500 characters, got {len(description)}")
        details["description"] = description
    if code_url:
        if not CODE_URL.fullmatch(code_url):
            raise InputError("--code-url", f"{code_url!r} is not an http(s) URL without spaces (at most 300 characters)")
        details["code_url"] = code_url
    return details


def run_record(record: dict, method: str, supervision: str, maps_digest: str, details: dict) -> dict:
    """``run.json`` of an external submission: provenance from the registered protocol; the maps' content hash
    stands for the config (the same maps under the same name are a repeat)."""
    return {"method": method, "source": EXTERNAL, "supervision": supervision,
            "protocol": {"id": record["id"], "hash": record["hash"]},
            "dataset": {"fingerprint": record["dataset_fingerprint"]},
            "split": {"fingerprint": record["split_fingerprint"]},
            "config_hash": f"maps:{maps_digest[:32]}", "seed": 0, "code_version": "external", **details}


def _assemble(folder: Path, maps: dict[str, tuple[str, Path]], run: dict) -> None:
    """Copy the maps into ``folder/scores/<section>/`` and write the index and the run record (schema-checked)."""
    subjects = {}
    for subject, (section, path) in maps.items():
        rel = f"{section}/{subject}{'.nii.gz' if path.name.endswith('.gz') else '.nii'}"
        (folder / "scores" / section).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / "scores" / rel)
        subjects[subject] = {"section": section, "files": {"score": rel}}
    index = {"format": 2, "settings": {"source": EXTERNAL, "method": run["method"]}, "subjects": subjects}
    check_schema(index, "scores_index", folder / "scores" / "index.json")
    check_schema(run, "run_record", folder / "run.json")
    write_json(folder / "scores" / "index.json", index)
    write_json(folder / "run.json", run)


def _digest(maps: dict[str, tuple[str, Path]]) -> str:
    from pipeline.fingerprint import sha256_file

    return hashlib.sha256("".join(f"{s}:{sha256_file(p)};" for s, (_, p) in maps.items()).encode()).hexdigest()


def submit_maps(maps_dir, csv_path, protocol_id: str, method: str, supervision: str, description: str | None = None,
                code_url: str | None = None, run_dir=None, ground_truth_dir=None, n_boot: int = 1000) -> dict:
    """Check, assemble and submit ``maps_dir`` as a row of ``protocol_id`` (registered on ``csv_path``); returns
    the row. ``run_dir``: where the run folder goes (default ``<leaderboard folder>/submissions/<protocol>/
    <method>-<8 hex>``). ``ground_truth_dir``: the organiser's hidden test labels, for such a protocol."""
    from pipeline.evaluation.evaluate import evaluate_scores
    from pipeline.leaderboard.kit import registered_items
    from pipeline.leaderboard.submission import append_row, submission_row

    check_name(protocol_id, "--protocol-id", "protocol id")
    details = _checked_details(method, supervision, description, code_url)
    record = bound_protocol(csv_path, protocol_id)
    maps = expected_maps(Path(maps_dir), record)
    items = registered_items(record)
    for subject, (_, path) in maps.items():
        check_map(path, Path(items[subject]["image"]))
    bind_ground_truth(csv_path, protocol_id, ground_truth_dir, write=False)  # fail before any work
    final = Path(run_dir) if run_dir else (Path(csv_path).resolve().parent / "submissions" / protocol_id
                                           / f"{method}-{uuid.uuid4().hex[:8]}")
    if final.exists():
        raise InputError(final, "run folder already exists; choose another --run-dir")
    run = run_record(record, method, supervision, _digest(maps), details)
    with atomic_dir(final) as tmp:
        _assemble(tmp, maps, run)
        row = submission_row(tmp, record, n_boot=n_boot, ground_truth_dir=ground_truth_dir, run=run)
        evaluate_scores(record["dataset_dir"], tmp / "scores", tmp / "evaluation", method, n_boot=n_boot,
                        progress=False, ground_truth_dir=ground_truth_dir)  # the run's report, as for pipeline runs
        row["run_dir"] = str(final.resolve())
    try:
        bind_ground_truth(csv_path, protocol_id, ground_truth_dir)
        append_row(csv_path, row)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    return row
