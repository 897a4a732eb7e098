"""Submission kit: what a participant needs to make maps for a registered protocol, and nothing more.

Challenge platforms (Grand Challenge, the MSD and BraTS challenges, EvalAI) hand participants the
images they must predict on and a fixed output format; the organiser keeps the test labels. A kit
(``pipeline leaderboard kit --protocol-id ID --out DIR``) is that hand-out for one registered protocol:

* ``images/<subject>.nii[.gz]``: the validation and test images of the registered split, byte for byte;
* ``labels/<subject>.nii[.gz]``: the labels of the validation subjects only (to tune on); never a test label;
* ``grids/<subject>.nii.gz``: an all-zero float32 volume on the grid the subject's map must be on (shape, affine
  and header of the image's spatial part), a template for ``nib.Nifti1Image(map, ref.affine, ref.header)``
  (float32: nibabel casts a map to its header's data type, so an integer template would quantise it);
* ``kit.json``: the manifest (schema ``configs/schemas/kit_manifest.schema.json``): protocol id and hash,
  data and split fingerprints, the subject list per section (training subjects by id only: they are in
  the public dataset), each subject's grid as JSON;
* ``SUBMITTING.md``: the map format and one worked command, written from the protocol.

The kit is written to a temporary folder and moved into place whole, so a failed kit leaves nothing.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.atomic import atomic_dir, write_json
from pipeline.common import check_schema
from pipeline.errors import InputError
from pipeline.leaderboard.registry import bound_protocol, check_name, check_registered_data, hides_test_labels

KIT_FORMAT = 1
MANIFEST = "kit.json"
MAP_FORMAT = {"file": "<subject>.nii.gz", "dtype": "float32 (any float or integer type is read as float)",
              "grid": "the subject's grid: shape and affine of grids/<subject>.nii.gz",
              "values": "finite; higher = more anomalous; the brain mask is taken from the image, not the map",
              "sections": ["validation", "test"]}


def _nifti_suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"


def spatial_grid(image_path: Path) -> tuple[list[int], np.ndarray, nib.Nifti1Header]:
    """Shape (first three axes), affine and a 3D copy of the header of an image: the map's grid."""
    from pipeline.data.transforms import check_header

    img = check_header(image_path, "image")
    header = img.header.copy()
    shape = [int(n) for n in img.shape[:3]]
    header.set_data_shape(shape)
    return shape, np.asarray(img.affine, dtype=float), header


def _write_grid(path: Path, shape: list[int], affine: np.ndarray, header: nib.Nifti1Header) -> None:
    """float32, so that a map saved with this header keeps its values (nibabel casts data to the header's type)."""
    header = header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0, 0
    header["descrip"] = b"grid of the anomaly map"
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.float32), affine, header), str(path))


def registered_items(record: dict) -> dict[str, dict]:
    """``{subject: dataset item}`` of a registered protocol's dataset, refused if its content changed since."""
    from pipeline.data.dataset import load_subjects

    check_registered_data(record)
    return {item["subject"]: item for item in load_subjects(record["dataset_dir"]).data}


def kit_manifest(record: dict, subjects: dict[str, dict]) -> dict:
    """The manifest of a kit for ``record`` (a registered protocol); ``subjects`` per subject: section,
    image, label (or None) and grid."""
    return {"format": KIT_FORMAT,
            "protocol": {"id": record["id"], "hash": record["hash"]},
            "dataset": {"fingerprint": record["dataset_fingerprint"]},
            "split": {"fingerprint": record["split_fingerprint"],
                      **{section: list(record["split"][section]) for section in ("train", "validation", "test")}},
            "test_labels": "hidden (organiser's ground truth)" if hides_test_labels(record) else "withheld",
            "maps": MAP_FORMAT, "subjects": subjects,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_kit(csv_path, protocol_id: str, out_dir) -> dict:
    """Write the kit of the protocol registered under ``protocol_id`` on the leaderboard ``csv_path`` into
    ``out_dir`` (replaced whole); returns the manifest."""
    check_name(protocol_id, "--protocol-id", "protocol id")
    record = bound_protocol(csv_path, protocol_id)
    items = registered_items(record)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for folder in ("images", "labels", "grids"):
            (tmp / folder).mkdir()
        subjects = {}
        for section in ("validation", "test"):
            for subject in record["split"][section]:
                subjects[subject] = _kit_subject(tmp, items, subject, section)
        manifest = kit_manifest(record, subjects)
        check_schema(manifest, "kit_manifest", tmp / MANIFEST)
        write_json(tmp / MANIFEST, manifest)
        (tmp / "SUBMITTING.md").write_text(submitting_text(manifest), encoding="utf-8")
    return manifest


def _kit_subject(kit: Path, items: dict[str, dict], subject: str, section: str) -> dict:
    """Copy one subject's image (and, for validation, label) into the kit; its entry in the manifest."""
    item = items.get(subject)
    if item is None:
        raise InputError("dataset", f"registered {section} subject {subject!r} is not in the dataset")
    image = Path(item["image"])
    shape, affine, header = spatial_grid(image)
    entry = {"section": section, "image": f"images/{subject}{_nifti_suffix(image)}", "label": None,
             "grid": {"shape": shape, "affine": affine.round(6).tolist(), "file": f"grids/{subject}.nii.gz"}}
    shutil.copyfile(image, kit / entry["image"])
    if section == "validation" and item.get("label"):
        entry["label"] = f"labels/{subject}{_nifti_suffix(Path(item['label']))}"
        shutil.copyfile(item["label"], kit / entry["label"])
    _write_grid(kit / entry["grid"]["file"], shape, affine, header)
    return entry


def submitting_text(manifest: dict) -> str:
    """``SUBMITTING.md`` of a kit: the format and one worked command, from the manifest."""
    protocol, split = manifest["protocol"], manifest["split"]
    n_val, n_test = len(split["validation"]), len(split["test"])
    return f"""# Submitting to protocol `{protocol['id']}`

Protocol hash `{protocol['hash'][:12]}`, dataset `{manifest['dataset']['fingerprint']}`, split
`{split['fingerprint'][:12]}`. Test labels: {manifest['test_labels']}.

## What is in this kit
- `images/`: the {n_val} validation and {n_test} test images (as in the dataset; 4D, channels in the
  dataset's modality order).
- `labels/`: labels of the validation subjects only (BraTS convention, 0 background, 1-3 tumour), to tune on.
- `grids/`: one all-zero volume per subject on the grid its map must be on.
- `kit.json`: the subject list per section (`split`), and each subject's grid (shape and affine).
Train on the `train` subjects of the public dataset only ({len(split['train'])} listed in `kit.json`);
never on validation or test images.

## The format
One map per validation and test subject, `<subject>.nii.gz`, all in one folder: a 3D float volume
with exactly the shape and affine of `grids/<subject>.nii.gz` (copy its header:
`nib.Nifti1Image(map.astype("float32"), ref.affine, ref.header)`), finite values, higher = more
anomalous. Every subject must be present and no other file ending in `.nii` or `.nii.gz`. The
organiser masks the brain from the image, chooses the Dice threshold on your validation maps (the
validation-threshold Dice) and scores the test maps against labels you never see.

## Submitting
```bash
pipeline leaderboard submit-maps MY_MAPS/ --protocol-id {protocol['id']} --method my-method \\
    --supervision unsupervised --description "what the method is" --code-url https://example.org/code
```
`--supervision`: `unsupervised` (learnt from images only) or `weak slice labels`. A fault (a missing
subject, a map on another grid, NaN) is named in one line and nothing is submitted.
"""
