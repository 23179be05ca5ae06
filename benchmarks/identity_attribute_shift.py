"""How far a true edit moves FaceWorld's identity nets, and whether a mean shift makes up for it.

    python benchmarks/identity_attribute_shift.py --json OUT.json [--people 64] [--first 100] [--net DIR]

Identity guidance pulls an edited face towards the *input's* identity embedding. If an attribute
moved every face's embedding by much the same amount, that pull would undo the attribute, and a
target of the input's embedding plus the attribute's mean shift would hold identity without it.
This measures both on training people (FaceWorld's renderer, no model runs), for the net guidance
uses (the model card's, the trainers' own; ``--net``) and for the oracle that scores the report:
- ``cos_input_truth``: mean cosine between the input's and the true edit's embeddings, per frame;
- ``cos_shifted_truth``: the same with the input's embedding moved by the mean shift (measured on
  the first half of the people, scored on the second half);
- ``shift_norm``: the length of that mean shift (embeddings are unit vectors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from faceworld_quality import crops_of  # noqa: E402

from faceworld import EDITS, render_clip  # noqa: E402
from faceworld.identity import TRAIN_IDS  # noqa: E402
from faceworld.oracles import FaceWorldIdentity  # noqa: E402
from ipfacediff.identity import IdentityEncoder  # noqa: E402
from ipfacediff.job import SHIPPED_MODELS  # noqa: E402


def embed(net: torch.nn.Module, crops: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return F.normalize(net(x).float(), dim=-1)


def shift_scores(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Per-frame cosines, plain and with the mean shift of the first half applied to the second."""
    half = len(pairs) // 2
    shift = torch.stack([(truth - source).mean(0) for source, truth in pairs[:half]]).mean(0)
    held = pairs[half:]
    plain = [float((source * truth).sum(-1).mean()) for source, truth in held]
    shifted = [float((F.normalize(source + shift, dim=-1) * truth).sum(-1).mean()) for source, truth in held]
    return {
        "cos_input_truth": round(float(np.mean(plain)), 4),
        "cos_shifted_truth": round(float(np.mean(shifted)), 4),
        "shift_norm": round(float(shift.norm()), 4),
        "people": len(pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=64)
    parser.add_argument("--first", type=int, default=100, help="first training identity")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--net", type=Path, default=SHIPPED_MODELS / "identity_net")
    parser.add_argument("--oracle", type=Path, default=SHIPPED_MODELS / "oracles" / "identity")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    people = list(TRAIN_IDS)[args.first : args.first + args.people]
    nets = {
        "guide": IdentityEncoder.from_pretrained(args.net),
        "oracle": FaceWorldIdentity.from_pretrained(args.oracle),
    }
    pairs: dict[str, dict[str, list]] = {e: {n: [] for n in nets} for e in EDITS}
    for person in people:
        clip = render_clip(person, seed=person, frames=args.frames, size=128, fps=12.0)
        source = crops_of(clip.array(), clip.tracks)
        source_embeddings = {n: embed(net, source) for n, net in nets.items()}
        for name, edit in EDITS.items():
            if edit.is_noop(clip.attributes[0]):
                continue
            truth = clip.with_edit(edit)
            truth_crops = crops_of(truth.array(), truth.tracks)
            for n, net in nets.items():
                pairs[name][n].append((source_embeddings[n], embed(net, truth_crops)))
    results = {
        "people": people,
        "net": os.path.relpath(args.net, Path(__file__).resolve().parents[1]),
        "edits": {e: {n: shift_scores(p) for n, p in by_net.items()} for e, by_net in pairs.items()},
    }
    print(f"{'edit':<14}{'net':<8}{'cos(input, truth)':>19}{'cos(input + shift, truth)':>27}{'|shift|':>9}")
    for name, by_net in results["edits"].items():
        for n, row in by_net.items():
            print(
                f"{name:<14}{n:<8}{row['cos_input_truth']:>19.3f}{row['cos_shifted_truth']:>27.3f}"
                f"{row['shift_norm']:>9.3f}"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
