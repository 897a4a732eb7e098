"""One flag grammar for every subcommand.

``--dataset-dir`` is the spelling help shows, ``--dataset_dir`` the same flag (bundle settings are
config ids, so ``--t-start`` sets ``t_start``); ``--key=value`` works too. A flag that is neither an
option of the subcommand nor, for train/score/evaluate, a setting of the bundle is an error naming
the closest known flag.
"""

from __future__ import annotations

import argparse
import difflib

from pipeline.errors import InputError


def _subcommands(parser: argparse.ArgumentParser) -> dict | None:
    """The subcommand parsers by name, or None for a parser that takes no subcommand."""
    found = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return found[0] if found else None


def _leaf(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.ArgumentParser, int]:
    """(the innermost subcommand's parser, where its arguments start in ``argv``)."""
    start = 0
    while (choices := _subcommands(parser)) is not None and start < len(argv) and argv[start] in choices:
        parser, start = choices[argv[start]], start + 1
    return parser, start


def _setting_key(name: str) -> str:
    """A bundle setting's config id: underscores, ``::`` as ``#`` (``--network-def#channels``)."""
    return name.replace("-", "_").replace("::", "#")


def canonical_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with every flag in its one spelling: options dashed, bundle settings as config ids.

    Raises :class:`InputError` naming the first flag the subcommand does not know, with the closest one.
    """
    leaf, start = _leaf(parser, argv)
    if _subcommands(leaf) is not None:
        return argv  # no subcommand named (or --help, --version): argparse says what is missing
    out, tokens = argv[:start], iter(argv[start:])
    for token in tokens:
        if token == "--":
            return [*out, token, *tokens]
        if not token.startswith("--"):
            out.append(token)
            continue
        name, eq, value = token[2:].partition("=")
        option = "--" + name.replace("_", "-")
        if option in leaf._option_string_actions:
            out.append(option + eq + value)
        elif leaf.get_default("bundle") and _setting_key(name).split("#")[0] in _known_settings():
            value = value if eq else next(tokens, None)
            out += ["--" + _setting_key(name)] + ([] if value is None else [value])
        else:
            raise InputError("command line", _unknown_flag(token.partition("=")[0], leaf))
    return out


def _known_settings() -> frozenset[str]:
    """Config ids of the bundle, and the workflow's own arguments (refused later, with their reason)."""
    from pipeline.bundle import WORKFLOW_ARGUMENTS, setting_ids

    return setting_ids() | WORKFLOW_ARGUMENTS


def _unknown_flag(flag: str, leaf: argparse.ArgumentParser) -> str:
    """Names ``flag`` and the closest flag ``leaf`` knows (its options, and bundle settings)."""
    from pipeline.bundle import WORKFLOW_ARGUMENTS

    known = [s for s in leaf._option_string_actions if s.startswith("--")]
    what = "option"
    if leaf.get_default("bundle"):
        known += ["--" + s.replace("_", "-") for s in sorted(_known_settings() - WORKFLOW_ARGUMENTS)]
        what = "option or bundle setting"
    close = difflib.get_close_matches("--" + flag[2:].replace("_", "-"), known, n=1)
    hint = f"did you mean {close[0]}?" if close else f"see '{leaf.prog} --help'"
    return f"{flag}: unknown {what} of '{leaf.prog}'; {hint}"
