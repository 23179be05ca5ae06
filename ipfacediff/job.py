"""The whole edit of a video file: faces → aligned crops → editing pipeline → paste back → video.

This is what ``ipfacediff edit`` runs and what the Python API exposes as :func:`edit_video`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from ipfacediff.domain import ModelCard, check_faces
from ipfacediff.diffusion import InversionCache, Progress, StageTimer, default_cache_dir
from ipfacediff.editing import IPFaceDiffPipeline
from ipfacediff.errors import UserError
from ipfacediff.files import check_writable, write_json
from ipfacediff.settings import DEFAULT_STEPS, DEFAULT_WINDOW, EditSettings
from ipfacediff.models import build_tiny_models, library_versions, load_model_set, model_resolution
from ipfacediff.video import VideoInfo, iter_frames, probe_video, write_video

if TYPE_CHECKING:
    from ipfacediff.face import FaceTracks

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")


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
    adapters_dir: str | Path | None = None,
) -> IPFaceDiffPipeline:
    """Load a model set (default: the embedded one) as an :class:`IPFaceDiffPipeline`;
    ``adapter_library=False`` ignores the ε1/ε2 adapters a model folder ships; ``adapters_dir``:
    an adapter library kept outside the model folder (``ipfacediff train library --output LIB``),
    used instead of the model folder's own."""
    torch_device = pick_device(device)
    models = load_model_set(
        model or str(default_model_dir()),
        identity_model=identity_model,
        identity_lora=identity_lora,
        edit_loras=edit_loras,
        config=config,
        dtype=pick_dtype(dtype, torch_device),
        device=torch_device,
        allow_pickle=allow_pickle,
        adapters=adapter_library,
        adapters_dir=adapters_dir,
    )
    pipeline = IPFaceDiffPipeline.from_model_set(models)
    source = Path(model) if model else default_model_dir()
    card = ModelCard.read(source) if source.is_dir() else None
    pipeline.register_to_config(model_card=card.to_dict() if card else None)
    return pipeline


def model_card(pipeline: IPFaceDiffPipeline) -> ModelCard | None:
    """The card of the model the pipeline was loaded from (None: no card, nothing is checked)."""
    data = pipeline.config.get("model_card")
    return ModelCard.from_dict(data) if data else None


def check_domain(
    pipeline: IPFaceDiffPipeline, crops: dict[int, dict[int, np.ndarray]], video_name: str, *, allow_out_of_domain: bool
) -> dict:
    """Every face to be edited checked against the model's card, before any UNet work; a face the
    model is not made for stops the run (one line) unless overridden. Returns what .run.json records."""
    from ipfacediff.domain import sample_indices

    card = model_card(pipeline)
    if card is None:
        return {"checked": False}
    # Only the frames the check looks at: stacking every crop of a long clip would fill memory.
    sampled = {}
    for track_id, by_frame in crops.items():
        frames = sorted(by_frame)
        sampled[track_id] = {frames[i]: by_frame[frames[i]] for i in sample_indices(len(frames))}
    results = check_faces(card, pipeline.vae, sampled, video_name)
    refused = [r for r in results.values() if not r.passed]
    if refused and not allow_out_of_domain:
        raise refused[0].error()
    return {
        "checked": True,
        "domain": card.domain,
        "description": card.description,
        "check": card.check,
        "threshold": card.threshold,
        "overridden": bool(refused),
        "faces": {str(i): {"passed": r.passed, "score": round(r.score, 3)} for i, r in results.items()},
    }


def check_paths(input_path: Path, output_path: Path) -> VideoInfo:
    """Catch the user's path mistakes before any work is done."""
    info = probe_video(input_path)
    if output_path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(f"output {output_path.name} must end in .mp4 (the edit is written as H.264 mp4)")
    if output_path.resolve() == input_path.resolve():
        raise UserError("the output path is the input path; inputs are never overwritten, choose another name")
    check_writable(output_path)
    check_writable(run_metadata_path(output_path), what="run metadata")
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
    inversion_reused: bool = False  # every face's inversion came whole from the cache
    inversion_reused_share: float = 0.0  # share of the inversion steps read from the cache (a resumed run)
    domain: dict = field(default_factory=dict)  # the model card's check of every edited face, and any override
    cache_bytes: int = 0  # what the inversion cache takes on disk after the run
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
    return FaceTracks(
        info.frame_count,
        info.width,
        info.height,
        info.fps,
        [FaceTrack(0, frames, [box] * len(frames), [np.zeros((5, 2))] * len(frames))],
    )


class CropStore(Mapping[int, np.ndarray]):
    """One face track's aligned crops by frame number, in one array in frame order: in memory,
    or with ``folder`` in a file there (a memory map), so that a long clip's crops (768 kB a frame
    at 512²) are not all held in memory. Crops are added in frame order."""

    def __init__(self, frames: Sequence[int], size: int, *, folder: Path | None = None):
        self.position = {frame: row for row, frame in enumerate(frames)}
        self.folder = folder
        shape = (max(1, len(self.position)), size, size, 3)
        if folder is None:
            self.array = np.empty(shape, np.uint8)
        else:
            path = folder / f"crops-{secrets.token_hex(6)}.npy"
            self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        self.filled: dict[int, None] = {}  # the frames whose crops are in, in order

    def __setitem__(self, frame: int, crop: np.ndarray) -> None:
        self.array[self.position[frame]] = crop
        self.filled[frame] = None

    def __getitem__(self, frame: int) -> np.ndarray:
        if frame not in self.filled:
            raise KeyError(frame)
        return self.array[self.position[frame]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.filled)

    def __len__(self) -> int:
        return len(self.filled)

    def rows(self, frames: Sequence[int]) -> np.ndarray:
        """The crops of ``frames`` (N, size, size, 3): a view of the array when they are stored
        one after another, as a range of the track is."""
        rows = [self.position[f] for f in frames]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return self.array[rows[0] : rows[0] + len(rows)]
        return self.array[rows]

    def empty_like(self, frames: Sequence[int]) -> "CropStore":
        """A store of the same kind (memory or file) for other crops of ``frames``."""
        return CropStore(frames, self.array.shape[1], folder=self.folder)


@dataclass
class FaceCrops:
    """The faces to edit: their tracks, frame→crop transforms and aligned crops, by track id."""

    tracks: FaceTracks
    transforms: dict[int, dict[int, np.ndarray]]
    crops: dict[int, dict[int, np.ndarray]]


def face_crops(
    input_path: Path,
    info: VideoInfo,
    size: int,
    *,
    faces: str = "all",
    tracks_path: str | Path | None = None,
    whole_frame: bool = False,
    require_face: bool = False,
    progress: Progress | None = None,
    frames: range | None = None,
    spill: Path | None = None,
    in_memory: int = DEFAULT_WINDOW,
) -> FaceCrops:
    """Find (or read) the face tracks and collect every track's aligned crops in one streaming pass
    (only those of ``frames`` when given: a time range is all that is inverted and edited). With
    ``spill``, a track of more than ``in_memory`` crops keeps them in a file in that folder."""
    from ipfacediff.face import FaceTracks, alignment_transforms, crop_face, detect_video_faces, require_face as check

    if whole_frame:
        tracks = _whole_frame_track(info)
    elif tracks_path is not None:
        tracks = FaceTracks.load(tracks_path)
        if (tracks.width, tracks.height) != (info.width, info.height):
            raise UserError(
                f"face tracks are for {tracks.width}x{tracks.height} frames but the video is {info.width}x{info.height}"
            )
        last = max((t.frames[-1] for t in tracks.tracks if t.frames), default=-1)
        if last >= info.frame_count:
            raise UserError(
                f"face tracks reach frame {last} but {input_path.name} has {info.frame_count} frames "
                f"(0-{info.frame_count - 1}): they are for another clip"
            )
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
    crops: dict[int, CropStore] = {}
    for track in tracks.tracks:
        wanted = [f for f in sorted(transforms[track.id]) if frames is None or f in frames]
        crops[track.id] = CropStore(wanted, size, folder=spill if len(wanted) > in_memory else None)
    if tracks.tracks:
        for index, frame in enumerate(iter_frames(input_path)):
            if frames is not None and index >= frames.stop:
                break
            if frames is not None and index < frames.start:
                continue
            for track in tracks.tracks:
                M = transforms[track.id].get(index)
                if M is not None:
                    crops[track.id][index] = _resize(frame, (size, size)) if whole_frame else crop_face(frame, M, size)
    return FaceCrops(tracks, transforms, crops)


def invert_video(
    input_path: str | Path,
    *,
    pipeline: IPFaceDiffPipeline,
    source_prompt: str = "",
    resolution: int | None = None,
    steps: int = DEFAULT_STEPS,
    faces: str = "all",
    tracks_path: str | Path | None = None,
    whole_frame: bool = False,
    cache: InversionCache | None = None,
    progress: Progress | None = None,
    allow_out_of_domain: bool = False,
) -> list[str]:
    """Fill the inversion cache for every selected face; returns lines describing what was done."""
    input_path = Path(input_path)
    info = probe_video(input_path)
    size = resolution or model_resolution(pipeline.vae, pipeline.unet)
    cache = cache if cache is not None else InversionCache()
    spill = tempfile.TemporaryDirectory(prefix="ipfacediff-crops-")
    found = face_crops(
        input_path,
        info,
        size,
        faces=faces,
        tracks_path=tracks_path,
        whole_frame=whole_frame,
        progress=progress,
        spill=Path(spill.name),
    )
    if not found.tracks.tracks:
        return [f"no face found in {input_path.name}: nothing to invert"]
    check_domain(pipeline, found.crops, input_path.name, allow_out_of_domain=allow_out_of_domain)
    lines = []
    for track in found.tracks.tracks:
        order = sorted(found.crops[track.id])
        timer = StageTimer(pipeline.unet.device)
        inverted, _ = pipeline.invert(
            found.crops[track.id].rows(order),
            source_prompt=source_prompt,
            steps=steps,
            cache=cache,
            progress=progress,
            timer=timer,
            frame_indices=order,
        )
        if inverted.unet_calls == 0:
            state = "already cached"
        elif inverted.reused_steps:
            state = f"{inverted.reused_share:.0%} of the steps from the cache, {inverted.unet_calls} UNet calls"
        else:
            state = f"{inverted.unet_calls} UNet calls"
        lines.append(
            f"face {track.id}: {len(order)} frames at {size}px, {steps} steps, {state}, "
            f"{sum(timer.seconds.values()):.1f} s"
        )
    lines.append(f"cache: {cache.root} ({cache.size_bytes() / 2**30:.2f} GB)")
    spill.cleanup()
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
    from ipfacediff.diffusion import schedule_record
    from ipfacediff.face import face_mask, paste_face

    from dataclasses import replace

    input_path, output_path = Path(input_path), Path(output_path)
    info = check_paths(input_path, output_path)
    frames_to_edit = settings.frame_range(info.fps, info.frame_count, times=info.times.seconds())
    fade_note = settings.fade_note(frames_to_edit)
    if fade_note:
        log(fade_note)
    pipeline.plan_edit(settings)  # an unknown adapter name fails before any work
    size = settings.resolution or model_resolution(pipeline.vae, pipeline.unet)
    cache = cache if cache is not None else InversionCache()
    timer = StageTimer(pipeline.unet.device)

    spill = tempfile.TemporaryDirectory(prefix="ipfacediff-crops-")  # long tracks' crops, removed at the end
    with timer("faces"):
        found = face_crops(
            input_path,
            info,
            size,
            faces=settings.faces,
            tracks_path=tracks_path,
            whole_frame=settings.whole_frame,
            require_face=settings.require_face,
            progress=progress,
            frames=frames_to_edit,
            spill=Path(spill.name),
            in_memory=settings.window,
        )
    tracks, transforms, crops = found.tracks, found.transforms, found.crops
    check_face_prompts(settings, tracks)
    to_edit = {t.id: crops[t.id] for t in tracks.tracks if settings.prompt_for(t.id) is not None}
    domain = check_domain(pipeline, to_edit, input_path.name, allow_out_of_domain=settings.allow_out_of_domain)

    edited: dict[int, dict[int, np.ndarray]] = {}
    hair_by_track: dict[int, bool] = {}  # pasted with the hair mask: asked for, or a hair adapter edited
    face_reports = []
    reused_steps = total_steps = 0
    for track in tracks.tracks:
        prompt = settings.prompt_for(track.id)
        order = [f for f in sorted(crops[track.id]) if f in frames_to_edit]
        if not order or prompt is None:  # outside the range, or left unedited by its own prompt
            face_reports.append({"id": track.id, "frames": 0, "prompt": prompt})
            continue
        face_settings = replace(settings, prompt=prompt)
        face_plan = pipeline.plan_edit(face_settings)
        result = pipeline(
            crops[track.id].rows(order),
            face_settings,
            plan=face_plan,
            cache=cache,
            progress=progress,
            frame_indices=order,
            output=crops[track.id].empty_like(order).array,
        )
        edited[track.id] = {
            f: faded(crops[track.id][f], crop, settings.fade_weight(f, frames_to_edit))
            for f, crop in zip(order, result.frames)
        }
        hair_by_track[track.id] = result.hair
        reused_steps += result.inversion_reused_share * settings.steps  # a share of the frames: not whole steps
        total_steps += settings.steps
        for stage, value in result.timings.items():
            timer.seconds[stage] = timer.seconds.get(stage, 0.0) + value
        face_reports.append(
            {
                "id": track.id,
                "frames": len(order),
                "prompt": prompt,
                "unet_calls": result.unet_calls,
                "edit_adapters": result.edit_adapters,
                "guidance": result.guidance,
                "identity_gradient": result.identity_gradient,
                "strength": face_plan.strength,
                "inversion_reused_share": round(result.inversion_reused_share, 4),
            }
        )

    if not tracks.tracks:
        message = f"no face found in {input_path.name}: frames pass through unchanged"
        log(message)
    elif len(frames_to_edit) < info.frame_count:
        message = (
            f"edited {len(edited)} face(s) in frames {frames_to_edit.start}-{frames_to_edit.stop - 1} "
            f"of {info.frame_count}"
        )
    else:
        message = f"edited {len(edited)} face(s) in {info.frame_count} frames"

    def output_frames():
        # A frame where nothing is pasted goes out as the input's own decoded picture (no RGB round
        # trip); write_video takes the output's colours from audio_from, the input.
        from ipfacediff.video import iter_source_frames

        for index, (frame, source) in enumerate(iter_source_frames(input_path)):
            pasted = False
            for track in tracks.tracks:
                crop = edited.get(track.id, {}).get(index)
                if crop is None:
                    continue
                M = transforms[track.id][index]
                if settings.whole_frame:
                    frame = paste_whole_frame(frame, crop)
                else:
                    frame = paste_face(frame, crop, M, face_mask(track, index, M, size, hair=hair_by_track[track.id]))
                pasted = True
            if progress:
                progress("write", index + 1, info.frame_count)
            yield frame if pasted or source is None else source

    with timer("paste_and_write"):
        write_video(output_path, output_frames(), info.fps, times=info.times, audio_from=input_path)
    spill.cleanup()
    seconds = dict(timer.seconds)
    seconds["total"] = sum(seconds.values())
    share = reused_steps / total_steps if total_steps else 0.0
    report = RunReport(
        input=str(input_path),
        output=str(output_path),
        settings=settings.to_dict(),
        model={
            "source": pipeline.config.get("model_source"),
            "resolution": size,
            "dtype": str(pipeline.unet.dtype),
            "device": str(pipeline.unet.device),
            "schedule": schedule_record(pipeline.scheduler, settings.steps),
        },
        video={
            "frames": info.frame_count,
            "width": info.width,
            "height": info.height,
            "fps": info.fps,
            "has_audio": info.has_audio,
        },
        faces=face_reports,
        seconds={k: round(v, 4) for k, v in seconds.items()},
        inversion_reused=bool(face_reports) and share == 1.0,
        inversion_reused_share=round(share, 4),
        domain=domain,
        cache_bytes=cache.size_bytes(),
        versions=library_versions(),
        message=message,
    )
    report.save(run_metadata_path(output_path))
    return report


def check_face_prompts(settings: EditSettings, tracks) -> None:
    """Every face ``--face-prompt`` names is one of the faces being edited, as ``--faces`` ids are
    (a prompt for a face that is not there would be ignored); nothing to check without faces."""
    have = [t.id for t in tracks.tracks]
    for face in settings.face_prompt_ids():
        if have and face not in have:
            raise UserError(
                f"--face-prompt {face}=...: no face track {face} among the faces edited "
                f"(ids: {', '.join(map(str, have))}; `ipfacediff faces` lists a video's faces)"
            )


def faded(source: np.ndarray, edited: np.ndarray, weight: float) -> np.ndarray:
    """The crop showing ``weight`` of the edit (the range's fade in and out)."""
    if weight >= 1.0:
        return edited
    mixed = source.astype(np.float32) + weight * (edited.astype(np.float32) - source.astype(np.float32))
    return np.clip(mixed, 0, 255).round().astype(np.uint8)


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
