"""Running a typer command the house way: a user's mistake is one ``error:`` line and exit code 2.

``ipfacediff`` (cli.py) and the command groups that plug into it (``ipfacediff.commands`` entry
points, run on their own as ``python -m PLUGIN``) share this runner, so a plug-in never imports
the CLI to get its errors worded the same way.
"""

from __future__ import annotations

import os
import sys

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
    """Library chatter (weight-loading bars, torchvision notices) would bury our progress bars."""
    import warnings

    # mediapipe 0.10.14 calls a protobuf API that protobuf 4 deprecates, once per graph.
    warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


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
