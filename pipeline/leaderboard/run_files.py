"""The files of a run folder that the leaderboard reads or publishes: regular files of the run, never links.

Why: a run folder is the participant's. A symbolic link (or a hard link) named ``evaluation/report.png``
or ``config.json`` would make the site copy or show any file the organiser's machine can read (a
hidden test label, the generator's secret seed). So :data:`SITE_FILES` must be regular files with a
single name, in a folder that lies inside the run folder: :func:`check_run_files` refuses anything
else at ``submit``, and the site reads them only through :func:`read_run_file`, which checks again
and opens with ``O_NOFOLLOW`` (a folder tampered with after its submission is read no further).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from pipeline.errors import InputError

SITE_FILES = ("run.json", "config.json", "environment.json", "evaluation/metrics.json", "evaluation/report.png",
              "evaluation/per_subject.csv", "scores/index.json")
"""What the site reads, copies or links from a run folder (the maps are checked by the evaluation)."""
MAX_BYTES = 64 * 1024 * 1024


def file_problem(run_dir: Path, name: str) -> str | None:
    """Why ``run_dir / name`` may not be read or published; None for a regular file of the run, or none at all."""
    path = Path(run_dir) / name
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not path.parent.resolve().is_relative_to(Path(run_dir).resolve()):
        return "lies in a folder outside the run folder"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_nlink > 1:
        return f"is a hard link ({info.st_nlink} names for one file)"
    return None


def check_run_files(run_dir: Path) -> None:
    """Refuse a submission whose site files are links or leave the run folder (one line, naming the file)."""
    for name in SITE_FILES:
        problem = file_problem(run_dir, name)
        if problem:
            raise InputError(Path(run_dir) / name, f"{problem}; a run folder may hold only regular files of its own "
                                                   "(no symbolic or hard links)")


def read_run_file(run_dir: Path, name: str) -> bytes | None:
    """The bytes of ``run_dir / name`` if it is a regular file of the run with one name, else None
    (missing, a link, too large); the open file itself is checked, so a swap after the check is caught."""
    if file_problem(run_dir, name) is not None:
        return None
    try:
        fd = os.open(Path(run_dir) / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1 or info.st_size > MAX_BYTES:
            return None
        return f.read(MAX_BYTES)


def read_run_json(run_dir: Path | None, name: str) -> dict:
    """A JSON object from the run folder (via :func:`read_run_file`); empty when absent, refused or malformed."""
    data = read_run_file(run_dir, name) if run_dir is not None else None
    try:
        value = json.loads(data.decode("utf-8")) if data is not None else None
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def refused_files(run_dir: Path | None) -> list[str]:
    """The site files of a run that exist but are not its own regular files (named on its page)."""
    return [] if run_dir is None else [name for name in SITE_FILES if file_problem(run_dir, name)]
