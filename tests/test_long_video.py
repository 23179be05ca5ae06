"""Long clips: windows that share anchor keyframes, the per-chunk inversion cache, its limit."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from ipfacediff.diffusion import CACHE_CHUNK, InversionCache, chunk_bounds
from ipfacediff.diffusion import cache as cache_files
from ipfacediff.editing import ANCHOR_KEYFRAMES, cross_fade, edit_windows
from ipfacediff.errors import UserError
from ipfacediff.settings import EditSettings

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a face with eyeglasses"


def drifting(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth texture drifting a pixel per frame: every frame differs, as in a real clip."""
    import cv2

    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 256, (size + 8, size + count + 8, 3)).astype(np.uint8), (0, 0), 2)
    return np.stack([base[4 : 4 + size, i : i + size] for i in range(count)])


def settings(**overrides) -> EditSettings:
    return EditSettings(prompt=PROMPT, steps=3, **overrides)


def test_windows_are_whole_chunks_that_share_one_chunk():
    chunks = chunk_bounds(list(range(100)))
    assert chunks[:2] == [(0, 16), (16, 32)] and chunks[-1] == (96, 100)
    assert edit_windows(chunks, 100) == [(0, 100)]
    windows = edit_windows(chunks, 48)
    assert windows == [(0, 48), (32, 80), (64, 100)]
    # chunks follow the frames' numbers in the video, not their positions
    assert chunk_bounds([5, 6, 15, 16, 40]) == [(0, 3), (3, 4), (4, 5)]
    import torch

    faded = cross_fade(torch.zeros(3, 1), torch.ones(3, 1))
    assert torch.allclose(faded[:, 0], torch.tensor([0.25, 0.5, 0.75]))


def test_a_clip_within_one_window_is_edited_exactly_as_before(tiny_pipe, tmp_path):
    frames = drifting(40)
    one = tiny_pipe(frames, settings(), cache=InversionCache(tmp_path / "a"))
    wide = tiny_pipe(frames, settings(window=40), cache=InversionCache(tmp_path / "b"))
    assert one.windows == wide.windows == 1
    assert np.array_equal(one.frames, wide.frames)


def test_a_long_clip_is_edited_in_windows_holding_one_window_of_latents(tiny_pipe, tmp_path, monkeypatch):
    frames = drifting(75)
    held, anchored = [], []
    invert, denoise = type(tiny_pipe).invert, type(tiny_pipe).denoise

    def recording(self, *args, **kwargs):
        inverted, source = invert(self, *args, **kwargs)
        held.append(len(inverted.clean))
        return inverted, source

    def recording_anchors(self, inverted, embeds, settings, plan, window, *args, **kwargs):
        anchored.append(window.anchor_rows)
        return denoise(self, inverted, embeds, settings, plan, window, *args, **kwargs)

    monkeypatch.setattr(type(tiny_pipe), "invert", recording)
    monkeypatch.setattr(type(tiny_pipe), "denoise", recording_anchors)
    stages = set()
    cache = InversionCache(tmp_path / "cache")
    result = tiny_pipe(frames, settings(window=32), cache=cache, progress=lambda stage, done, total: stages.add(stage))
    assert result.windows == 4 and result.frames.shape == frames.shape
    # one window and its anchors in memory, never the clip; the inversion holds the window's frames only
    assert held == [32] * 3 + [27]
    assert anchored == [0] + [ANCHOR_KEYFRAMES] * 3
    assert {"windows", "edit window 1/4", "edit window 4/4", "invert window 2/4"} <= stages
    # every frame keyframed somewhere, and the anchors (the first window's) at every step
    assert all(len(step) > 4 for step in result.keyframes_per_step)
    # the overlap chunk is inverted once: the later window reads it back
    assert result.unet_calls["invert"] == 3 * 2 * 5 and result.inversion_reused_share == 0  # 5 chunks, 2 batches each
    again = tiny_pipe(frames, settings(window=32), cache=cache)
    assert again.inversion_reused and again.inversion_reused_share == 1.0
    assert np.array_equal(again.frames, result.frames)


def test_an_overlapping_range_reuses_the_chunks_it_shares(tiny_pipe, tmp_path):
    clip = drifting(64)
    cache = InversionCache(tmp_path / "cache")
    first = tiny_pipe(clip[0:40], settings(), cache=cache, frame_indices=range(0, 40))
    assert first.inversion_reused_share == 0
    # frames 8-55: chunk 16-31 is whole in both, 32-39 of the first is part of 32-47 here
    later = tiny_pipe(clip[8:56], settings(), cache=InversionCache(tmp_path / "cache"), frame_indices=range(8, 56))
    assert later.inversion_reused_share == pytest.approx(16 / 48)
    assert later.unet_calls["invert"] == 3 * (1 + 2 + 1)  # 8, 16 and 8 frames in batches of 8
    # without the frames' numbers the same frames fall into other chunks and nothing is shared
    shifted = tiny_pipe(clip[8:56], settings(), cache=InversionCache(tmp_path / "cache"))
    assert shifted.inversion_reused_share < later.inversion_reused_share


def tensors(kilobytes: int) -> dict:
    import torch

    return {"latents": torch.zeros(kilobytes * 256)}


def test_eviction_keeps_the_cache_under_its_limit_and_spares_the_running_job(tmp_path):
    import os

    old = InversionCache(tmp_path)
    for age, key in enumerate(["a", "b", "c"]):
        old.save(key, "clean", tensors(100))
        os.utime(old.folder(key), (1000 + age, 1000 + age))  # a used first, c last
    assert old.size_bytes() > 300_000
    job = InversionCache(tmp_path, max_bytes=350_000)
    assert job.load("a", "clean") is not None  # the running job uses a: it stays
    job.save("d", "clean", tensors(100))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c", "d"]
    assert job.size_bytes() <= 350_000 and job.size_bytes() == sum(size for *_, size in job.entries())
    # what does not fit even when every other entry is gone is not written
    job.save("e", "clean", tensors(400))
    assert not job.folder("e").exists() and job.size_bytes() <= 350_000


def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path, monkeypatch):
    cache = InversionCache(tmp_path)
    cache.save("a", "clean", tensors(1))

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cache_files, "write_atomic", full)
    with pytest.raises(UserError) as error:
        cache.save("a", "step_0000", tensors(1))
    assert "\n" not in str(error.value) and "full" in str(error.value) and "--cache-max-gb" in str(error.value)
    assert cache.load("a", "clean") is not None


def test_cache_limit_is_an_option_of_edit_invert_and_batch(capsys):
    import typer

    from ipfacediff.cli import app, main

    commands = typer.main.get_command(app).commands
    for name in ("edit", "invert", "batch"):
        assert any("--cache-max-gb" in param.opts for param in commands[name].params), name
    with pytest.raises(SystemExit) as exit_code:
        main(["invert", "missing.mp4", "--cache-max-gb", "0"])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --cache-max-gb")


def test_chunk_size_is_what_the_windows_overlap_by():
    assert EditSettings(prompt="x").window >= 8 * CACHE_CHUNK  # a few hundred frames are one window
    with pytest.raises(UserError):
        EditSettings(prompt="x", window=CACHE_CHUNK)


def test_an_edit_of_an_overlapping_time_range_reuses_the_cache(tiny_pipe, tmp_path):
    from ipfacediff.job import edit_video
    from ipfacediff.video import write_video

    source = write_video(tmp_path / "clip.mp4", iter(drifting(64, size=48)), 16.0)
    cache = InversionCache(tmp_path / "cache")
    common = dict(prompt=PROMPT, steps=2, whole_frame=True, resolution=32, fade=0)
    first = edit_video(
        source,
        tmp_path / "a.mp4",
        EditSettings(start="frame:0", end="frame:40", **common),
        pipeline=tiny_pipe,
        cache=cache,
        log=lambda _m: None,
    )
    assert first.inversion_reused_share == 0 and first.cache_bytes == cache.size_bytes() > 0
    later = edit_video(
        source,
        tmp_path / "b.mp4",
        EditSettings(start="frame:8", end="frame:56", **common),
        pipeline=tiny_pipe,
        cache=InversionCache(tmp_path / "cache"),
        log=lambda _m: None,
    )
    assert later.inversion_reused_share == pytest.approx(16 / 48, abs=1e-4)  # frames 16-31: a whole chunk in both


def test_a_long_track_keeps_its_crops_in_a_file(tmp_path):
    from ipfacediff.job import CropStore

    store = CropStore([3, 4, 5, 7], 8, folder=tmp_path)
    for frame in (3, 4, 5, 7):
        store[frame] = np.full((8, 8, 3), frame, np.uint8)
    assert isinstance(store.array, np.memmap) and list(store) == [3, 4, 5, 7] and 6 not in store
    assert np.shares_memory(store.rows([4, 5, 7]), store.array)  # a range is a view, not a copy
    assert [int(crop[0, 0, 0]) for crop in store.rows([3, 7])] == [3, 7]
    assert not isinstance(CropStore([1], 8).array, np.memmap)


def test_a_windows_stages_share_their_bar_and_start_it_afresh():
    import io

    from rich.console import Console
    from rich.progress import Progress

    from ipfacediff.progress import Stage, progress_bars

    with progress_bars(Console(force_terminal=True, width=100, file=io.StringIO())) as update:
        update("windows", 0, 3)
        update(Stage("edit", 0, 3), 4, 4)
        update(Stage("edit", 1, 3), 1, 4)
        # the rich display, reached through the callback's closure
        bars = next(c.cell_contents for c in update.__closure__ if isinstance(c.cell_contents, Progress))
        assert [t.description for t in bars.tasks] == ["windows", "edit window 2/3"]
        assert bars.tasks[1].completed == 1 and bars.tasks[1].total == 4


def test_a_track_longer_than_a_window_is_edited_from_files(tiny_pipe, tmp_path, monkeypatch):
    from ipfacediff import job
    from ipfacediff.video import read_frames, write_video

    stores = []
    original = job.CropStore.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        stores.append(self)

    monkeypatch.setattr(job.CropStore, "__init__", recording)
    source = write_video(tmp_path / "clip.mp4", iter(drifting(48, size=48)), 16.0)
    settings = EditSettings(prompt=PROMPT, steps=2, whole_frame=True, resolution=32, window=32)
    report = job.edit_video(
        source,
        tmp_path / "out.mp4",
        settings,
        pipeline=tiny_pipe,
        cache=InversionCache(tmp_path / "cache"),
        log=lambda _m: None,
    )
    assert report.faces[0]["frames"] == 48 and len(read_frames(tmp_path / "out.mp4")) == 48
    assert len(stores) == 2 and all(isinstance(store.array, np.memmap) for store in stores)  # source, edited
