"""Running a typer command the house way: a user's mistake is one ``error:`` line and exit code 2.

``ipfacediff`` (cli.py) and the command groups that plug into it (``ipfacediff.commands`` entry
points, run on their own as ``python -m PLUGIN``) share this runner, so a plug-in never imports
the CLI to get its errors worded the same way.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

import click
import typer
from rich.console import Console
from typer._click import exceptions as typer_click_exceptions

from ipfacediff.errors import UserError

console = Console(stderr=True)
# typer (0.2x) parses with its own copy of click, whose errors are not click's classes.
CLICK_ERRORS = (click.ClickException, typer_click_exceptions.ClickException)
HELP_ERRORS = (click.exceptions.NoArgsIsHelpError, typer_click_exceptions.NoArgsIsHelpError)


def quiet_libraries() -> None:
    """Library chatter (weight-loading bars, torchvision notices) would bury our progress bars.

    diffusers and transformers are quietened as soon as something imports them, not imported here:
    importing them takes seconds, which a mistyped option or ``--help`` would wait for."""
    import warnings

    # mediapipe 0.10.14 calls a protobuf API that protobuf 4 deprecates, once per graph.
    warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers"):
        if name in sys.modules:
            _quieten(name)
        elif not any(isinstance(f, _QuietOnImport) and f.name == name for f in sys.meta_path):
            sys.meta_path.insert(0, _QuietOnImport(name))


def _quieten(name: str) -> None:
    logging = importlib.import_module(f"{name}.utils.logging")
    logging.set_verbosity_error()
    logging.disable_progress_bar()


class _QuietOnImport(importlib.abc.MetaPathFinder):
    """Finds package ``name`` as the other finders do, and quietens it once it has run its __init__
    (asked for its spec only, as an availability check does, it stays for the real import)."""

    def __init__(self, name: str) -> None:
        self.name, self.finding = name, False

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if fullname != self.name or self.finding:
            return None
        self.finding = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.finding = False
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            run(module)
            _quieten(fullname)

        spec.loader.exec_module = exec_module
        return spec


def silence_native_logging() -> None:
    """mediapipe's and TensorFlow Lite's C++ code log to file descriptor 2 from their own threads,
    up to six lines before an ``error:`` line and a dozen in a normal run, and no flag or variable
    stops all of it (absl writes "All log messages before absl::InitializeLog()" regardless). So
    descriptor 2 is pointed at /dev/null and Python's own stderr (our messages, progress bars,
    tracebacks of real bugs) keeps writing to a copy of the original."""
    import logging

    sys.stderr.flush()
    original = os.dup(2)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 2)
    os.close(quiet)
    sys.stderr = os.fdopen(
        original, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8", errors="backslashreplace"
    )
    logging.getLogger("absl").setLevel(logging.ERROR)


def usage_line(error: click.ClickException) -> str:
    """click's (and typer's) message of a usage error as one line, naming the command and where
    its options are listed: "edit: No such option: --x (see `ipfacediff edit --help`)"."""
    message = " ".join(error.format_message().split())
    context = getattr(error, "ctx", None)
    if context is None:
        return message
    names, level = [], context
    while level.parent is not None:  # the subcommands' names, without the program's
        names.append(level.info_name)
        level = level.parent
    command = " ".join(reversed(names))
    return f"{command + ': ' if command else ''}{message} (see `{context.command_path} --help`)"


def run_command(command: typer.Typer, argv: list[str] | None = None, *, prog_name: str | None = None) -> None:
    """Run ``command`` (argv, else the process's arguments) under ``prog_name``, turning user
    mistakes into one line and exit code 2."""
    quiet_libraries()
    # Only the installed command owns the process's stderr; a caller of main(argv) keeps its own.
    if argv is None and "--verbose" not in sys.argv[1:] and os.environ.get("IPFACEDIFF_VERBOSE", "0") == "0":
        silence_native_logging()
    try:
        # Without standalone mode click returns an ``Exit``'s code instead of exiting with it.
        code = command(args=argv, prog_name=prog_name, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as error:
        console.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except (click.exceptions.Abort, typer.Abort):
        console.print("aborted", markup=False)
        sys.exit(130)
    except HELP_ERRORS as error:  # a group named without its command: its help
        error.show()
        sys.exit(error.exit_code)
    except CLICK_ERRORS as error:  # unknown option, bad value, missing option: one line like ours
        console.print(f"error: {usage_line(error)}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except (click.exceptions.Exit, typer.Exit) as done:
        sys.exit(done.exit_code)
