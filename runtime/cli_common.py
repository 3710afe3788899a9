"""What both command-line tools share: one-line errors and warnings, --debug tracebacks, JSON
output, quiet exits when the reader of a pipe goes away."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from runtime.errors import WeightpackError

# What a shell reports for a process ended by SIGPIPE (`seq 1 100000 | head -1`).
BROKEN_PIPE_STATUS = 128 + getattr(signal, "SIGPIPE", 13)


class Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line (`prog: error: ...`, exit status 2), as every
    other bad input is reported; `--help` says the rest."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_command(sub: argparse._SubParsersAction, name: str, *, help: str, description: str,
                examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand whose --help has a description and runnable examples (kept verbatim)."""
    width = min(shutil.get_terminal_size((100, 24)).columns, 100) - 2
    return sub.add_parser(name, help=help, description=textwrap.fill(description, width),
                          epilog="examples:\n" + "".join(f"  {e}\n" for e in examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def existing_file(path: os.PathLike | str) -> os.PathLike | str:
    """Report a missing input file at once, before the command imports torch: its loader
    would report the same, seconds later."""
    if not os.path.lexists(path):
        raise WeightpackError(f"{path}: no such file")
    return path


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of tables")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors")


def main(parser: argparse.ArgumentParser, argv: list[str] | None, prog: str) -> int:
    """Parse and run a subcommand, for both CLIs' `main`."""
    try:
        try:
            args = parser.parse_args(argv)
            return run(args.func, args, prog)
        finally:
            sys.stdout.flush()  # now, not at exit, so that a closed pipe is caught below
    except BrokenPipeError:
        # The reader (`head`, a closed pager) has all it wants: not an error of ours. Point
        # stdout at /dev/null so the interpreter's last flush stays quiet too (Python's
        # documented recipe, "Note on SIGPIPE" in the signal module).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_STATUS


def run(command: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str) -> int:
    """Run a subcommand; user errors become one line on stderr and exit status 2."""
    debug = getattr(args, "debug", False)
    try:
        with _one_line_warnings(prog, debug):
            return command(args)
    except WeightpackError as exc:
        if debug:
            raise
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _one_line_warnings(prog: str, debug: bool) -> Iterator[None]:
    """Warnings as `prog: warning: message` lines, without Python's file:line and source."""
    with warnings.catch_warnings():
        if not debug:
            def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
                print(f"{prog}: warning: {one_line(message)}", file=sys.stderr)

            warnings.showwarning = show  # type: ignore[assignment]
        yield


def one_line(exc: BaseException | str) -> str:
    """The error's own message, even when a DataLoader worker wrapped it in a traceback."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    last = lines[-1]
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def progress_enabled(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()
