"""The whole edit of a video file: faces → aligned crops → editing pipeline → paste back → video.

This is what ``ipfacediff edit`` runs and what the Python API exposes as :func:`edit_video`.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ipfacediff.diffusion import InversionCache, Progress, default_cache_dir
from ipfacediff.editing import (
    DEFAULT_ALL_KEYFRAMES_BELOW,
    DEFAULT_INJECT_ATTENTION_UNTIL,
    DEFAULT_INJECT_FEATURE_UNTIL,
    DEFAULT_PROPAGATION_TEMPERATURE,
    DEFAULT_TEMPORAL_SMOOTHING,
    DEFAULT_STEPS,
    IPFaceDiffPipeline,
)
from ipfacediff.errors import UserError
from ipfacediff.files import write_json
from ipfacediff.models import build_tiny_models, library_versions, load_model_set, model_resolution
from ipfacediff.video import VideoInfo, iter_frames, probe_video, write_video

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")


@dataclass
class EditSettings:
    """Everything that decides the result of an edit; written to the run metadata."""

    prompt: str
    source_prompt: str = ""
    steps: int = DEFAULT_STEPS
    guidance: float | None = None  # None: the edit adapter's tuned value, else DEFAULT_GUIDANCE
    keyframes: int | None = None
    propagation_temperature: float = DEFAULT_PROPAGATION_TEMPERATURE
    temporal_smoothing: float = DEFAULT_TEMPORAL_SMOOTHING
    inject_feature_until: int = DEFAULT_INJECT_FEATURE_UNTIL
    inject_attention_until: int = DEFAULT_INJECT_ATTENTION_UNTIL
    all_keyframes_below: int = DEFAULT_ALL_KEYFRAMES_BELOW
    strength: float = 1.0
    seed: int = 0
    identity_guidance: bool = True
    every_frame: bool = False
    resolution: int | None = None
    faces: str = "all"
    require_face: bool = False
    whole_frame: bool = False
    hair: bool = False
    adapters: str = "auto"  # the model library's ε2 adapters: auto (by prompt words), none, or names
    detail_transfer: bool = True  # the VAE's lost detail put back where the edit changed nothing
    local_blend: bool = True  # the edit confined to where the prompt changes ε2's prediction
    blend_threshold: float | None = None  # None: the edit adapter's tuned value, else DEFAULT_BLEND_THRESHOLD

    def validate(self) -> None:
        if not self.prompt or not self.prompt.strip():
            raise UserError('the prompt is empty: say what to change, e.g. --prompt "a face with eyeglasses"')
        if not 1 <= self.steps <= 1000:
            raise UserError(f"--steps must be between 1 and 1000, got {self.steps}")
        if not 0 < self.strength <= 1:
            raise UserError(f"--strength must be in (0, 1], got {self.strength}")
        if self.guidance is not None and self.guidance < 0:
            raise UserError(f"--guidance must be 0 or more, got {self.guidance}")
        if self.keyframes is not None and self.keyframes < 1:
            raise UserError(f"--keyframes must be at least 1, got {self.keyframes}")
        if self.propagation_temperature < 0:
            raise UserError(f"--propagation-temperature must be 0 or more, got {self.propagation_temperature}")
        if not 0 <= self.all_keyframes_below <= 1000:
            raise UserError(f"--all-keyframes-below must be a timestep in 0..1000, got {self.all_keyframes_below}")
        if not 0 <= self.temporal_smoothing < 0.5:
            raise UserError(f"--temporal-smoothing must be in [0, 0.5), got {self.temporal_smoothing}")
        if self.blend_threshold is not None and not 0 <= self.blend_threshold < 1:
            raise UserError(f"--blend-threshold must be in [0, 1), got {self.blend_threshold}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise UserError(f"--resolution must be a multiple of 8, got {self.resolution}")


SHIPPED_MODELS = Path(__file__).resolve().parent / "assets" / "faceworld"


def default_model_dir() -> Path:
    """The embedded default, no download either way: FaceWorld's trained mini models when the
    package ships them, else the tiny random set, built into the cache on first use."""
    if (SHIPPED_MODELS / "model_index.json").is_file():
        return SHIPPED_MODELS
    folder = default_cache_dir() / "models" / "tiny-seed0"
    if not (folder / "model_index.json").is_file():
        staging = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        build_tiny_models(staging, seed=0)
        if folder.exists():  # another process got there first
            shutil.rmtree(staging)
        else:
            staging.replace(folder)
    return folder


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise UserError(f"--dtype must be one of auto, {', '.join(table)}; got {dtype}")
    return table[dtype]


def load_pipeline(
    model: str | None = None,
    *,
    identity_model: str | None = None,
    identity_lora: str | None = None,
    edit_loras: list[tuple[str, float]] | None = None,
    config: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    adapter_library: bool = True,
) -> IPFaceDiffPipeline:
    """Load a model set (default: the embedded one) as an :class:`IPFaceDiffPipeline`;
    ``adapter_library=False`` ignores the ε1/ε2 adapters a model folder ships."""
    torch_device = pick_device(device)
    models = load_model_set(
        model or str(default_model_dir()), identity_model=identity_model, identity_lora=identity_lora,
        edit_loras=edit_loras, config=config, dtype=pick_dtype(dtype, torch_device), device=torch_device,
        allow_pickle=allow_pickle, adapters=adapter_library,
    )
    return IPFaceDiffPipeline.from_model_set(models)


def check_paths(input_path: Path, output_path: Path) -> VideoInfo:
    """Catch the user's path mistakes before any work is done."""
    info = probe_video(input_path)
    if output_path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(f"output {output_path.name} must end in .mp4 (the edit is written as H.264 mp4)")
    if output_path.resolve() == input_path.resolve():
        raise UserError("the output path is the input path; inputs are never overwritten, choose another name")
    folder = output_path.parent
    if not folder.is_dir():
        raise UserError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"output folder {folder} is not writable; choose another output path")
    return info


@dataclass
class RunReport:
    """Run metadata, written next to the output as ``<output>.run.json``."""

    input: str
    output: str
    settings: dict
    model: dict
    video: dict
    faces: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    inversion_reused: bool = False
    versions: dict[str, str] = field(default_factory=dict)
    message: str = ""

    def save(self, path: Path) -> Path:
        return write_json(path, asdict(self))


def run_metadata_path(output: Path) -> Path:
    return output.with_name(output.stem + ".run.json")


def _whole_frame_track(info: VideoInfo):
    from ipfacediff.face import FaceTrack, FaceTracks

    box = [0.0, 0.0, float(info.width), float(info.height)]
    frames = list(range(info.frame_count))
    return FaceTracks(info.frame_count, info.width, info.height, info.fps,
                      [FaceTrack(0, frames, [box] * len(frames), [np.zeros((5, 2))] * len(frames))])


@dataclass
class FaceCrops:
    """The faces to edit: their tracks, frame→crop transforms and aligned crops, by track id."""

    tracks: "FaceTracks"
    transforms: dict[int, dict[int, np.ndarray]]
    crops: dict[int, dict[int, np.ndarray]]


def face_crops(input_path: Path, info: VideoInfo, size: int, *, faces: str = "all", tracks_path: str | Path | None = None,
               whole_frame: bool = False, require_face: bool = False, progress: Progress | None = None) -> FaceCrops:
    """Find (or read) the face tracks and collect every track's aligned crops in one streaming pass."""
    from ipfacediff.face import FaceTracks, alignment_transforms, crop_face, detect_video_faces, require_face as check

    if whole_frame:
        tracks = _whole_frame_track(info)
    elif tracks_path is not None:
        tracks = FaceTracks.load(tracks_path)
        if (tracks.width, tracks.height) != (info.width, info.height):
            raise UserError(f"face tracks are for {tracks.width}x{tracks.height} frames but the video is {info.width}x{info.height}")
    else:
        report = (lambda done: progress("faces", done, info.frame_count)) if progress else None
        tracks = detect_video_faces(input_path, progress=report)
    if require_face:
        check(tracks, input_path)
    tracks = tracks.select(faces)
    if whole_frame:
        scale = np.array([[size / info.width, 0, 0], [0, size / info.height, 0]])
        transforms = {0: dict.fromkeys(range(info.frame_count), scale)}
    else:
        transforms = {t.id: alignment_transforms(t, size) for t in tracks.tracks}
    crops: dict[int, dict[int, np.ndarray]] = {t.id: {} for t in tracks.tracks}
    if tracks.tracks:
        for index, frame in enumerate(iter_frames(input_path)):
            for track in tracks.tracks:
                M = transforms[track.id].get(index)
                if M is not None:
                    crops[track.id][index] = _resize(frame, (size, size)) if whole_frame else crop_face(frame, M, size)
    return FaceCrops(tracks, transforms, crops)


def invert_video(input_path: str | Path, *, pipeline: IPFaceDiffPipeline, source_prompt: str = "",
                 resolution: int | None = None, steps: int = DEFAULT_STEPS, faces: str = "all",
                 tracks_path: str | Path | None = None, whole_frame: bool = False,
                 cache: InversionCache | None = None, progress: Progress | None = None) -> list[str]:
    """Fill the inversion cache for every selected face; returns lines describing what was done."""
    input_path = Path(input_path)
    info = probe_video(input_path)
    size = resolution or model_resolution(pipeline.vae, pipeline.unet)
    cache = cache if cache is not None else InversionCache()
    found = face_crops(input_path, info, size, faces=faces, tracks_path=tracks_path, whole_frame=whole_frame,
                       progress=progress)
    if not found.tracks.tracks:
        return [f"no face found in {input_path.name}: nothing to invert"]
    lines = []
    for track in found.tracks.tracks:
        order = sorted(found.crops[track.id])
        timings: dict[str, float] = {}
        inverted, _ = pipeline.invert(np.stack([found.crops[track.id][f] for f in order]), source_prompt=source_prompt,
                                      steps=steps, cache=cache, progress=progress, timings=timings)
        state = "already cached" if inverted.unet_calls == 0 else f"{inverted.unet_calls} UNet calls"
        lines.append(f"face {track.id}: {len(order)} frames at {size}px, {steps} steps, {state}, "
                     f"{timings['encode'] + timings['invert']:.1f} s")
    lines.append(f"cache: {cache.root}")
    return lines


def edit_video(
    input_path: str | Path,
    output_path: str | Path,
    settings: EditSettings,
    *,
    pipeline: IPFaceDiffPipeline,
    tracks_path: str | Path | None = None,
    cache: InversionCache | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] = print,
) -> RunReport:
    """Edit every selected face of a video and write the result with the input's audio."""
    from ipfacediff.face import face_mask, paste_face

    settings.validate()
    input_path, output_path = Path(input_path), Path(output_path)
    info = check_paths(input_path, output_path)
    size = settings.resolution or model_resolution(pipeline.vae, pipeline.unet)
    cache = cache if cache is not None else InversionCache()
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    tick = time.perf_counter()
    found = face_crops(input_path, info, size, faces=settings.faces, tracks_path=tracks_path,
                       whole_frame=settings.whole_frame, require_face=settings.require_face, progress=progress)
    tracks, transforms, crops = found.tracks, found.transforms, found.crops
    seconds["faces"] = time.perf_counter() - tick

    edited: dict[int, dict[int, np.ndarray]] = {}
    hair_by_track: dict[int, bool] = {}  # pasted with the hair mask: asked for, or a hair adapter edited
    face_reports = []
    reused = True
    seconds_by_stage: dict[str, float] = {}
    for track in tracks.tracks:
        order = sorted(crops[track.id])
        if not order:
            continue
        result = pipeline(
            np.stack([crops[track.id][f] for f in order]), settings.prompt, source_prompt=settings.source_prompt,
            steps=settings.steps, guidance=settings.guidance, keyframes=settings.keyframes,
            propagation_temperature=settings.propagation_temperature, temporal_smoothing=settings.temporal_smoothing,
            inject_feature_until=settings.inject_feature_until, inject_attention_until=settings.inject_attention_until,
            all_keyframes_below=settings.all_keyframes_below,
            strength=settings.strength, seed=settings.seed, identity_guidance=settings.identity_guidance,
            every_frame=settings.every_frame, adapters=settings.adapters, local_blend=settings.local_blend,
            blend_threshold=settings.blend_threshold, detail_transfer=settings.detail_transfer, hair=settings.hair,
            aligned=not settings.whole_frame, cache=cache, progress=progress,
        )
        edited[track.id] = dict(zip(order, result.frames))
        hair_by_track[track.id] = result.hair
        reused = reused and result.inversion_reused
        for stage, value in result.timings.items():
            seconds_by_stage[stage] = seconds_by_stage.get(stage, 0.0) + value
        face_reports.append({"id": track.id, "frames": len(order), "unet_calls": result.unet_calls,
                             "edit_adapters": result.edit_adapters, "guidance": result.guidance})
    seconds.update(seconds_by_stage)

    if not tracks.tracks:
        message = f"no face found in {input_path.name}: frames pass through unchanged"
        log(message)
    else:
        message = f"edited {len(edited)} face(s) in {info.frame_count} frames"

    tick = time.perf_counter()

    def output_frames():
        for index, frame in enumerate(iter_frames(input_path)):
            for track in tracks.tracks:
                crop = edited.get(track.id, {}).get(index)
                if crop is None:
                    continue
                M = transforms[track.id][index]
                if settings.whole_frame:
                    frame = paste_whole_frame(frame, crop)
                else:
                    frame = paste_face(frame, crop, M, face_mask(track, index, M, size, hair=hair_by_track[track.id]))
            if progress:
                progress("write", index + 1, info.frame_count)
            yield frame

    write_video(output_path, output_frames(), info.fps, audio_from=input_path)
    seconds["paste_and_write"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - started
    report = RunReport(
        input=str(input_path), output=str(output_path), settings=asdict(settings),
        model={"source": pipeline.config.get("model_source"), "resolution": size,
               "dtype": str(pipeline.unet.dtype), "device": str(pipeline.unet.device)},
        video={"frames": info.frame_count, "width": info.width, "height": info.height, "fps": info.fps,
               "has_audio": info.has_audio},
        faces=face_reports, seconds={k: round(v, 4) for k, v in seconds.items()},
        inversion_reused=reused and bool(face_reports), versions=library_versions(), message=message,
    )
    report.save(run_metadata_path(output_path))
    return report


def paste_whole_frame(frame: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """``frame`` plus the change a whole-frame edit made to its resized copy, scaled back up: as
    :func:`~ipfacediff.face.paste_face` does for a face, so the frame keeps its own resolution
    wherever the edit changed nothing (scaling the edited copy up would blur all of it)."""
    height, width = frame.shape[:2]
    change = edited.astype(np.float32) - _resize(frame, edited.shape[1::-1]).astype(np.float32)
    return np.clip(frame + _resize(change, (width, height)), 0, 255).round().astype(np.uint8)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    shrink = size[0] * size[1] < image.shape[0] * image.shape[1]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
