"""Garbage to every flag of every subcommand (issue 26): exit code 2 and one ``error:`` line, never a traceback.

Every leaf command of the parser (``leaderboard kit`` and the rest included) and, for the bundle commands, every
bundle setting their ``--help`` lists, is run in an empty folder with its other required arguments filled by
names of files that do not exist. The values are garbage for any type: not a number, not YAML, not a path that
exists. Flags whose value is where new output goes (``synth --out``) take any name and are left out: a name is
a valid answer there.
"""

from __future__ import annotations

import argparse
import logging
import re

import pytest

from pipeline.bundle import settings_help
from pipeline.cli import build_parser, main

GARBAGE = ("garbage[", "1e999")
WORKFLOWS = {"train": "train", "score": "inference", "evaluate": "evaluate"}
OUTPUT_NAMES = {("synth", "--out"), ("synth", "--hidden-test-labels")}
"""Flags that name where new output goes: any name is valid there."""


def _leaves(parser, path=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaves(child, (*path, name))


def _valued_flags(parser) -> list[str]:
    return [a.option_strings[-1] for a in parser._actions if a.option_strings and a.nargs != 0
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def _cases() -> list[list[str]]:
    cases = []
    for path, parser in _leaves(build_parser()):
        positionals = [a for a in parser._actions if not a.option_strings]
        required = [a for a in parser._actions if a.option_strings and a.required]
        flags = _valued_flags(parser)
        if path[0] in WORKFLOWS:
            flags += re.findall(r"^  (--[a-z0-9-]+)", settings_help(WORKFLOWS[path[0]]), re.M)
        for i, flag in enumerate(flags):
            if (path[0], flag) in OUTPUT_NAMES:
                continue
            argv = [*path, *[f"no-such-input-{k}" for k in range(len(positionals))]]
            for k, action in enumerate(required):
                if action.option_strings[-1] != flag:
                    argv += [action.option_strings[-1], action.choices[0] if action.choices else f"no-such-{k}"]
            cases.append([*argv, flag, GARBAGE[i % len(GARBAGE)]])
    return cases


CASES = _cases()


@pytest.fixture(autouse=True)
def no_stale_log_streams():
    """In one process, a bundle run leaves log handlers bound to the stream pytest captured for that test (closed
    by the next one); the real command line starts a fresh process each time."""
    yield
    for logger in [logging.getLogger(), *map(logging.getLogger, list(logging.root.manager.loggerDict))]:
        for handler in list(getattr(logger, "handlers", [])):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)


def test_the_corpus_reaches_every_command():
    commands = {tuple(c[:2]) if c[0] == "leaderboard" else (c[0],) for c in CASES}
    assert {("leaderboard", "kit"), ("leaderboard", "submit-maps"), ("leaderboard", "verify"), ("train",), ("score",),
            ("evaluate",), ("synth",), ("prepare",), ("benchmark",)} <= commands
    assert len(CASES) > 150


@pytest.mark.parametrize("argv", CASES, ids=[" ".join(c[:1] + c[-2:-1]) for c in CASES])
def test_garbage_is_one_line_and_exit_2(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2, argv
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, lines[:4])
