"""Content hashes of data files, cached so that re-checking a large dataset is quick.

A leaderboard must notice a label edited in place even when its size stays the same, so the
dataset fingerprint hashes file *contents* (SHA-256, streamed in 1 MiB blocks). Hashing the 484
real BraTS subjects (about 7 GB) takes about a minute; the cache makes every later check a stat
per file. A cache entry is keyed by the resolved path and is valid only while size, mtime, ctime
and inode all match: ``os.utime`` can put an old mtime back, but not the ctime, which the kernel
sets on every change.

The cache lives in ``$PIPELINE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/brain-diffusion-anomaly``,
else ``~/.cache/brain-diffusion-anomaly``) as ``sha256.json``, written atomically under a file lock.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from filelock import FileLock

from pipeline.atomic import write_json
from pipeline.common import read_optional_json

BLOCK = 1 << 20
CACHE_NAME = "sha256.json"


def cache_dir() -> Path:
    explicit = os.environ.get("PIPELINE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "brain-diffusion-anomaly"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, streamed (no whole-file read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def sha256_files(paths) -> dict[str, str]:
    """{resolved path: SHA-256} for existing files; unchanged files come from the cache."""
    paths = [Path(p).resolve() for p in paths]
    folder = cache_dir()
    cache = read_optional_json(folder / CACHE_NAME) or {}  # a missing or damaged cache only costs a re-hash
    out, fresh = {}, {}
    for path in paths:
        if not path.is_file():
            continue
        stamp, entry = _stamp(path), cache.get(str(path))
        if isinstance(entry, dict) and entry.get("stamp") == stamp:
            out[str(path)] = entry["sha256"]
        else:
            out[str(path)] = sha256_file(path)
            fresh[str(path)] = {"stamp": stamp, "sha256": out[str(path)]}
    if fresh:
        _store(folder, fresh)
    return out


def _store(folder: Path, fresh: dict) -> None:
    """Merge new entries into the cache; a read-only cache folder is not an error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / (CACHE_NAME + ".lock")), timeout=60):
            cache = read_optional_json(folder / CACHE_NAME) or {}
            cache.update(fresh)
            write_json(folder / CACHE_NAME, cache, indent=None)
    except OSError:
        pass
