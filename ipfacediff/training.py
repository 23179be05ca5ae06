"""Fine-tuning the two models of IP-FaceDiff: ε1 (identity model) and ε2 (edit model).

Both start from the same SD-1.x UNet and are trained once per model (ε1) or per model and
attribute (ε2), by default as LoRA adapters (peft) over the frozen base, saved in diffusers' LoRA
format so that ``load_model_set(model, identity_lora=...)`` / ``edit_loras=[(path, w)]`` and the
CLI's ``--identity-lora`` / ``--edit-lora`` read them; ``full=True`` fine-tunes the whole UNet.

ε1, :func:`train_identity`: the ordinary denoising loss on the subject's faces with the empty
prompt, plus an identity term on the one-step estimate of the clean image,

    L = ‖ε̂ − ε‖² + λ_id · (1 − cos(ID(D(x̂0)), ID(x0))),   x̂0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t,

D the VAE decoder (frozen, gradients pass through it), ID the identity network. Timesteps: t is
uniform over the whole schedule for the denoising term, so ε1 stays a valid denoiser everywhere
(the editor inverts with it and reads its features at every level), but the identity term is
applied only to the samples of a batch with t ≤ ``id_max_timestep`` (400). Above that, x̂0 is a
blur of the face (ᾱ_400 ≈ 0.42 for SD's schedule; at t = 600 the noise carries 84 % of the
variance) on which an identity network says nothing useful; below it, x̂0 is a recognisable face.
The term is averaged over the whole batch (zero for noisier samples), so its weight does not jump
with how many samples of a batch happen to be below the threshold.

ε2, :func:`train_edit`, as DiffusionCLIP: every training face is DDIM-inverted with the frozen
base model (source prompt) to level t0 once, before training; each step regenerates a batch from
there with ε2 under the target prompt in a few DDIM steps, with gradients through every step
(gradient checkpointing in the UNet and VAE), and scores the result against the input:

    L = λ_dir · (1 − cos(E_I(x_gen) − E_I(x_ref), E_T(target) − E_T(source)))
      + λ_id · (1 − cos(ID(x_gen), ID(x_ref))) + λ_l1 · |x_gen − x_ref|₁,

E_I / E_T the (normalised) image and text embeddings of a CLIP model, x_ref the training face.
With before/after pairs (``paired_targets``: each training face also shown edited), the edited
face y takes x_ref's place where the result is compared with an image, and each pair gives its
own direction:

    L = λ_dir · (1 − cos(E_I(x_gen) − E_I(x_ref), E_I(y) − E_I(x_ref)))
      + λ_id · (1 − cos(ID(x_gen), ID(y))) + λ_l1 · |x_gen − y|₁.

A caption's direction can be met by a change that only CLIP reads as the attribute (a smudge for
"beard", a tinted patch for "blonde"); a pair says what the attribute looks like on this face.

Both trainers are a loss on one :class:`Trainer` (the loop, validation, checkpoints, resume and the
files written) and take their settings as one object (:mod:`ipfacediff.training_settings`); ε2's
DDIM inversion and regeneration are :func:`ipfacediff.diffusion.ddim_walk`, its inversion kept in
an :class:`~ipfacediff.diffusion.InversionCache`. Training runs through accelerate (mixed
precision, gradient accumulation) and is seeded. Every ``checkpoint_every`` optimizer steps, ``OUTPUT/checkpoints/step_XXXXXX/`` receives the trained
weights, the optimizer state, the RNG states and the losses so far, written to a temporary folder
and renamed, so a killed run leaves only whole checkpoints; ``resume=True`` continues from the
last one and gives the run an uninterrupted run would have given. Everything is written as
safetensors and JSON: nothing in an output folder is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from ipfacediff.diffusion import (
    InversionCache,
    check_scheduler,
    ddim_walk,
    encode_frames,
    encode_prompt,
    frames_digest,
    predicted_noise,
)
from ipfacediff.errors import UserError
from ipfacediff.files import check_file, write_atomic, write_json
from ipfacediff.models import library_versions, load_clip, load_model_set, model_resolution, module_fingerprint
from ipfacediff.training_settings import EditTrainingSettings, IdentityTrainingSettings, TrainingSettings

TrainingProgress = Callable[[str, int, int, "float | None"], None]
"""progress(stage, done, total, loss): stages "faces", "invert" and "train"; loss is None except
for "train", where it is the mean loss of the optimizer step just taken."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm")
# A video gives at most this many face crops, evenly spread over its (frame, face) pairs:
# neighbouring frames are near-duplicates, and memory stays bounded for long videos.
VIDEO_MAX_FACES = 300

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "default"
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
CHECKPOINT_PREFIX = "step_"
MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 1e-2
VALIDATION_FACES = 4

S = TypeVar("S", bound=TrainingSettings)


@dataclass
class TrainingResult:
    """What a training run produced.

    ``adapter``: the LoRA file (OUTPUT/pytorch_lora_weights.safetensors), or with ``full=True`` the
    diffusers UNet folder OUTPUT/unet. ``losses``: one per optimizer step, from step 1 (including
    the steps of an earlier, resumed run). ``steps``: optimizer steps done in all. ``seconds``: wall
    time of this call. ``validation_before`` / ``validation_after``: the loss on a fixed batch
    (fixed faces, noise and timesteps) before the first step and after the last.
    """

    output: Path
    adapter: Path
    losses: list[float]
    steps: int
    seconds: float
    validation_before: float | None = None
    validation_after: float | None = None
    resumed_from: int | None = None
    faces: int = 0


# ---------------------------------------------------------------------------------------------
# Training faces


def load_training_faces(
    data: str | Path,
    resolution: int,
    *,
    max_images: int | None = None,
    progress: TrainingProgress | None = None,
    detect_images: bool = False,
    strict: bool = False,
) -> np.ndarray:
    """The training faces as (N, R, R, 3) RGB uint8, R = ``resolution``.

    ``data``: a folder of images (png/jpg/webp/bmp, taken as already aligned face crops; centre
    cropped to a square and resized), a video, or a folder mixing both; every face of a video
    goes through the face module's detection, tracking and aligned crops (at most
    VIDEO_MAX_FACES per video, evenly spread). Only the folder's own files are read, in name
    order (one that is not a regular file this process can read is an error). ``max_images`` keeps
    that many, evenly spread. Images that do not decode are skipped.
    ``detect_images``: images are photos, and each of their faces is detected and aligned as a
    video's are (a photo without a face gives none). ``strict``: an unreadable image is an error.
    """
    _check_face_reading(resolution, max_images)
    files = training_files(data)
    cap = VIDEO_MAX_FACES if max_images is None else min(VIDEO_MAX_FACES, max_images)
    faces: list[np.ndarray] = []
    unreadable, faceless, videos = 0, 0, 0
    for index, file in enumerate(files):
        if file.suffix.lower() in IMAGE_SUFFIXES:
            found = _photo_faces(file, resolution) if detect_images else _read_face_image(file, resolution)
            if found is None and strict:
                raise UserError(
                    f"cannot read the image {file} (not an image, or damaged): remove it from the "
                    "training data or replace it"
                )
            if found is None:
                unreadable += 1
            elif not detect_images:
                faces.append(found)
            else:
                faceless += not found
                faces.extend(found)
        else:
            videos += 1
            frames = (
                (lambda done, total: progress("faces", done, total, None)) if progress and len(files) == 1 else None
            )
            faces.extend(_video_faces(file, resolution, cap, progress=frames))
        if progress:
            progress("faces", index + 1, len(files), None)
    if not faces:
        reasons = []
        if unreadable:
            reasons.append(f"{unreadable} unreadable image(s)")
        if faceless:
            reasons.append(f"no face found in {faceless} image(s)")
        if videos:
            reasons.append(f"no face found in {videos} video(s)")
        crops = "photos, aligned face crops" if detect_images else "aligned face crops"
        raise UserError(
            f"no usable faces in {data} ({', '.join(reasons)}): give {crops} or videos with a clearly visible face"
        )
    stacked = np.stack(faces)
    if max_images is not None and len(stacked) > max_images:
        stacked = stacked[evenly_spaced(len(stacked), max_images)]
    return stacked


def load_training_pairs(
    data: str | Path,
    targets: str | Path,
    resolution: int,
    *,
    max_images: int | None = None,
    progress: TrainingProgress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Before/after faces as two (N, R, R, 3) RGB uint8 arrays: every image of the folder
    ``data`` with the image of the same file name in ``targets`` (both read as aligned crops,
    like :func:`load_training_faces`). A pair is all or nothing, so a missing or unreadable
    partner is an error rather than a skipped face that would shift every later pair."""
    _check_face_reading(resolution, max_images)
    files = training_files(data)
    partners = {p.name: p for p in _option_files("--paired-targets", targets)}
    if any(f.suffix.lower() not in IMAGE_SUFFIXES for f in files):
        raise UserError(f"--paired-targets needs a folder of face images as training data, not videos: {data}")
    missing = [f.name for f in files if f.name not in partners]
    if missing:
        raise UserError(
            f"--paired-targets: {len(missing)} training image(s) have no edited partner of the same "
            f"name in {targets} (first: {missing[0]})"
        )
    if max_images is not None and len(files) > max_images:
        files = [files[i] for i in evenly_spaced(len(files), max_images)]
    before, after = [], []
    for index, file in enumerate(files):
        pair = _read_face_image(file, resolution), _read_face_image(partners[file.name], resolution)
        if pair[0] is None or pair[1] is None:
            raise UserError(f"--paired-targets: cannot read the pair {file.name} (training data or its partner)")
        before.append(pair[0])
        after.append(pair[1])
        if progress:
            progress("faces", index + 1, len(files), None)
    return np.stack(before), np.stack(after)


def _check_face_reading(resolution: int, max_images: int | None) -> None:
    if resolution < 8 or resolution % 8:
        raise UserError(f"--resolution must be a multiple of 8, got {resolution}")
    if max_images is not None and max_images < 1:
        raise UserError(f"--max-images must be at least 1, got {max_images}")


def _option_files(flag: str, folder: str | Path) -> list[Path]:
    """:func:`training_files` of a folder an option names, its errors prefixed with the option."""
    try:
        return training_files(folder)
    except UserError as error:
        raise UserError(f"{flag}: {error}") from None


def training_files(data: str | Path) -> list[Path]:
    """The image and video files :func:`load_training_faces` reads; UserError when there are none."""
    path = Path(data).expanduser()
    kinds = f"images ({', '.join(IMAGE_SUFFIXES)}) or videos ({', '.join(VIDEO_SUFFIXES)})"
    if not path.exists():
        raise UserError(f"training data {data} does not exist: pass a folder of aligned face {kinds}, or a video")
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
            raise UserError(f"training data {path.name} is not one of the {kinds} that can be trained on")
        return [path]
    files = sorted(
        p
        for p in path.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES and not p.is_dir()
    )
    for file in files:  # one that cannot be read (a pipe, a broken link) is named, not skipped
        check_file(file, "training data", "remove it from the folder or replace it with the file itself")
    if not files:
        raise UserError(f"training data folder {data} holds no {kinds}")
    return files


def evenly_spaced(count: int, keep: int) -> np.ndarray:
    """``keep`` indices spread evenly over range(count), first and last included."""
    return np.unique(np.linspace(0, count - 1, keep).round().astype(int))


def _read_rgb_image(path: Path) -> np.ndarray | None:
    """An image file as RGB uint8, or None when it cannot be read as one."""
    try:
        image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    except (OSError, cv2.error):
        return None
    if image is None or image.size == 0:
        return None
    return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def _read_face_image(path: Path, resolution: int) -> np.ndarray | None:
    image = _read_rgb_image(path)
    if image is None:
        return None
    height, width = image.shape[:2]
    side = min(height, width)
    y, x = (height - side) // 2, (width - side) // 2
    square = image[y : y + side, x : x + side]
    interpolation = cv2.INTER_AREA if side > resolution else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(square, (resolution, resolution), interpolation=interpolation))


def _photo_faces(path: Path, resolution: int) -> list[np.ndarray] | None:
    """Aligned crops of every face the face module finds in a photo (its detection, landmarks and
    alignment, as for one video frame); None when the file cannot be read as an image."""
    from ipfacediff.face import alignment_transforms, crop_face, track_faces

    rgb = _read_rgb_image(path)
    if rgb is None:
        return None
    tracks = track_faces([rgb], fps=1.0)
    return [
        crop_face(rgb, alignment_transforms(track, resolution, smooth=False)[0], resolution) for track in tracks.tracks
    ]


def _video_faces(
    path: Path, resolution: int, cap: int, progress: Callable[[int, int], None] | None = None
) -> list[np.ndarray]:
    """Aligned crops of every tracked face of a video, at most ``cap``, evenly spread;
    ``progress(frames done, frames)`` during detection."""
    from ipfacediff.face import alignment_transforms, crop_face, detect_video_faces
    from ipfacediff.video import iter_frames, probe_video

    if progress is not None:
        frames = probe_video(path).frame_count
        tracks = detect_video_faces(path, progress=lambda done: progress(done, frames))
    else:
        tracks = detect_video_faces(path)
    pairs = sorted((frame, track.id) for track in tracks.tracks for frame in track.frames)
    if not pairs:
        return []
    if len(pairs) > cap:
        pairs = [pairs[i] for i in evenly_spaced(len(pairs), cap)]
    transforms = {t.id: alignment_transforms(t, resolution) for t in tracks.tracks}
    wanted: dict[int, list[int]] = {}
    for frame, track_id in pairs:
        wanted.setdefault(frame, []).append(track_id)
    last = max(wanted)
    crops = []
    for index, frame in enumerate(iter_frames(path)):
        for track_id in wanted.get(index, []):
            crops.append(crop_face(frame, transforms[track_id][index], resolution))
        if index >= last:
            break
    return crops


def faces_to_tensor(faces: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(faces)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# The trainer both models share


def _checkpoints(output: Path) -> list[tuple[int, Path]]:
    folder = output / "checkpoints"
    found = []
    if folder.is_dir():
        for child in folder.iterdir():
            if child.is_dir() and child.name.startswith(CHECKPOINT_PREFIX) and (child / "state.json").is_file():
                try:
                    found.append((int(child.name[len(CHECKPOINT_PREFIX) :]), child))
                except ValueError:
                    continue
    return sorted(found)


def _check_output(output: Path, resume: bool) -> None:
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} is a file: --output names the folder the trained model goes to")
    if not resume and ((output / "training.json").is_file() or _checkpoints(output)):
        raise UserError(
            f"{output} already holds a training run: pass --resume to continue it, or choose another --output"
        )


def _accelerator(mixed_precision: str, gradient_accumulation: int):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # AcceleratorState is process-wide and refuses a second, different precision; a new training
    # run in the same process (the tests, a notebook) may ask for one.
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state()
    try:
        return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation)
    except (ValueError, RuntimeError) as error:
        raise UserError(
            f"--mixed-precision {mixed_precision} is not available here: {str(error).strip().splitlines()[0][:200]}"
        ) from None


def _load_models(model: str, accelerator, weight_dtype: torch.dtype, full: bool, loading: dict):
    # Adapters are trained from the base model; ``loading``: load_model_set's config / allow_pickle.
    models = load_model_set(model, adapters=False, **loading)
    check_scheduler(models.scheduler)
    device = accelerator.device
    # The frozen parts run in the training precision; in full mode the VAE and text encoder stay
    # float32 so that the saved model folder is exact.
    frozen_dtype = torch.float32 if full else weight_dtype
    models.vae.to(device, frozen_dtype)
    models.text_encoder.to(device, frozen_dtype)
    models.unet.to(device, frozen_dtype)
    return models


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


class Trainer:
    """One training run of the UNet, ε1's or ε2's: the models, the trained weights and their
    optimizer, the random draws, the loop, the checkpoints and the files it leaves.

    A trainer function makes one (which loads the base model), computes what the frozen base gives
    (latents, inversions, prompt embeddings), then :meth:`add_trainable` makes the UNet trainable
    and :meth:`fit` runs the loop on the function's loss of a batch of face indices. The loop and
    everything written are the same for both models, so a checkpoint and its resumption behave
    the same whatever the loss.
    """

    def __init__(
        self,
        mode: str,
        model: str,
        output: Path,
        settings: TrainingSettings,
        *,
        resume: bool,
        config: str | None = None,
        allow_pickle: bool = False,
    ):
        _check_output(output, resume)
        self.mode, self.output, self.settings, self.resume = mode, output, settings, resume
        self.started = time.perf_counter()
        self.accelerator = _accelerator(settings.mixed_precision, settings.gradient_accumulation)
        self.device = self.accelerator.device
        self.weight_dtype = _weight_dtype(settings.mixed_precision)
        loading = dict(config=config, allow_pickle=allow_pickle)
        self.models = _load_models(model, self.accelerator, self.weight_dtype, settings.full, loading)
        self.resolution = settings.resolution or model_resolution(self.models.vae, self.models.unet)
        self.record: dict = {}  # what decides the result, in every checkpoint and training.json
        self.faces = 0
        self.losses: list[float] = []
        self.step = 0
        self.validation_before: float | None = None
        self.previous_seconds = 0.0  # of the runs this one resumes
        self.resumed_from: int | None = None

    def validation_faces(self) -> list[int]:
        """The faces of the fixed validation batch: a few, spread over the training set."""
        return evenly_spaced(self.faces, min(VALIDATION_FACES, self.faces)).tolist()

    def add_trainable(self, inputs: dict, faces: int) -> None:
        """Make the UNet trainable (LoRA or whole) and prepare it and its optimizer with accelerate.

        ``inputs``: what the run was given besides its settings (model, data and its digest, ...);
        with the settings, they are the run's record, which a resumed run must match."""
        settings, models = self.settings, self.models
        self.record = {**inputs, **settings.record(), "resolution": self.resolution}
        self.faces = faces
        unet = models.unet
        torch.manual_seed(settings.seed)
        if settings.full:
            unet.to(dtype=torch.float32).requires_grad_(True)
        else:
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(
                LoraConfig(
                    r=settings.rank,
                    lora_alpha=settings.rank,
                    init_lora_weights="gaussian",
                    target_modules=list(LORA_TARGET_MODULES),
                ),
                adapter_name=ADAPTER_NAME,
            )
        self.params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
        for param in self.params.values():  # trained weights stay float32 whatever the base's precision
            param.data = param.data.float()
        if settings.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            models.vae.enable_gradient_checkpointing()
        unet.train()
        self.raw_optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=settings.learning_rate, weight_decay=WEIGHT_DECAY
        )
        self.unet, self.optimizer = self.accelerator.prepare(unet, self.raw_optimizer)  # call self.unet
        self.raw_unet = self.accelerator.unwrap_model(self.unet)  # save self.raw_unet
        self.generator = torch.Generator().manual_seed(settings.seed)

    def fit(
        self,
        step_loss: Callable[[list[int]], torch.Tensor],
        validate: Callable[[], float],
        *,
        progress: TrainingProgress | None = None,
        components: dict | None = None,
    ) -> TrainingResult:
        """Resume when asked, train to ``max_steps``, write the outputs and the report.

        ``step_loss(faces)``: the loss of a batch of face indices (drawing its own noise from
        :attr:`generator`); ``validate()``: the loss of a fixed batch. ``components``: with
        ``full``, the other parts of a model folder to save the UNet with (else a UNet folder)."""
        if self.resume:
            self.load_checkpoint()
        if self.validation_before is None:
            with torch.no_grad(), self.accelerator.autocast():
                self.validation_before = validate()
        self.output.mkdir(parents=True, exist_ok=True)
        self.train(step_loss, progress)
        self.unet.eval()
        with torch.no_grad(), self.accelerator.autocast():
            validation_after = validate()
        adapter = self.write_outputs(components)
        seconds = time.perf_counter() - self.started
        self.write_report(adapter, seconds, validation_after)
        return TrainingResult(
            output=self.output,
            adapter=adapter,
            losses=list(self.losses),
            steps=self.step,
            seconds=seconds,
            validation_before=self.validation_before,
            validation_after=validation_after,
            resumed_from=self.resumed_from,
            faces=self.faces,
        )

    def train(self, step_loss: Callable[[list[int]], torch.Tensor], progress: TrainingProgress | None) -> None:
        """Optimizer steps up to max_steps; each draws ``gradient_accumulation`` batches."""
        settings, accelerator = self.settings, self.accelerator
        take = min(settings.batch_size, self.faces)
        while self.step < settings.max_steps:
            total = 0.0
            for _ in range(settings.gradient_accumulation):
                batch = torch.randperm(self.faces, generator=self.generator)[:take].tolist()
                with accelerator.accumulate(self.unet):
                    with accelerator.autocast():
                        loss = step_loss(batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(list(self.params.values()), MAX_GRAD_NORM)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                total += float(loss.detach()) / settings.gradient_accumulation
            if not math.isfinite(total):
                raise UserError(
                    f"training diverged at step {self.step + 1} (loss {total}): lower --learning-rate"
                    + (" or use --mixed-precision bf16/no" if settings.mixed_precision == "fp16" else "")
                )
            self.step += 1
            self.losses.append(total)
            if progress:
                progress("train", self.step, settings.max_steps, total)
            every = settings.checkpoint_every
            if self.step == settings.max_steps or (every and self.step % every == 0):
                self.save_checkpoint()

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """OUTPUT/checkpoints/step_XXXXXX: trained weights, optimizer, RNG states and losses, as
        safetensors and JSON, written to a temporary folder and renamed."""
        folder = self.output / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        temporary = folder / f".{final.name}.tmp{os.getpid()}"
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir()
        save_file(
            {n: p.detach().to("cpu").contiguous() for n, p in self.params.items()},
            str(temporary / "trainable.safetensors"),
        )
        if not self.settings.full:
            self.write_adapter(temporary / ADAPTER_FILE)
        optimizer_tensors, optimizer_rest = _flatten_optimizer(self.raw_optimizer.state_dict())
        save_file(optimizer_tensors, str(temporary / "optimizer.safetensors"))
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for index, state in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda_{index}"] = state
        save_file(rng, str(temporary / "rng.safetensors"))
        scaler = getattr(self.accelerator, "scaler", None)
        write_json(
            temporary / "state.json",
            {
                "step": self.step,
                "mode": self.mode,
                "settings": self.record,
                "losses": self.losses,
                "validation_before": self.validation_before,
                "seconds": self.previous_seconds + time.perf_counter() - self.started,
                "optimizer": optimizer_rest,
                "scaler": scaler.state_dict() if scaler is not None else None,
            },
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if self.settings.keep_checkpoints:
            for _, old in _checkpoints(self.output)[: -self.settings.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self) -> None:
        """Continue from the last checkpoint in OUTPUT, if any: the same run, the same settings."""
        found = _checkpoints(self.output)
        if not found:
            return
        step, folder = found[-1]
        try:
            state = json.loads((folder / "state.json").read_text())
            recorded, losses = state["settings"], list(state["losses"])
            trained = load_file(str(folder / "trainable.safetensors"))
            optimizer = _unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), state["optimizer"])
            rng = load_file(str(folder / "rng.safetensors"))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            raise UserError(
                f"cannot resume from {folder}: the checkpoint is incomplete or in another format; "
                "remove it or choose another --output"
            ) from None
        if state.get("mode") != self.mode:
            raise UserError(
                f"{self.output} holds a {state.get('mode')} training run, not {self.mode}: choose another --output"
            )
        differing = [k for k in self.record if k != "max_steps" and recorded.get(k) != self.record[k]]
        if differing:
            key = differing[0]
            raise UserError(
                f"cannot resume: the checkpoint in {self.output} was trained with {key}="
                f"{recorded.get(key)!r}, now {self.record[key]!r}; use the same settings "
                "or another --output"
            )
        if step > self.settings.max_steps:
            raise UserError(
                f"cannot resume: the last checkpoint is at step {step}, past --max-steps "
                f"{self.settings.max_steps}; raise --max-steps"
            )
        if set(trained) != set(self.params):
            raise UserError(f"checkpoint {folder} does not match this model: choose another --output")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(trained[name].to(param.device, param.dtype))
        self.raw_optimizer.load_state_dict(optimizer)
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available():
            cuda = [rng[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in rng]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        self.step = step
        self.losses = losses
        self.validation_before = state.get("validation_before")
        self.previous_seconds = float(state.get("seconds", 0.0))
        self.resumed_from = step

    # -- outputs -------------------------------------------------------------------------------

    def write_adapter(self, path: Path) -> None:
        """The LoRA in diffusers' format: keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight``."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.raw_unet, adapter_name=ADAPTER_NAME)
        tensors = {f"unet.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        # The adapter's LoraConfig as diffusers' save_lora_weights records it (keys "unet.<field>"),
        # so that diffusers' own loaders rebuild the same config rather than infer one.
        config = {
            f"unet.{k}": sorted(v) if isinstance(v, set) else v
            for k, v in self.raw_unet.peft_config[ADAPTER_NAME].to_dict().items()
        }
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True, default=str)}
        write_atomic(path, save(tensors, metadata=metadata))

    def write_outputs(self, components: dict | None) -> Path:
        """The adapter (or full UNet / model folder) and nothing else; returns its path."""
        self.output.mkdir(parents=True, exist_ok=True)
        if not self.settings.full:
            path = self.output / ADAPTER_FILE
            self.write_adapter(path)
            return path
        temporary = self.output / f".model.tmp{os.getpid()}"
        if temporary.exists():
            shutil.rmtree(temporary)
        if components is None:  # ε1: a UNet folder, read by --identity-model
            self.raw_unet.save_pretrained(temporary / "unet", safe_serialization=True)
        else:  # ε2: a whole model folder, read by --model
            from diffusers import StableDiffusionPipeline

            StableDiffusionPipeline(
                unet=self.raw_unet,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                **components,
            ).save_pretrained(temporary, safe_serialization=True)
        for child in temporary.iterdir():
            target = self.output / child.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(child, target)
        temporary.rmdir()
        return self.output / "unet"

    def write_report(self, adapter: Path, seconds: float, validation_after: float | None) -> None:
        write_json(
            self.output / "training.json",
            {
                "mode": self.mode,
                "adapter": str(adapter),
                "settings": self.record,
                "faces": self.faces,
                "steps": self.step,
                "losses": self.losses,
                "validation_loss": {"before": self.validation_before, "after": validation_after},
                "seconds": self.previous_seconds + seconds,
                "seconds_this_run": seconds,
                "resumed_from": self.resumed_from,
                "device": str(self.accelerator.device),
                "versions": library_versions("peft", "accelerate"),
            },
        )


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            key = f"{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().to("cpu").contiguous()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _identity_encoder(identity, device):
    from ipfacediff.identity import IdentityEncoder

    if not isinstance(identity, torch.nn.Module):  # else an IdentityEncoder or one with its interface
        identity = IdentityEncoder.from_pretrained(identity)
    return identity.to(device)


@torch.no_grad()
def _identity_embeddings(encoder, images: torch.Tensor, device, chunk: int = 16) -> torch.Tensor:
    return torch.cat([encoder(images[i : i + chunk].to(device)).float() for i in range(0, len(images), chunk)])


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1], differentiable."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float().clamp(-1, 1)


def _settings(cls: type[S], settings: S | None, options: dict) -> S:
    """``settings`` (default: ``cls()``) with the keyword ``options`` over it: a trainer takes
    either, so that a caller can name a few settings without building the object."""
    settings = cls() if settings is None else settings
    if not isinstance(settings, cls):
        raise TypeError(f"this trainer takes {cls.__name__}, not {type(settings).__name__}")
    return dataclasses.replace(settings, **options) if options else settings


# ---------------------------------------------------------------------------------------------
# ε1: the identity model


def denoising_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict for ``clean`` latents noised with ``noise``: the noise for an
    ε model, the velocity √ᾱ·ε − √(1−ᾱ)·x₀ for a v model. A v model fine-tuned on ε would be
    trained away from what its scheduler, and the sampler here, read from it."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    return noise


def train_identity(
    model: str,
    data: str | Path,
    output: str | Path,
    settings: IdentityTrainingSettings | None = None,
    *,
    resume: bool = False,
    identity=None,
    progress: TrainingProgress | None = None,
    config: str | None = None,
    allow_pickle: bool = False,
    **options: Any,
) -> TrainingResult:
    """Fine-tune ε1 on one subject's faces (``data``: image folder or video(s)); see the module doc.

    ``settings``: the run's :class:`IdentityTrainingSettings`; ``options``: any of its fields,
    over it. ``identity``: an IdentityEncoder, a path for IdentityEncoder.from_pretrained, or None
    (dlib's net). With ``full``, the whole UNet is saved as OUTPUT/unet (``--identity-model OUTPUT``).
    ``config`` / ``allow_pickle``: how ``model`` loads, as :func:`~ipfacediff.models.load_model_set`'s.
    """
    settings = _settings(IdentityTrainingSettings, settings, options)
    training_files(data)  # a missing or empty data folder fails before any model is loaded
    trainer = Trainer(
        "identity", model, Path(output).expanduser(), settings, resume=resume, config=config, allow_pickle=allow_pickle
    )
    models, device, weight_dtype = trainer.models, trainer.device, trainer.weight_dtype
    faces = load_training_faces(data, trainer.resolution, max_images=settings.max_images, progress=progress)
    encoder = _identity_encoder(identity, device) if settings.lambda_id > 0 else None

    latents = encode_frames(models.vae, faces)
    references = _identity_embeddings(encoder, faces_to_tensor(faces), device) if encoder is not None else None
    empty = encode_prompt(models.tokenizer, models.text_encoder, [""]).to(device, weight_dtype)
    alphas = models.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    prediction = models.scheduler.config.prediction_type
    trainer.add_trainable(
        dict(model=str(model), data=str(Path(data).expanduser().resolve()), faces_digest=frames_digest(faces)),
        len(faces),
    )

    def loss_of(batch: list[int], noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        z0 = latents[batch].to(device)
        noise, timesteps = noise.to(device), timesteps.to(device)
        a = alphas[timesteps].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        embeds = empty.expand(len(batch), -1, -1)
        output = trainer.unet(x_t.to(weight_dtype), timesteps, encoder_hidden_states=embeds).sample.float()
        loss = F.mse_loss(output, denoising_target(models.scheduler, z0, noise, timesteps))
        eps = predicted_noise(output, x_t, a, prediction)
        near = (timesteps <= settings.id_max_timestep).nonzero().flatten()
        if encoder is not None and len(near):
            x0 = (x_t[near] - (1 - a[near]).sqrt() * eps[near]) / a[near].sqrt()
            similarity = F.cosine_similarity(encoder(_decode(models.vae, x0)).float(), references[batch][near], dim=-1)
            loss = loss + settings.lambda_id * (1 - similarity).sum() / len(batch)
        return loss

    def step_loss(batch: list[int]) -> torch.Tensor:
        noise = torch.randn((len(batch), *latents.shape[1:]), generator=trainer.generator)
        timesteps = torch.randint(0, len(alphas), (len(batch),), generator=trainer.generator)
        return loss_of(batch, noise, timesteps)

    # The fixed validation batch: one noise per face, timesteps spread evenly so that both terms
    # are measured.
    fixed = torch.Generator().manual_seed(settings.seed + 1)
    val_faces = trainer.validation_faces()
    val_noise = torch.randn((len(val_faces), *latents.shape[1:]), generator=fixed)
    val_t = torch.tensor([int((i + 0.5) * len(alphas) / len(val_faces)) for i in range(len(val_faces))])
    return trainer.fit(step_loss, lambda: float(loss_of(val_faces, val_noise, val_t)), progress=progress)


# ---------------------------------------------------------------------------------------------
# ε2: the edit model


def edit_levels(t0: int, inversion_steps: int, generation_steps: int) -> tuple[list[int], list[int]]:
    """Timesteps of the partial inversion (0 → t0, ascending) and of the regeneration (t0 → 0)."""
    inversion = sorted({round(t0 * i / inversion_steps) for i in range(inversion_steps + 1)})
    generation = sorted({round(t0 * i / generation_steps) for i in range(generation_steps + 1)}, reverse=True)
    return inversion, generation


def train_edit(
    model: str,
    source: str,
    target: str,
    data: str | Path,
    clip: str,
    output: str | Path,
    settings: EditTrainingSettings | None = None,
    *,
    target_images: str | Path | None = None,
    paired_targets: str | Path | None = None,
    resume: bool = False,
    identity=None,
    progress: TrainingProgress | None = None,
    config: str | None = None,
    allow_pickle: bool = False,
    **options: Any,
) -> TrainingResult:
    """Fine-tune ε2 to turn ``source`` faces into ``target`` ones (DiffusionCLIP); see the module doc.

    ``settings``: the run's :class:`EditTrainingSettings`; ``options``: any of its fields, over it.
    ``clip``: a CLIPModel folder or hub id (the directional loss). With ``full``, the whole UNet is
    saved as a complete model folder in OUTPUT (``--model OUTPUT``). ``target_images``: example
    faces that show the target (other people will do; read as ``data``): the direction becomes the
    one from the training faces' mean CLIP image embedding to the examples' instead of the
    captions' text direction. A caption says what the attribute is called; examples show what it
    looks like, and a text direction can be met by a change that only CLIP reads as the attribute
    (a tinted patch for "blonde", a glow for "beard"). ``paired_targets``: a folder holding each
    training image (``data``, a folder of images) edited, under the same file name; the loss then
    compares the result with the edited face (module doc). Not with ``target_images``.
    ``config`` / ``allow_pickle``: how ``model`` loads, as :func:`~ipfacediff.models.load_model_set`'s.
    """
    settings = _settings(EditTrainingSettings, settings, options)
    _check_edit_arguments(source, target, data, target_images, paired_targets)
    scorer = load_clip(clip)
    trainer = Trainer(
        "edit", model, Path(output).expanduser(), settings, resume=resume, config=config, allow_pickle=allow_pickle
    )
    models, device, size = trainer.models, trainer.device, trainer.resolution
    scorer.to(device, trainer.weight_dtype)
    faces, edited = _edit_faces(data, paired_targets, size, max_images=settings.max_images, progress=progress)
    encoder = _identity_encoder(identity, device) if settings.lambda_id > 0 else None

    images = faces_to_tensor(faces)
    wanted = images if edited is None else faces_to_tensor(edited)  # what a result is compared with
    examples = (
        None if target_images is None else load_training_faces(target_images, size, max_images=settings.max_images)
    )
    reference_clip, direction = _clip_direction(
        scorer, images, device, edited=None if edited is None else wanted, examples=examples, texts=(source, target)
    )
    reference_id = _identity_embeddings(encoder, wanted, device) if encoder is not None else None
    source_embeds = encode_prompt(models.tokenizer, models.text_encoder, [source]).to(device, trainer.weight_dtype)
    target_embeds = encode_prompt(models.tokenizer, models.text_encoder, [target]).to(device, trainer.weight_dtype)
    alphas = models.scheduler.alphas_cumprod.to(torch.float32)
    inversion_levels, generation_levels = edit_levels(settings.t0, settings.inversion_steps, settings.generation_steps)
    inputs = _edit_inputs(model, source, target, data, clip, faces, target_images, examples, paired_targets, edited)

    # The base model is frozen: every face is inverted once, before the adapter exists.
    inverted = _inverted_faces(
        trainer, encode_frames(models.vae, faces), source_embeds, alphas, inversion_levels, inputs, progress
    )
    trainer.add_trainable(inputs, len(faces))
    loss_of = _edit_loss(
        trainer,
        scorer,
        encoder,
        inverted,
        target_embeds,
        alphas,
        generation_levels,
        references=(reference_clip, direction, reference_id, wanted),
    )
    val_faces = trainer.validation_faces()
    components = None
    if settings.full:
        components = dict(
            vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, scheduler=models.scheduler
        )
    return trainer.fit(loss_of, lambda: float(loss_of(val_faces)), progress=progress, components=components)


def _check_edit_arguments(
    source: str, target: str, data: str | Path, target_images: str | Path | None, paired_targets: str | Path | None
) -> None:
    """The captions and folders of an ε2 run checked before any model loads: a mistake is one line
    at once, not after minutes of loading."""
    if not source.strip() or not target.strip():
        raise UserError('--source and --target must both describe the face, e.g. "a face" and "a face with eyeglasses"')
    if source.strip() == target.strip():
        raise UserError("--source and --target are the same text: the target must describe the edit")
    training_files(data)  # a missing or empty data folder fails before any model is loaded
    if target_images is not None and paired_targets is not None:
        raise UserError("--target-images and --paired-targets both say what the edit looks like: give one")
    if target_images is not None:
        _option_files("--target-images", target_images)
    if paired_targets is not None:
        _option_files("--paired-targets", paired_targets)


def _edit_faces(
    data: str | Path,
    paired_targets: str | Path | None,
    size: int,
    *,
    max_images: int | None,
    progress: TrainingProgress | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The training faces and, with ``paired_targets``, each one's edited face (None without)."""
    if paired_targets is None:
        return load_training_faces(data, size, max_images=max_images, progress=progress), None
    return load_training_pairs(data, paired_targets, size, max_images=max_images, progress=progress)


def _edit_inputs(
    model: str,
    source: str,
    target: str,
    data: str | Path,
    clip: str,
    faces: np.ndarray,
    target_images: str | Path | None,
    examples: np.ndarray | None,
    paired_targets: str | Path | None,
    edited: np.ndarray | None,
) -> dict:
    """What an ε2 run was trained from, as its checkpoints record it: ``--resume`` continues only
    the same run."""
    inputs = dict(
        model=str(model),
        source=source,
        target=target,
        data=str(Path(data).expanduser().resolve()),
        clip=str(clip),
        faces_digest=frames_digest(faces),
    )
    if examples is not None:  # recorded only when used, so earlier runs still resume
        inputs.update(
            target_images=str(Path(target_images).expanduser().resolve()), target_images_digest=frames_digest(examples)
        )
    if edited is not None:
        inputs.update(
            paired_targets=str(Path(paired_targets).expanduser().resolve()), paired_targets_digest=frames_digest(edited)
        )
    return inputs


def _clip_direction(
    scorer,
    images: torch.Tensor,
    device,
    *,
    edited: torch.Tensor | None,
    examples: np.ndarray | None,
    texts: tuple[str, str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training faces' CLIP image embeddings and, per face, the direction its change should
    take in CLIP space: towards its edited face (pairs), towards the examples' mean, or else the
    captions' text direction (module doc)."""
    with torch.no_grad():
        reference = _clip_embeddings(scorer, images, device)
        if edited is not None:
            direction = F.normalize(_clip_embeddings(scorer, edited, device) - reference, dim=-1)
        elif examples is None:
            direction = scorer.text_direction(*texts).to(device).expand(len(images), -1)
        else:
            direction = image_direction(reference, _clip_embeddings(scorer, faces_to_tensor(examples), device))
            direction = direction.expand(len(images), -1)
    return reference, direction


def _edit_loss(
    trainer: Trainer,
    scorer,
    encoder,
    inverted: torch.Tensor,
    target_embeds: torch.Tensor,
    alphas: torch.Tensor,
    generation_levels,
    *,
    references: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor],
) -> Callable[[list[int]], torch.Tensor]:
    """ε2's loss of a batch of face indices: each inverted face generated with the target caption
    through the adapter being trained, then the directional CLIP term, and the identity and L1 terms
    where their weights ask for them."""
    reference_clip, direction, reference_id, wanted = references
    settings, models, device = trainer.settings, trainer.models, trainer.device
    prediction = models.scheduler.config.prediction_type

    def loss_of(batch: list[int]) -> torch.Tensor:
        clean = ddim_walk(
            trainer.unet,
            inverted[batch].to(device),
            target_embeds,
            alphas,
            generation_levels,
            prediction_type=prediction,
        )
        generated = _decode(models.vae, clean)
        change = scorer.image_embeddings(generated) - reference_clip[batch]
        loss = settings.lambda_dir * (1 - F.cosine_similarity(change, direction[batch], dim=-1)).mean()
        if encoder is not None:
            similarity = F.cosine_similarity(encoder(generated).float(), reference_id[batch], dim=-1)
            loss = loss + settings.lambda_id * (1 - similarity).mean()
        if settings.lambda_l1:
            loss = loss + settings.lambda_l1 * (generated - wanted[batch].to(device)).abs().mean()
        return loss

    return loss_of


def image_direction(reference: torch.Tensor, examples: torch.Tensor) -> torch.Tensor:
    """Unit vector (1, D) from the mean of the ``reference`` CLIP image embeddings (N, D) to the
    mean of the ``examples`` (M, D): what the people have in common cancels, the attribute stays."""
    return F.normalize((examples.mean(0) - reference.mean(0))[None], dim=-1)


def _clip_embeddings(scorer, images: torch.Tensor, device, chunk: int = 16) -> torch.Tensor:
    return torch.cat([scorer.image_embeddings(images[i : i + chunk].to(device)) for i in range(0, len(images), chunk)])


@torch.no_grad()
def _inverted_faces(
    trainer: Trainer,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    alphas: torch.Tensor,
    levels: list[int],
    inputs: dict,
    progress: TrainingProgress | None,
    batch_size: int = 8,
) -> torch.Tensor:
    """The training faces DDIM-inverted to t0 by the frozen base model, in an InversionCache in
    OUTPUT/cache so that a resumed run does not invert again."""
    unet, vae = trainer.models.unet, trainer.models.vae
    prediction = trainer.models.scheduler.config.prediction_type
    cache = InversionCache(trainer.output / "cache")
    key = cache.key(
        faces=inputs["faces_digest"],
        unet=module_fingerprint(unet),
        vae=module_fingerprint(vae),
        source=inputs["source"],
        levels=levels,
        dtype=str(unet.dtype),
    )
    cached = cache.load(key, "inverted")
    if cached is not None:
        return cached["latents"]
    embeds = embeds.to(unet.device, unet.dtype)
    starts = range(0, len(latents), batch_size)
    out = []
    for done, start in enumerate(starts):
        batch = latents[start : start + batch_size].to(unet.device)
        out.append(ddim_walk(unet, batch, embeds, alphas, levels, prediction_type=prediction).cpu())
        if progress:
            progress("invert", done + 1, len(starts), None)
    inverted = torch.cat(out)
    cache.save(key, "inverted", {"latents": inverted})
    return inverted


__all__ = [
    "EditTrainingSettings",
    "IdentityTrainingSettings",
    "Trainer",
    "TrainingProgress",
    "TrainingResult",
    "TrainingSettings",
    "denoising_target",
    "edit_levels",
    "evenly_spaced",
    "load_training_faces",
    "load_training_pairs",
    "training_files",
    "train_edit",
    "train_identity",
]
