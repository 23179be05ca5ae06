"""The edit of a video file: faces → aligned crops → editing pipeline → paste back → video, and
the inversion of a video's faces into the cache. What :class:`~ipfacediff.service.EditService`
runs; the Python API's :func:`edit_video`."""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from ipfacediff.crops import FaceCrops, face_crops, resize_image
from ipfacediff.diffusion import InversionCache, Progress, StageTimer
from ipfacediff.domain import ModelCard, check_faces
from ipfacediff.editing import IPFaceDiffPipeline
from ipfacediff.models import library_versions, model_resolution
from ipfacediff.occlusion import face_behind_occluders, without_face_behind
from ipfacediff.runs import RunReport, check_paths, run_metadata_path
from ipfacediff.settings import DEFAULT_STEPS, EditSettings, setting_error
from ipfacediff.video import VideoInfo, probe_video, write_video

if TYPE_CHECKING:
    from ipfacediff.face import FaceTracks
    from ipfacediff.models.segmenter import OccluderSegmenter


def model_card(pipeline: IPFaceDiffPipeline) -> ModelCard | None:
    """The card of the model the pipeline was loaded from (None: no card, nothing is checked)."""
    data = pipeline.config.get("model_card")
    return ModelCard.from_dict(data) if data else None


def occluder_segmenter(pipeline: IPFaceDiffPipeline) -> OccluderSegmenter | None:
    """The occluder segmenter the model's card names, on the pipeline's device (None: none)."""
    card = model_card(pipeline)
    if card is None or card.occluder_segmenter is None:
        return None
    return _segmenter(str(card.occluder_segmenter), str(pipeline.unet.device))


@functools.lru_cache(maxsize=2)
def _segmenter(folder: str, device: str):
    from ipfacediff.models.segmenter import load_occluder_segmenter

    return load_occluder_segmenter(folder, device)


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
            occlusion=settings.occlusion,
        )
    timer.seconds["faces"] -= found.occlusion_seconds  # timed on its own: what the masks cost
    check_face_prompts(settings, found.tracks)
    to_edit = {t.id: found.crops[t.id] for t in found.tracks.tracks if settings.prompt_for(t.id) is not None}
    domain = check_domain(pipeline, to_edit, input_path.name, allow_out_of_domain=settings.allow_out_of_domain)
    if settings.occlusion and not settings.whole_frame:
        passed = [int(i) for i, face in domain.get("faces", {}).items() if face["passed"]]
        found.find_occlusion(occluder_segmenter(pipeline), passed)
        timer.seconds["occlusion"] = found.occlusion_seconds

    faces = edit_faces(pipeline, settings, found, frames_to_edit, cache=cache, progress=progress, timer=timer)
    message = run_message(input_path.name, info.frame_count, frames_to_edit, found.tracks, faces)
    if not found.tracks.tracks:
        log(message)
    with timer("paste_and_write"):
        frames = output_frames(input_path, info.frame_count, found, faces, size, settings.whole_frame, progress)
        write_video(output_path, frames, info.fps, crf=settings.crf, times=info.times, audio_from=input_path)
    spill.cleanup()
    report = run_report(input_path, output_path, settings, pipeline, info, size, faces, timer, domain, cache, message)
    report.save(run_metadata_path(output_path))
    return report


@dataclass
class EditedFaces:
    """What editing the faces of a video gives the pasting and the run report."""

    crops: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)  # by track, then frame
    # pasted with the hair mask: asked for, or a hair adapter edited
    hair: dict[int, bool] = field(default_factory=dict)
    reports: list[dict] = field(default_factory=list)  # one per track, edited or not
    reused_steps: float = 0.0  # steps read from the inversion cache, summed over the faces
    total_steps: int = 0

    @property
    def reused_share(self) -> float:
        """Weighted by each face's steps, as one figure for the run."""
        return self.reused_steps / self.total_steps if self.total_steps else 0.0


def edit_faces(
    pipeline: IPFaceDiffPipeline,
    settings: EditSettings,
    found: FaceCrops,
    frames_to_edit: range,
    *,
    cache: InversionCache,
    progress: Progress | None,
    timer: StageTimer,
) -> EditedFaces:
    """Each face goes through the pipeline on its own, with its own prompt (``--face-prompt``) and
    so its own plan; the pipeline's stage times are added to ``timer``, which times the whole run."""
    faces = EditedFaces()
    for track in found.tracks.tracks:
        prompt = settings.prompt_for(track.id)
        crops = found.crops[track.id]
        order = [f for f in sorted(crops) if f in frames_to_edit]
        if not order or prompt is None:  # outside the range, or left unedited by its own prompt
            faces.reports.append({"id": track.id, "frames": 0, "prompt": prompt})
            continue
        face_settings = replace(settings, prompt=prompt)
        face_plan = pipeline.plan_edit(face_settings)
        occlusion = occlusion_of(found, track.id, order, crops.array.shape[1])
        rows, filled = crops.rows(order), None
        if occlusion is not None and occlusion.any():  # the edit is given the face behind what covers it
            with timer("occlusion"):
                paint = functools.partial(pipeline.paint_hidden, steps=face_settings.steps, seed=face_settings.seed)
                filled = face_behind_occluders(rows, occlusion, crops.empty_like(order).array, paint)
        result = pipeline(
            rows if filled is None else filled,
            face_settings,
            plan=face_plan,
            cache=cache,
            progress=progress,
            frame_indices=order,
            output=crops.empty_like(order).array,
            occlusion=occlusion,
            latents=False,
        )
        if filled is not None:
            with timer("occlusion"):
                without_face_behind(result.frames, rows, filled, occlusion)
        faces.crops[track.id] = {
            f: faded(crops[f], crop, settings.fade_weight(f, frames_to_edit)) for f, crop in zip(order, result.frames)
        }
        faces.hair[track.id] = result.hair
        faces.reused_steps += result.inversion_reused_share * settings.steps  # a share of the frames: not whole steps
        faces.total_steps += settings.steps
        for stage, value in result.timings.items():
            timer.seconds[stage] = timer.seconds.get(stage, 0.0) + value
        faces.reports.append(
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
                "identity_steps_skipped": result.identity_steps_skipped,
                **occlusion_report(found, track, order),
            }
        )
    return faces


def occlusion_of(found: FaceCrops, track_id: int, order: list[int], size: int) -> np.ndarray | None:
    """(N, size, size) float32 occlusion masks of a face's frames ``order``, or None where
    occlusion was not looked for; at most OCCLUSION_SIDE, which the local blend's grid is below."""
    from ipfacediff.crops import OCCLUSION_SIDE

    if track_id not in found.occlusion:
        return None
    side = min(size, OCCLUSION_SIDE)
    return np.stack([found.occlusion_at(track_id, f, side) for f in order])


def occlusion_report(found: FaceCrops, track, order: list[int]) -> dict:
    """What .run.json keeps of a face's occlusion: the method, how many edited frames have a mask
    and in how many of them the hand landmarker found a hand itself (the rest are the face's own
    look, or hands carried over a gap), and per edited frame the share of the face mask covered
    (:func:`~ipfacediff.occlusion.occluded_share`)."""
    from ipfacediff.crops import OCCLUSION_SIDE
    from ipfacediff.face import face_mask
    from ipfacediff.occlusion import OCCLUSION_METHOD, occluded_share

    if track.id not in found.occlusion:
        return {"occlusion": None}
    shares = []
    for f in order:
        mask = found.occlusion_at(track.id, f, OCCLUSION_SIDE)
        M = found.transforms[track.id][f]
        side = mask.shape[0]
        scale = side / found.crops[track.id][f].shape[0]
        shares.append(round(max(0.0, occluded_share(mask, face_mask(track, f, M * scale, side))), 4))
    return {
        "occlusion": {
            "method": OCCLUSION_METHOD + ("+segmenter" if track.id in found.segmented else ""),
            "frames_occluded": sum(share > 0 for share in shares),
            "frames_with_hands": len(found.hand_frames.get(track.id, set()) & set(order)),
            "largest_share": max(shares, default=0.0),
            "share": shares,
        }
    }


def run_message(
    video_name: str, frame_count: int, frames_to_edit: range, tracks: FaceTracks, faces: EditedFaces
) -> str:
    """The run's one-line summary, as the front-ends show it and .run.json keeps it."""
    if not tracks.tracks:
        return f"no face found in {video_name}: frames pass through unchanged"
    if len(frames_to_edit) < frame_count:
        return (
            f"edited {len(faces.crops)} face(s) in frames {frames_to_edit.start}-{frames_to_edit.stop - 1} "
            f"of {frame_count}"
        )
    return f"edited {len(faces.crops)} face(s) in {frame_count} frames"


def output_frames(
    input_path: Path,
    frame_count: int,
    found: FaceCrops,
    faces: EditedFaces,
    size: int,
    whole_frame: bool,
    progress: Progress | None,
) -> Iterator[np.ndarray]:
    """The input's frames with the edited faces pasted in, streamed so a long video never sits in
    memory. A frame where nothing is pasted goes out as the input's own decoded picture (no RGB
    round trip); write_video takes the output's colours from audio_from, the input. A pasted
    frame keeps the decoded samples wherever the paste left the pixels (a hand in front of the face,
    the backdrop) as they were."""
    from ipfacediff.face import face_mask, paste_face
    from ipfacediff.video import iter_source_frames, keep_source_samples

    for index, (frame, source) in enumerate(iter_source_frames(input_path)):
        original, pasted = frame, False
        for track in found.tracks.tracks:
            crop = faces.crops.get(track.id, {}).get(index)
            if crop is None:
                continue
            M = found.transforms[track.id][index]
            if whole_frame:
                frame = paste_whole_frame(frame, crop)
            else:
                mask = face_mask(track, index, M, size, hair=faces.hair[track.id])
                frame = paste_face(frame, crop, M, mask, occlusion=found.occlusion_at(track.id, index, size))
            pasted = True
        if progress:
            progress("write", index + 1, frame_count)
        if source is None:
            yield frame
        else:
            yield keep_source_samples(frame, original, source) if pasted else source


def run_report(
    input_path: Path,
    output_path: Path,
    settings: EditSettings,
    pipeline: IPFaceDiffPipeline,
    info: VideoInfo,
    size: int,
    faces: EditedFaces,
    timer: StageTimer,
    domain: dict,
    cache: InversionCache,
    message: str,
) -> RunReport:
    """What .run.json keeps of a run: enough to tell how an output was made and to redo it."""
    from ipfacediff.diffusion import schedule_record

    seconds = dict(timer.seconds)
    seconds["total"] = sum(seconds.values())
    share = faces.reused_share
    return RunReport(
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
        faces=faces.reports,
        seconds={k: round(v, 4) for k, v in seconds.items()},
        inversion_reused=bool(faces.reports) and share == 1.0,
        inversion_reused_share=round(share, 4),
        domain=domain,
        cache_bytes=cache.size_bytes(),
        versions=library_versions(),
        message=message,
    )


def check_face_prompts(settings: EditSettings, tracks) -> None:
    """Every face ``--face-prompt`` names is one of the faces being edited, as ``--faces`` ids are
    (a prompt for a face that is not there would be ignored); nothing to check without faces."""
    have = [t.id for t in tracks.tracks]
    for face in settings.face_prompt_ids():
        if have and face not in have:
            raise setting_error(
                "face_prompts",
                f"{{setting}} {face}=...: no face track {face} among the faces edited "
                f"(ids: {', '.join(map(str, have))}; `ipfacediff faces` lists a video's faces)",
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
    change = edited.astype(np.float32) - resize_image(frame, edited.shape[1::-1]).astype(np.float32)
    return np.clip(frame + resize_image(change, (width, height)), 0, 255).round().astype(np.uint8)
