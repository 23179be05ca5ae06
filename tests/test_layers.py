"""Layers point one way: FaceWorld plugs into the core, never the reverse, and nothing imports the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

from conftest import REPO_ROOT

PACKAGES = ("ipfacediff", "faceworld")
SHIM = REPO_ROOT / "ipfacediff" / "faceworld"  # the deprecated old name: the one core place naming FaceWorld


def imported_modules(path: Path) -> set[str]:
    """Every module (and module.name) the file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the two packages."""
    found = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def test_no_core_module_imports_faceworld():
    package = REPO_ROOT / "ipfacediff"
    offenders = {}
    core = [p for p in package.rglob("*.py") if SHIM not in p.parents and "assets" not in p.relative_to(package).parts]
    assert package / "models" / "loading.py" in core and package / "cli.py" in core and package / "demo.py" in core
    for path in core:
        found = sorted(
            n for n in imported_modules(path) if n.split(".")[0] == "faceworld" or "faceworld" in n.split(".")
        )
        if found:
            offenders[str(path.relative_to(package))] = found
    assert not offenders, offenders


def test_no_module_imports_the_cli():
    offenders = {}
    for name, path in modules().items():
        found = sorted(n for n in imported_modules(path) if n == "ipfacediff.cli" or n.startswith("ipfacediff.cli."))
        if found and name != "ipfacediff.cli":
            offenders[name] = found
    assert not offenders, offenders


def test_no_import_circle():
    """Module A imports B (anywhere in A) draws A -> B; no module reaches itself."""
    known = modules()

    def target(name: str) -> str | None:  # "ipfacediff.models.ADAPTER_LIBRARY" -> "ipfacediff.models"
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    edges = {
        name: {t for n in imported_modules(path) if (t := target(n)) and t != name} for name, path in known.items()
    }
    state, circles = {}, []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for nxt in sorted(edges[name]):
            if state.get(nxt) == "open":
                circles.append(trail[trail.index(nxt) :] + [nxt] if nxt in trail else [name, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[name] = "done"

    for name in sorted(known):
        if name not in state:
            visit(name, [name])
    assert not circles, circles


def test_faceworld_uses_only_public_names_of_the_core():
    private = {}
    for path in (REPO_ROOT / "faceworld").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ipfacediff":
                names = [a.name for a in node.names if a.name.startswith("_")]
                if names:
                    private.setdefault(path.name, []).extend(names)
    assert not private, private


def test_faceworld_identity_nets_load_through_the_registry(tmp_path):
    from faceworld.oracles import IDENTITY_KIND, FaceWorldIdentity
    from ipfacediff.identity import IdentityEncoder, identity_net_kinds

    assert IDENTITY_KIND in identity_net_kinds()  # declared as an entry point by the package
    folder = tmp_path / "net"
    FaceWorldIdentity().save_pretrained(folder)
    assert isinstance(IdentityEncoder.from_pretrained(folder), FaceWorldIdentity)


def test_the_old_name_is_faceworld_with_one_warning():
    """``ipfacediff.faceworld`` (and its modules) are faceworld's own module objects, and say so once."""
    script = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import ipfacediff.faceworld as old
    from ipfacediff.faceworld.oracles import FaceWorldIdentity
    import ipfacediff.faceworld.train
import faceworld, faceworld.oracles, faceworld.train
assert old.render_clip is faceworld.render_clip and old.__all__ == faceworld.__all__
assert FaceWorldIdentity is faceworld.oracles.FaceWorldIdentity
assert ipfacediff.faceworld.train is faceworld.train
print([str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(
        ["ipfacediff.faceworld is deprecated: import faceworld (python -m faceworld) instead"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import ipfacediff.faceworld
    assert ipfacediff.faceworld.EDITS is __import__("faceworld").EDITS
