"""Writing small output files whole: a reader (or a killed run) never sees half a file; reading the
files a user names (:func:`reading`): any failure is one UserError line naming the file."""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (str as UTF-8) to a temporary file beside ``path`` and rename it over ``path``.

    The folder must exist. The file gets the usual permissions (umask), not a temporary file's
    0600. On any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    started = time.time()
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    remove_stale_temporaries(path, rf"\.{re.escape(path.name)}\.[0-9a-f]{{8}}\.tmp", before=started)
    return path


def remove_stale_temporaries(path: str | os.PathLike, pattern: str, *, before: float) -> None:
    """Remove what killed earlier writes of ``path`` left beside it: the files whose whole name
    matches ``pattern`` (the writer's own temporary names for ``path``, nothing else) and that were
    last written before ``before`` (a ``time.time()``), so that a write of the same file still
    going on in another process keeps its temporary file."""
    path = Path(path)
    name = re.compile(pattern)
    prefix = glob.escape(f".{path.name}.")
    for candidate in path.parent.glob(f"{prefix}*"):
        try:
            if name.fullmatch(candidate.name) and candidate.is_file() and candidate.stat().st_mtime < before:
                candidate.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: it was only tidying
            continue


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as indented JSON, written atomically; objects JSON cannot hold are written as str().

    Strict JSON: a NaN or infinity is a bug upstream (numbers are checked where they enter), and
    other readers reject the ``NaN`` Python would write, so it raises instead."""
    return write_atomic(path, json.dumps(data, indent=2, default=str, allow_nan=False))


def check_writable(path: str | os.PathLike, *, what: str = "output") -> Path:
    """Fail in a second, with one line, if ``path`` cannot be written, rather than after the work.

    A file is created and removed beside it: permission bits alone do not tell (a read-only mount,
    /proc, a full quota), and a folder or device at the path itself is refused."""
    from ipfacediff.errors import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise UserError(f"{what} {path} is not a regular file; choose another path")
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist; create it first")
    problem = _cannot_create_in(folder, path.name)
    if problem:
        raise UserError(f"{what} {path} cannot be written ({problem}); choose another path")
    return path


def check_writable_folder(
    folder: str | os.PathLike, what: str = "output folder", fix: str = "choose another path", *, create: bool = False
) -> Path:
    """``folder`` (expanded) once a file could be created in it, or in the nearest folder above it
    that exists (the work makes the missing ones; ``create``: made now, with its parents); else one
    UserError line ``"{what} {folder} cannot be ... ; {fix}"`` -- before any work, rather than a
    traceback at the first write after it. As in :func:`check_writable`, a file is really created
    and removed: permission bits say nothing about a read-only mount, and nothing at all for root."""
    from ipfacediff.errors import UserError

    folder = Path(folder).expanduser()
    existing = folder
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        blocker = "it" if existing == folder else existing
        raise UserError(f"{what} {folder} cannot be made ({blocker} is a file, not a folder); {fix}")
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"{what} {folder} cannot be made ({error.strerror or error}); {fix}") from None
        existing = folder
    problem = _cannot_create_in(existing, "folder")
    if problem:
        raise UserError(f"{what} {folder} cannot be written ({problem}); {fix}")
    return folder


def _cannot_create_in(folder: Path, name: str) -> str | None:
    """Why no file can be created in ``folder`` (found by creating one and removing it), or None."""
    probe = folder / f".{name}.{secrets.token_hex(4)}.probe"
    try:
        with open(probe, "xb"):
            pass
    except OSError as error:
        return error.strerror or str(error)
    probe.unlink(missing_ok=True)
    return None


# ---------------------------------------------------------------------------------------------
# Reading the files a user names (weights, configs, adapters): every failure is one line.


class FileProblem(Exception):
    """What is wrong with the file being read, as the rest of a sentence that starts with its name
    ("is truncated (...)"). Raise it inside :func:`reading`, which names the file and says what to
    do; ``path`` and ``what`` name another file than the one being read (a part of a folder)."""

    def __init__(self, problem: str, path: str | os.PathLike | None = None, what: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.path = None if path is None else Path(path)
        self.what = what


_SPECIAL_FILES = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def _file_problem(path: Path, folder: bool) -> str | None:
    """Why ``path`` cannot be read as a regular file (a folder with ``folder``), or None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as error:
        return f"cannot be read ({error.strerror or type(error).__name__})"
    kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")
    if folder and stat.S_ISDIR(mode) or not folder and stat.S_ISREG(mode):
        return None if os.access(path, os.R_OK | (os.X_OK if folder else 0)) else "is not readable (permission denied)"
    if folder:
        return "is a file, not a folder" if stat.S_ISREG(mode) else f"is not a folder (it is {kind})"
    return "is a folder, not a file" if stat.S_ISDIR(mode) else f"is not a regular file (it is {kind})"


def check_file(path: str | os.PathLike, what: str, fix: str, *, folder: bool = False) -> Path:
    """``path`` (expanded) when it is a regular file this process can read (a folder with
    ``folder``); else one UserError line: ``"{what} {path} does not exist; {fix}"``, "is not a
    regular file (it is a character device)", "is not readable (permission denied)", ..."""
    from ipfacediff.errors import UserError

    path = Path(path).expanduser()
    problem = _file_problem(path, folder)
    if problem:
        raise UserError(f"{what} {path} {problem}; {fix}")
    return path


def short_detail(error: BaseException, limit: int = 160) -> str:
    """A library error in a few words: its type and the first line that says something, cut at a
    space (never inside a path) when it is long."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = next((line for line in lines if not line.endswith(":")), lines[0] if lines else "")
    if len(text) > limit:
        cut = text.rfind(" ", 0, limit)
        text = (text[:cut] if cut > 0 else "") + " …"
    return f"{type(error).__name__}: {text}" if text.strip(" …") else type(error).__name__


@contextmanager
def reading(path: str | os.PathLike, what: str, fix: str, *, folder: bool = False) -> Iterator[Path]:
    """Read the file (or ``folder``) a user named inside this block, behind one error line.

    ``path`` must be a regular file this process can read (a folder with ``folder``). In the block,
    a :class:`FileProblem` becomes ``"{what} {path} {problem}; {fix}"``, a UserError passes as it
    is, and any other failure (OSError, a parser's or a library's error) becomes the same line with
    the error in a few words. The path is always written whole.
    """
    from ipfacediff.errors import UserError

    path = check_file(path, what, fix, folder=folder)
    try:
        yield path
    except UserError:
        raise
    except FileProblem as error:
        raise UserError(f"{error.what or what} {error.path or path} {error.problem}; {fix}") from None
    except PermissionError:
        raise UserError(f"{what} {path} is not readable (permission denied); {fix}") from None
    except MemoryError:
        raise
    except Exception as error:  # parsers and loaders raise many types; all mean "this file is unusable"
        detail = error.strerror if isinstance(error, OSError) and error.strerror else short_detail(error)
        raise UserError(f"{what} {path} cannot be read ({detail}); {fix}") from None


def read_json(path: str | os.PathLike, what: str, fix: str) -> Any:
    """The JSON in ``path``, or one UserError line (missing, not a regular file, not JSON)."""
    with reading(path, what, fix) as file:
        data = file.read_bytes()
        try:
            return json.loads(data)
        except UnicodeDecodeError:
            raise FileProblem("is not JSON (it is not UTF-8 text)") from None
        except json.JSONDecodeError as error:
            problem = (
                "is empty, not JSON"
                if not data.strip()
                else f"is not JSON (line {error.lineno}, column {error.colno}: {error.msg})"
            )
            raise FileProblem(problem) from None


SAFETENSORS_MAX_HEADER = 100_000_000  # what the safetensors library accepts


def safetensors_header(path: str | os.PathLike, what: str, fix: str) -> dict[str, dict]:
    """The tensor table of a ``.safetensors`` file (name -> dtype, shape, data_offsets), read from
    its header alone (milliseconds for any size), after checking that the file is a safetensors
    file and holds every byte its header describes; else one UserError line."""
    with reading(path, what, fix) as file:
        size = file.stat().st_size
        with open(file, "rb") as stream:
            head = stream.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if size == 0:
                raise FileProblem("is empty (0 bytes), not a safetensors file")
            if length < 2 or length > SAFETENSORS_MAX_HEADER:
                raise FileProblem("is not a safetensors file (it does not start with a safetensors header)")
            if 8 + length > size:
                raise FileProblem(f"is truncated ({size:,} bytes, less than its own header of {length:,} bytes)")
            raw = stream.read(length)
        try:
            header = json.loads(raw)
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            ends = [
                int(v["data_offsets"][1])
                for v in tensors.values()
                if isinstance(v["dtype"], str) and isinstance(v["shape"], list)
            ]
            if len(ends) != len(tensors):
                raise ValueError
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError):
            raise FileProblem("is not a safetensors file (its header is not a safetensors tensor table)") from None
        expected = 8 + length + max(ends, default=0)
        if size < expected:
            raise FileProblem(f"is truncated ({size:,} bytes where its header describes {expected:,})")
        if size > expected:
            raise FileProblem(f"is damaged ({size - expected:,} bytes more than its header describes)")
        return tensors


def read_safetensors(path: str | os.PathLike, what: str, fix: str) -> dict:
    """All tensors of a ``.safetensors`` file (on the CPU) after :func:`safetensors_header`'s checks;
    any failure is one UserError line."""
    safetensors_header(path, what, fix)
    with reading(path, what, fix) as file:
        from safetensors.torch import load_file

        return load_file(str(file))
