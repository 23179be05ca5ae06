"""Video I/O: round trips, variable frame rates, rotation, audio, atomic writes and user errors.

Test clips are made here with PyAV directly (not with write_video), so reading is checked against
files this module did not produce.
"""

from __future__ import annotations

import hashlib
import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from ipfacediff.errors import UserError
from ipfacediff.video import (
    DEFAULT_CRF,
    SourceFrame,
    VideoInfo,
    iter_frames,
    iter_source_frames,
    keep_source_samples,
    probe_video,
    read_frames,
    rotate_upright,
    write_video,
)

W, H = 64, 48


def moving_pattern(count: int, width: int = W, height: int = H) -> list[np.ndarray]:
    """Smooth gradient with a bright square moving right: easy for H.264, distinct per frame."""
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        image = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 80)], axis=-1)
        image[10:22, 4 + 3 * i : 16 + 3 * i] = [250, 250, 40]
        frames.append(image.astype(np.uint8))
    return frames


def gray(level: int) -> np.ndarray:
    return np.full((H, W, 3), level, dtype=np.uint8)


def make_clip(
    path: Path,
    images: list[np.ndarray],
    *,
    rate: int = 10,
    times_ms: list[int] | None = None,
    ccw_rotation: int | None = None,
    audio_codec: str | None = None,
    audio_seconds: float = 2.0,
    options: dict[str, str] | None = None,
) -> Path:
    """Write ``images`` with libx264; ``times_ms`` gives explicit (e.g. irregular) timestamps."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=rate, options=options or {})
        video.height, video.width = images[0].shape[:2]
        video.pix_fmt = "yuv420p"
        if times_ms is not None:
            video.codec_context.time_base = Fraction(1, 1000)
        if ccw_rotation is not None:
            video.set_display_rotation(ccw_rotation)
        if audio_codec is not None:
            sample_rate = 48_000
            audio = out.add_stream(audio_codec, rate=sample_rate, layout="stereo")
            t = np.arange(int(sample_rate * audio_seconds)) / sample_rate
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            stereo = np.stack([tone, tone])
            frame = av.AudioFrame.from_ndarray(stereo, format="fltp", layout="stereo")
            frame.sample_rate = sample_rate
            frame.pts = 0
            out.mux(audio.encode(frame))
            out.mux(audio.encode())
        for i, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if times_ms is not None:
                frame.pts = times_ms[i]
                frame.time_base = Fraction(1, 1000)
            out.mux(video.encode(frame))
        out.mux(video.encode())
    return path


def stream_seconds(path: Path) -> dict[str, float]:
    with av.open(str(path)) as container:
        return {s.type: float(s.duration * s.time_base) for s in container.streams}


def source_indices(frames: np.ndarray, step: int = 20) -> list[int]:
    """Which gray level ``i * step`` each (uniform gray) decoded frame shows."""
    return [round(float(frame.mean()) / step) for frame in frames]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- round trips --------------------------------------------------------------------------------


def test_round_trip_keeps_count_fps_size_and_pixels(tmp_path):
    source = moving_pattern(12)
    out = write_video(tmp_path / "out.mp4", iter(source), 10)

    assert out == tmp_path / "out.mp4"
    info = probe_video(out)
    expected = VideoInfo(
        path=out,
        width=W,
        height=H,
        fps=10.0,
        frame_count=12,
        duration=1.2,
        rotation=0,
        has_audio=False,
        times=info.times,
    )
    assert info == expected
    assert info.times.seconds() == pytest.approx([i / 10 for i in range(12)], abs=1e-9)
    before = sha256(out)
    frames = read_frames(out)
    assert sha256(out) == before  # reading never touches the file
    assert frames.shape == (12, H, W, 3) and frames.dtype == np.uint8
    errors = np.abs(frames.astype(int) - np.stack(source)).mean(axis=(1, 2, 3))
    assert errors.max() < 4, errors
    # Frames are in order: each decoded frame is nearest to its own source frame.
    for i, frame in enumerate(frames):
        distances = [np.abs(frame.astype(int) - s).mean() for s in source]
        assert int(np.argmin(distances)) == i
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_saturated_colours_survive_a_round_trip(tmp_path):
    image = np.zeros((H, W, 3), np.uint8)
    image[:16, :, 0] = image[16:32, :, 1] = image[32:, :, 2] = 255
    out = write_video(tmp_path / "colours.mp4", [image] * 3, 10)
    frame = read_frames(out)[1].astype(int)
    # Away from the band edges, where 4:2:0 chroma blurs: a wrong BT.601/709 matrix is off by ~20.
    bands = {(3, 13): [255, 0, 0], (19, 29): [0, 255, 0], (35, 45): [0, 0, 255]}
    for (top, bottom), colour in bands.items():
        assert np.abs(frame[top:bottom] - colour).max() <= 6


def test_fractional_fps_is_kept_exactly(tmp_path):
    out = write_video(tmp_path / "ntsc.mp4", moving_pattern(9), 30000 / 1001)
    info = probe_video(out)
    assert info.fps == pytest.approx(30000 / 1001, abs=1e-9)
    assert info.frame_count == 9


def test_write_streams_the_generator(tmp_path):
    """Frames are encoded as they arrive: the temp file is being written before the last frame.

    x264 holds about 40 frames of lookahead before its first packet, hence 60 frames.
    """
    seen_temp = []

    def frames():
        for i in range(60):
            if i == 59:
                seen_temp.extend(tmp_path.glob(".out.mp4.tmp-*.mp4"))
            yield gray(i * 4)

    out = write_video(tmp_path / "out.mp4", frames(), 10)
    assert len(seen_temp) == 1
    assert not seen_temp[0].exists()
    assert probe_video(out).frame_count == 60


def test_real_clip(shared_clip):
    clip = shared_clip("closeup.mp4")
    before = sha256(clip)
    info = probe_video(clip)
    assert (info.frame_count, info.fps, info.width, info.height) == (40, 10.0, 512, 512)
    assert info.duration == pytest.approx(4.0)
    frames = read_frames(clip)
    assert frames.shape == (40, 512, 512, 3)
    np.testing.assert_array_equal(read_frames(clip, start=17, count=5), frames[17:22])
    assert sha256(clip) == before


def test_start_and_count_match_a_full_read(tmp_path):
    # Short GOPs with B-frames make the seek land on different keyframes.
    options = {"g": "5", "keyint_min": "5", "bf": "2", "sc_threshold": "0"}
    clip = make_clip(tmp_path / "gop.mp4", [gray(8 * i) for i in range(30)], options=options)
    full = read_frames(clip)
    assert source_indices(full, step=8) == list(range(30))
    for start in (0, 1, 4, 5, 6, 13, 27, 29):
        chunk = read_frames(clip, start=start, count=3)
        np.testing.assert_array_equal(chunk, full[start : start + 3])
    assert read_frames(clip, start=31).shape == (0, H, W, 3)
    assert len(list(iter_frames(clip, start=25))) == 5
    with pytest.raises(ValueError):
        iter_frames(clip, start=-1)


# --- variable frame rate ------------------------------------------------------------------------

# Uneven like a phone's: 50 ms gaps, a 250 ms hold, a 200 ms hold.
VFR_TIMES_MS = [0, 100, 150, 400, 450, 500, 700, 800, 850, 900]
# Short GOPs with B-frames: frames are stored out of order and seeks land on several keyframes.
GOP_OPTIONS = {"g": "3", "keyint_min": "3", "bf": "2", "sc_threshold": "0"}


def vfr_clip(path: Path, **options) -> Path:
    """Frame ``i`` is uniform gray ``20 * i``, shown at ``VFR_TIMES_MS[i]``."""
    images = [gray(20 * i) for i in range(len(VFR_TIMES_MS))]
    return make_clip(path, images, times_ms=VFR_TIMES_MS, **options)


def shown_times(path: Path) -> list[float]:
    """Each frame's presentation time in seconds, as a player reads them (not via our reader)."""
    with av.open(str(path)) as container:
        return [float(frame.time) for frame in container.decode(video=0)]


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
@pytest.mark.parametrize("options", [None, GOP_OPTIONS], ids=["plain", "b-frames"])
def test_every_frame_of_a_variable_frame_rate_clip_comes_out_once_at_its_own_time(tmp_path, suffix, options):
    clip = vfr_clip(tmp_path / f"vfr{suffix}", options=options)
    info = probe_video(clip)
    assert info.frame_count == len(VFR_TIMES_MS)
    assert info.times.seconds() == pytest.approx([t / 1000 for t in VFR_TIMES_MS], abs=1e-9)
    assert info.duration == pytest.approx(1.0, abs=1e-9)  # the last frame lasts 100 ms
    assert source_indices(read_frames(clip)) == list(range(len(VFR_TIMES_MS)))


def test_a_variable_frame_rate_clip_is_read_in_chunks_like_a_full_read(tmp_path):
    clip = vfr_clip(tmp_path / "vfr.mp4", options=GOP_OPTIONS)
    full = read_frames(clip)
    for start in range(len(VFR_TIMES_MS)):
        np.testing.assert_array_equal(read_frames(clip, start=start, count=2), full[start : start + 2])


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_a_variable_frame_rate_clip_is_written_back_with_its_own_timestamps(tmp_path, suffix):
    clip = vfr_clip(tmp_path / f"vfr{suffix}", audio_codec="aac", audio_seconds=2.0)
    info = probe_video(clip)
    out = write_video(tmp_path / "out.mp4", iter_frames(clip), info.fps, times=info.times, audio_from=clip)
    assert shown_times(out) == pytest.approx([t / 1000 for t in VFR_TIMES_MS], abs=1e-6)
    assert source_indices(read_frames(out)) == list(range(len(VFR_TIMES_MS)))
    back = probe_video(out)
    assert back.duration == pytest.approx(info.duration, abs=1e-6)
    # The audio is cut where the last frame ends, not where frame_count / fps would put it.
    assert stream_seconds(out)["audio"] == pytest.approx(back.duration, abs=0.03)


def test_more_frames_than_timestamps_is_refused_and_leaves_nothing(tmp_path):
    times = probe_video(vfr_clip(tmp_path / "vfr.mkv")).times
    with pytest.raises(ValueError, match="more frames than"):
        write_video(tmp_path / "out.mp4", [gray(0)] * (len(times.pts) + 1), 10, times=times)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vfr.mkv"]


def test_millisecond_rounded_constant_rate_keeps_every_frame(tmp_path):
    """30 fps stored in ms (0, 33, 67, 100, ...): rounding must not duplicate or drop frames."""
    times = [round(i * 1000 / 30) for i in range(24)]
    images = [gray(10 * i) for i in range(24)]
    clip = make_clip(tmp_path / "ms.mkv", images, rate=30, times_ms=times)
    info = probe_video(clip)
    assert (info.fps, info.frame_count) == (30.0, 24)
    assert source_indices(read_frames(clip), step=10) == list(range(24))


# --- rotation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("ccw", "clockwise"), [(90, 270), (-90, 90), (180, 180)])
def test_rotation_metadata_is_applied(tmp_path, ccw, clockwise):
    """PyAV writes display matrices counter-clockwise; players (and we) turn frames upright."""
    image = moving_pattern(1)[0]
    clip = make_clip(tmp_path / "rotated.mp4", [image] * 3, ccw_rotation=ccw)
    info = probe_video(clip)
    assert info.rotation == clockwise
    upright = rotate_upright(image, clockwise)
    assert (info.height, info.width) == upright.shape[:2]
    frames = read_frames(clip)
    assert frames.shape == (3, *upright.shape)
    assert np.abs(frames[0].astype(int) - upright).mean() < 4


def test_rotate_upright_turns_clockwise_and_is_contiguous():
    image = np.arange(6).reshape(2, 3)
    assert rotate_upright(image, 90).tolist() == [[3, 0], [4, 1], [5, 2]]
    assert rotate_upright(image, 270).tolist() == [[2, 5], [1, 4], [0, 3]]
    assert rotate_upright(image, 180).tolist() == [[5, 4, 3], [2, 1, 0]]
    assert rotate_upright(image, 90).flags.c_contiguous
    with pytest.raises(ValueError):
        rotate_upright(image, 45)


# --- audio --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("container", "codec", "muxed_as"),
    [
        ("mp4", "aac", "aac"),  # copied
        ("mkv", "mp3", "mp3"),  # copied
        ("mkv", "libopus", "opus"),  # copied
        ("mkv", "pcm_s16le", "aac"),  # mp4 cannot hold PCM: re-encoded
    ],
)
def test_audio_is_muxed_and_trimmed_to_the_video(tmp_path, container, codec, muxed_as):
    source = make_clip(tmp_path / f"talk.{container}", moving_pattern(15), audio_codec=codec)
    assert probe_video(source).has_audio
    out = write_video(tmp_path / "out.mp4", moving_pattern(12), 10, audio_from=source)

    info = probe_video(out)
    assert info.has_audio and info.frame_count == 12
    seconds = stream_seconds(out)
    assert seconds["video"] == pytest.approx(1.2)
    assert abs(seconds["audio"] - seconds["video"]) < 1 / 10  # the source tone lasts 2 s
    with av.open(str(out)) as result:
        assert result.streams.audio[0].codec_context.codec.canonical_name == muxed_as
        samples = np.concatenate([f.to_ndarray()[0] for f in result.decode(audio=0)])
    assert np.sqrt(np.mean(samples.astype(float) ** 2)) > 0.1  # the tone, not silence


def test_no_audio_in_source_means_no_audio_stream(tmp_path):
    silent = make_clip(tmp_path / "silent.mp4", moving_pattern(5))
    out = write_video(tmp_path / "out.mp4", moving_pattern(5), 10, audio_from=silent)
    assert not probe_video(out).has_audio
    assert set(stream_seconds(out)) == {"video"}


# --- odd sizes, atomic writes, bad frames ----------------------------------------------------


def test_odd_size_is_padded_by_repeating_the_edge(tmp_path):
    source = moving_pattern(4, width=65, height=49)
    out = write_video(tmp_path / "odd.mp4", source, 10)
    info = probe_video(out)
    assert (info.width, info.height) == (66, 50)
    frames = read_frames(out).astype(int)
    assert np.abs(frames[:, :49, :65] - np.stack(source)).mean() < 4
    # The padding repeats the last real column/row.
    assert np.abs(frames[:, :, 65] - frames[:, :, 64]).mean() < 4
    assert np.abs(frames[:, 49] - frames[:, 48]).mean() < 4


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    temp_files = []

    def broken():
        # Past x264's lookahead, so the temp file has really been written to when we crash.
        for i in range(60):
            yield gray(i * 4)
        temp_files.extend(tmp_path.glob(".*.tmp-*.mp4"))
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        write_video(tmp_path / "new.mp4", broken(), 10)
    assert len(temp_files) == 1
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old.mp4"
    old.write_bytes(b"previous result")
    with pytest.raises(RuntimeError):
        write_video(old, broken(), 10)
    assert old.read_bytes() == b"previous result"
    assert list(tmp_path.iterdir()) == [old]


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [np.zeros((H, W, 3), np.float32)],
        [np.zeros((H, W), np.uint8)],
        [np.zeros((H, W, 4), np.uint8)],
        [gray(0), gray(0), np.zeros((H + 2, W, 3), np.uint8)],
    ],
    ids=["empty", "float", "grey", "rgba", "size-change"],
)
def test_bad_frames_raise_value_error_and_leave_nothing(tmp_path, frames):
    with pytest.raises(ValueError):
        write_video(tmp_path / "out.mp4", iter(frames), 10)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fps", [0, -5, float("nan"), float("inf")])
def test_bad_fps_raises_value_error(tmp_path, fps):
    with pytest.raises(ValueError):
        write_video(tmp_path / "out.mp4", moving_pattern(2), fps)


def test_output_folder_problems_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        write_video(tmp_path / "missing" / "out.mp4", moving_pattern(2), 10)
    with pytest.raises(UserError, match="is a folder"):
        write_video(tmp_path, moving_pattern(2), 10)
    # chmod does not stop root (CI containers), so fake the permission check.
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(UserError, match="not writable"):
        write_video(tmp_path / "out.mp4", moving_pattern(2), 10)


# --- unreadable inputs ----------------------------------------------------------------------------


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    text = tmp_path / "input.txt"
    text.write_text("hello, this is not a video\n" * 20)
    empty = tmp_path / "empty.mp4"
    empty.touch()
    truncated = tmp_path / "truncated.mp4"
    make_clip(tmp_path / "whole.mp4", moving_pattern(5))
    truncated.write_bytes((tmp_path / "whole.mp4").read_bytes()[:300])
    audio_only = tmp_path / "tone.m4a"
    with av.open(str(audio_only), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16_000, layout="mono")
        silence = np.zeros((1, 4096), np.float32)
        frame = av.AudioFrame.from_ndarray(silence, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16_000, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return {
        "missing": (tmp_path / "input.mp4", "input.mp4 does not exist"),
        "text": (text, "input.txt is not a video ffmpeg can read"),
        "empty": (empty, "empty.mp4 is empty"),
        "truncated": (truncated, "truncated.mp4 is not a video ffmpeg can read"),
        "folder": (tmp_path, "is a folder"),
        "audio-only": (audio_only, "tone.m4a has no video stream"),
    }


@pytest.mark.parametrize("kind", ["missing", "text", "empty", "truncated", "folder", "audio-only"])
def test_unreadable_inputs_are_one_line_user_errors(tmp_path, kind):
    path, message = _bad_inputs(tmp_path)[kind]
    before = sha256(path) if path.is_file() else None
    for read in (probe_video, iter_frames, read_frames):  # iter_frames fails at the call
        with pytest.raises(UserError) as caught:
            read(path)
        assert message in str(caught.value)
        assert "\n" not in str(caught.value)
    if before is not None:
        assert sha256(path) == before


@pytest.mark.parametrize("kind", ["missing", "text", "empty", "folder"])
def test_unreadable_audio_source_is_a_user_error(tmp_path, kind):
    path, message = _bad_inputs(tmp_path)[kind]
    out = tmp_path / "out.mp4"
    with pytest.raises(UserError, match=message):
        write_video(out, moving_pattern(2), 10, audio_from=path)
    assert not out.exists()


# --- pass-through of unedited frames --------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def textured(count: int) -> list[np.ndarray]:
    """Saturated 16-pixel checks drifting right: sharp colour edges, which an RGB round trip
    (chroma re-subsampled, colours rounded twice) blurs, but which H.264 keeps well."""
    y, x = np.mgrid[0:H, 0:W]
    palette = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 230], [230, 220, 50]], np.uint8)
    return [palette[((x + 2 * i) // 16 + 2 * (y // 16)) % 4] for i in range(count)]


def colour_tags(path: Path) -> tuple[int, int, int, int]:
    with av.open(str(path)) as container:
        context = container.streams.video[0].codec_context
        return (context.colorspace, context.color_range, context.color_primaries, context.color_trc)


def test_pass_through_frames_read_back_as_the_input(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", textured(8))
    pairs = list(iter_source_frames(clip))
    assert len(pairs) == 8 and all(isinstance(s, SourceFrame) for _, s in pairs)
    np.testing.assert_array_equal(np.stack([rgb for rgb, _ in pairs]), read_frames(clip))

    through = write_video(tmp_path / "through.mp4", (s for _, s in pairs), 10, colour_from=clip)
    via_rgb = write_video(tmp_path / "rgb.mp4", (rgb for rgb, _ in pairs), 10, colour_from=clip)
    source = read_frames(clip)
    through_db = [psnr(a, b) for a, b in zip(source, read_frames(through))]
    rgb_db = [psnr(a, b) for a, b in zip(source, read_frames(via_rgb))]
    assert min(through_db) >= 45, through_db
    # The RGB round trip this avoids loses colour detail: the clip tells the two apart.
    assert max(rgb_db) < 45, rgb_db


def test_an_edited_frame_keeps_the_decoded_samples_where_it_is_unchanged(tmp_path):
    """The paste-back changes part of a frame: the rest keeps the input's own samples (luma per
    pixel, chroma per whole 2x2 block), where an RGB round trip would move its colour edges."""
    clip = make_clip(tmp_path / "in.mp4", textured(4))
    for rgb, source in iter_source_frames(clip):
        edited = rgb.copy()
        edited[:, :21] = 255 - edited[:, :21]  # columns 0-20: chroma blocks 0-9 changed, block 10 mixed
        kept = keep_source_samples(edited, rgb, source)
        luma, chroma = (slice(0, H), slice(None)), H * W
        np.testing.assert_array_equal(kept.yuv[luma][:, 21:], source.yuv[luma][:, 21:])
        planes = [p.reshape(H // 2, W // 2) for p in np.split(kept.yuv.reshape(-1)[chroma:], 2)]
        originals = [p.reshape(H // 2, W // 2) for p in np.split(source.yuv.reshape(-1)[chroma:], 2)]
        for plane, original in zip(planes, originals):
            np.testing.assert_array_equal(plane[:, 11:], original[:, 11:])
            assert not np.array_equal(plane[:, :10], original[:, :10])
        assert not np.array_equal(kept.yuv[luma][:, :21], source.yuv[luma][:, :21])
        np.testing.assert_array_equal(keep_source_samples(rgb, rgb, source).yuv, source.yuv)


def test_real_clip_passes_through_at_45_db(shared_clip, tmp_path):
    clip = shared_clip("closeup.mp4")
    out = write_video(tmp_path / "out.mp4", (s for _, s in iter_source_frames(clip)), 10, audio_from=clip)
    scores = [psnr(a, b) for a, b in zip(read_frames(clip), read_frames(out))]
    assert len(scores) == 40 and min(scores) >= 45, (DEFAULT_CRF, min(scores))
    assert colour_tags(out) == colour_tags(clip)


def test_untagged_input_stays_untagged_and_edited_frames_keep_their_colours(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", textured(6))
    assert colour_tags(clip) == (2, 0, 2, 2)  # unspecified: read as BT.601 limited range
    # Smooth colours (no chroma edges to blur); converted with BT.709 they would read back at 31 dB.
    y, x = np.mgrid[0:H, 0:W]
    edited = np.stack([40 + x * 180 // W, 220 - y * 160 // H, np.full_like(x, 200)], axis=-1)
    edited = edited.astype(np.uint8)

    def frames():
        for index, (_, source) in enumerate(iter_source_frames(clip)):
            yield edited if index == 3 else source

    out = write_video(tmp_path / "out.mp4", frames(), 10, audio_from=clip)
    assert colour_tags(out) == (2, 0, 2, 2)
    back, source = read_frames(out), read_frames(clip)
    assert psnr(back[3], edited) >= 38
    assert min(psnr(back[i], source[i]) for i in (0, 1, 2, 4, 5)) >= 45


def test_without_a_source_output_is_bt709_and_source_frames_are_converted(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", textured(4))
    sources = [s for _, s in iter_source_frames(clip)]
    out = write_video(tmp_path / "out.mp4", sources, 10)
    assert colour_tags(out) == (1, 1, 1, 1)
    # Converted through RGB as the reader decodes them: the same as writing the RGB frames.
    rgb = write_video(tmp_path / "rgb.mp4", read_frames(clip), 10)
    np.testing.assert_array_equal(read_frames(out), read_frames(rgb))


def test_rotated_input_never_passes_through(tmp_path):
    image = moving_pattern(1)[0]
    clip = make_clip(tmp_path / "rotated.mp4", [image] * 3, ccw_rotation=90)
    pairs = list(iter_source_frames(clip))
    assert [s for _, s in pairs] == [None, None, None]
    np.testing.assert_array_equal(np.stack([rgb for rgb, _ in pairs]), read_frames(clip))
    assert pairs[0][0].shape == (W, H, 3)


def test_a_source_frame_of_another_size_is_refused(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", textured(2))
    source = next(iter_source_frames(clip))[1]
    with pytest.raises(ValueError, match="size"):
        write_video(tmp_path / "out.mp4", [np.zeros((H + 2, W, 3), np.uint8), source], 10)
    assert not (tmp_path / "out.mp4").exists()
