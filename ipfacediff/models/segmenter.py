"""The occluder segmenter: a small U-Net marking, in an aligned face crop, what lies in front of the face.

The occlusion mask (:mod:`ipfacediff.occlusion`) finds hands with mediapipe and anything else by
how it differs from the face's own look over its track: what moves. Something held still in front
of the face the whole clip (a microphone at the mouth) is part of that look, so only a model that
knows what faces of the video's world look like can tell it is not the face. Such a model belongs
to the model set it was trained with, as its identity network does: a model folder's card
(``ipfacediff.json``, :class:`~ipfacediff.domain.ModelCard`) names it as ``occluder_segmenter``,
and it is used on the faces the card's in-domain check passes only. The embedded FaceWorld model
ships one (trained by ``python -m faceworld segmenter``); an SD-1.x folder has none unless its
author adds one.

Its operating point (``threshold``, ``min_share``) is part of its config: it was measured with
the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(4, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(4, cout),
        nn.SiLU(),
    )


class OccluderSegmenter(ModelMixin, ConfigMixin):
    """(N, 3, side, side) aligned crops in [-1, 1] to (N, 1, side, side) logits of "something is in
    front of the face here". ``side``: the crop side it was trained at (crops are resized to it).
    A region it marks (probability above ``threshold``) counts (:meth:`regions`) where it reaches
    into the inner face (the face mask shrunk by ``inner_margin`` of the side) with at least
    ``min_share`` of the crop: specks, the backdrop beside a turned face and strands of hair at the
    face's outline are where it errs first."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        side: int = 64,
        channels: Sequence[int] = (8, 16, 32, 48),
        threshold: float = 0.6,
        min_share: float = 0.01,
        inner_margin: float = 0.03,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
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

    @torch.inference_mode()
    def probability(self, crops: np.ndarray, batch: int = 64) -> np.ndarray:
        """(N, side, side) float32 probabilities of (N, H, W, 3) uint8 RGB crops, resized to ``side``."""
        side = self.config.side
        crops = np.asarray(crops)
        if crops.shape[1:3] != (side, side):
            crops = np.stack([cv2.resize(c, (side, side), interpolation=cv2.INTER_AREA) for c in crops])
        out = []
        for start in range(0, len(crops), batch):
            x = torch.from_numpy(crops[start : start + batch].astype(np.float32)).permute(0, 3, 1, 2)
            x = x.to(self.device, self.dtype) / 127.5 - 1
            out.append(torch.sigmoid(self(x))[:, 0].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, side, side), np.float32)

    def regions(self, crops: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """(N, side, side) uint8: 1 over the marked regions of (N, H, W, 3) crops that reach into
        their faces (``faces``: (N, side, side) face masks, > 0 inside) with ``min_share`` of the crop."""
        config = self.config
        marked = self.probability(crops) > config.threshold
        margin = round(config.inner_margin * config.side)
        if margin > 0:
            kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
            faces = np.stack([cv2.erode((np.asarray(f) > 0).astype(np.uint8), kernel) for f in faces])
        return face_regions(marked, faces, config.min_share * config.side**2)


def face_regions(marked: np.ndarray, faces: np.ndarray, least: float) -> np.ndarray:
    """(N, side, side) uint8: the 8-connected pieces of ``marked`` (bool) with at least ``least``
    pixels inside their ``faces`` (> 0)."""
    out = np.zeros(marked.shape, np.uint8)
    for i, (pieces, face) in enumerate(zip(marked, faces, strict=True)):
        count, labels = cv2.connectedComponents(pieces.astype(np.uint8), connectivity=8)
        if count <= 1:
            continue
        keep = np.bincount(labels[face > 0], minlength=count) >= least
        keep[0] = False
        out[i] = keep[labels]
    return out


def load_occluder_segmenter(folder: str | Path, device: torch.device | str = "cpu") -> OccluderSegmenter:
    """The segmenter saved in ``folder`` (``save_pretrained``), on ``device``, frozen."""
    model = OccluderSegmenter.from_pretrained(str(folder))
    return model.to(device).eval().requires_grad_(False)
