"""What a model can edit: its model card and the in-domain check of every face track before an edit.

A model trained on one world draws nonsense on another (the embedded FaceWorld model on a real
face), and an edit that "succeeds" there only wastes the user's time. So a model folder may carry
a small **model card**, ``ipfacediff.json`` beside ``model_index.json``::

    {"format_version": 1, "domain": "faceworld", "model_name": "the embedded model",
     "description": "FaceWorld's drawn faces", "check": "vae_round_trip", "threshold": 16.0,
     "resolution": 64, "in_domain_min": 19.459, "out_of_domain_max": 11.405,
     "advice": "pass --model ... --device cuda for real videos, or run ipfacediff demo",
     "identity_net": null, "occluder_segmenter": null}

and before any UNet work every face track to be edited is checked (:func:`check_track`): a track
whose score is below the card's ``threshold`` is not what the model can edit, and the edit stops
with :attr:`DomainResult.message`. A model without a card (any SD-1.x folder, a hub id, a single
file, the tiny test models) is not checked. This module knows nothing about FaceWorld: the card
carries the numbers, measured by ``benchmarks/domain_check.py``.

The check, ``vae_round_trip`` (per aligned crop, inside the canonical face ellipse): the model's
own VAE round trip (encode, decode) of the crop, scored as its PSNR, less ``SHORTFALL_WEIGHT``
times how far that PSNR falls short of the PSNR of a plain 2x resample of the same crop (area
down, cubic up)::

    score = PSNR(VAE) - 3 * max(0, PSNR(2x resample) - PSNR(VAE))      (dB)

A VAE reproduces the world it was trained on far better than anything else, but PSNR alone also
rewards any crop with little in it: a real face cut from a 512 px frame shrinks to a smooth 64 px
crop, and a blurred, dark or flat one reaches the PSNR of a drawn face. The resample is the
content-blind yardstick: it loses only the finest detail, so a VAE that misses the crop's smooth
shading and colour (a photograph, which it turns into flat patches) falls far behind it, while on
its own world it keeps up with it. A black or uniform frame, which the resample copies exactly,
scores far below any face; noise scores low on PSNR itself. A track is judged on the median
score of up to ``SAMPLE`` crops spread evenly over it, so a blink or a turned head in a few frames
does not decide.

On the embedded model (``benchmarks/domain_check.py``): FaceWorld's faces score 19.5 dB and up (a
small face of a two-face 128 px scene; every other one 25 dB and up), the shared real clips 6.2 and
9.7, real faces shrunk, blurred, compressed, greyed, darkened or brightened and real photos at most
11.4; the card's threshold is 16. Real faces through a cartoon or stylisation filter score up to
17.9: a drawing style the check cannot always tell from FaceWorld's.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ipfacediff.errors import OutOfDomainError, UserError

MODEL_CARD = "ipfacediff.json"
FORMAT_VERSION = 1
SAMPLE = 16  # crops scored per track
SHORTFALL_WEIGHT = 3.0  # vae_round_trip: dB of score lost per dB the VAE falls behind the resample
RESAMPLE_FACTOR = 2  # vae_round_trip: the yardstick halves the crop's side and scales it back up
_EPSILON = 0.01  # added to every squared error: a perfect copy scores a finite 66 dB


@dataclass(frozen=True)
class ModelCard:
    """``MODEL/ipfacediff.json``: what the model in that folder can edit (see the module docstring).

    ``threshold``: a track passes when its median ``check`` score is at least this.
    ``in_domain_min`` / ``out_of_domain_max``: the lowest score of an in-domain face and the highest
    of an out-of-domain one where the card's author measured them (the margins of the threshold).
    ``resolution``: the crop side the numbers were measured at; crops of another side are resized
    to it before scoring (None: scored as they come). ``advice``: what to do instead, the end of
    the refusal line. ``identity_net``: the identity network identity guidance should use with this
    model (absolute once read; a path relative to the folder in the file), or None.
    ``occluder_segmenter``: likewise, the :class:`~ipfacediff.models.segmenter.OccluderSegmenter`
    folder that finds what is held still in front of this world's faces, or None.
    ``measured``: free-form notes of how the numbers were measured (kept, not interpreted).
    """

    domain: str
    description: str
    check: str
    threshold: float
    advice: str
    model_name: str = "the model"
    resolution: int | None = None
    in_domain_min: float | None = None
    out_of_domain_max: float | None = None
    identity_net: Path | None = None
    occluder_segmenter: Path | None = None
    measured: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def read(cls, model_folder: str | os.PathLike) -> ModelCard | None:
        """The card of a model folder; None when ``model_folder`` is not a folder (a hub id, a
        single weights file) or has no ``ipfacediff.json``. A malformed card is one UserError
        line naming the file."""
        from ipfacediff.files import read_json

        if not str(model_folder):
            return None
        folder = Path(model_folder).expanduser()
        file = folder / MODEL_CARD
        if not folder.is_dir() or not os.path.lexists(file):
            return None
        fix = "fix it (see ModelCard in ipfacediff/domain.py) or remove it, which turns the in-domain check off"
        data = read_json(file, "model card", fix)
        try:
            return cls.from_dict(data, folder)
        except (ValueError, KeyError, TypeError) as error:
            detail = f"lacks {error}" if isinstance(error, KeyError) else str(error)
            raise UserError(f"model card {file} is not valid ({detail}); {fix}") from None

    @classmethod
    def from_dict(cls, data: Any, folder: str | os.PathLike | None = None) -> ModelCard:
        """A card from its JSON object; ``folder`` resolves its paths (ValueError,
        KeyError or TypeError, with what is wrong, on a bad card)."""
        if not isinstance(data, dict):
            raise TypeError(f"it holds a JSON {type(data).__name__}, not an object")
        version = data["format_version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"format_version {version} is newer than this ipfacediff reads ({FORMAT_VERSION}); update ipfacediff"
            )
        check = _text(data, "check")
        if check not in CHECKS:
            raise ValueError(f"check {check!r} is not one of {', '.join(sorted(CHECKS))}")
        resolution = data.get("resolution")
        if resolution is not None and (
            isinstance(resolution, bool) or not isinstance(resolution, int) or not 8 <= resolution <= 4096
        ):
            raise ValueError(f"resolution must be null or an integer from 8 to 4096, got {resolution!r}")
        identity = _model_path(data, "identity_net", folder)
        segmenter = _model_path(data, "occluder_segmenter", folder)
        measured = data.get("measured", {})
        if not isinstance(measured, dict):
            raise ValueError(f"measured must be an object, got {type(measured).__name__}")
        return cls(
            domain=_text(data, "domain"),
            description=_text(data, "description"),
            check=check,
            threshold=_finite(data, "threshold"),
            advice=_text(data, "advice"),
            model_name=_text(data, "model_name") if "model_name" in data else "the model",
            resolution=resolution,
            in_domain_min=_finite(data, "in_domain_min", optional=True),
            out_of_domain_max=_finite(data, "out_of_domain_max", optional=True),
            identity_net=identity,
            occluder_segmenter=segmenter,
            measured=measured,
            format_version=version,
        )

    def to_dict(self, folder: str | os.PathLike | None = None) -> dict:
        """The card as its JSON object (``identity_net`` relative to ``folder`` when given)."""
        data = asdict(self)
        for key in ("identity_net", "occluder_segmenter"):
            if data[key] is not None:
                path = Path(data[key])
                relative = folder is not None and path.is_absolute()
                data[key] = os.path.relpath(path, folder) if relative else str(path)
        return data

    def write(self, model_folder: str | os.PathLike) -> Path:
        """Write ``MODEL/ipfacediff.json`` (strict JSON: a NaN or infinity raises)."""
        from ipfacediff.files import write_json

        folder = Path(model_folder).expanduser()
        return write_json(folder / MODEL_CARD, self.to_dict(folder))


def _model_path(data: dict, key: str, folder: str | os.PathLike | None) -> Path | None:
    """``data[key]``: null, or a path relative to the model folder that exists (ValueError)."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be null or a path relative to the model folder, got {value!r}")
    path = Path(os.path.abspath(Path(folder or ".").expanduser() / value))
    if not path.exists():
        raise ValueError(f"{key} {path} does not exist")
    return path


def _text(data: dict, key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value.strip() or "\n" in value:
        raise ValueError(f"{key} must be a non-empty one-line string, got {value!r}")
    return value.strip()


def _finite(data: dict, key: str, *, optional: bool = False) -> float | None:
    value = data.get(key) if optional else data[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number{' or null' if optional else ''}, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# The checks: name -> per-crop scores (higher = more like the model's world)


def _face_region(size: int) -> np.ndarray:
    """(size, size) bool: the canonical face ellipse of an aligned crop."""
    from ipfacediff.face import CANONICAL_FACE_ELLIPSE

    cx, cy, rx, ry = CANONICAL_FACE_ELLIPSE
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _region_psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> np.ndarray:
    diff = a.astype(np.float64)[:, region] - b.astype(np.float64)[:, region]
    mse = (diff**2).reshape(len(a), -1).mean(axis=1)
    return 10.0 * np.log10(255.0**2 / (mse + _EPSILON))


def _resampled(crops: np.ndarray, factor: int) -> np.ndarray:
    import cv2

    h, w = crops.shape[1:3]
    small = (max(1, w // factor), max(1, h // factor))
    return np.stack(
        [
            cv2.resize(cv2.resize(c, small, interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_CUBIC)
            for c in crops
        ]
    )


def vae_round_trip_parts(vae, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per crop, inside the face ellipse: (PSNR of the VAE round trip, PSNR of the 2x resample), dB."""
    from ipfacediff.diffusion import decode_latents, encode_frames

    crops = np.ascontiguousarray(crops)
    region = _face_region(crops.shape[1]) if crops.shape[1] == crops.shape[2] else np.ones(crops.shape[1:3], bool)
    round_trip = decode_latents(vae, encode_frames(vae, crops, batch_size=SAMPLE), batch_size=SAMPLE)
    return _region_psnr(crops, round_trip, region), _region_psnr(crops, _resampled(crops, RESAMPLE_FACTOR), region)


def _vae_round_trip(vae, crops: np.ndarray) -> np.ndarray:
    vae_psnr, resample_psnr = vae_round_trip_parts(vae, crops)
    return vae_psnr - SHORTFALL_WEIGHT * np.maximum(0.0, resample_psnr - vae_psnr)


CHECKS: dict[str, Callable[[Any, np.ndarray], np.ndarray]] = {"vae_round_trip": _vae_round_trip}


def sample_indices(count: int, sample: int = SAMPLE) -> np.ndarray:
    """Up to ``sample`` indices spread evenly over ``count`` items, first and last included."""
    if count <= sample:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, sample).round().astype(int))


def _as_crops(crops: Any, resolution: int | None = None) -> np.ndarray:
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[-1] != 3 or len(crops) == 0 or crops.dtype != np.uint8:
        raise ValueError(f"crops must be a non-empty (N, H, W, 3) uint8 array, got {crops.dtype} {crops.shape}")
    if resolution is not None and crops.shape[1:3] != (resolution, resolution):
        import cv2

        shrink = crops.shape[1] * crops.shape[2] > resolution * resolution
        crops = np.stack(
            [
                cv2.resize(c, (resolution, resolution), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
                for c in crops
            ]
        )
    return crops


def domain_scores(vae, crops: np.ndarray, *, sample: int = SAMPLE, check: str = "vae_round_trip") -> np.ndarray:
    """The ``check`` score (dB) of up to ``sample`` of ``crops`` (N, H, W, 3 uint8 aligned face
    crops) spread evenly over them, in their order: float64 (min(N, sample),)."""
    crops = _as_crops(crops)
    return CHECKS[check](vae, crops[sample_indices(len(crops), sample)])


@dataclass(frozen=True)
class DomainResult:
    """One track's verdict. ``score``: the median of its sampled crops' scores; ``message``: one
    line, the refusal (without ``error:``) when not ``passed``, else what was found."""

    passed: bool
    score: float
    threshold: float
    message: str
    scores: tuple[float, ...] = ()  # the sampled crops' scores, in frame order
    label: str = ""  # the face, as the message names it
    model_name: str = "the model"
    description: str = ""  # what the model edits (the card's)

    def error(self) -> OutOfDomainError:
        """The refusal as an error: the message for the command line, its parts for the web page."""
        return OutOfDomainError(
            self.message,
            label=self.label,
            model_name=self.model_name,
            description=self.description,
            score=self.score,
            threshold=self.threshold,
        )


def check_track(card: ModelCard, vae, crops: np.ndarray, *, label: str, sample: int = SAMPLE) -> DomainResult:
    """Check one face track (its aligned crops, N x H x W x 3 uint8, in frame order) against the
    card; ``label`` names it in the message, e.g. "face 0 of interview.mp4"."""
    scores = domain_scores(vae, _as_crops(crops, card.resolution), sample=sample, check=card.check)
    score = float(np.median(scores))
    passed = score >= card.threshold
    if passed:
        message = (
            f"{label} is in {card.model_name}'s domain ({card.description}; {card.check} {score:.1f} dB, "
            f"threshold {card.threshold:g} dB)"
        )
    else:
        message = (
            f"{card.model_name} edits {card.description}, and {label} is not one "
            f"(check: {card.check} score {score:.1f} dB, needs at least {card.threshold:g} dB): {card.advice}"
        )
    return DomainResult(
        passed,
        score,
        float(card.threshold),
        message,
        tuple(float(s) for s in scores),
        label=label,
        model_name=card.model_name,
        description=card.description,
    )


def check_faces(
    card: ModelCard, vae, crops: Mapping[int, Mapping[int, np.ndarray]], video_name: str, *, sample: int = SAMPLE
) -> dict[int, DomainResult]:
    """Check every track of :attr:`ipfacediff.job.FaceCrops.crops` (track id -> frame -> crop),
    labelled "face ID of VIDEO_NAME"; tracks without crops are skipped. Track id -> result."""
    results = {}
    for track_id, by_frame in crops.items():
        if by_frame:
            stack = np.stack([by_frame[f] for f in sorted(by_frame)])
            results[track_id] = check_track(card, vae, stack, label=f"face {track_id} of {video_name}", sample=sample)
    return results
