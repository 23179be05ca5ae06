"""Deprecated: FaceWorld is its own package, ``faceworld``; this name keeps old imports working.

``ipfacediff.faceworld`` and every ``ipfacediff.faceworld.X`` are ``faceworld`` and
``faceworld.X`` (the same module objects), with one DeprecationWarning; ``python -m
ipfacediff.faceworld`` runs ``python -m faceworld``. This is the only module of the core that
names FaceWorld.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

import faceworld
from faceworld import *  # noqa: F403

__all__ = faceworld.__all__

warnings.warn(
    "ipfacediff.faceworld is deprecated: import faceworld (python -m faceworld) instead",
    DeprecationWarning,
    stacklevel=2,
)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``ipfacediff.faceworld.X`` as the module ``faceworld.X`` (not a copy of it)."""

    def find_spec(self, name, path=None, target=None):
        if name.startswith(f"{__name__}.") and name != f"{__name__}.__main__":
            if importlib.util.find_spec(f"faceworld{name[len(__name__) :]}") is not None:
                return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        # The import system hands back what sys.modules holds under the name after this.
        sys.modules[module.__name__] = importlib.import_module(f"faceworld{module.__name__[len(__name__) :]}")


sys.meta_path.append(_Alias())
