"""A plain `pip install .` gives a working tool; the web page and Ray are extras that say how to get them."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ipfacediff.cli import main

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_gradio_and_ray_are_extras_and_the_test_extra_pulls_them():
    core = {Requirement(r).name.lower() for r in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not core & {"gradio", "ray"}
    assert [Requirement(r).name for r in extras["ui"]] == ["gradio"]
    assert [Requirement(r).name for r in extras["batch"]] == ["ray"]
    assert any(Requirement(r).name == "ipfacediff" and {"ui", "batch"} <= Requirement(r).extras for r in extras["test"])


def test_mediapipe_is_installed_with_what_it_declares():
    """mediapipe comes in as a normal dependency (no --no-deps install beside pip's resolver)."""
    missing = []
    for text in importlib.metadata.requires("mediapipe") or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            missing.append(f"{req} (found {version})")
    assert not missing, missing


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["ui"], 'error: gradio is not installed: pip install "ipfacediff[ui]"'),
        (["batch", "jobs.csv", "-o", "out"], 'error: ray is not installed: pip install "ipfacediff[batch]"'),
    ],
)
def test_a_missing_extra_is_one_line_and_exit_2(argv, line, monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in ("gradio", "ray") else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    out = capsys.readouterr()
    assert (out.out + out.err).strip() == line
