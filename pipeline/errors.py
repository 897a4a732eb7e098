"""One exception type for bad user input, so every stage reports it the same way.

The CLI turns a :class:`InputError` into a single line ``error: <file>: <problem>`` and exit code 2.
"""

from __future__ import annotations

import os


class InputError(Exception):
    """Bad input named by the file (or setting) it came from and what is wrong with it."""

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = None if source is None else str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}" if self.source else problem)


def find_input_error(err: BaseException | None) -> InputError | None:
    """The InputError behind an exception, however deep MONAI's transforms or configs wrapped it."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, InputError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
