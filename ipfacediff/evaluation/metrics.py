"""Scoring a face-video edit: is it still the same person, did the edit happen, does it flicker.

:func:`evaluate_videos` compares an edited video with the video it was made from, frame by frame
(both must have the same frame count and size), and returns a JSON-ready dict of metrics;
:func:`write_metrics_json` and :func:`~ipfacediff.evaluation.report.write_html_report` save it.

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
from ipfacediff.files import write_json
from ipfacediff.identity import DLIB_SAME_PERSON_THRESHOLD

if TYPE_CHECKING:
    from ipfacediff.face import FaceTrack, FaceTracks
    from ipfacediff.identity import IdentityEncoder
    from ipfacediff.models import ClipScorer
    from ipfacediff.video import VideoInfo

__all__ = [
    "ID_SAME_PERSON_COSINE",
    "CropScorer",
    "METRIC_KEYS",
    "SUMMARY_KEYS",
    "TRACK_KEYS",
    "evaluate_videos",
    "write_metrics_json",
]

Progress = Callable[[str, int, int], None]

# The headline metrics, in the order they appear in the JSON and the report.
METRIC_KEYS = (
    "id_sim",
    "id_dist",
    "id_drift",
    "tl_id",
    "tg_id",
    "clip_direction",
    "clip_score",
    "warp_error_ratio",
    "flicker",
    "background_psnr",
    "face_detection_rate",
    "seconds",
)
# Read from METRIC_KEYS, so a new metric is added once: a batch's mean figures (no timing, and
# id_sim rather than its distance twin), and the columns of the report's per-face table.
SUMMARY_KEYS = tuple(k for k in METRIC_KEYS if k not in ("id_dist", "seconds"))
TRACK_KEYS = tuple(k for k in METRIC_KEYS if k not in ("background_psnr", "seconds"))

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
    started = time.perf_counter()
    seconds: dict[str, Any] = {}
    original, edited = Path(original), Path(edited)
    info = _comparable_videos(original, edited)
    meta_path, meta = _read_run_metadata(run_metadata, edited)
    settings = meta.get("settings") if meta and isinstance(meta.get("settings"), dict) else None
    prompt, source_prompt = _edit_prompts(settings, prompt, source_prompt)

    def stage_progress(stage: str) -> Callable[[int], None] | None:
        return (lambda done: progress(stage, done, info.frame_count)) if progress else None

    tracks, edited_tracks = _find_faces(original, edited, info, tracks, stage_progress, seconds)

    tick = time.perf_counter()
    identity, clip_scorer, text = _load_scorers(identity, clip, prompt, source_prompt)
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
        _inputs_record(
            original, edited, info, prompt, source_prompt, clip if clip_scorer else None, meta_path, settings, meta
        )
    )
    return metrics


def write_metrics_json(metrics: dict, path: str | os.PathLike) -> Path:
    """Write ``metrics`` as JSON, atomically; NaN and infinities become null."""
    return write_json(_output_path(path), _jsonable(metrics))


# --- inputs -----------------------------------------------------------------------------------


def _comparable_videos(original: Path, edited: Path) -> VideoInfo:
    """The original's info, once both videos are known to be frame for frame comparable: every
    figure pairs frame t of one with frame t of the other."""
    from ipfacediff.video import probe_video

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
    return info


def _edit_prompts(settings: dict | None, prompt: str | None, source_prompt: str | None) -> tuple[str | None, str]:
    """The prompts the edit was made with unless given: the CLIP figures score what was asked for."""
    if prompt is None and settings and isinstance(settings.get("prompt"), str) and settings["prompt"].strip():
        prompt = settings["prompt"]
    if source_prompt is None and settings and isinstance(settings.get("source_prompt"), str):
        source_prompt = settings["source_prompt"]
    source_prompt = source_prompt if source_prompt and source_prompt.strip() else DEFAULT_SOURCE_PROMPT
    return prompt, source_prompt


def _find_faces(
    original: Path,
    edited: Path,
    info: VideoInfo,
    tracks: FaceTracks | None,
    stage_progress: Callable[[str], Callable[[int], None] | None],
    seconds: dict[str, Any],
) -> tuple[FaceTracks, FaceTracks]:
    """The original's face tracks (found, or the given ones checked) and the edited video's, which
    only the detection rate reads; each search's time goes into ``seconds``."""
    from ipfacediff.face import detect_video_faces

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
    return tracks, edited_tracks


def _load_scorers(
    identity: IdentityEncoder | None, clip: str | None, prompt: str | None, source_prompt: str
) -> tuple[IdentityEncoder, ClipScorer | None, torch.Tensor | None]:
    """The identity net (the given one is reused), and CLIP with the prompts' text embeddings
    (target, source) only when there is a prompt to score: without one CLIP is never loaded."""
    if identity is None:
        from ipfacediff.identity import IdentityEncoder

        identity = IdentityEncoder.from_pretrained(None)
    clip_scorer = text = None
    if clip and prompt:
        from ipfacediff.models import load_clip

        clip_scorer = load_clip(clip).to(next(identity.parameters()).device)
        text = clip_scorer.text_embeddings([prompt, source_prompt]).cpu()  # (2, D): target, source
    return identity, clip_scorer, text


def _inputs_record(
    original: Path,
    edited: Path,
    info: VideoInfo,
    prompt: str | None,
    source_prompt: str,
    clip_model: str | None,
    meta_path: Path | None,
    settings: dict | None,
    meta: dict | None,
) -> dict:
    """What the figures were measured on and against, so a metrics file explains itself."""
    return dict(
        original=str(original),
        edited=str(edited),
        width=info.width,
        height=info.height,
        fps=info.fps,
        prompt=prompt,
        source_prompt=source_prompt if prompt else None,
        clip_model=clip_model,
        thresholds={"id_dist": DLIB_SAME_PERSON_THRESHOLD, "id_sim": ID_SAME_PERSON_COSINE},
        run_metadata=str(meta_path) if meta_path else None,
        settings=settings,
        domain=meta.get("domain") if meta else None,
    )


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
    original: Path,
    edited: Path,
    count: int,
    tracks: FaceTracks,
    identity: IdentityEncoder,
    clip: ClipScorer | None,
    progress: Callable[[int], None] | None,
) -> _Measured:
    """One streamed pass over both videos: crops and embeddings, flow, warp errors, background."""
    from ipfacediff.face import alignment_transforms, crop_face
    from ipfacediff.video import iter_frames

    transforms = {t.id: alignment_transforms(t, CROP_SIZE) for t in tracks.tracks}
    states = {t.id: _TrackState(t.id) for t in tracks.tracks}
    flow = _Flow()
    warp, diff, background = np.zeros(3), np.zeros(3), np.zeros(2)
    per_frame: dict[str, list] = {
        k: []
        for k in ("warp_error", "warp_error_original", "temporal_diff", "temporal_diff_original", "background_psnr")
    }
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
    full = cv2.warpAffine(
        mask,
        Mm,
        frame_size,
        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
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
            small = self.dis.calc(
                cv2.resize(a, size, interpolation=cv2.INTER_AREA),
                cv2.resize(b, size, interpolation=cv2.INTER_AREA),
                None,
            )
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


def _assemble(
    measured: _Measured, tracks: FaceTracks, edited_tracks: FaceTracks, count: int, text: torch.Tensor | None
) -> dict:
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


def _track_metrics(
    state: _TrackState, tracks: FaceTracks, edited_tracks: FaceTracks, text: torch.Tensor | None
) -> dict:
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
    clip_direction, clip_score, clip_score_original = _clip_figures(state, text)
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


def _clip_figures(state: _TrackState, text: torch.Tensor | None) -> tuple[float | None, float | None, float | None]:
    """A track's clip_direction, clip_score and clip_score_original (None without CLIP)."""
    if text is None or not state.clip_o:
        return None, None, None
    c_o, c_e = torch.cat(state.clip_o), torch.cat(state.clip_e)
    change = (c_e - c_o).mean(0)  # per-frame noise averages out; 0 for an unchanged face
    clip_direction = float(F.cosine_similarity(change, text[0] - text[1], dim=0))
    return clip_direction, float((c_e @ text[0]).mean()), float((c_o @ text[0]).mean())


class CropScorer:
    """The evaluation's identity and CLIP figures of edited aligned face crops (the pipeline's
    input and output), without videos to find faces in: what ``train library --tune`` judges each
    trial edit by, with the same networks, crop side and formulas as :func:`evaluate_videos`.
    The networks load once; each call gives ``id_sim``, ``clip_direction``, ``clip_score`` and
    ``clip_score_original`` as a track of :func:`evaluate_videos` has them."""

    def __init__(self, clip: str, *, identity: IdentityEncoder | None = None):
        from ipfacediff.identity import IdentityEncoder
        from ipfacediff.models import load_clip

        self.identity = identity if identity is not None else IdentityEncoder.from_pretrained(None)
        self.clip = load_clip(clip).to(next(self.identity.parameters()).device)

    def __call__(
        self, original: np.ndarray, edited: np.ndarray, prompt: str, source_prompt: str = DEFAULT_SOURCE_PROMPT
    ) -> dict[str, float | None]:
        state = _TrackState(0)
        text = self.clip.text_embeddings([prompt, source_prompt]).cpu()
        with torch.inference_mode():
            for o, e in zip(original, edited):
                state.pending.append((_crop_side(o), _crop_side(e)))
                if len(state.pending) >= BATCH:
                    _flush(state, self.identity, self.clip)
            _flush(state, self.identity, self.clip)
        d_o, d_e = torch.cat(state.desc_o), torch.cat(state.desc_e)
        clip_direction, clip_score, clip_score_original = _clip_figures(state, text)
        return {
            "id_sim": float(F.cosine_similarity(d_e, d_o, dim=-1).mean()),
            "clip_direction": clip_direction,
            "clip_score": clip_score,
            "clip_score_original": clip_score_original,
        }


def _crop_side(crop: np.ndarray) -> np.ndarray:
    """An aligned crop at the evaluation's crop side (the canonical alignment scales with the side)."""
    if crop.shape[:2] == (CROP_SIZE, CROP_SIZE):
        return np.ascontiguousarray(crop)
    shrink = crop.shape[0] > CROP_SIZE
    return cv2.resize(crop, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


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
