"""Argument helpers every command group shares: one definition of each common flag and value reader."""

from __future__ import annotations

import argparse

from pipeline.errors import InputError

DEFAULT_LEADERBOARD = "results/leaderboard.csv"


def add_command(sub, name: str, func, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand that runs ``func(args)`` and takes ``--quiet`` (every command does)."""
    parser = sub.add_parser(name, help=help, **kwargs)
    quiet_flag(parser)
    parser.set_defaults(func=func)
    return parser


def quiet_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="warnings and errors only: no progress bars or logs, just the final summary")


def trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-expressions", action="store_true",
                        help="allow settings that MONAI's config parser runs as code ('$...', '@...', '%%...', "
                             "_target_); only for protocol files and values you trust")


def leaderboard_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--leaderboard", default=DEFAULT_LEADERBOARD, help=f"CSV (default {DEFAULT_LEADERBOARD})")


def set_option(parser: argparse.ArgumentParser, example: str = "dataset.dir=data/msd") -> None:
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help=f"override a protocol value by dotted key, e.g. --set {example}")


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def yaml_value(text: str, source: str, key: str):
    """A command-line value read as YAML; a malformed one is one line, not a parser traceback."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InputError(source, f"{key}: value {text!r} is not valid YAML ({str(err).splitlines()[0]})") from None


def parse_overrides(tokens: list[str]) -> dict:
    """``--key value`` pairs (values read as YAML: numbers, lists, booleans) -> config overrides. For a setting
    whose default is a list, ``a,b,c`` means ``[a, b, c]`` (``--modalities FLAIR,T2w``, ``--unet-channels
    16,32,64``), the same as the YAML list ``[a,b,c]``."""
    from pipeline.bundle import list_setting_ids

    if len(tokens) % 2 or not all(t.startswith("--") for t in tokens[::2]):
        raise InputError("command line", f"bundle settings must come as '--key value' pairs, got {' '.join(tokens)}")
    lists = list_setting_ids()
    out = {}
    for key, text in zip(tokens[::2], tokens[1::2]):
        if key[2:] in lists and "," in text and not text.lstrip().startswith(("[", "{")):
            out[key[2:]] = [yaml_value(item.strip(), "command line", key) for item in text.split(",")]
        else:
            out[key[2:]] = yaml_value(text, "command line", key)
    return out


def parse_assignments(items: list[str] | None) -> dict:
    """``KEY=VALUE`` strings (values read as YAML) -> {dotted key: value}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError("--set", f"expects KEY=VALUE (e.g. dataset.dir=data/msd), got {item!r}")
        out[key] = yaml_value(value, "--set", key)
    return out
