"""The edit's settings are one object: its checks, its readers, and the places built from it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

from ipfacediff.errors import UserError
from ipfacediff.files import check_writable, write_json
from ipfacediff.settings import EditSettings, flag_of

from conftest import REPO_ROOT

ENTRY_POINT = Path(sys.executable).with_name("ipfacediff")


def one_line_error(**values) -> str:
    with pytest.raises(UserError) as caught:
        EditSettings(**{"prompt": "a face with eyeglasses", **values})
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "values, words",
    [
        ({"guidance": math.nan}, "--guidance must be a finite number"),
        ({"guidance": math.inf}, "--guidance must be a finite number"),
        ({"guidance": -1.0}, "--guidance must be in [0, 100]"),
        ({"seed": 2**70}, "--seed must be in [0, "),
        ({"seed": -1}, "--seed must be in [0, "),
        ({"resolution": 0}, "--resolution must be in [8, 4096]"),
        ({"resolution": -64}, "--resolution must be in [8, 4096]"),
        ({"resolution": 100}, "--resolution must be a multiple of 8"),
        ({"steps": 2.5}, "--steps must be an integer"),
        ({"steps": True}, "--steps must be an integer"),
        ({"strength": 0.0}, "--strength must be in (0, 1]"),
        ({"temporal_smoothing": 0.5}, "--temporal-smoothing must be in [0, 0.5)"),
        ({"blend_threshold": math.nan}, "--blend-threshold must be a finite number"),
        ({"keyframes": 0}, "--keyframes must be in [1, "),
        ({"faces": "0,x"}, "bad face selection"),
        ({"prompt": "   "}, "the prompt is empty"),
        ({"local_blend": "no"}, "--local-blend must be true or false"),
        ({"face_prompts": ("²=a face with a beard",)}, "--face-prompt must be ID=TEXT"),
        ({"face_prompts": ("٣=a face with a beard",)}, "--face-prompt must be ID=TEXT"),
        ({"faces": "0,²"}, "bad face selection"),
        ({"start": "inf"}, "--start must be seconds"),
        ({"end": "frame:" + "9" * 5000}, "--end must be seconds"),
    ],
)
def test_every_bad_value_is_one_line_naming_its_option(values, words):
    assert words in one_line_error(**values)


def test_times_past_any_clip_are_its_end_not_an_overflow():
    assert EditSettings(prompt="x", end="1e308").frame_range(24.0, 10) == range(0, 10)
    assert EditSettings(prompt="x", end="frame:" + "9" * 400).frame_range(24.0, 10) == range(0, 10)
    for start in ("1e308", "frame:" + "9" * 400):
        with pytest.raises(UserError, match="the range starts after the clip's last frame"):
            EditSettings(prompt="x", start=start).frame_range(24.0, 10)


def test_a_fade_too_long_for_its_range_is_shortened_and_said():
    settings = EditSettings(prompt="x", start="frame:2", end="frame:5", fade=50)
    frames = settings.frame_range(10.0, 8)
    weights = [settings.fade_weight(f, frames) for f in frames]
    assert max(weights) == 1.0 and weights == [0.5, 1.0, 0.5]  # a 50-frame fade would peak at 2/51
    note = settings.fade_note(frames)
    assert note and "\n" not in note and "--fade 50" in note and "3-frame range" in note and "1 frame" in note
    start_only = EditSettings(prompt="x", start="frame:5", fade=50)
    frames = start_only.frame_range(10.0, 8)
    assert [start_only.fade_weight(f, frames) for f in frames] == [1 / 3, 2 / 3, 1.0]
    assert "at the start of the 3-frame range" in start_only.fade_note(frames)
    fitting = EditSettings(prompt="x", start="frame:2", end="frame:20", fade=4)
    frames = fitting.frame_range(10.0, 30)
    assert fitting.fade_note(frames) is None and fitting.fade_weight(2, frames) == 1 / 5
    assert EditSettings(prompt="x", fade=50).fade_note(range(0, 3)) is None  # the whole clip: no fade at all


def test_values_are_typed_and_frozen():
    settings = EditSettings(prompt="a smiling face", guidance=5, steps=20.0)
    assert settings.guidance == 5.0 and isinstance(settings.guidance, float)
    assert settings.steps == 20 and isinstance(settings.steps, int)
    with pytest.raises(AttributeError):
        settings.steps = 3  # type: ignore[misc]


def test_values_typed_by_a_person_are_read_or_refused_in_one_line():
    settings = EditSettings.from_mapping(
        {"prompt": "x", "steps": "20", "local_blend": "off", "guidance": "", "faces": [0, 2]}
    )
    assert (settings.steps, settings.local_blend, settings.guidance, settings.faces) == (20, False, None, "0,2")
    for values, words in [
        ({"steps": "abc"}, "steps must be an integer"),
        ({"guidance": "nan"}, "--guidance must be a finite number"),
        ({"hair": "maybe"}, "hair must be true or false"),
        ({"colour": "red"}, "unknown setting 'colour'"),
    ]:
        with pytest.raises(UserError, match="^m.csv line 3: ") as caught:
            EditSettings.from_mapping({"prompt": "x", **values}, where="m.csv line 3")
        assert words in str(caught.value)


def test_the_readme_carries_the_generated_options_table():
    readme = (REPO_ROOT / "README.md").read_text()
    begin, end = "<!-- edit-settings: begin -->\n", "\n<!-- edit-settings: end -->"
    assert begin in readme and end in readme
    table = readme[readme.index(begin) + len(begin) : readme.index(end)]
    assert table == EditSettings.options_table(), "README's table is stale: paste `python -m ipfacediff.settings`"


def test_edit_takes_every_setting_as_an_option_and_batch_as_a_column():
    import typer.main

    from ipfacediff.batch import _setting_names
    from ipfacediff.cli import app

    command = typer.main.get_command(app).commands["edit"]  # type: ignore[attr-defined]
    options = {name for param in command.params for name in param.opts}
    for f in fields(EditSettings):
        assert flag_of(f.name, f.metadata) in options, f.name
    assert set(_setting_names()) == {f.name for f in fields(EditSettings)} - {"prompt"}


def test_json_is_written_strictly(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"guidance": math.nan})
    assert not list(tmp_path.iterdir())


def test_an_unwritable_output_is_found_before_the_work(tmp_path):
    for path, words in [
        (Path("/proc/x.mp4"), "cannot be written"),
        (tmp_path, "is a folder"),
        (tmp_path / "missing" / "x.mp4", "does not exist"),
        (Path("/dev/null"), "not a regular file"),
    ]:
        with pytest.raises(UserError, match=words):
            check_writable(path)
    assert check_writable(tmp_path / "ok.mp4") == tmp_path / "ok.mp4"
    assert not list(tmp_path.iterdir())  # the probe file is gone


def run_entry_point(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed ``ipfacediff`` command in a process of its own: its real exit code and streams."""
    if not ENTRY_POINT.is_file():
        pytest.skip(f"{ENTRY_POINT} is not installed (pip install -e . puts it beside the interpreter)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(ENTRY_POINT), *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--guidance", "nan", "--guidance must be a finite number"),
        ("--guidance", "inf", "--guidance must be a finite number"),
        ("--seed", str(2**70), "--seed must be in"),
        ("--resolution", "0", "--resolution must be in [8, 4096]"),
        ("--resolution", "-64", "--resolution must be in [8, 4096]"),
        ("--edit-lora", "adapter.safetensors:nan", "nan"),
        ("--start", "1e308", "the range starts after the clip's last frame"),
        ("--cache-max-gb", "1e300", "--cache-max-gb must be in (0, 1000000]"),
        ("--face-prompt", "²=a face with a beard", "--face-prompt must be ID=TEXT"),
    ],
)
def test_hostile_numbers_exit_2_with_one_line_and_no_output(tmp_path, option, value, words):
    from ipfacediff.video import write_video
    import numpy as np

    clip = tmp_path / "in.mp4"
    write_video(clip, (np.full((64, 64, 3), i * 20, np.uint8) for i in range(4)), 10.0)
    (tmp_path / "adapter.safetensors").write_bytes(b"")
    started = time.monotonic()
    done = run_entry_point(
        "edit", str(clip), "-o", str(tmp_path / "out.mp4"), "-p", "a face", option, value, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], done.stderr
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "out.run.json").exists()
    assert time.monotonic() - started < 60


def test_an_unwritable_output_fails_at_once_through_the_entry_point(tmp_path):
    from ipfacediff.video import write_video
    import numpy as np

    clip = tmp_path / "in.mp4"
    write_video(clip, (np.full((64, 64, 3), i * 20, np.uint8) for i in range(4)), 10.0)
    done = run_entry_point("edit", str(clip), "-o", "/proc/x.mp4", "-p", "a face")
    assert done.returncode == 2 and done.stderr.startswith("error: output /proc/x.mp4 cannot be written")
    assert len(done.stderr.strip().splitlines()) == 1


def test_mediapipe_logging_is_silent_unless_verbose(shared_clip, tmp_path):
    clip = shared_clip("closeup.mp4")
    quiet = run_entry_point("faces", str(clip))
    assert quiet.returncode == 0 and quiet.stderr.strip() == "", quiet.stderr
    assert quiet.stdout.startswith("face 0: frames 0-39")
    missing = run_entry_point("faces", str(clip), "--json", str(tmp_path / "no" / "tracks.json"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    loud = run_entry_point("--verbose", "faces", str(clip))
    assert loud.returncode == 0 and loud.stderr.strip() != ""


@pytest.mark.parametrize(
    "argv, words",
    [
        (["faceworld", "train", "out", "--no-such-option"], "faceworld train: No such option: --no-such-option"),
        (["edit", "in.mp4", "-o", "o.mp4", "-p", "x", "--steps", "abc"], "edit: Invalid value for '--steps'"),
    ],
)
def test_usage_mistakes_of_the_entry_point_are_one_line_and_exit_2(tmp_path, argv, words):
    done = run_entry_point(*argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], done.stderr
    assert "--help" in lines[0] and not list(tmp_path.iterdir())


def test_a_failed_batch_row_makes_the_entry_point_exit_1(tmp_path, tiny_dir):
    pytest.importorskip("ray")
    from ipfacediff.video import write_video
    import numpy as np

    write_video(tmp_path / "in.mp4", (np.full((64, 64, 3), i * 20, np.uint8) for i in range(4)), 10.0)
    manifest = tmp_path / "m.jsonl"
    rows = [
        {"input": "missing.mp4", "prompt": "a face"},
        {"input": "in.mp4", "prompt": "a face", "face_prompts": ["7=a beard"], "whole_frame": True, "steps": 2},
    ]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = run_entry_point(
        "batch", str(manifest), "-o", str(tmp_path / "out"), "--workers", "1", "--model", str(tiny_dir)
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "0 done, 2 failed" in done.stdout
    failed = [line for line in done.stderr.splitlines() if line.startswith("failed ")]
    assert len(failed) == 2 and any("no face track 7 among the faces edited (ids: 0;" in line for line in failed)
