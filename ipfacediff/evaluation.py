"""Scoring a face-video edit: is it still the same person, did the edit happen, does it flicker.

:func:`evaluate_videos` compares an edited video with the video it was made from, frame by frame
(both must have the same frame count and size), and returns a JSON-ready dict of metrics;
:func:`write_metrics_json` and :func:`write_html_report` save it.

Faces are found once, in the ORIGINAL video (or taken from ``tracks``), and every face-level
figure cuts the same aligned crop (the original's transform) out of both videos, so the same
region is compared whatever the edit did to it.

Identity (dlib's face net, :class:`ipfacediff.identity.IdentityEncoder`)
    ``id_sim``: mean cosine between the edited and the original crop of each frame; ``id_dist``:
    mean Euclidean descriptor distance on dlib's scale (below 0.6 = same person); ``id_drift``:
    ``id_dist`` over the original clip's own identity spread (the largest distance between two
    of its frames), i.e. how far the edit moved the face compared with how far head pose and
    expression move it anyway. ``tl_id`` / ``tg_id`` (Stitch it in Time; Diffusion Video
    Autoencoders): mean cosine between adjacent frames / between all frame pairs of the EDITED
    video, each divided by the same figure of the ORIGINAL (1.0 = as consistent as the input).

Edit strength (CLIP, only with ``clip`` and a prompt)
    ``clip_direction``: cosine between the change of the crop's CLIP image embedding (edited -
    original, both normalised, averaged over the frames) and the change of the text embedding
    (target - source prompt): StyleGAN-NADA's directional similarity, 0 for an unchanged face;
    ``clip_score``: mean cosine between the edited crop and the target prompt
    (``clip_score_original``: the same for the input, the baseline to compare it with).

Temporal stability
    DIS optical flow on the ORIGINAL frames (t -> t-1, and t-1 -> t for a forward-backward check)
    warps frame t-1 onto frame t; the warp error is the mean absolute RGB difference (0-255) over
    the pixels that land inside the frame and pass the forward-backward check. The same flow and
    mask serve both videos, so ``warp_error_ratio`` = edited warp error / original warp error is
    1.0 for an edit that adds no temporal change beyond the input's own motion. ``flicker`` = mean
    absolute frame-to-frame difference of the edited video minus that of the original (0 = no
    extra change). Both are whole-frame figures at the top level; per face track (and
    ``face_warp_error_ratio`` / ``face_flicker`` at the top level) they are measured inside the
    face region only, where an edit's flicker is not diluted by the untouched background.

Background and detection
    ``background_psnr``: PSNR (dB) between original and edited outside the dilated face masks
    (capped at 100 dB for identical pixels); ``face_detection_rate``: fraction of edited frames
    in which the face detector finds a face (per track: frames where an edited-video face overlaps
    the track's box).

Top-level identity and CLIP figures are the frame-weighted means of the per-track ones.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ipfacediff.errors import UserError
from ipfacediff.face import box_iou
from ipfacediff.files import write_atomic, write_json
from ipfacediff.identity import DLIB_SAME_PERSON_THRESHOLD

if TYPE_CHECKING:
    from ipfacediff.face import FaceTrack, FaceTracks
    from ipfacediff.identity import IdentityEncoder
    from ipfacediff.models import ClipScorer

__all__ = [
    "ID_SAME_PERSON_COSINE",
    "METRIC_KEYS",
    "evaluate_videos",
    "write_html_report",
    "write_metrics_json",
]

Progress = Callable[[str, int, int], None]

# The headline metrics, in the order they appear in the JSON and the report.
METRIC_KEYS = (
    "id_sim", "id_dist", "id_drift", "tl_id", "tg_id", "clip_direction", "clip_score",
    "warp_error_ratio", "flicker", "background_psnr", "face_detection_rate", "seconds",
)  # fmt: skip

# Cosine of identity embeddings matching dlib's 0.6 distance: dlib's descriptors have a norm of
# about 1.45 (1.39 and 1.54 on the two shared clips), and |a - b|^2 = 2 r^2 (1 - cos) gives
# cos = 1 - 0.6^2 / (2 * 1.45^2) = 0.914.
ID_SAME_PERSON_COSINE = 0.915

CROP_SIZE = 256  # side of the aligned crops fed to the identity net and CLIP
MASK_SIZE = 128  # crop side the face masks are drawn at (their precision does not matter)
MASK_DILATE = 0.06  # dilation of the face mask (with hair) in crop sides, for the background
BATCH = 16  # crops per network call
PAIRWISE_MAX_FRAMES = 400  # tg_id and the identity spread use at most this many frames (evenly)
FLOW_MAX_SIDE = 640  # optical flow runs on a copy at most this large
FB_ALPHA, FB_BETA = 0.01, 0.5  # forward-backward consistency test (Sundaram et al. 2010)
RATIO_EPS = 0.01  # grey levels added to both sides of the warp-error ratio (static videos)
PSNR_MAX = 100.0
DETECTION_IOU = 0.3
DEFAULT_SOURCE_PROMPT = "a face"


# --- public API -------------------------------------------------------------------------------


def evaluate_videos(
    original: str | Path,
    edited: str | Path,
    *,
    prompt: str | None = None,
    source_prompt: str | None = None,
    clip: str | None = None,
    tracks: FaceTracks | None = None,
    run_metadata: str | Path | None = None,
    identity: IdentityEncoder | None = None,
    progress: Progress | None = None,
) -> dict:
    """Score ``edited`` against ``original``; see the module docstring for the metrics.

    ``prompt``/``source_prompt`` default to the edit's settings in the run metadata (the source
    then to "a face"); ``clip`` is a CLIPModel folder or hub id, as :func:`ipfacediff.models.load_clip`
    reads it. The run metadata is ``run_metadata`` or else ``<edited stem>.run.json`` next to the
    edited video.
    ``identity`` reuses a loaded encoder. ``progress(stage, done, total)`` follows the work.
    """
    from ipfacediff.face import detect_video_faces
    from ipfacediff.video import probe_video

    started = time.perf_counter()
    seconds: dict[str, Any] = {}
    original, edited = Path(original), Path(edited)
    info = probe_video(original)
    other = probe_video(edited)
    if (other.width, other.height) != (info.width, info.height):
        raise UserError(
            f"{edited.name} is {other.width}x{other.height} but {original.name} is {info.width}x{info.height}: "
            "evaluate an edit against the video it was made from"
        )
    if other.frame_count != info.frame_count:
        raise UserError(
            f"{edited.name} has {other.frame_count} frames but {original.name} has {info.frame_count}: "
            "evaluate an edit against the video it was made from"
        )
    if info.frame_count == 0:
        raise UserError(f"{original.name} has no frames to evaluate")
    meta_path, meta = _read_run_metadata(run_metadata, edited)
    settings = meta.get("settings") if meta and isinstance(meta.get("settings"), dict) else None
    if prompt is None and settings and isinstance(settings.get("prompt"), str) and settings["prompt"].strip():
        prompt = settings["prompt"]
    if source_prompt is None and settings and isinstance(settings.get("source_prompt"), str):
        source_prompt = settings["source_prompt"]
    source_prompt = source_prompt if source_prompt and source_prompt.strip() else DEFAULT_SOURCE_PROMPT

    def stage_progress(stage: str) -> Callable[[int], None] | None:
        return (lambda done: progress(stage, done, info.frame_count)) if progress else None

    tick = time.perf_counter()
    if tracks is None:
        tracks = detect_video_faces(original, progress=stage_progress("faces"))
    elif (tracks.width, tracks.height) != (info.width, info.height):
        raise UserError(
            f"face tracks are for {tracks.width}x{tracks.height} frames but {original.name} is {info.width}x{info.height}"
        )
    seconds["faces"] = time.perf_counter() - tick
    tick = time.perf_counter()
    edited_tracks = detect_video_faces(edited, progress=stage_progress("faces (edited)"))
    seconds["faces_edited"] = time.perf_counter() - tick

    tick = time.perf_counter()
    if identity is None:
        from ipfacediff.identity import IdentityEncoder

        identity = IdentityEncoder.from_pretrained(None)
    clip_scorer = text = None
    if clip and prompt:
        from ipfacediff.models import load_clip

        clip_scorer = load_clip(clip).to(next(identity.parameters()).device)
        text = clip_scorer.text_embeddings([prompt, source_prompt]).cpu()  # (2, D): target, source
    seconds["models"] = time.perf_counter() - tick

    tick = time.perf_counter()
    measured = _measure(original, edited, info.frame_count, tracks, identity, clip_scorer, stage_progress("evaluate"))
    seconds["measure"] = time.perf_counter() - tick

    metrics = _assemble(measured, tracks, edited_tracks, info.frame_count, text)
    metrics["seconds"] = seconds
    seconds["total"] = time.perf_counter() - started
    for key in list(seconds):
        seconds[key] = round(seconds[key], 4)
    seconds["edit_seconds"] = meta.get("seconds") if meta and isinstance(meta.get("seconds"), dict) else None
    metrics.update(
        original=str(original), edited=str(edited), width=info.width, height=info.height, fps=info.fps,
        prompt=prompt, source_prompt=source_prompt if prompt else None, clip_model=clip if clip_scorer else None,
        thresholds={"id_dist": DLIB_SAME_PERSON_THRESHOLD, "id_sim": ID_SAME_PERSON_COSINE},
        run_metadata=str(meta_path) if meta_path else None, settings=settings,
        domain=meta.get("domain") if meta else None,
    )
    return metrics


def write_metrics_json(metrics: dict, path: str | os.PathLike) -> Path:
    """Write ``metrics`` as JSON, atomically; NaN and infinities become null."""
    return write_json(_output_path(path), _jsonable(metrics))


def write_html_report(
    metrics: dict,
    original: str | os.PathLike,
    edited: str | os.PathLike,
    path: str | os.PathLike,
    *,
    settings: dict | None = None,
) -> Path:
    """One self-contained HTML page: animated side-by-side preview, per-frame plots, metrics and
    settings (``settings`` or else the run metadata's). Every image is a ``data:`` URI; the page
    loads nothing from anywhere."""
    settings = settings if settings is not None else metrics.get("settings")
    preview, preview_type = _preview_animation(metrics, Path(original), Path(edited))
    plots = [_identity_plot(metrics), _temporal_plot(metrics)]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>ipfacediff evaluation: {_text(Path(edited).name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Face edit evaluation</h1>",
        _domain_warning(metrics),
        f"<p>original <code>{_text(original)}</code><br>edited <code>{_text(edited)}</code><br>"
        f"{metrics.get('frames', '?')} frames, {metrics.get('width', '?')}x{metrics.get('height', '?')}"
        f"{_verdict(metrics)}</p>",
        "<h2>Preview</h2>",
        f'<img class="preview" alt="original, edited and their difference, animated" '
        f'src="data:{preview_type};base64,{base64.b64encode(preview).decode()}">',
        "<h2>Metrics</h2>",
        _metrics_table(metrics),
    ]
    if metrics.get("tracks"):
        parts += ["<h2>Per face</h2>", _tracks_table(metrics["tracks"])]
    parts += ["<h2>Per frame</h2>"]
    parts += [f'<img class="plot" alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
              for alt, png in plots]
    parts += ["<h2>Settings</h2>", _dict_table(settings) if settings else "<p>no run metadata</p>"]
    parts += ["<h2>Timings (seconds)</h2>", _timings_table(metrics.get("seconds") or {})]
    parts += ["</body></html>", ""]
    return write_atomic(_output_path(path), "\n".join(parts))


# --- measurement ------------------------------------------------------------------------------


@dataclass
class _TrackState:
    """What one face track collects during the pass over both videos."""

    id: int
    frames: list[int] = field(default_factory=list)
    boxes: list[list[int]] = field(default_factory=list)
    pending: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    desc_o: list[torch.Tensor] = field(default_factory=list)
    desc_e: list[torch.Tensor] = field(default_factory=list)
    clip_o: list[torch.Tensor] = field(default_factory=list)
    clip_e: list[torch.Tensor] = field(default_factory=list)
    warp: np.ndarray = field(default_factory=lambda: np.zeros(3))  # edited error, original error, pixels
    diff: np.ndarray = field(default_factory=lambda: np.zeros(3))  # edited, original, pixels


@dataclass
class _Measured:
    states: list[_TrackState]
    warp: np.ndarray  # whole frame: edited error sum, original error sum, valid pixels
    diff: np.ndarray  # whole frame: edited diff sum, original diff sum, pixels
    background: np.ndarray  # squared error sum, sample count
    per_frame: dict[str, list]


def _measure(
    original: Path, edited: Path, count: int, tracks: FaceTracks, identity: IdentityEncoder,
    clip: ClipScorer | None, progress: Callable[[int], None] | None,
) -> _Measured:
    """One streamed pass over both videos: crops and embeddings, flow, warp errors, background."""
    from ipfacediff.face import alignment_transforms, crop_face
    from ipfacediff.video import iter_frames

    transforms = {t.id: alignment_transforms(t, CROP_SIZE) for t in tracks.tracks}
    states = {t.id: _TrackState(t.id) for t in tracks.tracks}
    flow = _Flow()
    warp, diff, background = np.zeros(3), np.zeros(3), np.zeros(2)
    per_frame: dict[str, list] = {k: [] for k in ("warp_error", "warp_error_original", "temporal_diff",
                                                  "temporal_diff_original", "background_psnr")}
    prev: tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, np.ndarray]] | None = None
    with torch.inference_mode():
        for t, (o, e) in enumerate(zip(iter_frames(original), iter_frames(edited))):
            h, w = o.shape[:2]
            masks: dict[int, np.ndarray] = {}
            for track in tracks.in_frame(t):
                M = transforms[track.id][t]
                state = states[track.id]
                i = track.position(t)
                state.frames.append(t)
                state.boxes.append([round(v) for v in track.boxes[i]])
                state.pending.append((crop_face(o, M, CROP_SIZE), crop_face(e, M, CROP_SIZE)))
                if len(state.pending) >= BATCH:
                    _flush(state, identity, clip)
                masks[track.id] = _region_mask(track, t, M, (w, h))
            outside = ~np.logical_or.reduce(list(masks.values())) if masks else np.ones((h, w), bool)
            sq = cv2.absdiff(o, e)[outside].astype(np.float64) ** 2
            background += (sq.sum(), sq.size)
            per_frame["background_psnr"].append(_psnr(sq.sum(), sq.size))
            gray = cv2.cvtColor(o, cv2.COLOR_RGB2GRAY)
            if prev is not None:
                o0, e0, gray0, masks0 = prev
                valid, err_o, err_e = flow.warp_errors(gray0, gray, o0, e0, o, e)
                d_o = _mean_abs(o, o0)
                d_e = _mean_abs(e, e0)
                n = int(valid.sum())
                warp += (err_e[valid].sum(), err_o[valid].sum(), n)
                diff += (d_e.sum(), d_o.sum(), d_o.size)
                per_frame["warp_error"].append(float(err_e[valid].mean()) if n else None)
                per_frame["warp_error_original"].append(float(err_o[valid].mean()) if n else None)
                per_frame["temporal_diff"].append(float(d_e.mean()))
                per_frame["temporal_diff_original"].append(float(d_o.mean()))
                for track_id, region in masks.items():
                    if track_id not in masks0:
                        continue
                    inside = region & valid
                    states[track_id].warp += (err_e[inside].sum(), err_o[inside].sum(), inside.sum())
                    states[track_id].diff += (d_e[region].sum(), d_o[region].sum(), region.sum())
            prev = (o, e, gray, masks)
            if progress is not None:
                progress(t + 1)
        for state in states.values():
            _flush(state, identity, clip)
    return _Measured(list(states.values()), warp, diff, background, per_frame)


def _flush(state: _TrackState, identity: IdentityEncoder, clip: ClipScorer | None) -> None:
    """Run the networks on a track's pending crops (original and edited in one batch)."""
    if not state.pending:
        return
    crops = np.stack([c for pair in state.pending for c in pair])  # o0, e0, o1, e1, ...
    device = next(identity.parameters()).device
    x = torch.from_numpy(crops).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    desc = identity.descriptor(x).float().cpu()
    state.desc_o.append(desc[0::2])
    state.desc_e.append(desc[1::2])
    if clip is not None:
        emb = clip.image_embeddings(x).cpu()
        state.clip_o.append(emb[0::2])
        state.clip_e.append(emb[1::2])
    state.pending.clear()


def _mean_abs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel mean absolute RGB difference, float32 (H, W)."""
    return cv2.absdiff(a, b).astype(np.float32).mean(axis=2)


def _psnr(sq_sum: float, n: int) -> float | None:
    if n == 0:
        return None
    mse = sq_sum / n
    return PSNR_MAX if mse <= 255.0**2 * 10 ** (-PSNR_MAX / 10) else float(10 * math.log10(255.0**2 / mse))


def _region_mask(track: FaceTrack, t: int, M: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W): the face with hair (as ``--hair`` edits it), dilated a little."""
    from ipfacediff.face import face_mask

    Mm = M * (MASK_SIZE / CROP_SIZE)
    mask = (face_mask(track, t, Mm, MASK_SIZE, hair=True) > 0).astype(np.uint8)
    r = max(1, round(MASK_DILATE * MASK_SIZE))
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    full = cv2.warpAffine(mask, Mm, frame_size, flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return full.astype(bool)


class _Flow:
    """DIS optical flow of the original video, used to warp frame t-1 onto frame t."""

    def __init__(self) -> None:
        self.dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        self.grid: tuple[np.ndarray, np.ndarray] | None = None

    def flow(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(H, W, 2) displacement taking each pixel of ``a`` to where it is in ``b``."""
        h, w = a.shape
        scale = min(1.0, FLOW_MAX_SIDE / max(h, w))
        if scale < 1.0:
            size = (max(8, round(w * scale)), max(8, round(h * scale)))
            small = self.dis.calc(cv2.resize(a, size, interpolation=cv2.INTER_AREA),
                                  cv2.resize(b, size, interpolation=cv2.INTER_AREA), None)
            fx = cv2.resize(small[..., 0], (w, h), interpolation=cv2.INTER_LINEAR) * (w / size[0])
            fy = cv2.resize(small[..., 1], (w, h), interpolation=cv2.INTER_LINEAR) * (h / size[1])
            return np.dstack([fx, fy])
        return self.dis.calc(a, b, None)

    def warp_errors(
        self, gray0: np.ndarray, gray1: np.ndarray, o0: np.ndarray, e0: np.ndarray, o1: np.ndarray, e1: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Valid-pixel mask and per-pixel warp errors (original, edited) of frame t-1 -> t."""
        h, w = gray1.shape
        if self.grid is None or self.grid[0].shape != (h, w):
            gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
            self.grid = gx, gy
        backward = self.flow(gray1, gray0)  # pixel of t -> its place in t-1
        forward = self.flow(gray0, gray1)
        map_x = self.grid[0] + backward[..., 0]
        map_y = self.grid[1] + backward[..., 1]
        valid = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
        forward_there = cv2.remap(forward, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        loop = ((backward + forward_there) ** 2).sum(axis=2)
        magnitude = (backward**2).sum(axis=2) + (forward_there**2).sum(axis=2)
        valid &= loop <= FB_ALPHA * magnitude + FB_BETA

        def error(prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
            warped = cv2.remap(prev, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            return _mean_abs(cur, warped)

        return valid, error(o0, o1), error(e0, e1)


# --- assembling the metrics -------------------------------------------------------------------


def _assemble(measured: _Measured, tracks: FaceTracks, edited_tracks: FaceTracks, count: int,
              text: torch.Tensor | None) -> dict:
    """``text``: the (2, D) normalised target and source prompt embeddings, None without CLIP."""
    with_clip = text is not None
    track_metrics = [_track_metrics(s, tracks, edited_tracks, text) for s in measured.states if s.frames]
    weights = [t["frames"] for t in track_metrics]

    def overall(key: str) -> float | None:
        pairs = [(t[key], w) for t, w in zip(track_metrics, weights) if t[key] is not None]
        total = sum(w for _, w in pairs)
        return float(sum(v * w for v, w in pairs) / total) if total else None

    edited_faces = {f for t in edited_tracks.tracks for f in t.frames}
    original_faces = {f for t in tracks.tracks for f in t.frames}
    ratio = _ratio(measured.warp)
    metrics: dict[str, Any] = {
        "id_sim": overall("id_sim"),
        "id_dist": overall("id_dist"),
        "id_drift": overall("id_drift"),
        "tl_id": overall("tl_id"),
        "tg_id": overall("tg_id"),
        "clip_direction": overall("clip_direction") if with_clip else None,
        "clip_score": overall("clip_score") if with_clip else None,
        "warp_error_ratio": ratio,
        "flicker": _flicker(measured.diff),
        "background_psnr": _psnr(*measured.background),
        "face_detection_rate": len(edited_faces) / count,
        "seconds": {},
        "frames": count,
        "tracks": track_metrics,
    }
    id_dist = metrics["id_dist"]
    metrics.update(
        same_person=None if id_dist is None else bool(id_dist < DLIB_SAME_PERSON_THRESHOLD),
        face_warp_error_ratio=overall("warp_error_ratio"),
        face_flicker=overall("flicker"),
        face_detection_rate_original=len(original_faces) / count,
        clip_score_original=overall("clip_score_original") if with_clip else None,
        warp_error=_safe_div(measured.warp[0], measured.warp[2]),
        warp_error_original=_safe_div(measured.warp[1], measured.warp[2]),
        temporal_diff=_safe_div(measured.diff[0], measured.diff[2]),
        temporal_diff_original=_safe_div(measured.diff[1], measured.diff[2]),
    )
    per_frame: dict[str, list] = {"id_sim": [None] * count}
    sums = np.zeros(count)
    hits = np.zeros(count)
    for t in track_metrics:
        for f, v in zip(t["per_frame"]["frames"], t["per_frame"]["id_sim"]):
            sums[f] += v
            hits[f] += 1
    per_frame["id_sim"] = [round(float(s / n), 5) if n else None for s, n in zip(sums, hits)]
    for key, values in measured.per_frame.items():
        per_frame[key] = [None if v is None else round(float(v), 4) for v in values]
    metrics["per_frame"] = per_frame
    return metrics


def _track_metrics(state: _TrackState, tracks: FaceTracks, edited_tracks: FaceTracks, text: torch.Tensor | None) -> dict:
    d_o, d_e = torch.cat(state.desc_o), torch.cat(state.desc_e)
    sim = F.cosine_similarity(d_e, d_o, dim=-1)
    dist = torch.linalg.vector_norm(d_e - d_o, dim=-1)
    n = len(state.frames)
    pick = np.unique(np.linspace(0, n - 1, min(n, PAIRWISE_MAX_FRAMES)).round().astype(int))
    spread = float(torch.cdist(d_o[pick], d_o[pick]).max()) if n > 1 else 0.0
    e_o, e_e = F.normalize(d_o, dim=-1), F.normalize(d_e, dim=-1)
    adjacent = torch.from_numpy(np.diff(state.frames) == 1)
    tl_id = tg_id = None
    if bool(adjacent.any()):
        local_o = (e_o[:-1] * e_o[1:]).sum(-1)[adjacent].mean()
        local_e = (e_e[:-1] * e_e[1:]).sum(-1)[adjacent].mean()
        tl_id = float(local_e / local_o.clamp_min(1e-6))
    if len(pick) > 1:
        upper = torch.triu(torch.ones(len(pick), len(pick), dtype=torch.bool), diagonal=1)
        global_o = (e_o[pick] @ e_o[pick].T)[upper].mean()
        global_e = (e_e[pick] @ e_e[pick].T)[upper].mean()
        tg_id = float(global_e / global_o.clamp_min(1e-6))
    clip_direction = clip_score = clip_score_original = None
    if text is not None and state.clip_o:
        c_o, c_e = torch.cat(state.clip_o), torch.cat(state.clip_e)
        change = (c_e - c_o).mean(0)  # per-frame noise averages out; 0 for an unchanged face
        clip_direction = float(F.cosine_similarity(change, text[0] - text[1], dim=0))
        clip_score = float((c_e @ text[0]).mean())
        clip_score_original = float((c_o @ text[0]).mean())
    track = next(t for t in tracks.tracks if t.id == state.id)
    found = 0
    for f, box in zip(track.frames, track.boxes):
        others = [t.boxes[t.position(f)] for t in edited_tracks.in_frame(f)]
        found += bool(others) and bool((box_iou(box, others) >= DETECTION_IOU).any())
    return {
        "id": state.id,
        "frames": n,
        "id_sim": float(sim.mean()),
        "id_dist": float(dist.mean()),
        "id_drift": float(dist.mean()) / max(spread, 1e-2),
        "tl_id": tl_id,
        "tg_id": tg_id,
        "clip_direction": clip_direction,
        "clip_score": clip_score,
        "clip_score_original": clip_score_original,
        "warp_error_ratio": _ratio(state.warp),
        "flicker": _flicker(state.diff),
        "face_detection_rate": found / len(track.frames) if track.frames else None,
        "identity_spread": spread,
        "per_frame": {
            "frames": list(state.frames),
            "id_sim": [round(float(v), 5) for v in sim],
            "id_dist": [round(float(v), 5) for v in dist],
            "boxes": state.boxes,
        },
    }


def _ratio(sums: np.ndarray) -> float | None:
    """(edited error + eps) / (original error + eps) from [edited sum, original sum, count]."""
    if sums[2] == 0:
        return None
    return float((sums[0] / sums[2] + RATIO_EPS) / (sums[1] / sums[2] + RATIO_EPS))


def _flicker(sums: np.ndarray) -> float | None:
    return float((sums[0] - sums[1]) / sums[2]) if sums[2] else None


def _safe_div(a: float, b: float) -> float | None:
    return float(a / b) if b else None


def _read_run_metadata(run_metadata: str | Path | None, edited: Path) -> tuple[Path | None, dict | None]:
    """The edit's run metadata: the given file (errors are the user's), else the one written
    next to the edited video if there is one (ignored when unreadable)."""
    explicit = run_metadata is not None
    path = Path(run_metadata) if explicit else edited.with_name(edited.stem + ".run.json")
    if not explicit and not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        if not explicit:
            return None, None
        reason = exc.strerror if isinstance(exc, OSError) else f"not valid JSON ({exc})"
        raise UserError(f"cannot read run metadata {path}: {reason}") from None
    if not isinstance(data, dict):
        if not explicit:
            return None, None
        raise UserError(f"run metadata {path} must hold a JSON object")
    return path, data


# --- files ------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


def _output_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output folder {path.parent} does not exist; create it first")
    return path


# --- HTML report ------------------------------------------------------------------------------

PREVIEW_PANEL = 200  # long side of each preview panel, pixels
PREVIEW_MAX_FRAMES = 40
ZOOM_MAX_FACE = 0.3  # a zoomed face row is added when the main face is smaller (of the short side)
DIFF_GAIN = 4  # the difference panel shows |edited - original| times this

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:980px;
color:#222;padding:0 12px}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.92em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
img.preview,img.plot{max-width:100%;display:block;margin:8px 0;image-rendering:auto}
code{font-size:.9em;word-break:break-all}.good{color:#17702a}.bad{color:#a3161b}.muted{color:#777}
"""

_DESCRIPTIONS = {
    "id_sim": "identity cosine, edited vs original crop (1 = same; same person above ~{sim})",
    "id_dist": "identity distance, dlib scale (same person below {dist})",
    "id_drift": "id_dist / the input's own identity spread across frames",
    "tl_id": "adjacent-frame identity consistency, edited / original (1 = as consistent)",
    "tg_id": "all-pairs identity consistency, edited / original (1 = as consistent)",
    "clip_direction": "CLIP: image change vs text change (source → target prompt), cosine",
    "clip_score": "CLIP: edited face vs target prompt, cosine",
    "warp_error_ratio": "flow-warped frame error, edited / original (1 = no added flicker)",
    "flicker": "mean |frame t − t−1|, edited minus original (0–255; 0 = no added change)",
    "background_psnr": "PSNR outside the faces, dB (high = background untouched)",
    "face_detection_rate": "fraction of edited frames with a detected face",
    "face_warp_error_ratio": "warp_error_ratio inside the face regions",
    "face_flicker": "flicker inside the face regions",
    "face_detection_rate_original": "fraction of original frames with a face",
    "clip_score_original": "CLIP: original face vs target prompt, cosine",
}


def _text(value: Any) -> str:
    """HTML-escaped text; "://" is written with entities so no URL appears in the page source."""
    return html.escape(str(value)).replace("://", ":&#47;&#47;")


def _fmt(value: Any) -> str:
    if value is None:
        return '<span class="muted">—</span>'
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return _text(value)


def _domain_warning(metrics: dict) -> str:
    """A banner when the edit ran on faces its model is not made for (``--allow-out-of-domain``)."""
    domain = metrics.get("domain") or {}
    refused = [face for face, verdict in (domain.get("faces") or {}).items() if not verdict.get("passed")]
    if not domain.get("overridden") or not refused:
        return ""
    return (f'<p class="bad"><strong>Out of domain:</strong> the model is made for {_text(domain.get("description"))}; '
            f"face(s) {_text(', '.join(refused))} failed its check and were edited anyway "
            "(--allow-out-of-domain). Expect nonsense; the figures below do not say otherwise.</p>")


def edit_judged(metrics: dict) -> bool:
    """Whether the edit itself was scored (CLIP): without it only identity and flicker were."""
    return isinstance(metrics.get("clip_direction"), float)


def summary_line(metrics: dict) -> str:
    """One line for a terminal: the figures, and what they do not say."""
    keys = ("id_sim", "id_drift", "tl_id", "tg_id", "warp_error_ratio", "flicker", "clip_direction")
    figures = ", ".join(f"{key} {metrics[key]:.3f}" for key in keys if isinstance(metrics.get(key), float))
    if not figures:
        return "no face to score"
    if not edit_judged(metrics):
        figures += " (identity and flicker only: the edit itself was not judged; pass --clip to judge it)"
    return figures


def _verdict(metrics: dict) -> str:
    """The headline's words: identity is about the person, never about whether the edit worked."""
    same = metrics.get("same_person")
    parts = []
    if same is not None:
        parts.append(' — identity: <span class="good">same person</span> (id_dist below the threshold)' if same
                     else ' — identity: <span class="bad">identity lost</span> (id_dist above the threshold)')
    if not edit_judged(metrics):
        parts.append(' — <span class="muted">the edit itself was not judged (no CLIP model: identity and flicker '
                     "only)</span>")
    return "".join(parts)


def _metrics_table(metrics: dict) -> str:
    keys = [k for k in METRIC_KEYS if k != "seconds"] + [
        "face_warp_error_ratio", "face_flicker", "face_detection_rate_original", "clip_score_original"]
    rows = ["<table><tr><th>metric</th><th>value</th><th>meaning</th></tr>"]
    for key in keys:
        if key not in metrics:
            continue
        meaning = _DESCRIPTIONS.get(key, "").format(sim=ID_SAME_PERSON_COSINE, dist=DLIB_SAME_PERSON_THRESHOLD)
        rows.append(f'<tr><td><code>{key}</code></td><td class="num">{_fmt(metrics[key])}</td>'
                    f"<td>{_text(meaning)}</td></tr>")
    if metrics.get("prompt"):
        rows.append(f'<tr><td>prompts</td><td colspan="2">{_text(metrics.get("source_prompt"))} → '
                    f'{_text(metrics["prompt"])}</td></tr>')
    rows.append("</table>")
    return "".join(rows)


def _tracks_table(tracks: list[dict]) -> str:
    keys = ["frames", "id_sim", "id_dist", "id_drift", "tl_id", "tg_id", "clip_direction", "clip_score",
            "warp_error_ratio", "flicker", "face_detection_rate"]
    head = "".join(f"<th>{k}</th>" for k in keys)
    rows = [f"<table><tr><th>face</th>{head}</tr>"]
    for track in tracks:
        cells = "".join(f'<td class="num">{_fmt(track.get(k))}</td>' for k in keys)
        rows.append(f"<tr><td>{_text(track.get('id'))}</td>{cells}</tr>")
    rows.append("</table>")
    return "".join(rows)


def _dict_table(data: dict) -> str:
    rows = ["<table>"]
    for key, value in data.items():
        shown = json.dumps(_jsonable(value)) if isinstance(value, (dict, list, tuple)) else value
        rows.append(f"<tr><th>{_text(key)}</th><td>{_fmt(shown) if not isinstance(shown, str) else _text(shown)}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _timings_table(seconds: dict) -> str:
    plain = {k: v for k, v in seconds.items() if not isinstance(v, dict) and v is not None}
    parts = ["<p>evaluation</p>", _dict_table(plain) if plain else "<p>—</p>"]
    if isinstance(seconds.get("edit_seconds"), dict):
        parts += ["<p>edit</p>", _dict_table(seconds["edit_seconds"])]
    return "".join(parts)


def _main_track(metrics: dict) -> dict | None:
    tracks = [t for t in metrics.get("tracks") or [] if t.get("per_frame", {}).get("boxes")]
    if not tracks:
        return None

    def area(track: dict) -> float:
        boxes = np.asarray(track["per_frame"]["boxes"], dtype=np.float64)
        return float(np.median((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))

    return max(tracks, key=lambda t: (t["frames"], area(t)))


def _preview_animation(metrics: dict, original: Path, edited: Path) -> tuple[bytes, str]:
    """Animated WebP (GIF where Pillow lacks WebP): original | edited | difference, and below
    them the same zoomed on the main face when there is one."""
    from PIL import Image, features

    from ipfacediff.video import iter_frames, probe_video

    info = probe_video(original)
    step = max(1, math.ceil(info.frame_count / PREVIEW_MAX_FRAMES))
    scale = PREVIEW_PANEL / max(info.width, info.height)
    pw, ph = max(2, round(info.width * scale)), max(2, round(info.height * scale))
    track = _main_track(metrics)
    if track and _median_side(track) > ZOOM_MAX_FACE * min(info.width, info.height):
        track = None  # the face already fills the frame: a zoomed row would repeat it
    boxes = dict(zip(track["per_frame"]["frames"], track["per_frame"]["boxes"])) if track else {}
    images = []
    last_box = None
    for t, (o, e) in enumerate(zip(iter_frames(original), iter_frames(edited))):
        last_box = boxes.get(t, last_box)
        if t % step:
            continue
        diff = np.clip(cv2.absdiff(o, e).astype(np.int32) * DIFF_GAIN, 0, 255).astype(np.uint8)
        row = [_panel(cv2.resize(x, (pw, ph), interpolation=cv2.INTER_AREA), label)
               for x, label in ((o, "original"), (e, "edited"), (diff, f"difference x{DIFF_GAIN}"))]
        sheet = [np.concatenate(row, axis=1)]
        if track:
            zoom = [_panel(_zoom(x, last_box, pw, ph), label) for x, label in
                    ((o, "face"), (e, "face, edited"), (diff, "face difference"))]
            sheet.append(np.concatenate(zoom, axis=1))
        images.append(Image.fromarray(np.concatenate(sheet, axis=0)))
    duration = max(20, round(1000 * step / (info.fps or 10)))
    buffer = io.BytesIO()
    if features.check("webp"):
        images[0].save(buffer, format="WEBP", save_all=True, append_images=images[1:], duration=duration,
                       loop=0, quality=55, method=4)
        return buffer.getvalue(), "image/webp"
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0,
                   optimize=False)
    return buffer.getvalue(), "image/gif"


def _median_side(track: dict) -> float:
    boxes = np.asarray(track["per_frame"]["boxes"], dtype=np.float64)
    return float(np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))


def _zoom(image: np.ndarray, box: list[int] | None, pw: int, ph: int) -> np.ndarray:
    """The face region (box enlarged 1.8 times, at the panel's aspect) resized to the panel."""
    if box is None:
        return np.full((ph, pw, 3), 40, np.uint8)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = 1.8 * max(box[2] - box[0], box[3] - box[1], 4)
    s = min(pw, ph) / side
    M = np.array([[s, 0, pw / 2 - s * cx], [0, s, ph / 2 - s * cy]])
    flags = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(image, M, (pw, ph), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=(40, 40, 40))


def _panel(image: np.ndarray, label: str) -> np.ndarray:
    """Label at the bottom left (clips often carry their own caption at the top)."""
    out = np.ascontiguousarray(image)
    y = out.shape[0] - 6
    for colour, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.putText(out, label, (5, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, thickness, cv2.LINE_AA)
    return out


def _figure_png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _identity_plot(metrics: dict) -> tuple[str, bytes]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    tracks = metrics.get("tracks") or []
    for track in tracks:
        ax.plot(track["per_frame"]["frames"], track["per_frame"]["id_sim"], marker=".", label=f"face {track['id']}")
    if tracks:
        ax.axhline(ID_SAME_PERSON_COSINE, color="grey", linestyle="--", linewidth=1,
                   label=f"same-person threshold ({ID_SAME_PERSON_COSINE})")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no face tracks", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("frame")
    ax.set_ylabel("identity cosine")
    ax.set_title("identity similarity, edited vs original", fontsize=10)
    ax.grid(alpha=0.3)
    return "per-frame identity similarity", _figure_png(fig)


def _temporal_plot(metrics: dict) -> tuple[str, bytes]:
    from matplotlib.figure import Figure

    per_frame = metrics.get("per_frame") or {}
    fig = Figure(figsize=(9, 2.8), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    for ax, key, title in ((left, "warp_error", "flow-warp error (frame t−1 → t)"),
                           (right, "temporal_diff", "mean |frame t − frame t−1|")):
        edited = [np.nan if v is None else v for v in per_frame.get(key, [])]
        original = [np.nan if v is None else v for v in per_frame.get(f"{key}_original", [])]
        x = np.arange(1, len(edited) + 1)
        if len(x):
            ax.plot(x, edited, marker=".", label="edited")
            ax.plot(x, original, marker=".", label="original")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "single frame", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("frame t")
        ax.set_ylabel("grey levels (0–255)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    return "per-frame warp error and temporal difference", _figure_png(fig)
