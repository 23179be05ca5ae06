"""The offline demo: a held-out FaceWorld clip, edited with the embedded default models.

``sample_clip`` (a plain cartoon face with a tone) is the small built-in sample of the tests and
the web page; the demo renders the clip a plug-in registers (FaceWorld: a person who was never in
any training set).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from ipfacediff.diffusion import Progress
from ipfacediff.face import CANONICAL_FIVE_POINTS, FaceTrack, FaceTracks
from ipfacediff.video import write_video


def sample_clip(path: Path, *, frames: int = 24, size: int = 256, fps: float = 12.0) -> FaceTracks:
    """Write a cartoon face that drifts, nods and talks, with a tone as audio; return its true tracks."""
    rng = np.random.default_rng(7)
    background = cv2.GaussianBlur(rng.integers(60, 200, (size, size, 3)).astype(np.uint8), (0, 0), 12)
    face_size = size * 0.55
    track = FaceTrack(id=0, frames=[], boxes=[], points=[])
    images = []
    for index in range(frames):
        phase = 2 * math.pi * index / frames
        cx, cy = size / 2 + 0.08 * size * math.sin(phase), size / 2 + 0.04 * size * math.cos(phase)
        image = background.copy()
        x0, y0 = cx - face_size / 2, cy - face_size / 2
        points = CANONICAL_FIVE_POINTS * face_size + [x0, y0]
        centre = (int(cx), int(cy + 0.05 * face_size))
        cv2.ellipse(image, centre, (int(face_size * 0.36), int(face_size * 0.46)), 0, 0, 360, (224, 178, 150), -1)
        cv2.ellipse(
            image,
            (int(cx), int(y0 + 0.22 * face_size)),
            (int(face_size * 0.38), int(face_size * 0.2)),
            0,
            180,
            360,
            (60, 40, 30),
            -1,
        )
        for eye in points[:2]:
            cv2.circle(image, tuple(int(v) for v in eye), int(face_size * 0.045), (255, 255, 255), -1)
            cv2.circle(image, tuple(int(v) for v in eye), int(face_size * 0.022), (50, 80, 120), -1)
        cv2.circle(image, tuple(int(v) for v in points[2]), int(face_size * 0.025), (190, 140, 120), -1)
        mouth_open = int(face_size * (0.02 + 0.03 * abs(math.sin(3 * phase))))
        mouth_centre = tuple(int(v) for v in points[3:].mean(0))
        cv2.ellipse(image, mouth_centre, (int(face_size * 0.1), mouth_open), 0, 0, 360, (150, 60, 60), -1)
        images.append(image)
        track.frames.append(index)
        track.boxes.append([x0, y0, x0 + face_size, y0 + face_size])
        track.points.append(points)
    tone = _tone_clip(path.with_suffix(".tone.mp4"), frames / fps)
    write_video(path, images, fps, audio_from=tone)
    tone.unlink()
    return FaceTracks(frames=frames, width=size, height=size, fps=fps, tracks=[track])


def _tone_clip(path: Path, seconds: float) -> Path:
    """A file holding only a 440 Hz tone, to show that the edit keeps the input's sound."""
    import av

    rate = 44100
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        samples = np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate) + rate // 10) / rate).astype(np.float32) * 0.2
        for start in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def side_by_side(original: Path, edited: Path, output: Path) -> Path:
    """The input and its edit next to each other, for people to compare."""
    from ipfacediff.video import iter_frames, probe_video

    info = probe_video(original)
    pairs = zip(iter_frames(original), iter_frames(edited))
    return write_video(output, (np.concatenate([a, b], axis=1) for a, b in pairs), info.fps, times=info.times)


DEMO_CLIPS = "ipfacediff.demo_clips"  # entry points: frames -> a clip (frames, .fps, .tracks) to edit


def demo_clip(path: Path, *, frames: int = 24) -> FaceTracks:
    """Write the demo's input with a tone as audio and return its true tracks: the clip a plug-in
    registers (FaceWorld's held-out person, whose world the embedded models know), else
    :func:`sample_clip`."""
    from importlib.metadata import entry_points

    registered = sorted(entry_points(group=DEMO_CLIPS), key=lambda e: e.name)
    if not registered:
        return sample_clip(path, frames=frames)
    clip = registered[0].load()(frames=frames)
    tone = _tone_clip(path.with_suffix(".tone.mp4"), frames / clip.fps)
    write_video(path, iter(clip), clip.fps, audio_from=tone)
    tone.unlink()
    return clip.tracks


def run_demo(
    output_dir: Path, *, prompt: str = "a face with eyeglasses", steps: int = 20, progress: Progress | None = None
) -> list[str]:
    """Render the demo clip, edit it with the default models; return lines saying where things are."""
    from ipfacediff.job import edit_video, load_pipeline, run_metadata_path
    from ipfacediff.settings import EditSettings

    output_dir.mkdir(parents=True, exist_ok=True)
    clip = output_dir / "sample.mp4"
    tracks = demo_clip(clip)
    tracks_path = tracks.save(output_dir / "sample.tracks.json")
    edited = output_dir / "edited.mp4"
    pipe = load_pipeline()
    report = edit_video(
        clip,
        edited,
        EditSettings(prompt=prompt, steps=steps),
        pipeline=pipe,
        tracks_path=tracks_path,
        progress=progress,
    )
    preview = side_by_side(clip, edited, output_dir / "side_by_side.mp4")
    from ipfacediff.evaluation import evaluate_videos, write_html_report, write_metrics_json

    metrics = evaluate_videos(clip, edited, tracks=tracks, progress=progress)
    metrics_path = write_metrics_json(metrics, output_dir / "metrics.json")
    report_path = write_html_report(metrics, clip, edited, output_dir / "report.html")
    return [
        f"{report.message} in {report.seconds['total']:.1f} s",
        f"input:        {clip}",
        f"edited:       {edited}",
        f"side by side: {preview}",
        f"run metadata: {run_metadata_path(edited)}",
        f"metrics:      {metrics_path}",
        f"report:       {report_path}",
    ]
