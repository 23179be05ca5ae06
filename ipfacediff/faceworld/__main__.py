"""Look at FaceWorld.

    ipfacediff faceworld render sheet [--out faceworld_sheet.png] [--size 64] [--ids 0,1,1000]
    ipfacediff faceworld render clip OUT.mp4 [--ids 3,14] [--seed 1] [--frames 24] [--size 256]
           [--edit beard] [--tracks OUT.json]

``sheet``: rows are identities, columns the plain face, each scored edit, then (old + hat) and
two head turns with a blink and talking. ``clip``: a scene video with its ground-truth tracks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ipfacediff.faceworld.attributes import EDITS, Attributes
from ipfacediff.faceworld.identity import identity
from ipfacediff.faceworld.render import Pose, render_face
from ipfacediff.faceworld.scene import render_clip, write_clip

SHEET_COLUMNS = ("face", *EDITS, "old + hat", "yaw 25", "yaw -25, blink, talk")


def contact_sheet(ids, size: int = 64, upscale: int = 1) -> np.ndarray:
    """Rows = identities, columns = SHEET_COLUMNS; RGB uint8."""
    rows = []
    for i in ids:
        idt = identity(i)
        base = Attributes()
        row = [render_face(idt, base, size=size, background=i)]
        row += [render_face(idt, e.apply(base), size=size, background=i) for e in EDITS.values()]
        row.append(render_face(idt, Attributes(hat=True, age=0.9), size=size, background=i))
        row.append(render_face(idt, base, Pose(yaw=25), size=size, background=i))
        turned = Pose(yaw=-25, pitch=8, eyes_open=0.0, mouth_open=0.8)
        row.append(render_face(idt, base, turned, size=size, background=i))
        rows.append(np.concatenate(row, 1))
    sheet = np.concatenate(rows, 0)
    return sheet.repeat(upscale, 0).repeat(upscale, 1) if upscale > 1 else sheet


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ipfacediff.faceworld")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sheet")
    s.add_argument("--out", default="faceworld_sheet.png")
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--ids", default="0,1,2,3,4,5,6,7,1000,1001")
    s.add_argument("--upscale", type=int, default=3)
    c = sub.add_parser("clip")
    c.add_argument("out")
    c.add_argument("--ids", default="3,14")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--frames", type=int, default=24)
    c.add_argument("--size", type=int, default=256)
    c.add_argument("--edit", choices=sorted(EDITS), default=None)
    c.add_argument("--tracks", default=None)
    args = parser.parse_args(argv)
    ids = [int(x) for x in args.ids.split(",")]
    if args.cmd == "sheet":
        from PIL import Image

        Image.fromarray(contact_sheet(ids, args.size, args.upscale)).save(args.out)
        print(f"{args.out}: rows = ids {ids}; columns = {', '.join(SHEET_COLUMNS)}")
    else:
        clip = render_clip(ids, seed=args.seed, frames=args.frames, size=args.size)
        if args.edit:
            clip = clip.with_edit(EDITS[args.edit])
        video, tracks = write_clip(clip, args.out, args.tracks or Path(args.out).with_suffix(".json"))
        print(video, tracks)


if __name__ == "__main__":
    main()
