"""Train an occluder segmenter on real faces too (#36, tried and not shipped, see benchmarks/README.md):
:class:`~ipfacediff.models.segmenter.OccluderSegmenter` on aligned crops of real faces (jogger.mp4 from
../shared/data, with alignment jitter and strong colour jitter) and of FaceWorld people, with random
occluders pasted over them as ``python -m faceworld segmenter`` pastes them (:mod:`faceworld.segmenter`).
closeup.mp4 is left out: benchmarks/occlusion_paste.py ``--segmenter OUT`` measures on it.

    OMP_NUM_THREADS=1 python benchmarks/train_occluder.py --steps 3000 --out outputs/occluder_segmenter
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from faceworld.segmenter import SIDE, train_segmenter  # noqa: E402
from faceworld.train import progress_lines  # noqa: E402
from ipfacediff.face import alignment_transforms, crop_face, track_faces  # noqa: E402
from ipfacediff.video import iter_frames  # noqa: E402

REAL_CLIPS = ("jogger.mp4",)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--faceworld", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pos-weight", type=float, default=1.0, help="weight of occluder pixels in the loss")
    parser.add_argument("--out", type=Path, required=True, help="folder for the segmenter (save_pretrained)")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    real, frames = real_faces(rng)
    cartoons = faceworld_faces(args.faceworld)
    sources = [real] * 3 + [lambda: cartoons[int(rng.integers(len(cartoons)))]] * 2
    patches = [f[: f.shape[0] // 3] for f in frames[::4]] + cartoons[::40]

    def draw_face() -> np.ndarray:
        return colour_jitter(sources[int(rng.integers(len(sources)))](), rng)

    model = train_segmenter(
        draw_face, patches, steps=args.steps, batch=args.batch, seed=args.seed, pos_weight=args.pos_weight,
        progress=progress_lines(),
    )  # fmt: skip
    model.save_pretrained(str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
