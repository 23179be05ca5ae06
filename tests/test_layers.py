"""Layers point one way: FaceWorld plugs into the core, never the reverse."""

from __future__ import annotations

import ast

from conftest import REPO_ROOT

ENTRY_POINT_MODULES = {"cli", "demo", "ui", "__main__"}  # may bring FaceWorld to the user


def imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_core_module_imports_faceworld():
    package = REPO_ROOT / "ipfacediff"
    offenders = {}
    core = [p for p in package.rglob("*.py") if p.relative_to(package).parts[0] not in ("faceworld", "assets")]
    assert package / "models" / "loading.py" in core  # the stages split into packages are looked at too
    for path in core:
        if path.stem in ENTRY_POINT_MODULES:
            continue
        found = sorted(n for n in imported_modules(path) if n.startswith("ipfacediff.faceworld"))
        if found:
            offenders[str(path.relative_to(package))] = found
    assert not offenders, offenders


def test_faceworld_uses_only_public_names_of_the_core():
    private = {}
    for path in (REPO_ROOT / "ipfacediff" / "faceworld").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("ipfacediff.faceworld"):
                names = [a.name for a in node.names if a.name.startswith("_")]
                if names and node.module.startswith("ipfacediff"):
                    private.setdefault(path.name, []).extend(names)
    assert not private, private


def test_faceworld_identity_nets_load_through_the_registry(tmp_path):
    from ipfacediff.faceworld.oracles import IDENTITY_KIND, FaceWorldIdentity
    from ipfacediff.identity import IdentityEncoder, identity_net_kinds

    assert IDENTITY_KIND in identity_net_kinds()  # declared as an entry point by the package
    folder = tmp_path / "net"
    FaceWorldIdentity().save_pretrained(folder)
    assert isinstance(IdentityEncoder.from_pretrained(folder), FaceWorldIdentity)
