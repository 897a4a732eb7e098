"""model-zoo's ``large_files.yml``: where a bundle's weights come from, and the sha256 they must have.

model-zoo keeps weights out of git: ``ci/verify_bundle.py`` (and ``python -m monai.bundle
download_large_files``) fetch every listed file before checking a bundle, and a file already present is
kept only if its hash matches. This project publishes no weights, so no URL is invented: the file is
written from the weights training actually saved (their real sha256) with the URL the user gives
(``weights_url``), empty until the weights are uploaded somewhere. With an empty URL a copy holding the
weights verifies offline (hash checked, nothing downloaded) and a copy without them fails to download,
which is the truth: there is nothing to download yet.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from pipeline.atomic import atomic_path
from pipeline.errors import InputError
from pipeline.fingerprint import sha256_file

LARGE_FILES = "large_files.yml"
HEADER = ("# model-zoo's large files (ci/verify_bundle.py downloads each one before checking the bundle).\n"
          "# Written by training from the weights it saved (pipeline/model/large_files.py): hash_val is their\n"
          "# sha256; url stays empty until you publish them, then run\n"
          "#   python -m pipeline.bundle large-files --url <where model.pt can be downloaded>\n")


def read_large_files(bundle_root: str | os.PathLike) -> list[dict]:
    """The ``large_files`` list of ``<bundle_root>/large_files.yml`` (empty when there is no file)."""
    path = Path(bundle_root) / LARGE_FILES
    if not path.is_file():
        return []
    try:
        listed = (yaml.safe_load(path.read_text()) or {}).get("large_files", [])
    except (yaml.YAMLError, AttributeError) as err:
        raise InputError(path, f"not a large_files mapping ({str(err).splitlines()[0]})") from None
    if not isinstance(listed, list) or not all(isinstance(e, dict) and "path" in e for e in listed):
        raise InputError(path, "'large_files' must be a list of entries with a 'path'")
    return listed


def large_file_entry(bundle_root: str | os.PathLike, path: str | os.PathLike, url: str = "") -> dict:
    """The entry of one file of the bundle: its path inside the bundle, ``url`` and its sha256."""
    relative = Path(path).resolve().relative_to(Path(bundle_root).resolve()).as_posix()
    return {"path": relative, "url": str(url or ""), "hash_val": sha256_file(path), "hash_type": "sha256"}


def write_large_files(bundle_root: str | os.PathLike, path: str | os.PathLike, url: str = "") -> Path | None:
    """Refresh the entry of ``path`` in ``<bundle_root>/large_files.yml``, other entries kept. None (nothing
    written) when ``path`` lies outside the bundle folder: those weights are no file of the bundle."""
    root = Path(bundle_root).resolve()
    if not Path(path).resolve().is_relative_to(root):
        return None
    entry = large_file_entry(root, path, url)
    listed = [e for e in read_large_files(root) if e["path"] != entry["path"]] + [entry]
    out = root / LARGE_FILES
    with atomic_path(out) as tmp:
        tmp.write_text(HEADER + yaml.safe_dump({"large_files": listed}, sort_keys=False))
    return out
