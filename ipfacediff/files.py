"""Writing small output files whole: a reader (or a killed run) never sees half a file."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (str as UTF-8) to a temporary file beside ``path`` and rename it over ``path``.

    The folder must exist. The file gets the usual permissions (umask), not a temporary file's
    0600. On any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as indented JSON, written atomically; objects JSON cannot hold are written as str()."""
    return write_atomic(path, json.dumps(data, indent=2, default=str))
