"""Keyframes and propagation: which frames ε2 edits at a step, and how their edit reaches every
other frame (nearest neighbours in ε1's source features, then smoothing over time)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F


def select_keyframes(
    frame_count: int,
    count: int,
    *,
    generator: torch.Generator | None = None,
    candidates: Sequence[int] | None = None,
) -> list[int]:
    """``count`` evenly spaced keyframes; with a generator the grid gets a random offset.

    TokenFlow draws new keyframes at every step so no frame is only ever a follower; one shared
    random offset keeps the spacing even, so no frame is ever far from a keyframe. ``candidates``:
    the frames that may be keyframes, spaced evenly among themselves (the frames whose edit region
    something in front of the face does not hide; a keyframe behind a hand or a board has nothing
    of the edit to give the frames that take theirs from it).
    """
    if candidates is not None and 0 < len(candidates) < frame_count:
        ordered = sorted(candidates)
        return sorted({ordered[i] for i in select_keyframes(len(ordered), count, generator=generator)})
    count = max(1, min(count, frame_count))
    spacing = frame_count / count
    offset = spacing / 2 if generator is None else torch.rand(1, generator=generator).item() * spacing
    return sorted({min(frame_count - 1, int(offset + spacing * i)) for i in range(count)})


def two_nearest(frame: int, keyframes: list[int]) -> list[tuple[int, float]]:
    """The (at most) two keyframes closest in time, with weights falling with temporal distance."""
    nearest = sorted(keyframes, key=lambda k: (abs(k - frame), k))[:2]
    if len(nearest) == 1:
        return [(nearest[0], 1.0)]
    d1, d2 = abs(nearest[0] - frame), abs(nearest[1] - frame)
    return [(nearest[0], d2 / (d1 + d2)), (nearest[1], d1 / (d1 + d2))]


def token_similarity(
    frame_features: torch.Tensor, key_features: torch.Tensor, *, side: int, locality: float = 0.05
) -> torch.Tensor:
    """Cosine similarity of every token of a frame to every keyframe token, less a small
    locality prior that settles ties in flat regions (smooth skin) in favour of nearby tokens,
    as aligned face crops move little. features: (..., L, D), L = side²; returns (..., L, L)."""
    a = F.normalize(frame_features.float(), dim=-1)
    b = F.normalize(key_features.float(), dim=-1)
    similarity = a @ b.transpose(-1, -2)
    if locality:
        similarity = similarity - locality * squared_distances(side, str(similarity.device))
    return similarity


def nearest_neighbour_field(
    frame_features: torch.Tensor, key_features: torch.Tensor, *, side: int, locality: float = 0.05
) -> torch.Tensor:
    """For each token of a frame, the index of its most similar keyframe token: (..., L) int64."""
    return token_similarity(frame_features, key_features, side=side, locality=locality).argmax(-1)


@lru_cache(maxsize=8)
def squared_distances(side: int, device: str) -> torch.Tensor:
    """(L, L) squared distances between token positions of a side x side grid, over side²."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([ys.reshape(-1), xs.reshape(-1)], -1).float()
    return (torch.cdist(grid, grid).pow(2) / side**2).to(device)


def nearest_tokens(
    keyframes: list[int], features: torch.Tensor, frame_count: int, *, side: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(F, 2, L) int64: for each follower (every frame not in ``keyframes``, in order) the index of
    each token's nearest token in its first and its second closest keyframe (:func:`two_nearest`;
    the same one twice when there is one). It depends on the source's features and the keyframes
    only, not on the edit: a re-edit may read it (temperature 0, TokenFlow's rule)."""
    keyframes = sorted(keyframes)
    chosen = set(keyframes)
    followers = [f for f in range(frame_count) if f not in chosen]
    tokens = features.shape[1]
    out = torch.empty(len(followers), 2, tokens, dtype=torch.int64)
    position = {k: i for i, k in enumerate(keyframes)}
    key_features = features[keyframes].to(device)
    chunk = max(1, 2**28 // (tokens * tokens * 4))  # one (chunk, L, L) float32 similarity map
    for start in range(0, len(followers), chunk):
        batch = followers[start : start + chunk]
        pairs = [two_nearest(f, keyframes) for f in batch]
        frame_features = features[batch].to(device)
        for column, which in enumerate(([p[0][0] for p in pairs], [p[-1][0] for p in pairs])):
            index = torch.tensor([position[k] for k in which], device=device)
            nearest = nearest_neighbour_field(frame_features, key_features[index], side=side)
            out[start : start + len(batch), column] = nearest.cpu()
    return out


def propagate_by_nearest_neighbour(
    deltas: dict[int, torch.Tensor],
    features: torch.Tensor,
    frame_count: int,
    *,
    temperature: float = 0.0,
    device: torch.device | str = "cpu",
    nearest: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every frame's edit from the keyframes' edits ``deltas`` {keyframe: (C, h, w)}.

    features: (N, L, D) source features of all frames. A keyframe keeps its own edit; another
    frame takes, token by token, the edits at its nearest neighbours in its two closest
    keyframes, blended by temporal distance. temperature 0 takes the single nearest token
    (TokenFlow); above 0, a softmax of the similarities over that temperature weighs the
    keyframe's tokens, so a token whose best match is a near tie between neighbours does not
    flip from one to the other between frames (flicker on the coarse latent grid).
    ``nearest``: at temperature 0, those nearest tokens (:func:`nearest_tokens`), found already.
    Returns (N, C, h, w) on the CPU.
    """
    keyframes = sorted(deltas)
    channels, height, width = deltas[keyframes[0]].shape
    out = torch.empty(frame_count, channels, height, width)
    for k in keyframes:
        out[k] = deltas[k]
    followers = [f for f in range(frame_count) if f not in deltas]
    if not followers:
        return out
    if temperature == 0 and nearest is None:
        nearest = nearest_tokens(keyframes, features, frame_count, side=height, device=device)
    position = {k: i for i, k in enumerate(keyframes)}
    key_features = features[keyframes].to(device)
    key_deltas = torch.stack([deltas[k] for k in keyframes]).reshape(len(keyframes), channels, -1).to(device)
    tokens = key_features.shape[1]
    chunk = max(1, 2**28 // (tokens * tokens * 4))  # two (chunk, L, L) float32 similarity maps
    for start in range(0, len(followers), chunk):
        batch = followers[start : start + chunk]
        pairs = [two_nearest(f, keyframes) for f in batch]
        first = torch.tensor([position[p[0][0]] for p in pairs], device=device)
        second = torch.tensor([position[p[-1][0]] for p in pairs], device=device)
        weight = torch.tensor([p[1][1] if len(p) == 2 else 0.0 for p in pairs], device=device)
        gathered = []
        for column, which in enumerate((first, second)):
            if temperature > 0:
                similarity = token_similarity(features[batch].to(device), key_features[which], side=height)
                gathered.append(key_deltas[which] @ torch.softmax(similarity / temperature, -1).transpose(1, 2))
            else:
                index = nearest[start : start + len(batch), column].to(device)
                gathered.append(torch.gather(key_deltas[which], 2, index[:, None, :].expand(-1, channels, -1)))
        # Written as a correction so that equal edits (and single keyframes) stay bit-identical.
        blended = gathered[0] + weight[:, None, None] * (gathered[1] - gathered[0])
        out[batch] = blended.reshape(len(batch), channels, height, width).cpu()
    return out


def smooth_over_time(delta: torch.Tensor, weight: float) -> torch.Tensor:
    """(N, C, h, w) per-frame edits filtered over time with [weight, 1 − 2·weight, weight].

    The crops are aligned, so one token is one place on the face in every frame; the true edit
    moves with the face, so what changes of the edit from one frame to the next beyond that is
    flicker (a keyframe's own edit against its followers' propagated one, keyframes drawn anew
    every step). The ends repeat their frame; with weight 0 or fewer than 3 frames it is the input.
    """
    if weight == 0 or len(delta) < 3:
        return delta
    padded = torch.cat([delta[:1], delta, delta[-1:]])
    return (1 - 2 * weight) * delta + weight * (padded[:-2] + padded[2:])
