"""FaceWorld's ε1/ε2 adapters: the smoke preset trains them into a model's adapter library, which
the normal loader then uses without flags; prompts pick the edit adapters."""

from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from ipfacediff.errors import UserError
from faceworld.adapters import (
    ADAPTER_GUIDANCES,
    ADAPTER_WEIGHTS,
    BLEND_THRESHOLDS,
    EDIT_WORDS,
    train_adapters,
)
from faceworld.attributes import EDITS, Attributes, caption
from faceworld.train import train_faceworld_models
from ipfacediff.models import ADAPTER_LIBRARY, AdapterLibrary, pick_edit_adapters
from ipfacediff.settings import EditSettings


@contextmanager
def one_thread():
    """Small models on a shared CPU: one thread is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    with one_thread():
        folder = tmp_path_factory.mktemp("faceworld-adapters") / "model"
        train_faceworld_models(folder, preset="smoke")
        report = train_adapters(folder, preset="smoke", log=lambda _m: None)
    return folder, report


def test_the_library_lists_every_adapter_and_they_exist(model):
    folder, report = model
    library = AdapterLibrary.read(folder)
    assert library is not None and library.identity.is_file()
    assert {e.name for e in library.edits} == set(EDIT_WORDS)
    assert all(e.path.is_file() for e in library.edits)
    assert [e.name for e in library.edits if e.hair] == ["blonde_hair"]
    assert {e.name: e.target for e in library.edits}["smile"] == "a smiling face"
    assert library.blend_thresholds() == BLEND_THRESHOLDS
    assert library.weights() == ADAPTER_WEIGHTS
    assert library.guidances() == ADAPTER_GUIDANCES
    assert {e.values_from for e in library.edits} == {"faceworld"}  # the table's own model: marked as its values
    # The trainers' identity net is their own (seed + 1), not the benchmark's judge.
    assert report["steps"]["identity_net"]["seed"] == 1
    for name in ["identity", *EDIT_WORDS]:
        assert report["steps"][name]["steps"] > 0
    assert not (folder / "adapters" / "train_data").exists()
    assert not any((folder / "adapters").rglob("checkpoints"))


def test_a_finished_library_is_not_retrained_and_is_not_overwritten(model):
    folder, report = model
    library_file = folder / ADAPTER_LIBRARY
    stamp = library_file.stat().st_mtime_ns
    again = train_adapters(folder, preset="smoke", resume=True, log=lambda _m: None)
    assert again["steps"] == report["steps"]
    with pytest.raises(UserError, match="--resume"):
        train_adapters(folder, preset="smoke", log=lambda _m: None)
    assert library_file.stat().st_mtime_ns >= stamp


def test_the_loader_applies_the_library_and_the_prompt_picks_adapters(model):
    from ipfacediff.job import load_pipeline

    folder, _ = model
    pipe = load_pipeline(str(folder), device="cpu")
    assert set(pipe.unet.peft_config) == {"identity", *(f"edit:{n}" for n in EDIT_WORDS)}
    assert pipe.plan_edit(EditSettings(prompt="a face with a beard")).edit_weights == {"edit:beard": 1.0}
    assert pipe.plan_edit(
        EditSettings(prompt="a smiling face with a beard", source_prompt="a face with a beard")
    ).edit_weights == {"edit:smile": 1.0}
    assert pipe.plan_edit(EditSettings(prompt="a face with a beard", adapters="none")).edit_weights == {}
    assert pipe.plan_edit(EditSettings(prompt="a face", adapters="beard:0.5, smile")).edit_weights == {
        "edit:beard": 0.5,
        "edit:smile": 1.0,
    }
    with pytest.raises(UserError, match="unknown edit adapter 'hat'.*eyeglasses"):
        pipe.plan_edit(EditSettings(prompt="a face", adapters="hat")).edit_weights

    frames = (np.random.default_rng(0).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    with one_thread():
        with_adapter = pipe(frames, EditSettings(prompt="a face with a beard", steps=3))
        without = pipe(frames, EditSettings(prompt="a face with a beard", steps=3, adapters="none"))
        base = load_pipeline(str(folder), device="cpu", adapter_library=False)
        plain = base(frames, EditSettings(prompt="a face with a beard", steps=3))
    assert with_adapter.edit_adapters == {"beard": 1.0} and without.edit_adapters == {}
    assert not np.array_equal(with_adapter.frames, without.frames)
    assert base.adapter_library is None and not getattr(base.unet, "peft_config", None)
    # Without edit adapters the library's ε1 is still on: it guides, so the result is not the base's.
    assert not np.array_equal(without.frames, plain.frames)


def test_an_adapters_tuned_blend_threshold_is_the_default_an_edit_can_override(model):
    from ipfacediff.job import load_pipeline

    folder, _ = model
    pipe = load_pipeline(str(folder), device="cpu")
    tuned = BLEND_THRESHOLDS["smile"]
    assert pipe.adapter_library.blend_thresholds() == BLEND_THRESHOLDS
    frames = (np.random.default_rng(1).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    with one_thread():
        default = pipe(frames, EditSettings(prompt="a smiling face", steps=3))
        same = pipe(frames, EditSettings(prompt="a smiling face", steps=3, blend_threshold=tuned))
        stricter = pipe(frames, EditSettings(prompt="a smiling face", steps=3, blend_threshold=0.9))
    assert np.array_equal(default.frames, same.frames)
    assert not np.array_equal(default.frames, stricter.frames)


def test_an_adapters_tuned_guidance_is_the_default_an_edit_can_override(model):
    from ipfacediff.editing import DEFAULT_GUIDANCE
    from ipfacediff.job import load_pipeline

    folder, _ = model
    pipe = load_pipeline(str(folder), device="cpu")
    assert pipe.adapter_library.guidances() == ADAPTER_GUIDANCES
    name, tuned = next(iter(ADAPTER_GUIDANCES.items()))
    prompt = caption(EDITS[name].apply(Attributes()))
    untuned = next(e for e in EDIT_WORDS if e not in ADAPTER_GUIDANCES)
    frames = (np.random.default_rng(3).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    with one_thread():
        default = pipe(frames, EditSettings(prompt=prompt, steps=3))
        same = pipe(frames, EditSettings(prompt=prompt, steps=3, guidance=tuned))
        other = pipe(frames, EditSettings(prompt=prompt, steps=3, guidance=DEFAULT_GUIDANCE))
        mixed = pipe(frames, EditSettings(prompt="a face", steps=3, adapters=f"{name},{untuned}"))
    assert default.guidance == tuned and other.guidance == DEFAULT_GUIDANCE
    assert np.array_equal(default.frames, same.frames)
    assert not np.array_equal(default.frames, other.frames)
    # With several adapters the highest tuned guidance wins, so no attribute is pushed less than tuned.
    assert mixed.guidance == max(tuned, DEFAULT_GUIDANCE)


def test_an_adapters_tuned_weight_is_the_default_an_edit_can_override(model):
    from ipfacediff.job import load_pipeline

    folder, _ = model
    pipe = load_pipeline(str(folder), device="cpu")
    tuned = ADAPTER_WEIGHTS["eyeglasses"]
    assert pipe.adapter_library.weights() == ADAPTER_WEIGHTS
    assert pipe.plan_edit(EditSettings(prompt="a face with eyeglasses")).edit_weights == {"edit:eyeglasses": tuned}
    assert pipe.plan_edit(EditSettings(prompt="a face", adapters="eyeglasses, beard")).edit_weights == {
        "edit:eyeglasses": tuned,
        "edit:beard": 1.0,
    }
    assert pipe.plan_edit(EditSettings(prompt="a face", adapters="eyeglasses:1")).edit_weights == {
        "edit:eyeglasses": 1.0
    }
    frames = (np.random.default_rng(2).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    with one_thread():
        default = pipe(frames, EditSettings(prompt="a face with eyeglasses", steps=3))
        base_edit = pipe(frames, EditSettings(prompt="a face with eyeglasses", steps=3, adapters="none"))
        full_weight = pipe(frames, EditSettings(prompt="a face with eyeglasses", steps=3, adapters="eyeglasses:1"))
    assert default.edit_adapters == {"eyeglasses": tuned} and full_weight.edit_adapters == {"eyeglasses": 1.0}
    assert not np.array_equal(default.frames, full_weight.frames)
    if tuned == 0:  # at weight 0 the adapter is off: ε2 is the base model, as with adapters "none"
        assert np.abs(default.frames.astype(int) - base_edit.frames.astype(int)).max() <= 1


def test_explicit_edit_loras_replace_the_library_edits(model):
    from ipfacediff.job import load_pipeline

    folder, _ = model
    lora = folder / "adapters" / "smile" / "pytorch_lora_weights.safetensors"
    pipe = load_pipeline(str(folder), device="cpu", edit_loras=[(str(lora), 0.7)])
    assert set(pipe.unet.peft_config) == {"identity", "edit_0"}
    assert pipe.plan_edit(EditSettings(prompt="a face with eyeglasses")).edit_weights == {"edit_0": 0.7}


def test_prompt_words_pick_adapters():
    words = {"eyeglasses": ["eyeglasses", "glasses"], "beard": ["beard"]}
    assert pick_edit_adapters(words, "A face with GLASSES.") == ["eyeglasses"]
    assert pick_edit_adapters(words, "a face with a beard and eyeglasses", "a face with a beard") == ["eyeglasses"]
    assert pick_edit_adapters(words, "a face with sunglasses") == []  # whole words only
    assert pick_edit_adapters(words, "a bearded face") == []


@pytest.mark.parametrize(
    "edit",
    [
        {"words": ["x"]},
        {"path": "x.safetensors", "words": ["x"], "blend_threshold": 1.5},
        {"path": "x.safetensors", "words": ["x"], "blend_threshold": "low"},
        {"path": "x.safetensors", "words": ["x"], "weight": -1},
        {"path": "x.safetensors", "words": ["x"], "weight": "high"},
        {"path": "x.safetensors", "words": ["x"], "guidance": -1},
    ],
)
def test_a_broken_library_is_one_clear_error(tmp_path, edit):
    (tmp_path / "adapters").mkdir()
    (tmp_path / ADAPTER_LIBRARY).write_text(json.dumps({"edits": {"x": edit}}))
    with pytest.raises(UserError, match="not a valid adapter library"):
        AdapterLibrary.read(tmp_path)


def test_cli_rejects_an_unknown_adapter_in_one_line(model, tmp_path, capsys):
    from ipfacediff.cli import main
    from faceworld import render_clip
    from ipfacediff.video import write_video

    folder, _ = model
    clip = render_clip(1003, seed=1, frames=2, size=96)
    source = write_video(tmp_path / "in.mp4", iter(clip), clip.fps)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "edit",
                str(source),
                "-o",
                str(tmp_path / "out.mp4"),
                "-p",
                "a face",
                "--model",
                str(folder),
                "--adapters",
                "hat",
                "--whole-frame",
            ]
        )
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unknown edit adapter 'hat'; this model offers: eyeglasses, blonde_hair, beard, smile"
    ]
    assert not (tmp_path / "out.mp4").exists()


def test_edit_pairs_are_the_same_render_with_the_edit_made(tmp_path):
    """ε2's before/after pairs: same names, same person, pose and background; only the edit differs."""
    import cv2

    from faceworld.adapters import write_faces

    before = write_faces(tmp_path / "before", 4, seed=3, without="eyeglasses", edited=tmp_path / "after")
    names = sorted(p.name for p in before.glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "after").glob("*.png")) and len(names) == 4
    assert write_faces(tmp_path / "again", 4, seed=3, without="eyeglasses").is_dir()
    for name in names:
        source, edited = (cv2.imread(str(folder / name)).astype(int) for folder in (before, tmp_path / "after"))
        assert np.array_equal(source, cv2.imread(str(tmp_path / "again" / name)))  # pairs change no input
        changed = np.abs(source - edited).max(-1) > 24
        assert 0.01 < changed.mean() < 0.25, name  # the glasses, not the face or the background
        assert not changed[:, :8].any() and not changed[-10:].any()  # the frame's edges and the neck stay


def test_paired_training_uses_the_rendered_truth_and_resumes_only_the_same_way(model, tmp_path):
    import shutil

    folder, _ = model
    copy = tmp_path / "model"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("adapters"))
    with one_thread():
        report = train_adapters(copy, preset="smoke", edits=["smile"], paired=True, log=lambda _m: None)
    assert report["paired"] is True and report["steps"]["smile"]["steps"] > 0
    settings = json.loads((copy / "adapters" / "smile" / "training.json").read_text())["settings"]
    assert settings["paired_targets"].endswith("smile_edited") and settings["lambda_l1"] == 1.0
    unpaired = json.loads((folder / "adapters" / "smile" / "training.json").read_text())["settings"]
    assert "paired_targets" not in unpaired and unpaired["lambda_l1"] == 0.1
    with pytest.raises(UserError, match="trained with --paired"):
        train_adapters(copy, preset="smoke", edits=["smile"], resume=True, log=lambda _m: None)
