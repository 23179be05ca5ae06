"""Training the embedded model set's occluder segmenter (:class:`~ipfacediff.models.segmenter.OccluderSegmenter`).

No labelled occlusion data exists, so it is made, XSeg-style: aligned crops of FaceWorld's training
people (ids < 1000, with their hats, glasses and beards, which belong to the face and must not be
marked) with random occluders pasted over them: sticks with balls, boxes and cups, bars, blobs,
polygons and shapes entering from the crop's edge, in solid colours, gradients, stripes, grids,
noise, skin tones or patches of other faces. FaceWorld's own drawn occluders (the hand, microphone,
cup and board of ``faceworld render clip --occluder``) are never among them, and no held-out person
is: benchmarks/occlusion.py measures on those, so what it shows is how far the pasted shapes carry.

    python -m faceworld segmenter ipfacediff/assets/faceworld
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from ipfacediff.diffusion import Progress
from ipfacediff.models.segmenter import OccluderSegmenter

SIDE = 64
FACES = 1500  # training crops rendered
DATA_SEED = 36
CLEAN_SHARE = 0.35  # of the training crops have nothing pasted on them


def pasted_texture(rng: np.random.Generator, patches: Sequence[np.ndarray], side: int = SIDE) -> np.ndarray:
    """(side, side, 3) float32: what a pasted occluder is made of."""
    kind = rng.integers(6)
    base = rng.uniform(0, 255, 3)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    if kind == 0:
        return np.broadcast_to(base, (side, side, 3)).astype(np.float32).copy()
    if kind == 1:
        other = rng.uniform(0, 255, 3)
        a = rng.uniform(0, 2 * math.pi)
        t = np.clip((x * math.cos(a) + y * math.sin(a)) / side + 0.5, 0, 1)[..., None]
        return (base * (1 - t) + other * t).astype(np.float32)
    if kind == 2:
        period = rng.uniform(2, 8)
        grid = rng.random() < 0.5
        lines = ((x // period) % 2 == 0) | ((y // period) % 2 == 0) if grid else (x // period) % 2 == 0
        return np.where(lines[..., None], base, rng.uniform(0, 255, 3)).astype(np.float32)
    if kind == 3:
        noise = cv2.GaussianBlur(rng.normal(0, 1, (side, side)).astype(np.float32), (0, 0), rng.uniform(0.5, 3))
        return np.clip(base + noise[..., None] * rng.uniform(10, 60), 0, 255).astype(np.float32)
    if kind == 4:  # the colour of a face (an arm, a cup in a skin tone): found by its shape
        skin = np.array([rng.uniform(150, 240), rng.uniform(100, 180), rng.uniform(70, 150)])
        shade = 0.8 + 0.2 * np.clip(y / side + rng.normal(0, 0.2), 0, 1)
        return (skin * shade[..., None]).astype(np.float32)
    patch = patches[int(rng.integers(len(patches)))]
    return cv2.resize(patch, (side, side))[:: rng.choice([1, -1])].astype(np.float32)


def pasted_shape(rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """(side, side) uint8 mask of one occluder, often entering from the crop's edge."""
    s, m = side, np.zeros((side, side), np.uint8)
    kind = rng.integers(6)
    cx, cy = rng.uniform(0.2, 0.8) * s, rng.uniform(0.3, 0.9) * s
    if kind == 0:  # a stick from the edge with a ball at its top
        r = rng.uniform(0.06, 0.16) * s
        end = (cx + rng.normal(0, 0.3) * s, s * 1.2)
        width = max(2, round(rng.uniform(0.3, 0.9) * r))
        cv2.line(m, (round(cx), round(cy)), (round(end[0]), round(end[1])), 1, width)
        cv2.circle(m, (round(cx), round(cy)), round(r), 1, -1)
    elif kind == 1:  # a box, a phone, a board; half with a rim or a lid
        w, h = rng.uniform(0.12, 0.5) * s, rng.uniform(0.12, 0.6) * s
        box = cv2.boxPoints(((cx, cy), (w, h), rng.normal(0, 20)))
        cv2.fillPoly(m, [np.round(box).astype(np.int32)], 1)
        if rng.random() < 0.5:
            cv2.ellipse(m, (round(cx), round(cy - h / 2)), (round(w / 2), round(w / 6)), 0, 0, 360, 1, -1)
    elif kind == 2:  # a bar across (a pole, a strap, a sleeve)
        a = rng.uniform(0, math.pi)
        d = np.array([math.cos(a), math.sin(a)]) * s * 1.5
        p = np.array([cx, cy])
        ends = tuple(np.round(p - d).astype(int)), tuple(np.round(p + d).astype(int))
        cv2.line(m, *ends, 1, round(rng.uniform(0.05, 0.3) * s))
    elif kind == 3:  # a blob
        axes = (round(rng.uniform(0.06, 0.3) * s), round(rng.uniform(0.06, 0.3) * s))
        cv2.ellipse(m, (round(cx), round(cy)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    elif kind == 4:  # a polygon
        n = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = rng.uniform(0.08, 0.3, n) * s
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        cv2.fillPoly(m, [np.round(points).astype(np.int32)], 1)
    else:  # something entering from a side
        edge = rng.integers(4)
        depth = rng.uniform(0.15, 0.5) * s
        points = rng.uniform(0, s, (4, 2))
        points[:2, edge % 2] = 0 if edge < 2 else s
        points[2:, edge % 2] = depth if edge < 2 else s - depth
        cv2.fillPoly(m, [cv2.convexHull(np.round(points).astype(np.int32))], 1)
    return m


def pasted_occluders(
    face: np.ndarray, rng: np.random.Generator, patches: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """``face`` (float32 RGB) with up to two occluders pasted over it and their mask (float32)."""
    side = face.shape[0]
    image, target = face.astype(np.float32).copy(), np.zeros((side, side), np.float32)
    if rng.random() < CLEAN_SHARE:
        return image, target
    for _ in range(int(rng.integers(1, 3))):
        m = pasted_shape(rng, side).astype(np.float32)
        if m.sum() < 6:
            continue
        alpha = cv2.GaussianBlur(m, (0, 0), rng.uniform(0.3, 1.0))[..., None]
        light = 0.75 + 0.5 * cv2.GaussianBlur(rng.random((side, side)).astype(np.float32), (0, 0), 12)[..., None]
        image = image * (1 - alpha) + pasted_texture(rng, patches, side) * light * alpha
        target = np.maximum(target, m)
    return image, target


def training_batch(
    draw_face: Callable[[], np.ndarray], rng: np.random.Generator, patches: Sequence[np.ndarray], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` crops of ``draw_face()`` with occluders pasted, mirrored, blurred and noised at
    random: (size, 3, side, side) in [-1, 1] and their (size, 1, side, side) masks."""
    images, targets = [], []
    for _ in range(size):
        face = draw_face().astype(np.float32)
        if rng.random() < 0.5:
            face = face[:, ::-1]
        image, target = pasted_occluders(face, rng, patches)
        if rng.random() < 0.3:
            image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 1.0))
        images.append(np.clip(image + rng.normal(0, rng.uniform(0, 4), image.shape), 0, 255))
        targets.append(target)
    x = torch.from_numpy(np.stack(images).astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
    return x, torch.from_numpy(np.stack(targets))[:, None]


def train_segmenter(
    draw_face: Callable[[], np.ndarray],
    patches: Sequence[np.ndarray],
    *,
    steps: int = 5000,
    batch: int = 24,
    seed: int = 0,
    pos_weight: float = 1.0,
    progress: Progress | None = None,
) -> OccluderSegmenter:
    """An :class:`OccluderSegmenter` trained on ``draw_face()`` crops with pasted occluders
    (:func:`training_batch`), AdamW with a one-cycle schedule."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = OccluderSegmenter(side=int(draw_face().shape[0]))
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    weight = torch.tensor(pos_weight)
    for step in range(steps):
        x, y = training_batch(draw_face, rng, patches, batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y, pos_weight=weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if progress is not None:
            progress("segmenter", step + 1, steps)
    return model.eval().requires_grad_(False)


SEGMENTER_FOLDER = "occluder_segmenter"  # in a model set, as its card names it


def train_faceworld_segmenter(
    model_folder: str | Path, *, steps: int = 5000, seed: int = 0, progress: Progress | None = None
) -> Path:
    """Train the segmenter on FACES crops of FaceWorld's training people, save it in the model
    set ``model_folder`` (SEGMENTER_FOLDER, replaced whole) and name it in the set's card."""
    from ipfacediff.domain import ModelCard
    from faceworld.scene import dataset

    folder = Path(model_folder).absolute()
    card = ModelCard.read(folder)
    faces = [sample.image for sample in dataset("train", FACES, size=SIDE, seed=DATA_SEED)]
    rng = np.random.default_rng(seed + 1)
    model = train_segmenter(
        lambda: faces[int(rng.integers(len(faces)))], faces[::40], steps=steps, seed=seed, progress=progress
    )
    target = folder / SEGMENTER_FOLDER
    fresh = folder / f".{SEGMENTER_FOLDER}.new"
    shutil.rmtree(fresh, ignore_errors=True)
    model.save_pretrained(str(fresh))
    old = folder / f".{SEGMENTER_FOLDER}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    fresh.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    if card is not None and card.occluder_segmenter != target:
        replace(card, occluder_segmenter=target).write(folder)
    return target
