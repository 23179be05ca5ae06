"""`train library --tune` and where a library's values come from: FaceWorld's table only for
FaceWorld's model, neutral values for any other, measured ones with --tune.

Tiny random models and a few steps: what is checked is that the chosen values are grid points
chosen by the stated rule from finite scores the evaluation measured, that they are written and
used, and that a rerun measures only what it lacks; not that the values are good."""

from __future__ import annotations

import json
import math
import shutil

import cv2
import pytest

from ipfacediff.adapters.edits import BUILTIN_EDITS
from ipfacediff.adapters.tune import TUNED_VALUES, TuneGrid, choose_point
from ipfacediff.cli import main
from ipfacediff.models import AdapterLibrary
from ipfacediff.models.defaults import SHIPPED_MODELS

from test_cli import run
from test_settings import run_entry_point

FAST = ["--max-steps", "2", "--max-images", "8", "--inversion-steps", "4", "--generation-steps", "2"]
GRID = "weight=0.5,1;guidance=7.5;blend_threshold=0.5"  # two points
TUNE = ["--tune", "--tune-grid", GRID, "--tune-frames", "2", "--tune-steps", "2"]
EDITS = 'eyeglasses,ink="a face with a cheek tattoo"'

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Aligned crops, as a folder of a user's own would come."""
    from conftest import moving_texture

    folder = tmp_path_factory.mktemp("aligned")
    for index, image in enumerate(moving_texture(6, seed=3)):
        cv2.imwrite(str(folder / f"{index}.png"), image[..., ::-1])
    return folder


def library_argv(model, faces, output, *extra) -> list[str]:
    return [
        "train",
        "library",
        "--model",
        str(model),
        "--data",
        str(faces),
        "--aligned",
        "--edits",
        EDITS,
        "--output",
        str(output),
        *FAST,
        *extra,
    ]


@pytest.fixture(scope="module")
def tuned(tiny_dir, faces, tmp_path_factory):
    lib = tmp_path_factory.mktemp("tuned") / "lib"
    try:
        main(library_argv(tiny_dir, faces, lib, *TUNE))
    except SystemExit as done:
        pytest.fail(f"train library --tune exited with {done.code}")
    return lib


def test_tune_writes_values_chosen_among_the_grid_points_from_finite_scores(tuned):
    spec = json.loads((tuned / "adapters.json").read_text())["edits"]
    tuning = json.loads((tuned / "training.json").read_text())["tuning"]
    grid = [tuple(p[k] for k in TUNED_VALUES) for p in TuneGrid.parse(GRID).points()]
    assert len(grid) == 2 and tuning["frames"] == 2 and tuning["grid"] == TuneGrid.parse(GRID).to_json()
    for name in ("eyeglasses", "ink"):
        entry, record = spec[name], tuning["edits"][name]
        assert entry["values_from"] == "tuned"
        assert tuple(entry[k] for k in TUNED_VALUES) in grid
        assert [tuple(p[k] for k in TUNED_VALUES) for p in record["points"]] == grid
        for point in record["points"]:
            assert all(math.isfinite(point[k]) for k in ("clip_direction", "id_sim", "clip_score")), point
        assert record["chosen"] == choose_point(record["points"])  # the stated rule, on what was measured
        assert tuple(record["chosen"][k] for k in TUNED_VALUES) == tuple(entry[k] for k in TUNED_VALUES)
        scores = entry["tuned_scores"]
        assert scores["clip_direction"] == record["chosen"]["clip_direction"] and scores["points"] == 2
        assert math.isfinite(scores["id_sim"]) and scores["frames"] == 2
    # The held-out faces were kept from training: ε1 and each ε2 trained on the other 4.
    report = json.loads((tuned / "training.json").read_text())
    assert report["held_out"]["faces"] == 2 and report["data"]["identity"]["faces"] == 4
    assert not (tuned / "train_data").exists()


def test_plan_edit_uses_the_tuned_values(tuned, tiny_dir):
    from ipfacediff.job import load_pipeline
    from ipfacediff.settings import DEFAULT_IDENTITY_GRADIENT, EditSettings

    spec = json.loads((tuned / "adapters.json").read_text())["edits"]["eyeglasses"]
    pipe = load_pipeline(str(tiny_dir), adapters_dir=tuned, device="cpu", dtype="float32")
    plan = pipe.plan_edit(EditSettings(prompt="a face with eyeglasses"))
    assert plan.edit_weights == {"edit:eyeglasses": spec["weight"]}
    assert plan.guidance == spec["guidance"] and plan.blend_threshold == spec["blend_threshold"]
    assert plan.identity_gradient == DEFAULT_IDENTITY_GRADIENT  # not tuned: neutral
    given = pipe.plan_edit(EditSettings(prompt="a face with eyeglasses", guidance=3.0, blend_threshold=0.7))
    assert given.guidance == 3.0 and given.blend_threshold == 0.7  # the edit's own settings still win


def test_a_rerun_reuses_the_measured_points(tuned, tiny_dir, faces, tmp_path, capsys):
    """A rerun that lacks a choice measures nothing again: the recorded scores decide (here a
    point's scores are changed on purpose, so the choice shows they were read, not measured)."""
    lib = tmp_path / "lib"
    shutil.copytree(tuned, lib)
    report = json.loads((lib / "training.json").read_text())
    record = report["tuning"]["edits"]["eyeglasses"]
    other = next(p for p in record["points"] if p != record.pop("chosen"))
    other.update(clip_direction=0.99, id_sim=0.999)
    (lib / "training.json").write_text(json.dumps(report))
    code, stdout, stderr = run(library_argv(tiny_dir, faces, lib, *TUNE, "--resume"), capsys)
    assert code == 0, stderr
    entry = AdapterLibrary.read_dir(lib).entry("eyeglasses")
    assert (entry.weight, entry.guidance, entry.blend_threshold) == tuple(other[k] for k in TUNED_VALUES)
    assert entry.tuned_scores["clip_direction"] == 0.99
    again = json.loads((lib / "training.json").read_text())["tuning"]["edits"]
    assert len(again["eyeglasses"]["points"]) == 2 and again["ink"] == report["tuning"]["edits"]["ink"]


@pytest.mark.skipif(not (SHIPPED_MODELS / "ipfacediff.json").is_file(), reason="the package ships no FaceWorld model")
def test_faceworlds_model_keeps_faceworlds_table(faces, tmp_path, capsys):
    """Its card names FaceWorld's domain: the built-in edits keep the table's values, marked so;
    a custom edit has none to keep."""
    lib = tmp_path / "lib"
    code, _, stderr = run(library_argv(SHIPPED_MODELS, faces, lib), capsys)
    assert code == 0, stderr
    loaded = {e.name: e for e in AdapterLibrary.read_dir(lib).edits}
    table = BUILTIN_EDITS["eyeglasses"]
    assert table.has_tuned_values()
    for name in ("weight", "guidance", "blend_threshold", "identity_gradient"):
        assert getattr(loaded["eyeglasses"], name) == getattr(table, name)
    assert loaded["eyeglasses"].values_from == "faceworld"
    assert loaded["ink"].values_from == "neutral" and not loaded["ink"].has_tuned_values()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--tune", "--tune-grid", "weight=9"], "--tune-grid: weight value '9' must be a number (ge 0, le 4)"),
        (["--tune", "--tune-grid", "strength=0.5"], "--tune-grid: 'strength=0.5' is not NAME=V1,V2,..."),
        (["--tune-grid", GRID], "--tune-grid is the grid of --tune: pass --tune too"),
    ],
)
def test_a_bad_tune_option_is_one_line_before_any_work(tiny_dir, faces, tmp_path, extra, words):
    done = run_entry_point(*library_argv(tiny_dir, faces, tmp_path / "lib", *extra))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {words}"), done.stderr
    assert not (tmp_path / "lib").exists()


def test_tune_refuses_to_hold_out_every_face(tiny_dir, faces, tmp_path, capsys):
    code, _, stderr = run(library_argv(tiny_dir, faces, tmp_path / "lib", "--tune", "--tune-frames", "6"), capsys)
    assert code == 2 and "--tune keeps 6 faces of --data from training" in stderr and "--data has 6" in stderr


def test_tuning_a_library_trained_on_every_face_is_refused(tuned, tiny_dir, faces, tmp_path, capsys):
    lib = tmp_path / "lib"
    shutil.copytree(tuned, lib)
    report = json.loads((lib / "training.json").read_text())
    del report["held_out"], report["tuning"]
    (lib / "training.json").write_text(json.dumps(report))
    code, _, stderr = run(library_argv(tiny_dir, faces, lib, *TUNE, "--resume"), capsys)
    assert code == 2 and "trained on every face of --data" in stderr
