"""A contact sheet of FaceWorld (``ipfacediff faceworld render sheet``): rows are identities,
columns the plain face, each scored edit, then (old + hat) and two head turns with a blink and
talking."""

from __future__ import annotations

import numpy as np

from faceworld.attributes import EDITS, Attributes
from faceworld.identity import identity
from faceworld.render import Pose, render_face

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
