"""Train an occluder segmenter (#36, tried and not shipped, see benchmarks/README.md): a tiny U-Net
that marks, in a 64² aligned face crop, what lies in front of the face. benchmarks/occlusion_paste.py
``--segmenter OUT`` measures it beside the hand landmarker.

No labelled occlusion data is at hand, so it is made (XSeg-style): aligned crops of real faces
(jogger.mp4 from ../shared/data, with alignment jitter and colour jitter) and of FaceWorld people
(with their hats, glasses and beards, which belong to the face and must not be marked), with random
occluders pasted over them: sticks with balls (microphones), boxes and cups, bars, blobs, polygons,
in solid colours, gradients, stripes, grids, noise or patches of other images, half of them entering
from the crop's edge. closeup.mp4 is left out: the benchmark measures on it.

    OMP_NUM_THREADS=1 python benchmarks/train_occluder.py --steps 3000 \
        --out outputs/occluder_segmenter.safetensors
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ipfacediff.face import alignment_transforms, crop_face, track_faces  # noqa: E402
from ipfacediff.face import CANONICAL_FACE_ELLIPSE  # noqa: E402
from ipfacediff.video import iter_frames  # noqa: E402

SIDE = 64
CHANNELS = (8, 16, 32, 48)
REAL_CLIPS = ("jogger.mp4",)
# A region the segmenter marks counts only where it reaches into the inner face (the canonical face
# ellipse shrunk by this factor) with at least this share of the crop: the outline's edge (hair, the
# backdrop) and specks are where it errs first. Kept regions grow and fade outwards by these shares
# of the crop, as a hand's region does.
THRESHOLD = 0.5
INNER_SHRINK = 0.8
MIN_SHARE = 0.004
MARGIN = 0.025
FEATHER = 0.02


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(4, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(4, cout),
        nn.SiLU(),
    )


class OccluderSegmenter(nn.Module):
    """(N, 3, 64, 64) aligned crops in [-1, 1] to (N, 1, 64, 64) logits of "something is in front of
    the face here"."""

    def __init__(self, channels=CHANNELS) -> None:
        super().__init__()
        self.down = nn.ModuleList(_block(a, b) for a, b in zip((3, *channels[:-1]), channels))
        self.up = nn.ModuleList(_block(b + a, a) for a, b in zip(channels[:-1], channels[1:]))
        self.head = nn.Conv2d(channels[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(reversed(self.up), reversed(skips[:-1])):
            x = block(torch.cat([nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"), skip], 1))
        return self.head(x)


def load_segmenter(path: str | Path) -> OccluderSegmenter:
    from safetensors.torch import load_file

    model = OccluderSegmenter()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


def probability(model: OccluderSegmenter, frame: np.ndarray, M: np.ndarray, size: int) -> np.ndarray:
    """(64, 64): the segmenter's probability of an occluder in the crop of ``M`` (side ``size``)."""
    crop = crop_face(frame, M * (SIDE / size), SIDE)
    x = torch.from_numpy(crop.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.inference_mode():
        return torch.sigmoid(model(x))[0, 0].numpy()


def object_region(prob: np.ndarray, size: int) -> np.ndarray:
    """(size, size) float32 mask of the regions of ``prob`` that reach into the inner face."""
    side = prob.shape[0]
    count, labels, _, _ = cv2.connectedComponentsWithStats((prob > THRESHOLD).astype(np.uint8), connectivity=8)
    cx, cy, rx, ry = CANONICAL_FACE_ELLIPSE
    inner = np.zeros((side, side), np.uint8)
    cv2.ellipse(
        inner,
        (round(cx * side), round(cy * side)),
        (round(rx * INNER_SHRINK * side), round(ry * INNER_SHRINK * side)),
        0,
        0,
        360,
        1,
        -1,
    )
    keep = np.zeros(count, bool)
    for label in range(1, count):
        keep[label] = np.count_nonzero((inner > 0) & (labels == label)) >= MIN_SHARE * side * side
    if not keep.any():
        return np.zeros((size, size), np.float32)
    fine = cv2.resize(prob, (size, size), interpolation=cv2.INTER_LINEAR) > THRESHOLD
    kept = cv2.resize(keep[labels].astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    kept = cv2.dilate(kept, np.ones((3, 3), np.uint8), iterations=max(1, size // side))
    covered = (fine & (kept > 0)).astype(np.uint8)
    outside = cv2.distanceTransform(1 - covered, cv2.DIST_L2, 5) - MARGIN * size
    ramp = np.clip(1.0 - outside / max(1.0, FEATHER * size), 0.0, 1.0)
    return (ramp * ramp * (3 - 2 * ramp)).astype(np.float32)


def real_faces(rng: np.random.Generator):
    """A function drawing a jittered aligned crop of a random frame of the real clips."""
    frames, transforms = [], []
    for name in REAL_CLIPS:
        clip = list(iter_frames(ROOT.parent / "shared" / "data" / "clips" / name))
        for track in track_faces(clip, fps=10.0).tracks:
            for index, M in alignment_transforms(track, SIDE).items():
                frames.append(clip[index])
                transforms.append(M)

    def draw() -> np.ndarray:
        k = int(rng.integers(len(frames)))
        angle, zoom = rng.normal(0, 6), math.exp(rng.normal(0, 0.06))
        jitter = cv2.getRotationMatrix2D((SIDE / 2, SIDE / 2), angle, zoom)
        jitter[:, 2] += rng.normal(0, 0.03 * SIDE, 2)
        M = np.vstack([jitter, [0, 0, 1]]) @ np.vstack([transforms[k], [0, 0, 1]])
        return crop_face(frames[k], M[:2], SIDE)

    return draw, frames


def faceworld_faces(count: int) -> list[np.ndarray]:
    from faceworld.scene import dataset

    return [sample.image for sample in dataset("train", count, size=SIDE, seed=36)]


def colour_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light, exposure, white balance and saturation far beyond one clip's: with one real person to
    learn from, the look of a face must not be what tells it from an occluder."""
    out = image.astype(np.float32) / 255.0
    out = out ** math.exp(rng.normal(0, 0.35))
    grey = out.mean(-1, keepdims=True)
    out = grey + (out - grey) * rng.uniform(0.0, 1.6)
    out = out * rng.uniform(0.35, 1.3) * rng.uniform(0.75, 1.25, 3)
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE - 0.5
    a = rng.uniform(0, 2 * math.pi)
    out = out * (1 + rng.uniform(0, 0.6) * (x * math.cos(a) + y * math.sin(a)))[..., None]
    out = (out - out.mean()) * rng.uniform(0.6, 1.4) + out.mean() + rng.uniform(-0.08, 0.08)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.clip(out * 255, 0, 255)


def texture(rng: np.random.Generator, patches: list[np.ndarray]) -> np.ndarray:
    """(SIDE, SIDE, 3) float32: what an occluder is made of."""
    kind = rng.integers(6)
    base = rng.uniform(0, 255, 3)
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    if kind == 0:
        return np.broadcast_to(base, (SIDE, SIDE, 3)).astype(np.float32).copy()
    if kind == 1:
        other = rng.uniform(0, 255, 3)
        t = np.clip((x * math.cos(a := rng.uniform(0, 6.3)) + y * math.sin(a)) / SIDE + 0.5, 0, 1)[..., None]
        return (base * (1 - t) + other * t).astype(np.float32)
    if kind == 2:
        period = rng.uniform(2, 8)
        lines = ((x // period) % 2 == 0) | ((y // period) % 2 == 0) if rng.random() < 0.5 else (x // period) % 2 == 0
        other = rng.uniform(0, 255, 3)
        return np.where(lines[..., None], base, other).astype(np.float32)
    if kind == 3:
        noise = cv2.GaussianBlur(rng.normal(0, 1, (SIDE, SIDE)).astype(np.float32), (0, 0), rng.uniform(0.5, 3))
        return np.clip(base + noise[..., None] * rng.uniform(10, 60), 0, 255).astype(np.float32)
    if kind == 4:
        # Skin-like: an occluder the colour of a face (an arm, a cup in a skin tone) is found by its shape.
        skin = np.array([rng.uniform(150, 240), rng.uniform(100, 180), rng.uniform(70, 150)])
        shade = 0.8 + 0.2 * np.clip(y / SIDE + rng.normal(0, 0.2), 0, 1)
        return (skin * shade[..., None]).astype(np.float32)
    patch = patches[int(rng.integers(len(patches)))]
    return cv2.resize(patch, (SIDE, SIDE))[:: rng.choice([1, -1])].astype(np.float32)


def shape(rng: np.random.Generator) -> np.ndarray:
    """(SIDE, SIDE) uint8 mask of one occluder, often entering from the crop's edge."""
    s, m = SIDE, np.zeros((SIDE, SIDE), np.uint8)
    kind = rng.integers(6)
    cx, cy = rng.uniform(0.2, 0.8) * s, rng.uniform(0.3, 0.9) * s
    if kind == 0:  # a microphone: a stick from the edge and a ball at its top
        r = rng.uniform(0.06, 0.16) * s
        end = (cx + rng.normal(0, 0.3) * s, s * 1.2)
        cv2.line(m, (round(cx), round(cy)), (round(end[0]), round(end[1])), 1, max(2, round(rng.uniform(0.3, 0.9) * r)))
        cv2.circle(m, (round(cx), round(cy)), round(r), 1, -1)
    elif kind == 1:  # a box, a cup, a phone, a board
        w, h = rng.uniform(0.12, 0.5) * s, rng.uniform(0.12, 0.6) * s
        box = cv2.boxPoints(((cx, cy), (w, h), rng.normal(0, 20)))
        cv2.fillPoly(m, [np.round(box).astype(np.int32)], 1)
        if rng.random() < 0.5:  # a cup's rim or a handle
            cv2.ellipse(m, (round(cx), round(cy - h / 2)), (round(w / 2), round(w / 6)), 0, 0, 360, 1, -1)
    elif kind == 2:  # a bar across (a pole, a strap, a passing arm in a sleeve)
        a = rng.uniform(0, math.pi)
        d = np.array([math.cos(a), math.sin(a)]) * s * 1.5
        p = np.array([cx, cy])
        cv2.line(
            m,
            tuple(np.round(p - d).astype(int)),
            tuple(np.round(p + d).astype(int)),
            1,
            round(rng.uniform(0.05, 0.3) * s),
        )
    elif kind == 3:  # a blob
        cv2.ellipse(
            m,
            (round(cx), round(cy)),
            (round(rng.uniform(0.06, 0.3) * s), round(rng.uniform(0.06, 0.3) * s)),
            rng.uniform(0, 180),
            0,
            360,
            1,
            -1,
        )
    elif kind == 4:  # a polygon
        n = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = rng.uniform(0.08, 0.3, n) * s
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        cv2.fillPoly(m, [np.round(points).astype(np.int32)], 1)
    else:  # an object entering from a side
        side = rng.integers(4)
        depth = rng.uniform(0.15, 0.5) * s
        points = rng.uniform(0, s, (4, 2))
        points[:2, side % 2] = 0 if side < 2 else s
        points[2:, side % 2] = depth if side < 2 else s - depth
        cv2.fillPoly(m, [cv2.convexHull(np.round(points).astype(np.int32))], 1)
    return m


def composite(face: np.ndarray, rng: np.random.Generator, patches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    image, target = face.copy(), np.zeros((SIDE, SIDE), np.float32)
    if rng.random() < 0.35:
        return image, target
    for _ in range(int(rng.integers(1, 3))):
        m = shape(rng).astype(np.float32)
        if m.sum() < 6:
            continue
        alpha = cv2.GaussianBlur(m, (0, 0), rng.uniform(0.3, 1.0))[..., None]
        paint = texture(rng, patches)
        light = 0.75 + 0.5 * cv2.GaussianBlur(rng.random((SIDE, SIDE)).astype(np.float32), (0, 0), 12)[..., None]
        image = image * (1 - alpha) + paint * light * alpha
        target = np.maximum(target, m)
    return image, target


def batch(draws, rng, patches, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = [], []
    for _ in range(size):
        face = colour_jitter(draws[int(rng.integers(len(draws)))](), rng)
        image, target = composite(face, rng, patches)
        if rng.random() < 0.3:
            image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 1.0))
        image = np.clip(image + rng.normal(0, rng.uniform(0, 4), image.shape), 0, 255)
        images.append(image)
        targets.append(target)
    x = torch.from_numpy(np.stack(images).astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
    return x, torch.from_numpy(np.stack(targets))[:, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--faceworld", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pos-weight", type=float, default=1.0, help="weight of occluder pixels in the loss")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    real, frames = real_faces(rng)
    cartoons = faceworld_faces(args.faceworld)
    draws = [real] * 3 + [lambda: cartoons[int(rng.integers(len(cartoons)))]] * 2
    patches = [f[: f.shape[0] // 3] for f in frames[::4]] + cartoons[::40]
    model = OccluderSegmenter()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=args.steps)
    started, running = time.perf_counter(), None
    for step in range(args.steps):
        x, y = batch(draws, rng, patches, args.batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(x), y, pos_weight=torch.tensor(args.pos_weight)
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {running:.4f} {time.perf_counter() - started:.0f}s", flush=True)
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
