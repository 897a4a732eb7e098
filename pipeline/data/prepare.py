"""Data stage entry point: split a dataset by patient and build the slice cache training reads.

One call that the CLI (``pipeline prepare``), training and the bundle configs share; it only wires
:mod:`pipeline.data.dataset` (loading), :mod:`pipeline.data.split` and
:mod:`pipeline.data.slice_cache` together, under a file lock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from pipeline.atomic import write_json
from pipeline.data.dataset import PreprocessConfig, load_subjects, split_subjects, tumour_subjects
from pipeline.data.slice_cache import build_labelled_slice_cache, build_slice_cache
from pipeline.data.split import RANDOM, read_or_make_split


@dataclass
class PreparedData:
    """What ``prepare_data`` hands to training: the split, the cache folder and the subjects' items."""

    split: dict
    cache_dir: Path
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    items: list[dict] = field(default_factory=list)

    def datalist(self, section: str) -> list[dict]:
        """The items (``subject``, ``image``, ``label``) of one split section: the data a section's slice
        dataset was cut from (model-zoo's ``train#dataset#data``)."""
        names = set(self.split[section])
        return [item for item in self.items if item["subject"] in names]


def prepare_data(
    dataset_dir: str | os.PathLike,
    split_file: str | os.PathLike,
    cache_root: str | os.PathLike,
    preprocess: PreprocessConfig = PreprocessConfig(),
    split_seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    labelled: bool = False,
    split_method: str = RANDOM,
) -> PreparedData:
    """Split (reused if the file exists) and build (or reuse) the healthy-slice cache (``labelled``:
    the labelled-slice cache of :func:`pipeline.data.slice_cache.build_labelled_slice_cache` instead).

    A file lock makes concurrent callers (the ranks of a multi-process run, parallel benchmark
    entries) build once and share the result. A failure leaves nothing behind: a new split file is
    written only after the cache is complete, and the lock file and folders this call created are
    removed (the lock file while still held, folders only when empty, so nothing that existed before
    or that another preparer wrote is touched). ``split_method`` makes a new split (a split file found is
    reused as it is): ``random`` (the default here, what published protocols are bound to) or ``stratified``.
    """
    items = load_subjects(dataset_dir).data
    subjects, test = split_subjects(items)
    cache_root = Path(cache_root)
    created = _make_folders(cache_root)
    lock_path = cache_root / ".prepare.lock"
    made_lock = not lock_path.exists()
    try:
        with FileLock(str(lock_path)):
            try:
                split, made = read_or_make_split(split_file, subjects, seed=split_seed, test=test, method=split_method,
                                                 tumour=lambda: tumour_subjects(items))
                build = build_labelled_slice_cache if labelled else build_slice_cache
                cache_dir = build(dataset_dir, cache_root, split, preprocess, workers, progress)
                if made:
                    write_json(split_file, split)
            except BaseException:
                if made_lock:
                    lock_path.unlink(missing_ok=True)
                raise
    except BaseException:
        _remove_empty_folders(created)
        raise
    return PreparedData(split=split, cache_dir=cache_dir, preprocess=preprocess, items=items)


def _make_folders(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty_folders(created: list[Path]) -> None:
    """Remove folders we created, innermost first, stopping at the first one that is not empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return
