"""Command line: one small module per command group, each calling the same library functions the bundle does.

Heavy imports (MONAI, torch) happen inside each command so ``pipeline --help`` stays instant. Bad input
ends with one line ``error: <file>: <problem>`` and exit code 2. ``--quiet`` everywhere: warnings and
errors only, and the final summary line. The flag grammar is in :mod:`pipeline.cli.grammar`.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli.data import add_data_commands
from pipeline.cli.grammar import canonical_arguments
from pipeline.cli.leaderboard import add_benchmark_command, add_leaderboard_commands
from pipeline.cli.workflows import add_workflow_commands, run_torchrun
from pipeline.errors import InputError, find_input_error

__all__ = ["build_parser", "canonical_arguments", "main", "run_torchrun"]


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end like every other bad input: one ``error:`` line naming the command, exit code 2
    (argparse's default prints the whole usage block first). Subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="pipeline", allow_abbrev=False,
        description="Unsupervised brain-tumour detection with diffusion models (MONAI). "
                    "Each command calls the same library functions as the bundle configs.")
    from pipeline import __version__
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_data_commands(sub)
    add_workflow_commands(sub)
    add_benchmark_command(sub)
    add_leaderboard_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    nul = next((i for i, arg in enumerate(argv) if "\x00" in str(arg)), None)
    if nul is not None:  # no path or setting can hold one; the OS would refuse it deep inside a command
        print(f"error: command line: argument {nul + 1} ({str(argv[nul])[:40]!r}) contains a NUL character", file=sys.stderr)
        return 2
    try:
        argv = canonical_arguments(parser, argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        args, extra = parser.parse_known_args(argv)
        if getattr(args, "bundle", False):
            args.settings = extra
        elif extra:
            parser.error(f"unrecognised arguments: {' '.join(extra)}")
    except SystemExit as stop:  # --help, --version (0) or a usage error (2): a return code for callers of main()
        return stop.code if isinstance(stop.code, int) else 2
    try:
        args.func(args)
    except Exception as err:  # noqa: BLE001 - bad input -> one line; anything else re-raised
        found = find_input_error(err)
        if found is None and isinstance(err, OSError) and err.filename is not None:
            found = f"{err.filename}: {err.strerror or err}"  # a path the OS refuses: a folder where a file goes, ...
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
