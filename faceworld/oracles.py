"""Two small networks trained on FaceWorld: an identity net and an attribute oracle.

The FaceWorld benchmark cannot use a real face-recognition or attribute model (FaceWorld people are
cartoons), so it uses its own, trained here on the *training* identities only (ids < 1000) and
measured on the held-out ones (ids >= 1000):

* :class:`FaceWorldIdentity` -- a CNN (64x64 aligned crop -> 128-d, L2-normalised) trained by
  metric learning on identity ids (CosFace: normalised softmax with an additive cosine margin over
  the training identities) plus a pair term that pulls together two renders of one person that
  differ only in attributes. Every training image has random attributes, head turn, expression,
  light, backdrop and residual misalignment, so the embedding ignores edits (glasses, hair colour,
  beard, smile, age, hat) and motion and keeps the person. It has the method names of
  :class:`ipfacediff.identity.IdentityEncoder` (``forward``, ``descriptor``, ``distance``,
  ``similarity``, ``from_pretrained``, ``embedding_dim``), so the project can use it wherever
  that encoder is used. Its descriptors are already L2-normalised: :meth:`distance` is the
  Euclidean distance of unit vectors (0 .. 2, ``sqrt(2 - 2 cos)``); below
  ``same_person_threshold`` (measured on held-out pairs at training time, in ``config.json``)
  means "same person".
* :class:`AttributeOracle` -- a CNN (64x64 aligned crop -> 6 logits) for :data:`ATTRIBUTE_NAMES`:
  eyeglasses, blonde hair, beard, smile (``smile >= SMILING``), old (``age >= OLD_AGE``), hat.
  "blonde_hair" is the *visible* hair colour (see :func:`attribute_labels`): dyed blonde
  (``hair_colour == "blonde"``) or a natural blonde whose hair has not greyed with age; a
  natural blonde looks blonde, so calling them "not blonde" would ask the oracle to know who
  they are. :func:`attribute_labels` is the ground truth the oracle is scored against.

:func:`train_oracles` renders the data (with a process pool), trains both, evaluates them on
held-out identities and writes ``OUTPUT/identity/``, ``OUTPUT/attributes/`` (``config.json`` +
``model.safetensors``, fp16) and ``OUTPUT/oracles.json``::

    ipfacediff faceworld oracles OUTPUT --preset smoke|cpu|gpu [--device auto] [--seed 0]
    (the same as python -m faceworld oracles ...)

Presets: ``smoke`` (seconds; the tests), ``cpu`` (about 13 minutes on two busy cores: 16k renders,
8 minutes for the identity net, 2 for the oracle), ``gpu`` (about 85 s on one H100 with 16 cores:
48k renders in ~28 s with a process pool, 40 s identity net, 10 s oracle). Training stops at the
preset's step count or its time budget, whichever comes first (the learning-rate schedule follows
whichever is further along), so a slow machine still finishes in time; ``oracles.json`` records
the steps actually taken.

Rendering with ``workers > 1`` uses a "spawn" process pool (torch's thread pools do not survive a
fork), so a script that calls :func:`train_oracles` with workers must guard its entry point with
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ipfacediff.job import pick_device
from faceworld.attributes import EDITS, OLD_AGE, SMILING, Attributes
from faceworld.identity import HAIR_COLOURS, HELD_OUT_IDS, TRAIN_IDS, Identity, identity, is_held_out
from faceworld.render import Lighting, Pose, hair_rgb, render_scene
from faceworld.scene import DatasetItem, align_pose, misaligned, random_attributes

__all__ = [
    "ATTRIBUTE_NAMES",
    "PRESETS",
    "AttributeOracle",
    "FaceWorldIdentity",
    "FaceWorldNet",
    "Preset",
    "TrainingSet",
    "attribute_labels",
    "evaluate_oracles",
    "render_heldout_set",
    "render_training_set",
    "train_oracles",
]

INPUT_SIZE = 64
ATTRIBUTE_NAMES = ("eyeglasses", "blonde_hair", "beard", "smile", "old", "hat")
IDENTITY_KIND = "faceworld-identity"
ORACLE_KIND = "faceworld-attribute-oracle"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Used until a trained model states its own (a unit-vector distance: cos ~ 0.5).
DEFAULT_SAME_PERSON_THRESHOLD = 1.0
_EVAL_SEED = 0x0E7A1  # held-out sets do not depend on the training seed


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------


def _nearest_hair_colour(rgb) -> str:
    names = list(HAIR_COLOURS)
    ref = np.array([HAIR_COLOURS[n] for n in names])
    return names[int(np.argmin(np.linalg.norm(ref - np.asarray(rgb, float), axis=1)))]


def attribute_labels(person: int | Identity, attributes: Attributes) -> dict[str, bool]:
    """The oracle's ground truth for ``attributes`` on ``person`` (an id or an Identity).

    ``blonde_hair``: the rendered head-hair colour (:func:`hair_rgb`: the dyed or natural colour,
    greyed with age) is nearest to the named blonde -- true for ``hair_colour == "blonde"`` at
    any age and for young natural blondes. ``smile``: ``smile >= SMILING``; ``old``:
    ``age >= OLD_AGE``; the others are the attributes themselves.
    """
    idt = identity(person) if isinstance(person, (int, np.integer)) else person
    return {
        "eyeglasses": bool(attributes.eyeglasses),
        "blonde_hair": _nearest_hair_colour(hair_rgb(idt, attributes)) == "blonde",
        "beard": bool(attributes.beard),
        "smile": float(attributes.smile) >= SMILING,
        "old": float(attributes.age) >= OLD_AGE,
        "hat": bool(attributes.hat),
    }


def _label_vector(person, attributes: Attributes) -> np.ndarray:
    labels = attribute_labels(person, attributes)
    return np.array([labels[n] for n in ATTRIBUTE_NAMES], np.float32)


# The identity parameters the identity net also regresses (from its embedding, linearly): the
# visible, edit-independent ones. Their scale is standardised over the training identities.
_SCALAR_PARAMS = (
    "head_w",
    "top_y",
    "jaw_w",
    "jaw_y",
    "chin_y",
    "chin_w",
    "cheek",
    "eye_dx",
    "eye_w",
    "eye_h",
    "eye_tilt",
    "iris_r",
    "brow_dy",
    "brow_len",
    "brow_thick",
    "brow_arch",
    "brow_tilt",
    "nose_w",
    "nose_side",
    "nose_round",
    "mouth_w",
    "lip_up",
    "lip_lo",
    "ear_h",
    "ear_w",
    "ear_y",
    "hairline_y",
    "hair_volume",
)
_COLOUR_PARAMS = ("skin", "iris", "lip", "hair")


def identity_parameters(person: int | Identity) -> np.ndarray:
    """A person's visible parameters as one float vector (scalars, colours / 255, hair style and
    parting one-hot, freckles, number of moles); :func:`_standardised_parameters` scales them."""
    from faceworld.identity import HAIR_STYLES

    idt = identity(person) if isinstance(person, (int, np.integer)) else person
    values = [float(getattr(idt, k)) for k in _SCALAR_PARAMS]
    for k in _COLOUR_PARAMS:
        values += [c / 255.0 for c in getattr(idt, k)]
    values += [float(idt.hair_style == h) for h in HAIR_STYLES]
    values += [float(idt.part == k) for k in (-1, 0, 1)]
    values += [float(bool(idt.freckles)), float(len(idt.moles))]
    return np.array(values, np.float32)


def _standardised_parameters(ids: Sequence[int]) -> np.ndarray:
    """(len(ids), P) identity parameters, standardised with the statistics of TRAIN_IDS."""
    train = np.stack([identity_parameters(i) for i in TRAIN_IDS])
    mean, std = train.mean(0), train.std(0) + 1e-6
    return (np.stack([identity_parameters(int(i)) for i in ids]) - mean) / std


# ----------------------------------------------------------------------------------------------
# Sampling and rendering
# ----------------------------------------------------------------------------------------------


def _scene(identity_id: int, rng: np.random.Generator) -> DatasetItem:
    """One aligned view of a person: random attributes, head turn (as far as scene clips turn),
    nod, blink, talking, light, backdrop and residual misalignment (as ``dataset_item``)."""
    attrs = random_attributes(rng)
    j = rng.normal(0, 1, 6)
    wide = rng.random() < 0.5
    pose = Pose(
        yaw=float(np.clip(j[0] * (16 if wide else 7), -38, 38)),
        pitch=float(np.clip(j[1] * 5, -12, 12)),
        eyes_open=1.0 if rng.random() < 0.9 else float(rng.uniform(0, 1)),
        mouth_open=0.0 if rng.random() < 0.7 else float(rng.uniform(0, 0.8)),
    )
    light = Lighting(
        float(rng.uniform(0, 360)),
        float(rng.uniform(40, 80)),
        float(rng.uniform(0.12, 0.5)),
        float(rng.uniform(0.8, 1.2)),
        float(rng.uniform(-0.5, 0.5)),
    )
    final = misaligned(align_pose(identity(identity_id), pose), j[2:6], shift=0.01, degrees=2.0, zoom=0.025)
    return DatasetItem(int(identity_id), attrs, final, light, int(rng.integers(0, 2**31 - 1)))


_OFF = {"eyeglasses": False, "hair_colour": None, "beard": False, "smile": 0.0}


def _variant(attrs: Attributes, rng: np.random.Generator) -> Attributes:
    """Other attributes for the same view: one edit made (or undone), or all attributes redrawn."""
    if rng.random() < 0.6:
        edit = list(EDITS.values())[int(rng.integers(len(EDITS)))]
        new = edit.apply(attrs)
        if new == attrs:  # already on: take it off instead
            new = attrs.replace(**{k: _OFF[k] for k, _ in edit.changes})
        return new
    return random_attributes(rng)


def _render(item: DatasetItem, attributes: Attributes | None = None) -> np.ndarray:
    idt = identity(item.identity_id)
    return render_scene([(idt, attributes or item.attributes, item.pose)], INPUT_SIZE, item.background, item.lighting)


def _render_train_chunk(args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, scenes, seed = args
    images, id_out, labels = [], [], []
    for i in ids:
        for k in range(scenes):
            rng = np.random.default_rng([0x0AC1E, int(seed), int(i), k])
            item = _scene(int(i), rng)
            other = _variant(item.attributes, rng)
            for attrs in (item.attributes, other):
                images.append(_render(item, attrs))
                id_out.append(int(i))
                labels.append(_label_vector(int(i), attrs))
    return np.stack(images), np.array(id_out, np.int64), np.stack(labels)


def _render_eval_chunk(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per id: view A, view B (other attributes and pose), and view A with each EDIT applied."""
    ids, seed = args
    images, labels, valid = [], [], []
    for i in ids:
        views = [_scene(int(i), np.random.default_rng([_EVAL_SEED, int(seed), int(i), k])) for k in range(2)]
        for v in views:
            images.append(_render(v))
            labels.append(_label_vector(int(i), v.attributes))
            valid.append(True)
        for edit in EDITS.values():
            new = edit.apply(views[0].attributes)
            images.append(_render(views[0], new))
            labels.append(_label_vector(int(i), new))
            valid.append(new != views[0].attributes)
    return np.stack(images), np.array(ids, np.int64), np.stack(labels), np.array(valid)


def _chunks(ids: Sequence[int], size: int) -> list[list[int]]:
    ids = [int(i) for i in ids]
    return [ids[k : k + size] for k in range(0, len(ids), size)]


def _map(fn, jobs: list, workers: int) -> list:
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    # spawn: the parent may already run torch's thread pools, which do not survive a fork.
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(fn, jobs))


@dataclass
class TrainingSet:
    """Rendered training data: ``images`` (N, 64, 64, 3) uint8, ``identity_ids`` (N,), ``labels``
    (N, 6) in :data:`ATTRIBUTE_NAMES` order, person by person, ``scenes`` views each, two renders
    per view: image ``(p * scenes + v) * 2 + r``. Renders ``r = 0, 1`` of a view differ only in
    attributes (the pair the identity net must not tell apart)."""

    images: np.ndarray
    identity_ids: np.ndarray
    labels: np.ndarray
    scenes: int = 1

    def __len__(self) -> int:
        return len(self.images)


def render_training_set(identity_ids: Sequence[int], scenes: int, seed: int = 0, workers: int = 0) -> TrainingSet:
    """``scenes`` views of each training identity, two renders per view (see :class:`TrainingSet`).

    Held-out ids (>= 1000) are refused: the oracles never see the people they are scored on.
    """
    ids = [int(i) for i in identity_ids]
    held = [i for i in ids if is_held_out(i) or i < 0]
    if held:
        raise ValueError(f"the oracles train on training identities (0..{TRAIN_IDS.stop - 1}) only, got {held[:5]}")
    parts = _map(_render_train_chunk, [(c, int(scenes), int(seed)) for c in _chunks(ids, 8)], workers)
    return TrainingSet(*(np.concatenate([p[k] for p in parts]) for k in range(3)), scenes=int(scenes))


@dataclass
class HeldOutSet:
    """Held-out renders: per id, 6 images (view A, view B, A + each of the 4 EDITS)."""

    images: np.ndarray  # (n, 6, 64, 64, 3)
    identity_ids: np.ndarray  # (n,)
    labels: np.ndarray  # (n, 6, 6)
    valid: np.ndarray  # (n, 6): False where an edit changes nothing (already on)


def render_heldout_set(count: int, seed: int = 0, workers: int = 0) -> HeldOutSet:
    """``count`` distinct held-out identities (ids >= 1000), drawn with a fixed seed."""
    rng = np.random.default_rng([_EVAL_SEED, int(seed)])
    ids = sorted(int(i) for i in rng.choice(np.asarray(HELD_OUT_IDS), size=int(count), replace=False))
    assert all(is_held_out(i) for i in ids)
    parts = _map(_render_eval_chunk, [(c, int(seed)) for c in _chunks(ids, 8)], workers)
    n_views = 2 + len(EDITS)
    images = np.concatenate([p[0] for p in parts]).reshape(-1, n_views, INPUT_SIZE, INPUT_SIZE, 3)
    labels = np.concatenate([p[2] for p in parts]).reshape(-1, n_views, len(ATTRIBUTE_NAMES))
    valid = np.concatenate([p[3] for p in parts]).reshape(-1, n_views)
    return HeldOutSet(images, np.concatenate([p[1] for p in parts]), labels, valid)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FaceWorldNet(nn.Module):
    """A small plain CNN for 64x64 crops in [-1, 1]: a stride-``stem_stride`` stem, then per width
    a stride-2 and a stride-1 3x3 conv (BN, ReLU), then flatten -> linear -> ``out_dim``."""

    def __init__(
        self,
        stem: int = 24,
        widths: Sequence[int] = (48, 96, 192),
        out_dim: int = 128,
        stem_stride: int = 2,
        dropout: float = 0.0,
        out_bn: bool = False,
    ) -> None:
        super().__init__()
        self.arch = {
            "stem": int(stem),
            "widths": [int(w) for w in widths],
            "out_dim": int(out_dim),
            "stem_stride": int(stem_stride),
            "dropout": float(dropout),
            "out_bn": bool(out_bn),
        }
        layers = _conv_bn_relu(3, stem, stem_stride)
        c = stem
        for w in widths:
            layers += _conv_bn_relu(c, w, 2) + _conv_bn_relu(w, w, 1)
            c = w
        self.features = nn.Sequential(*layers)
        side = INPUT_SIZE // stem_stride // 2 ** len(widths)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c * side * side, out_dim)
        self.out_bn = nn.BatchNorm1d(out_dim) if out_bn else nn.Identity()
        self.out_dim = int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_bn(self.fc(self.dropout(self.features(x).flatten(1))))


def _to_input(crops: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1], any size -> float (B, 3, 64, 64)."""
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) crops, got {tuple(crops.shape)}")
    crops = crops.float()
    if tuple(crops.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
        big = max(crops.shape[-2:]) > INPUT_SIZE
        crops = F.interpolate(crops, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=big, align_corners=False)
    return crops


def _images_to_tensor(images, device) -> torch.Tensor:
    """uint8 (N, H, W, 3) / (H, W, 3) array or tensor -> (N, 3, H, W) in [-1, 1]; a float tensor
    (N, 3, H, W) is taken to be in [-1, 1] already."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.ndim == 3:
        images = images[None]
    if images.dtype == torch.uint8:
        if images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)
        return images.to(device).float() / 127.5 - 1.0
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected uint8 (N, H, W, 3) images or float (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}"
        )
    return images.to(device).float()


def _save(net: FaceWorldNet, directory: str | Path, config: dict) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        state[k] = v.detach().to("cpu", torch.float16).contiguous()
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"kind": config["kind"]})
    os.chmod(directory / WEIGHTS_FILE, 0o644)  # safetensors writes 0600; these are shared artefacts
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _load(directory: str | Path, kind: str) -> tuple[FaceWorldNet, dict]:
    from safetensors.torch import load_file

    directory = Path(directory)
    if directory.is_file() and directory.name in (CONFIG_FILE, WEIGHTS_FILE):
        directory = directory.parent
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved {kind} model ({CONFIG_FILE} + {WEIGHTS_FILE})")
    config = json.loads(config_path.read_text())
    if config.get("kind") != kind:
        raise ValueError(f"{directory} holds a {config.get('kind')!r} model, not a {kind!r}")
    net = FaceWorldNet(**config["arch"])
    state = {k: v.float() for k, v in load_file(str(weights_path)).items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not fit the architecture in {CONFIG_FILE}: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return net, config


def _round_to_half(net: nn.Module) -> None:
    """Make the in-memory weights what fp16 on disk will hold, so a reload gives the same outputs."""
    with torch.no_grad():
        for t in list(net.parameters()) + [b for b in net.buffers() if b.is_floating_point()]:
            t.copy_(t.half().float())


class FaceWorldIdentity(nn.Module):
    """FaceWorld identity embedding, with :class:`ipfacediff.identity.IdentityEncoder`'s interface.

    ``forward(crops)``: ``(B, 3, H, W)`` RGB crops in [-1, 1] aligned to CANONICAL_FIVE_POINTS
    (any size; resized to 64) -> ``(B, 128)`` L2-normalised embeddings, differentiable w.r.t. the
    crops. :meth:`descriptor` is the same unit vector, so :meth:`distance` is the Euclidean distance
    of unit vectors (0 .. 2); below :attr:`same_person_threshold` means "same person". The weights
    are frozen and the net always runs in inference mode, as IdentityEncoder's.
    """

    input_size = INPUT_SIZE

    def __init__(
        self,
        net: FaceWorldNet | None = None,
        *,
        same_person_threshold: float | None = None,
        metadata: dict | None = None,
    ) -> None:
        super().__init__()
        self.net = net if net is not None else FaceWorldNet(out_bn=True)
        self.net.eval().requires_grad_(False)
        self.embedding_dim = int(self.net.out_dim)
        self.chip_size = INPUT_SIZE
        self.same_person_threshold = float(
            DEFAULT_SAME_PERSON_THRESHOLD if same_person_threshold is None else same_person_threshold
        )
        self.metadata = dict(metadata or {})

    def train(self, mode: bool = True) -> FaceWorldIdentity:
        super().train(mode)
        self.net.eval()
        return self

    def to_chip(self, crops: torch.Tensor) -> torch.Tensor:
        """Canonical crops in [-1, 1] -> the network's 64x64 input (also in [-1, 1])."""
        return _to_input(crops)

    def descriptor(self, crops: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``(B, 128)`` descriptors (what :meth:`distance` compares)."""
        return F.normalize(self.net(self.to_chip(crops)), dim=-1)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``(B, 128)`` identity embeddings of canonical crops in [-1, 1]."""
        return self.descriptor(crops)

    @staticmethod
    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Euclidean distance of descriptors (unit vectors: ``sqrt(2 - 2 cos)``, 0 .. 2)."""
        return torch.linalg.vector_norm(a - b, dim=-1)

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of embeddings (1 = same direction)."""
        return F.cosine_similarity(a, b, dim=-1)

    def same_person(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Whether descriptors ``a`` and ``b`` are closer than :attr:`same_person_threshold`."""
        return self.distance(a, b) < self.same_person_threshold

    @torch.no_grad()
    def embed_images(self, images, batch_size: int = 512) -> np.ndarray:
        """uint8 (N, H, W, 3) images -> float32 (N, 128) embeddings."""
        device = next(self.net.parameters()).device
        x = _images_to_tensor(images, "cpu")
        out = [self(x[k : k + batch_size].to(device)).float().cpu() for k in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.embedding_dim), np.float32)

    def save_pretrained(self, directory: str | Path) -> Path:
        config = {
            "kind": IDENTITY_KIND,
            "format_version": FORMAT_VERSION,
            "input_size": INPUT_SIZE,
            "input_range": [-1.0, 1.0],
            "alignment": "ipfacediff.face.CANONICAL_FIVE_POINTS",
            "embedding_dim": self.embedding_dim,
            "arch": self.net.arch,
            "same_person_threshold": self.same_person_threshold,
            "distance": "euclidean on L2-normalised embeddings",
            "dtype_on_disk": "float16",
            **{k: v for k, v in self.metadata.items() if k not in ("kind", "arch")},
        }
        return _save(self.net, directory, config)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FaceWorldIdentity:
        """A model written by :meth:`save_pretrained` (a directory with config.json and
        model.safetensors, or either file in it)."""
        net, config = _load(path, IDENTITY_KIND)
        meta = {k: v for k, v in config.items() if k not in ("same_person_threshold",)}
        return cls(net, same_person_threshold=config.get("same_person_threshold"), metadata=meta)


class AttributeOracle(nn.Module):
    """FaceWorld attribute classifier: aligned crops -> logits for :data:`ATTRIBUTE_NAMES`.

    ``forward`` takes ``(B, 3, H, W)`` in [-1, 1] (any size; resized to 64) and returns ``(B, 6)``
    logits; :meth:`predict_proba` takes uint8 images and returns one probability array per
    attribute. Ground truth: :func:`attribute_labels`.
    """

    names = ATTRIBUTE_NAMES

    def __init__(self, net: FaceWorldNet | None = None, *, metadata: dict | None = None) -> None:
        super().__init__()
        self.net = net if net is not None else FaceWorldNet(16, (32, 64, 128), len(ATTRIBUTE_NAMES))
        if self.net.out_dim != len(ATTRIBUTE_NAMES):
            raise ValueError(f"an attribute oracle has {len(ATTRIBUTE_NAMES)} outputs, got {self.net.out_dim}")
        self.net.eval().requires_grad_(False)
        self.metadata = dict(metadata or {})

    def train(self, mode: bool = True) -> AttributeOracle:
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net(_to_input(crops))

    @torch.no_grad()
    def predict_proba(self, images, batch_size: int = 512) -> dict[str, np.ndarray]:
        """``images``: uint8 (N, 64, 64, 3) (or one (64, 64, 3); other sizes are resized), or a
        float tensor (N, 3, H, W) in [-1, 1] -> {attribute: float32 (N,) probabilities}."""
        device = next(self.net.parameters()).device
        x = _images_to_tensor(images, "cpu")
        out = [
            torch.sigmoid(self(x[k : k + batch_size].to(device))).float().cpu() for k in range(0, len(x), batch_size)
        ]
        probs = torch.cat(out).numpy() if out else np.zeros((0, len(ATTRIBUTE_NAMES)), np.float32)
        return {name: probs[:, k].copy() for k, name in enumerate(ATTRIBUTE_NAMES)}

    def predict(self, images, threshold: float = 0.5) -> dict[str, np.ndarray]:
        """Boolean decisions (probability >= ``threshold``)."""
        return {k: v >= threshold for k, v in self.predict_proba(images).items()}

    def save_pretrained(self, directory: str | Path) -> Path:
        config = {
            "kind": ORACLE_KIND,
            "format_version": FORMAT_VERSION,
            "input_size": INPUT_SIZE,
            "input_range": [-1.0, 1.0],
            "alignment": "ipfacediff.face.CANONICAL_FIVE_POINTS",
            "attributes": list(ATTRIBUTE_NAMES),
            "arch": self.net.arch,
            "labels": "faceworld.oracles.attribute_labels",
            "dtype_on_disk": "float16",
            **{k: v for k, v in self.metadata.items() if k not in ("kind", "arch", "attributes")},
        }
        return _save(self.net, directory, config)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> AttributeOracle:
        net, config = _load(path, ORACLE_KIND)
        if list(config.get("attributes", ATTRIBUTE_NAMES)) != list(ATTRIBUTE_NAMES):
            raise ValueError(f"{path}: attributes {config.get('attributes')} differ from {list(ATTRIBUTE_NAMES)}")
        return cls(net, metadata=config)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    identities: int  # training identities used (the first ones of TRAIN_IDS)
    scenes: int  # views per identity (two renders each)
    identity_steps: int
    identity_batch: int  # images per step (pairs x 2)
    identity_seconds: float  # time budget of the identity net's training
    attribute_steps: int
    attribute_batch: int
    attribute_seconds: float
    heldout_identities: int
    workers: int | None  # render processes; None: all CPUs
    threads: int | None = None  # torch CPU threads while training; None: torch's default. On a
    # machine whose cores are busy with other work one thread is several times faster than two.
    identity_arch: dict = field(
        default_factory=lambda: {"stem": 24, "widths": [48, 96, 192], "out_dim": 128, "out_bn": True}
    )
    attribute_arch: dict = field(default_factory=lambda: {"stem": 16, "widths": [32, 64, 128], "out_dim": 6})
    lr: float = 2e-3
    parameter_weight: float = 1.0  # weight of the identity-parameter regression (generalises to new people)


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        identities=40,
        scenes=2,
        identity_steps=12,
        identity_batch=32,
        identity_seconds=10,
        attribute_steps=10,
        attribute_batch=32,
        attribute_seconds=6,
        heldout_identities=12,
        workers=0,
        identity_arch={"stem": 8, "widths": [16, 32, 64], "out_dim": 128, "out_bn": True},
        attribute_arch={"stem": 8, "widths": [16, 32, 64], "out_dim": 6},
        threads=1,
    ),
    "cpu": Preset(
        identities=1000,
        scenes=8,
        identity_steps=6000,
        identity_batch=96,
        identity_seconds=480,
        attribute_steps=2000,
        attribute_batch=96,
        attribute_seconds=120,
        heldout_identities=300,
        workers=2,
        threads=1,
    ),
    "cpu-large": Preset(  # the gpu preset's wider identity net, trained for 30 min on one CPU core
        identities=1000,
        scenes=8,
        identity_steps=40000,
        identity_batch=96,
        identity_seconds=1800,
        attribute_steps=200,
        attribute_batch=96,
        attribute_seconds=30,
        heldout_identities=300,
        workers=1,
        threads=1,
        identity_arch={"stem": 32, "widths": [64, 128, 256], "out_dim": 128, "out_bn": True},
    ),
    "gpu": Preset(
        identities=1000,
        scenes=24,
        identity_steps=5000,
        identity_batch=512,
        identity_seconds=40,
        attribute_steps=1500,
        attribute_batch=512,
        attribute_seconds=12,
        heldout_identities=500,
        workers=None,
        identity_arch={"stem": 32, "widths": [64, 128, 256], "out_dim": 128, "out_bn": True},
    ),
}


def _augment(x: torch.Tensor, gen: torch.Generator, *, flip: bool) -> torch.Tensor:
    """Mild, label-preserving jitter of (B, 3, 64, 64) in [-1, 1]: a small similarity warp,
    brightness/contrast, blur (as a VAE or a resampled crop leaves) and noise."""
    b, dev = x.shape[0], x.device

    def u(lo, hi, *shape):
        return torch.rand(b, *shape, generator=gen, device=dev) * (hi - lo) + lo

    ang = u(-0.05, 0.05)
    scale = u(0.96, 1.04)
    shift = u(-0.04, 0.04, 2)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    if flip:
        theta[:, 0, :2] *= torch.where(torch.rand(b, generator=gen, device=dev) < 0.5, -1.0, 1.0)[:, None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    blur = torch.rand(b, generator=gen, device=dev) < 0.25
    if bool(blur.any()):
        small = F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
        soft = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.where(blur[:, None, None, None], soft, x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.85, 1.15, 1, 1, 1) + mean + u(-0.08, 0.08, 1, 1, 1)
    noisy = (torch.rand(b, 1, 1, 1, generator=gen, device=dev) < 0.3).float()
    x = x + noisy * torch.randn(x.shape, generator=gen, device=dev) * u(0.0, 0.04, 1, 1, 1)
    return x.clamp(-1, 1)


class _Schedule:
    """Progress = the further along of steps and seconds; warm-up then cosine learning rate."""

    def __init__(self, steps: int, seconds: float) -> None:
        self.steps, self.seconds, self.start, self.step = int(steps), float(seconds), time.perf_counter(), 0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self) -> float:
        return max(self.step / max(self.steps, 1), self.elapsed / max(self.seconds, 1e-6))

    def done(self) -> bool:
        return self.progress() >= 1.0

    def lr_factor(self) -> float:
        p = min(self.progress(), 1.0)
        return p / 0.05 if p < 0.05 else 0.5 * (1 + math.cos(math.pi * (p - 0.05) / 0.95)) * 0.99 + 0.01


def _batch_images(images: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = images[idx.to(images.device)].to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last)


def _train_identity(
    data: TrainingSet, preset: Preset, device: torch.device, seed: int, log
) -> tuple[FaceWorldNet, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    classes, targets = np.unique(data.identity_ids, return_inverse=True)
    images = torch.from_numpy(data.images)
    if device.type == "cuda":
        images = images.to(device)
    targets_t = torch.from_numpy(targets.astype(np.int64)).to(device)
    net = FaceWorldNet(**preset.identity_arch).to(device).to(memory_format=torch.channels_last)
    centres = nn.Parameter(F.normalize(torch.randn(len(classes), net.out_dim, device=device), dim=1))
    targets_p = torch.from_numpy(_standardised_parameters(classes)).float().to(device)
    regress = nn.Linear(net.out_dim, targets_p.shape[1]).to(device)
    params = [
        {"params": list(net.parameters()) + list(regress.parameters()), "weight_decay": 5e-4},
        {"params": [centres], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(params, lr=preset.lr)
    scale, margin, pair_weight, param_weight = 30.0, 0.3, 2.0, preset.parameter_weight
    scenes = int(data.scenes)
    people = len(data) // (2 * scenes)
    blocks = data.identity_ids.reshape(people, 2 * scenes)
    if not (blocks == blocks[:, :1]).all():
        raise ValueError("training images must come person by person, 2 * scenes each (as render_training_set gives)")
    per_step = max(2, preset.identity_batch // 3)  # people per step, three images each
    sched = _Schedule(preset.identity_steps, preset.identity_seconds)
    amp = device.type == "cuda"
    net.train()
    losses = []
    while not sched.done():
        for g in opt.param_groups:
            g["lr"] = preset.lr * sched.lr_factor()
        # Per person: both renders of one view (same pose, other attributes) and one render of another
        # view (other pose, light, backdrop and attributes).
        p = torch.randperm(people, generator=cpu_gen)[:per_step]
        v1 = torch.randint(0, scenes, (len(p),), generator=cpu_gen)
        v2 = (v1 + torch.randint(1, max(scenes, 2), (len(p),), generator=cpu_gen)) % scenes
        r2 = torch.randint(0, 2, (len(p),), generator=cpu_gen)
        base = (p * scenes + v1) * 2
        idx = torch.cat([base, base + 1, (p * scenes + v2) * 2 + r2])
        x = _augment(_batch_images(images, idx, device), gen, flip=False)
        y = targets_t[idx.to(device)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            raw = net(x)
        emb = F.normalize(raw.float(), dim=1)
        param_loss = F.smooth_l1_loss(regress(raw.float()), targets_p[y])
        cos = emb @ F.normalize(centres, dim=1).T
        m = margin * min(1.0, sched.progress() / 0.1)  # margin warm-up
        logits = scale * (cos - m * F.one_hot(y, len(classes)))
        e1, e1b, e2 = emb.split(len(p))
        pair = (1 - (e1 * e1b).sum(1)).mean()
        # Cross-view InfoNCE in the batch: the other view of the same person against everyone else.
        nce_logits = (e1 @ e2.T) / 0.1
        nce_target = torch.arange(len(p), device=nce_logits.device)
        nce = 0.5 * (F.cross_entropy(nce_logits, nce_target) + F.cross_entropy(nce_logits.T, nce_target))
        loss = F.cross_entropy(logits, y) + pair_weight * pair + param_weight * param_loss + nce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step += 1
        losses.append(loss.detach())
        if sched.step % 100 == 0:
            recent = float(torch.stack(losses[-100:]).mean())
            log(
                f"identity step {sched.step} loss {recent:.3f} pair {float(pair.detach()):.4f} "
                f"nce {float(nce.detach()):.3f} parameters {float(param_loss.detach()):.3f} "
                f"({sched.elapsed:.0f}s, progress {sched.progress():.2f})"
            )
    net.eval()
    stats = {
        "steps": sched.step,
        "seconds": round(sched.elapsed, 1),
        "batch": per_step * 3,
        "classes": len(classes),
        "loss": f"CosFace (s=30, m=0.3) + 2 (1 - cos) of attribute pairs + cross-view "
        f"InfoNCE (t=0.1) + {param_weight} smooth-L1 regression of the identity parameters "
        "(linear, from the embedding)",
        "final_loss": round(float(torch.stack(losses[-50:]).mean()), 4) if losses else None,
    }
    return net.cpu().to(memory_format=torch.contiguous_format), stats


def _train_attributes(
    data: TrainingSet, preset: Preset, device: torch.device, seed: int, log
) -> tuple[FaceWorldNet, dict]:
    torch.manual_seed(seed + 1)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    cpu_gen = torch.Generator().manual_seed(seed + 1)
    images = torch.from_numpy(data.images)
    if device.type == "cuda":
        images = images.to(device)
    labels = torch.from_numpy(data.labels).to(device)
    net = FaceWorldNet(**preset.attribute_arch).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=preset.lr, weight_decay=5e-4)
    sched = _Schedule(preset.attribute_steps, preset.attribute_seconds)
    amp = device.type == "cuda"
    net.train()
    losses = []
    while not sched.done():
        for g in opt.param_groups:
            g["lr"] = preset.lr * sched.lr_factor()
        idx = torch.randint(0, len(data), (preset.attribute_batch,), generator=cpu_gen)
        x = _augment(_batch_images(images, idx, device), gen, flip=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels[idx.to(device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step += 1
        losses.append(loss.detach())
        if sched.step % 100 == 0:
            log(
                f"attributes step {sched.step} loss {float(torch.stack(losses[-100:]).mean()):.4f} ({sched.elapsed:.0f}s)"
            )
    net.eval()
    stats = {
        "steps": sched.step,
        "seconds": round(sched.elapsed, 1),
        "batch": preset.attribute_batch,
        "loss": "binary cross-entropy",
        "final_loss": round(float(torch.stack(losses[-50:]).mean()), 4) if losses else None,
    }
    return net.cpu().to(memory_format=torch.contiguous_format), stats


# ----------------------------------------------------------------------------------------------
# Held-out evaluation
# ----------------------------------------------------------------------------------------------


def _best_threshold(same: np.ndarray, diff: np.ndarray) -> tuple[float, float]:
    """Distance threshold maximising balanced accuracy (same below, different above)."""
    cand = np.unique(np.concatenate([same, diff]))
    cand = np.concatenate([cand, [cand[-1] + 1e-6]]) if len(cand) else np.array([1.0])
    s, d = np.sort(same), np.sort(diff)
    tpr = np.searchsorted(s, cand, side="left") / max(len(s), 1)  # same with distance < t
    tnr = 1 - np.searchsorted(d, cand, side="left") / max(len(d), 1)  # different with distance >= t
    acc = (tpr + tnr) / 2
    k = int(np.argmax(acc))
    lo = cand[k - 1] if k > 0 else cand[k]
    return float((lo + cand[k]) / 2), float(acc[k])


def _balanced_accuracy(same: np.ndarray, diff: np.ndarray, t: float) -> float:
    return float(((same < t).mean() + (diff >= t).mean()) / 2)


def _auc(same_sim: np.ndarray, diff_sim: np.ndarray) -> float:
    """P(similarity of a same pair > that of a different pair)."""
    d = np.sort(diff_sim)
    below = np.searchsorted(d, same_sim, side="left")
    ties = np.searchsorted(d, same_sim, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(same_sim) * len(d)))


def _rounded(d: dict, digits: int = 4) -> dict:
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in d.items()}


def evaluate_identity(model: FaceWorldIdentity, heldout: HeldOutSet) -> dict:
    """Verification on held-out pairs (views A and B of a person differ in attributes, pose, light
    and backdrop; different pairs are A of one person and B of another) and invariance to each
    EDIT (view A vs. view A with the edit applied)."""
    n, v = heldout.images.shape[:2]
    emb = model.embed_images(heldout.images.reshape(n * v, INPUT_SIZE, INPUT_SIZE, 3)).reshape(n, v, -1)
    a, b = emb[:, 0], emb[:, 1]
    sim = a @ b.T
    same_sim = np.diag(sim).copy()
    diff_sim = sim[~np.eye(n, dtype=bool)]
    same_d, diff_d = np.sqrt(np.clip(2 - 2 * same_sim, 0, None)), np.sqrt(np.clip(2 - 2 * diff_sim, 0, None))
    t, acc = _best_threshold(same_d, diff_d)
    # Two-fold: the threshold chosen on half of the people, the accuracy measured on the other half.
    half = n // 2
    folds = []
    for tr, te in ((slice(0, half), slice(half, n)), (slice(half, n), slice(0, half))):
        s_tr, s_te = sim[tr, tr], sim[te, te]
        dd = lambda s: np.sqrt(np.clip(2 - 2 * s, 0, None))  # noqa: E731
        t_fold, _ = _best_threshold(dd(np.diag(s_tr)), dd(s_tr[~np.eye(len(s_tr), dtype=bool)]))
        folds.append(_balanced_accuracy(dd(np.diag(s_te)), dd(s_te[~np.eye(len(s_te), dtype=bool)]), t_fold))
    far_t = float(np.quantile(diff_d, 1e-3))
    out = {
        "identities": int(n),
        "same_pairs": int(n),
        "different_pairs": int(diff_sim.size),
        "mean_cosine_same": float(same_sim.mean()),
        "mean_cosine_different": float(diff_sim.mean()),
        "min_cosine_same": float(same_sim.min()),
        "p99_cosine_different": float(np.quantile(diff_sim, 0.99)),
        "auc": _auc(same_sim, diff_sim),
        "same_person_threshold": t,  # Euclidean, unit vectors
        "same_person_threshold_cosine": float(1 - t * t / 2),
        "verification_accuracy": acc,  # balanced, at that threshold
        "verification_accuracy_2fold": float(np.mean(folds)),
        "tar_at_far_1e-3": float((same_d < far_t).mean()),
        "rank1_identification": float((sim.argmax(1) == np.arange(n)).mean()),
    }
    inv = {}
    for k, name in enumerate(EDITS, start=2):
        ok = heldout.valid[:, k]
        c = (emb[ok, 0] * emb[ok, k]).sum(-1)
        inv[name] = _rounded(
            {
                "pairs": int(ok.sum()),
                "mean_cosine": float(c.mean()),
                "min_cosine": float(c.min()),
                "p05_cosine": float(np.quantile(c, 0.05)),
                "fraction_ge_0.9": float((c >= 0.9).mean()),
                "same_person_rate": float((np.sqrt(np.clip(2 - 2 * c, 0, None)) < t).mean()),
            }
        )
    out = _rounded(out)
    out["edit_invariance"] = inv
    return out


def evaluate_oracle(oracle: AttributeOracle, heldout: HeldOutSet) -> dict:
    """Per-attribute accuracy on held-out renders (views A and B), and how often the oracle flags
    each EDIT's attribute on view A with the edit applied."""
    n, v = heldout.images.shape[:2]
    probs = oracle.predict_proba(heldout.images.reshape(n * v, INPUT_SIZE, INPUT_SIZE, 3))
    p = np.stack([probs[name] for name in ATTRIBUTE_NAMES], -1).reshape(n, v, -1)
    plain_p = p[:, :2].reshape(-1, len(ATTRIBUTE_NAMES))
    plain_y = heldout.labels[:, :2].reshape(-1, len(ATTRIBUTE_NAMES))
    pred = plain_p >= 0.5
    acc = {}
    for k, name in enumerate(ATTRIBUTE_NAMES):
        y = plain_y[:, k] > 0.5
        acc[name] = _rounded(
            {
                "accuracy": float((pred[:, k] == y).mean()),
                "positives": int(y.sum()),
                "recall": float(pred[y, k].mean()) if y.any() else None,
                "specificity": float((~pred[~y, k]).mean()) if (~y).any() else None,
            }
        )
    attr_of_edit = {"eyeglasses": "eyeglasses", "blonde_hair": "blonde_hair", "beard": "beard", "smile": "smile"}
    flags = {}
    for k, name in enumerate(EDITS, start=2):
        col = ATTRIBUTE_NAMES.index(attr_of_edit[name])
        ok = heldout.valid[:, k]
        flags[name] = _rounded(
            {
                "edited_images": int(ok.sum()),
                "flag_rate": float((p[ok, k, col] >= 0.5).mean()),
                "mean_probability": float(p[ok, k, col].mean()),
            }
        )
    mean_accuracy = round(float(np.mean([a["accuracy"] for a in acc.values()])), 4)
    return {"images": int(plain_p.shape[0]), "mean_accuracy": mean_accuracy, "per_attribute": acc, "edit_flag": flags}


def evaluate_oracles(
    identity_model: FaceWorldIdentity | None, oracle: AttributeOracle | None, heldout: HeldOutSet
) -> dict:
    """Held-out figures of either or both models (see :func:`evaluate_identity`, :func:`evaluate_oracle`)."""
    out: dict[str, Any] = {
        "heldout_identity_ids": {
            "count": int(len(heldout.identity_ids)),
            "min": int(heldout.identity_ids.min()),
            "max": int(heldout.identity_ids.max()),
        }
    }
    if identity_model is not None:
        out["identity"] = evaluate_identity(identity_model, heldout)
    if oracle is not None:
        out["attributes"] = evaluate_oracle(oracle, heldout)
    return out


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def train_oracles(
    output: str | Path,
    *,
    preset: str | Preset = "cpu",
    device: str = "auto",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    workers: int | None = None,
) -> dict:
    """Render FaceWorld data (training identities only), train the identity net and the attribute
    oracle, evaluate both on held-out identities and write ``output/identity/``,
    ``output/attributes/`` and ``output/oracles.json``. Returns the report (as in oracles.json,
    plus ``training_identity_ids``: every identity id the training data used)."""
    t0 = time.perf_counter()
    name = preset if isinstance(preset, str) else "custom"
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose from {sorted(PRESETS)}")
        preset = PRESETS[preset]
    log = progress or (lambda message: None)
    dev = pick_device(str(device))
    if workers is None:
        workers = preset.workers if preset.workers is not None else (os.cpu_count() or 1)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    train_ids = list(TRAIN_IDS)[: preset.identities]
    log(f"rendering {preset.identities} identities x {preset.scenes} views x 2 with {workers} workers")
    t = time.perf_counter()
    data = render_training_set(train_ids, preset.scenes, seed, workers)
    heldout = render_heldout_set(preset.heldout_identities, 0, workers)
    seconds["render"] = round(time.perf_counter() - t, 1)
    used = sorted(int(i) for i in np.unique(data.identity_ids))
    if any(is_held_out(i) for i in used):  # render_training_set refuses them; belt and braces
        raise AssertionError("held-out identities in the training data")
    log(
        f"rendered {len(data)} training and {heldout.images.shape[0] * heldout.images.shape[1]} held-out images "
        f"in {seconds['render']}s"
    )

    threads = torch.get_num_threads()
    if preset.threads and dev.type == "cpu":
        torch.set_num_threads(preset.threads)
    try:
        net, id_stats = _train_identity(data, preset, dev, seed, log)
        _round_to_half(net)
        anet, attr_stats = _train_attributes(data, preset, dev, seed, log)
        _round_to_half(anet)
    finally:
        torch.set_num_threads(threads)
    id_model = FaceWorldIdentity(net)
    oracle = AttributeOracle(anet)
    seconds["identity"], seconds["attributes"] = id_stats["seconds"], attr_stats["seconds"]

    t = time.perf_counter()
    metrics = evaluate_oracles(id_model, oracle, heldout)
    seconds["evaluate"] = round(time.perf_counter() - t, 1)
    id_model.same_person_threshold = metrics["identity"]["same_person_threshold"]
    id_model.metadata = {
        "trained_by": "faceworld.oracles",
        "preset": name,
        "seed": seed,
        "held_out": {
            k: metrics["identity"][k]
            for k in ("mean_cosine_same", "mean_cosine_different", "verification_accuracy", "auc")
        },
    }
    oracle.metadata = {
        "trained_by": "faceworld.oracles",
        "preset": name,
        "seed": seed,
        "held_out_accuracy": {k: v["accuracy"] for k, v in metrics["attributes"]["per_attribute"].items()},
    }
    id_model.save_pretrained(output / "identity")
    oracle.save_pretrained(output / "attributes")
    seconds["total"] = round(time.perf_counter() - t0, 1)
    files = {str(p.relative_to(output)): p.stat().st_size for p in sorted(output.glob("*/*")) if p.is_file()}
    report = {
        "preset": name,
        "preset_settings": asdict(preset),
        "seed": seed,
        "device": str(dev),
        "torch": torch.__version__,
        "seconds": seconds,
        "training_data": {
            "images": len(data),
            "identities": len(used),
            "min_id": used[0],
            "max_id": used[-1],
            "views_per_identity": preset.scenes,
            "held_out_ids_in_training": 0,
        },
        "identity": {
            **id_stats,
            "arch": net.arch,
            "same_person_threshold": id_model.same_person_threshold,
            "held_out": metrics["identity"],
        },
        "attributes": {**attr_stats, "arch": anet.arch, "held_out": metrics["attributes"]},
        "heldout_identity_ids": metrics["heldout_identity_ids"],
        "files": files,
    }
    (output / "oracles.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {output} in {seconds['total']}s")
    return {**report, "training_identity_ids": used, "heldout_ids": [int(i) for i in heldout.identity_ids]}
