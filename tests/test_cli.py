from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ipfacediff.cli import main
from ipfacediff.video import probe_video, write_video


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A short clip with a sound track and its true face track."""
    from ipfacediff.demo import sample_clip

    folder = tmp_path_factory.mktemp("sample")
    tracks = sample_clip(folder / "clip.mp4", frames=12)
    tracks.save(folder / "clip.tracks.json")
    return folder / "clip.mp4", folder / "clip.tracks.json"


def test_edit_real_clip_keeps_frames_fps_and_size(shared_clip, tiny_dir, tmp_path, capsys):
    clip = shared_clip("closeup.mp4")
    before = digest(clip)
    out = tmp_path / "out.mp4"
    code, stdout, stderr = run(
        [
            "edit",
            str(clip),
            "-o",
            str(out),
            "--prompt",
            "a face with eyeglasses",
            "--model",
            str(tiny_dir),
            "--resolution",
            "64",
            "--steps",
            "10",
        ],
        capsys,
    )
    assert code == 0, stderr
    info = probe_video(out)
    assert (info.frame_count, info.fps, info.width, info.height) == (40, 10.0, 512, 512)
    assert digest(clip) == before
    report = json.loads((tmp_path / "out.run.json").read_text())
    assert report["settings"]["steps"] == 10 and report["faces"] and report["seconds"]["invert"] > 0


def test_audio_is_kept_and_a_second_edit_reuses_the_inversion(sample, tiny_dir, tmp_path, capsys):
    clip, tracks = sample
    args = [
        "--prompt",
        "blonde hair",
        "--model",
        str(tiny_dir),
        "--steps",
        "3",
        "--tracks",
        str(tracks),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    code, _, stderr = run(["edit", str(clip), "-o", str(tmp_path / "a.mp4"), *args], capsys)
    assert code == 0, stderr
    source, edited = probe_video(clip), probe_video(tmp_path / "a.mp4")
    assert source.has_audio and edited.has_audio
    assert abs(edited.duration - source.duration) <= 1 / source.fps
    assert edited.frame_count == source.frame_count

    import av

    with av.open(str(tmp_path / "a.mp4")) as container:
        audio = container.streams.audio[0]
        audio_seconds = float(audio.duration * audio.time_base)
    assert abs(audio_seconds - edited.duration) <= 1 / source.fps

    code, _, stderr = run(["edit", str(clip), "-o", str(tmp_path / "b.mp4"), *args], capsys)
    assert code == 0
    assert "inversion reused" in stderr
    assert json.loads((tmp_path / "b.run.json").read_text())["inversion_reused"] is True


def _mistakes(tmp_path: Path, clip: Path, tiny_dir: Path) -> list[tuple[str, list[str], str]]:
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n")
    broken_model = tmp_path / "broken-model"
    broken_model.mkdir()
    (broken_model / "unet").mkdir()
    (broken_model / "unet" / "config.json").write_text("{not json")
    locked = tmp_path / "no-such-folder" / "out.mp4"
    ok = ["--model", str(tiny_dir), "--steps", "2"]
    return [
        (
            "missing input",
            ["edit", str(tmp_path / "nope.mp4"), "-o", str(tmp_path / "o.mp4"), "-p", "x", *ok],
            "does not exist",
        ),
        ("not a video", ["edit", str(text), "-o", str(tmp_path / "o.mp4"), "-p", "x", *ok], "not a video"),
        (
            "unreadable model",
            ["edit", str(clip), "-o", str(tmp_path / "o.mp4"), "-p", "x", "--model", str(broken_model)],
            "model",
        ),
        ("unwritable output", ["edit", str(clip), "-o", str(locked), "-p", "x", *ok], "does not exist"),
        ("output is input", ["edit", str(clip), "-o", str(clip), "-p", "x", *ok], "input path"),
        ("empty prompt", ["edit", str(clip), "-o", str(tmp_path / "o.mp4"), "-p", "  ", *ok], "prompt is empty"),
        (
            "bad face selection",
            ["edit", str(clip), "-o", str(tmp_path / "o.mp4"), "-p", "x", "--faces", "x", *ok],
            "face selection",
        ),
        (
            "smoothing too strong",
            ["edit", str(clip), "-o", str(tmp_path / "o.mp4"), "-p", "x", "--temporal-smoothing", "0.6", *ok],
            "--temporal-smoothing",
        ),
        (
            "negative guidance",
            ["edit", str(clip), "-o", str(tmp_path / "o.mp4"), "-p", "x", "--guidance", "-1", *ok],
            "--guidance",
        ),
        (
            "negative temperature",
            ["edit", str(clip), "-o", str(tmp_path / "o.mp4"), "-p", "x", "--propagation-temperature", "-1", *ok],
            "--propagation-temperature",
        ),
        (
            "timestep out of range",
            ["edit", str(clip), "-o", str(tmp_path / "o.mp4"), "-p", "x", "--all-keyframes-below", "2000", *ok],
            "--all-keyframes-below",
        ),
    ]


@pytest.mark.parametrize("case", range(9))
def test_user_mistakes_give_one_line_and_exit_2(case, sample, tiny_dir, tmp_path, capsys):
    clip, _ = sample
    before = digest(clip)
    name, argv, expected = _mistakes(tmp_path, clip, tiny_dir)[case]
    code, stdout, stderr = run(argv, capsys)
    assert code == 2, (name, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
    assert expected in lines[0], (name, lines[0])
    assert "Traceback" not in stderr + stdout
    assert digest(clip) == before
    assert not (tmp_path / "o.mp4").exists()


def test_a_mistake_from_the_installed_command_has_no_traceback(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ipfacediff.cli",
            "edit",
            str(tmp_path / "missing.mp4"),
            "-o",
            str(tmp_path / "o.mp4"),
            "-p",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: ")


ANSWERED = """
import sys
from ipfacediff.cli import main
sys.argv = ["ipfacediff", *sys.argv[1:]]
code = 0
try:
    main()
except SystemExit as done:
    code = done.code
print(code, sorted(name for name in ("torch", "diffusers", "transformers") if name in sys.modules))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["edit", "in.mp4", "-o", "out.mp4", "-p", "x", "--resolution", "0"],
        ["edit", "--no-such-option"],
        ["faces", "--help"],
    ],
)
def test_a_mistake_or_help_is_answered_before_the_model_libraries_load(argv):
    """Importing torch and diffusers takes seconds: the plug-in groups (FaceWorld's) that import
    them are attached only for a command line that may name one, and the libraries are quietened
    when something imports them, not by importing them."""
    done = subprocess.run([sys.executable, "-c", ANSWERED, *argv], capture_output=True, text=True, timeout=300)
    assert done.stdout.split("\n")[-2] == ("0 []" if "--help" in argv else "2 []"), done.stdout + done.stderr


def test_the_model_libraries_are_quiet_once_something_imports_them():
    code = (
        "from ipfacediff.runner import quiet_libraries; quiet_libraries(); import diffusers, transformers; "
        "from diffusers.utils import logging as d; from transformers.utils import logging as t; "
        "print(d.get_verbosity(), d.is_progress_bar_enabled(), t.get_verbosity(), t.is_progress_bar_enabled())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["40", "False", "40", "False"], done.stdout + done.stderr


@pytest.mark.parametrize(
    "command",
    ["edit", "invert", "build-tiny-models", "faces", "demo", "evaluate", "train identity", "train edit", "batch", "ui"],
)
def test_every_command_has_help(command, capsys):
    code, stdout, _ = run([*command.split(), "--help"], capsys)
    assert code == 0 and "Usage" in stdout


def test_build_tiny_models_command(tmp_path, capsys):
    code, stdout, _ = run(["build-tiny-models", str(tmp_path / "m"), "--seed", "2"], capsys)
    assert code == 0 and (tmp_path / "m" / "model_index.json").is_file() and (tmp_path / "m" / "clip").is_dir()
    code, _, stderr = run(["build-tiny-models", str(tmp_path / "m")], capsys)
    assert code == 2 and "not empty" in stderr


def test_invert_command_fills_the_cache(sample, tiny_dir, tmp_path, capsys):
    clip, tracks = sample
    argv = [
        "invert",
        str(clip),
        "--model",
        str(tiny_dir),
        "--steps",
        "3",
        "--tracks",
        str(tracks),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "UNet calls" in stdout
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "already cached" in stdout


def test_whole_frame_mode_and_no_face(tiny_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(5)]
    clip = write_video(tmp_path / "noise.mp4", noise, 5)
    code, _, stderr = run(
        ["edit", str(clip), "-o", str(tmp_path / "pass.mp4"), "-p", "x", "--model", str(tiny_dir), "--steps", "2"],
        capsys,
    )
    assert code == 0 and "no face found" in stderr
    assert probe_video(tmp_path / "pass.mp4").frame_count == 5
    code, _, stderr = run(
        [
            "edit",
            str(clip),
            "-o",
            str(tmp_path / "req.mp4"),
            "-p",
            "x",
            "--model",
            str(tiny_dir),
            "--steps",
            "2",
            "--require-face",
        ],
        capsys,
    )
    assert code == 2 and "no face found" in stderr
    code, _, stderr = run(
        [
            "edit",
            str(clip),
            "-o",
            str(tmp_path / "whole.mp4"),
            "-p",
            "x",
            "--model",
            str(tiny_dir),
            "--steps",
            "2",
            "--whole-frame",
        ],
        capsys,
    )
    assert code == 0, stderr
    info = probe_video(tmp_path / "whole.mp4")
    assert (info.width, info.height, info.frame_count) == (64, 48, 5)


def test_whole_frame_paste_keeps_the_frame_where_the_edit_changed_nothing():
    from ipfacediff.crops import resize_image
    from ipfacediff.edit import paste_whole_frame

    frame = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    small = resize_image(frame, (32, 32))  # what a whole-frame edit sees
    assert np.array_equal(paste_whole_frame(frame, small), frame)
    edited = small.copy()
    edited[:8, :8] = 255
    out = paste_whole_frame(frame, edited)
    assert np.array_equal(out[24:], frame[24:]) and np.array_equal(out[:, 32:], frame[:, 32:])
    assert out[:10, :14].mean() > frame[:10, :14].mean() + 50


def test_demo_runs_offline(tmp_path, capsys):
    code, stdout, stderr = run(["demo", "--output-dir", str(tmp_path / "demo"), "--steps", "2"], capsys)
    assert code == 0, stderr
    for name in ("sample.mp4", "edited.mp4", "side_by_side.mp4", "edited.run.json", "metrics.json", "report.html"):
        assert (tmp_path / "demo" / name).is_file()
        assert str(tmp_path / "demo" / name) in stdout


def test_edit_with_evaluate_and_the_evaluate_command(sample, tiny_dir, tmp_path, capsys):
    clip, tracks = sample
    out = tmp_path / "e.mp4"
    code, stdout, stderr = run(
        [
            "edit",
            str(clip),
            "-o",
            str(out),
            "-p",
            "a smiling face",
            "--model",
            str(tiny_dir),
            "--steps",
            "2",
            "--tracks",
            str(tracks),
            "--evaluate",
            "--clip",
            str(tiny_dir / "clip"),
        ],
        capsys,
    )
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "e.metrics.json").read_text())
    assert metrics["frames"] == 12 and metrics["clip_score"] is not None
    assert (tmp_path / "e.report.html").read_text().count("data:image") >= 2
    code, stdout, stderr = run(["evaluate", str(clip), str(clip), "--json", str(tmp_path / "self.json")], capsys)
    assert code == 0, stderr
    self_metrics = json.loads((tmp_path / "self.json").read_text())
    assert self_metrics["warp_error_ratio"] == pytest.approx(1.0, abs=0.05)
    code, _, stderr = run(["evaluate", str(clip), str(tmp_path / "missing.mp4")], capsys)
    assert code == 2 and stderr.startswith("error: ")


def test_train_commands_write_adapters_that_edit_loads(sample, tiny_dir, tmp_path, capsys):
    clip, tracks = sample
    faces = tmp_path / "faces"
    faces.mkdir()
    import cv2

    from conftest import moving_texture

    for i, image in enumerate(moving_texture(4)):
        cv2.imwrite(str(faces / f"{i}.png"), image[..., ::-1])
    code, stdout, stderr = run(
        [
            "train",
            "identity",
            "--model",
            str(tiny_dir),
            "--data",
            str(faces),
            "--output",
            str(tmp_path / "id"),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
        ],
        capsys,
    )
    assert code == 0, stderr
    identity = tmp_path / "id" / "pytorch_lora_weights.safetensors"
    assert identity.is_file()
    code, stdout, stderr = run(
        [
            "train",
            "edit",
            "--model",
            str(tiny_dir),
            "--source",
            "a face",
            "--target",
            "a face with eyeglasses",
            "--data",
            str(faces),
            "--clip",
            str(tiny_dir / "clip"),
            "--output",
            str(tmp_path / "glasses"),
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--inversion-steps",
            "2",
            "--generation-steps",
            "1",
        ],
        capsys,
    )
    assert code == 0, stderr
    edit_adapter = tmp_path / "glasses" / "pytorch_lora_weights.safetensors"
    code, _, stderr = run(
        [
            "edit",
            str(clip),
            "-o",
            str(tmp_path / "lora.mp4"),
            "-p",
            "a face with eyeglasses",
            "--model",
            str(tiny_dir),
            "--steps",
            "2",
            "--tracks",
            str(tracks),
            "--identity-lora",
            str(identity),
            "--edit-lora",
            f"{edit_adapter}:0.8",
        ],
        capsys,
    )
    assert code == 0, stderr
    code, _, stderr = run(
        [
            "train",
            "identity",
            "--model",
            str(tiny_dir),
            "--data",
            str(tmp_path / "none"),
            "--output",
            str(tmp_path / "x"),
        ],
        capsys,
    )
    assert code == 2 and stderr.startswith("error: ")
    train_edit = ["train", "edit", "--model", str(tiny_dir), "--source", "a face", "--target", "a face with eyeglasses"]
    train_edit += ["--data", str(faces), "--clip", str(tiny_dir / "clip"), "--output", str(tmp_path / "y")]
    code, _, stderr = run(train_edit + ["--target-images", str(tmp_path / "none")], capsys)
    assert code == 2 and stderr.startswith("error: --target-images: ") and stderr.count("\n") == 1
    code, _, stderr = run(train_edit + ["--paired-targets", str(tmp_path / "none")], capsys)
    assert code == 2 and stderr.startswith("error: --paired-targets: ") and stderr.count("\n") == 1


def test_faceworld_subcommands_render_and_refuse_in_one_line(tmp_path, capsys):
    from ipfacediff.face import FaceTracks

    code, out, _ = run(
        ["faceworld", "render", "clip", str(tmp_path / "c.mp4"), "--frames", "3", "--size", "96"], capsys
    )
    assert code == 0 and probe_video(tmp_path / "c.mp4").frame_count == 3
    assert len(FaceTracks.load(tmp_path / "c.json").tracks) == 2
    code, _, err = run(["faceworld", "adapters", str(tmp_path / "nothing"), "--preset", "smoke"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and "FaceWorld model folder" in err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "an-extra-argument"], "demo: Got unexpected extra argument"),
        (["edit", "--no-such-option"], "edit: No such option: --no-such-option"),
        (["edit", "in.mp4", "-p", "x"], "edit: Missing option '--output'"),
        (["edit", "in.mp4", "-o", "o.mp4", "-p", "x", "--steps", "abc"], "edit: Invalid value for '--steps'"),
        (["train", "library", "--data", "d"], "train library: Missing option '--model'"),
        (["train", "identity", "--bogus"], "train identity: No such option: --bogus"),
        (["faceworld", "render", "clip", "c.mp4", "--frames", "x"], "faceworld render clip: Invalid value"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_usage_mistakes_are_one_error_line_and_exit_2(argv, words, capsys):
    code, out, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert words in lines[0] and "--help`" in lines[0], lines[0]
    assert "Traceback" not in out + err and "Usage" not in err


def test_a_group_without_its_command_shows_its_help(capsys):
    code, out, err = run(["train"], capsys)
    assert code == 2 and "identity" in out + err and "library" in out + err and "error:" not in out + err


def test_a_face_prompt_for_a_face_the_clip_lacks_is_refused(sample, tiny_dir, tmp_path, capsys):
    clip, tracks = sample  # one face: track 0
    argv = ["edit", str(clip), "-o", str(tmp_path / "o.mp4"), "-p", "x", "--model", str(tiny_dir), "--steps", "2"]
    code, _, stderr = run([*argv, "--tracks", str(tracks), "--face-prompt", "7=a face with a beard"], capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --face-prompt 7=..."), stderr
    assert "no face track 7" in lines[0] and "ids: 0" in lines[0]
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "o.run.json").exists()
    code, _, stderr = run([*argv, "--whole-frame", "--face-prompt", "1=a face with a beard"], capsys)
    assert code == 2 and "no face track 1" in stderr  # the whole frame is face 0


def test_a_fade_longer_than_the_range_is_shortened_and_said(tiny_dir, tmp_path, capsys):
    frames = [np.full((48, 64, 3), 40 + 20 * i, np.uint8) for i in range(8)]
    clip = write_video(tmp_path / "in.mp4", frames, 10.0)
    argv = ["edit", str(clip), "-p", "x", "--model", str(tiny_dir), "--steps", "2", "--whole-frame"]
    argv += ["--start", "frame:2", "--end", "frame:5", "--cache-dir", str(tmp_path / "cache")]
    code, _, stderr = run([*argv, "-o", str(tmp_path / "long.mp4"), "--fade", "50"], capsys)
    assert code == 0, stderr
    notes = [line for line in stderr.splitlines() if "--fade" in line]
    assert len(notes) == 1 and "--fade 50" in notes[0] and "1 frame(s) instead" in notes[0], stderr
    code, _, stderr = run([*argv, "-o", str(tmp_path / "one.mp4"), "--fade", "1"], capsys)
    assert code == 0 and "--fade" not in stderr, stderr
    from ipfacediff.video import iter_frames

    shortened, asked = list(iter_frames(tmp_path / "long.mp4")), list(iter_frames(tmp_path / "one.mp4"))
    assert all(np.array_equal(a, b) for a, b in zip(shortened, asked)) and len(shortened) == 8
    assert np.abs(shortened[3].astype(int) - frames[3]).mean() > 1  # the middle frame is edited in full
