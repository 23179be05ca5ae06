"""What a perfect edit that cannot know the person's style scores on FaceWorld's identity metric.

    python benchmarks/faceworld_style_ceiling.py --json OUT.json [--identities 20] [--offset 0] [--others 4]

FaceWorld draws an attribute the same way on the same person: a glasses frame and its colour and a
beard's cut are identity fields (a hat's too), so the true edit of a video that never shows them
is in a style the input does not reveal. This renders each held-out clip of the quality report
with the edit made perfectly but in the style of ``--others`` other people (training identities
drawn at random) and scores it against the true edit with the oracle identity net, as
``benchmarks/faceworld_quality.py`` scores ``id_sim_to_truth``. Blonde hair (one colour for all)
and smile have no such field, so a perfect edit of them scores 1. Pure rendering: no model runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from faceworld_quality import crops_of  # noqa: E402

from faceworld import EDITS, HELD_OUT_IDS, render_clip  # noqa: E402
from faceworld.identity import identity  # noqa: E402
from faceworld.oracles import FaceWorldIdentity  # noqa: E402
from faceworld.scene import Clip  # noqa: E402
from ipfacediff.job import SHIPPED_MODELS  # noqa: E402

STYLE_FIELDS = {"eyeglasses": ("glasses_style", "glasses"), "beard": ("beard_style",)}


@dataclass(frozen=True)
class RestyledClip(Clip):
    """The same clip with one edit's style fields taken from another person."""

    style_of: int = 0
    fields: tuple[str, ...] = ()

    def faces(self, frame: int) -> list:
        donor = identity(self.style_of)
        return [
            (replace(idt, **{f: getattr(donor, f) for f in self.fields}), attributes, pose)
            for idt, attributes, pose in super().faces(frame)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--identities", type=int, default=20)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--others", type=int, default=4, help="other people's styles per edit")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--oracles", type=Path, default=SHIPPED_MODELS / "oracles")
    args = parser.parse_args()
    net = FaceWorldIdentity.from_pretrained(args.oracles / "identity")
    rng = np.random.default_rng(0)

    def embed(frames: np.ndarray, tracks) -> torch.Tensor:
        crops = torch.from_numpy(crops_of(frames, tracks)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            return net(crops)

    scores: dict[str, list[float]] = {name: [] for name in STYLE_FIELDS}
    same_style: dict[str, list[bool]] = {name: [] for name in STYLE_FIELDS}
    people = list(HELD_OUT_IDS)[args.offset : args.offset + args.identities]
    for person in people:
        clip = render_clip(person, seed=person, frames=args.frames, size=128, fps=12.0)
        for name, fields in STYLE_FIELDS.items():
            edit = EDITS[name]
            if edit.is_noop(clip.attributes[0]):
                continue
            truth = clip.with_edit(edit)
            reference = embed(truth.array(), truth.tracks)
            sims = []
            for other in rng.choice(500, args.others, replace=False):  # among the first 500 training identities
                restyled = RestyledClip(
                    truth.identity_ids,
                    truth.attributes,
                    truth.seed,
                    truth.frames,
                    truth.size,
                    truth.fps,
                    style_of=int(other),
                    fields=fields,
                )
                with torch.no_grad():
                    sims.append(float(net.similarity(embed(restyled.array(), restyled.tracks), reference).mean()))
                same_style[name].append(
                    getattr(identity(int(other)), fields[0]) == getattr(identity(person), fields[0])
                )
            scores[name].append(float(np.mean(sims)))
        print(f"identity {person}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in scores.items() if v), flush=True)

    results = {
        "identities": people,
        "frames": args.frames,
        "others": args.others,
        "id_sim_to_truth": {name: round(float(np.mean(v)), 4) for name, v in scores.items()},
        "edits": {name: len(v) for name, v in scores.items()},
        "share_of_draws_with_the_same_style": {name: round(float(np.mean(v)), 3) for name, v in same_style.items()},
    }
    print(f"{'edit':<12}{'id sim':>8}{'edits':>7}{'same style':>12}")
    for name in STYLE_FIELDS:
        print(
            f"{name:<12}{results['id_sim_to_truth'][name]:>8.3f}{results['edits'][name]:>7}"
            f"{results['share_of_draws_with_the_same_style'][name]:>12.3f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
