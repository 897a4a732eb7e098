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


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse's float takes 'inf', 'nan' and '1e999')."""
    value = float(text)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def share(text: str) -> float:
    """A number in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
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
    from pipeline.bundle import list_setting_ids, setting_defaults

    if len(tokens) % 2 or not all(t.startswith("--") for t in tokens[::2]):
        raise InputError("command line", f"bundle settings must come as '--key value' pairs, got {' '.join(tokens)}")
    lists, defaults = list_setting_ids(), setting_defaults()
    out = {}
    for key, text in zip(tokens[::2], tokens[1::2]):
        if key[2:] in lists and "," in text and not text.lstrip().startswith(("[", "{")):
            out[key[2:]] = [yaml_value(item.strip(), "command line", key) for item in text.split(",")]
        else:
            out[key[2:]] = yaml_value(text, "command line", key)
        check_setting_type(key, out[key[2:]], defaults.get(key[2:]))
    return out


NUMBER_WORDS = {"score_batch_size": ("auto",)}
"""Words a numeric setting also takes (``score_batch_size: auto``: the largest batch under a memory budget)."""


def _is_number(value) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_setting_type(flag: str, value, default) -> None:
    """A setting whose default is a number takes a finite number (or, as ``t_start`` does, a list of them), one whose
    default is true/false takes true/false, and a path setting (``*_dir``, ``*_path``, ``*_file``) takes text: said
    in one line here, before the value reaches a config expression or a constructor that would fail deep inside."""
    if value is None or (isinstance(value, str) and value.startswith(("$", "@", "%"))):
        return  # null, or an expression (refused or allowed by check_plain_settings)
    if value in NUMBER_WORDS.get(flag.lstrip("-").replace("-", "_"), ()):
        return
    numbers = value if isinstance(value, list) else [value]
    if _is_number(default) and not (numbers and all(_is_number(v) for v in numbers)):
        raise InputError(flag, f"expects a finite number (default {default}), got {value!r}")
    if isinstance(default, bool) and not isinstance(value, bool):
        raise InputError(flag, f"expects true or false (default {str(default).lower()}), got {value!r}")
    if flag.endswith(("_dir", "-dir", "_path", "-path", "_file", "-file")) and not isinstance(value, str):
        raise InputError(flag, f"expects a path, got {value!r}")


def parse_assignments(items: list[str] | None) -> dict:
    """``KEY=VALUE`` strings (values read as YAML) -> {dotted key: value}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError("--set", f"expects KEY=VALUE (e.g. dataset.dir=data/msd), got {item!r}")
        out[key] = yaml_value(value, "--set", key)
    return out
