"""The evaluation's HTML report: one self-contained page (animated preview, per-frame plots,
the metrics in words, the settings) and the one-line summary the command line prints."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ipfacediff.files import write_atomic
from ipfacediff.identity import DLIB_SAME_PERSON_THRESHOLD

from ipfacediff.evaluation.metrics import ID_SAME_PERSON_COSINE, METRIC_KEYS, TRACK_KEYS, _jsonable, _output_path


def write_html_report(
    metrics: dict,
    original: str | os.PathLike,
    edited: str | os.PathLike,
    path: str | os.PathLike,
    *,
    settings: dict | None = None,
) -> Path:
    """One self-contained HTML page: animated side-by-side preview, per-frame plots, metrics and
    settings (``settings`` or else the run metadata's). Every image is a ``data:`` URI; the page
    loads nothing from anywhere. The videos are named by file name, not path: a report is passed
    around, and a server's folders (the web page's) are nobody's business."""
    settings = settings if settings is not None else metrics.get("settings")
    preview, preview_type = _preview_animation(metrics, Path(original), Path(edited))
    plots = [_identity_plot(metrics), _temporal_plot(metrics)]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>ipfacediff evaluation: {_text(Path(edited).name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Face edit evaluation</h1>",
        _domain_warning(metrics),
        f"<p>original <code>{_text(Path(original).name)}</code><br>edited <code>{_text(Path(edited).name)}</code><br>"
        f"{metrics.get('frames', '?')} frames, {metrics.get('width', '?')}x{metrics.get('height', '?')}"
        f"{_verdict(metrics)}</p>",
        "<h2>Preview</h2>",
        f'<img class="preview" alt="original, edited and their difference, animated" '
        f'src="data:{preview_type};base64,{base64.b64encode(preview).decode()}">',
        "<h2>Metrics</h2>",
        _metrics_table(metrics),
    ]
    if metrics.get("tracks"):
        parts += ["<h2>Per face</h2>", _tracks_table(metrics["tracks"])]
    parts += ["<h2>Per frame</h2>"]
    parts += [
        f'<img class="plot" alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for alt, png in plots
    ]
    parts += ["<h2>Settings</h2>", _dict_table(settings, unset="default") if settings else "<p>no run metadata</p>"]
    parts += ["<h2>Timings (seconds)</h2>", _timings_table(metrics.get("seconds") or {})]
    parts += ["</body></html>", ""]
    return write_atomic(_output_path(path), "\n".join(parts))


PREVIEW_PANEL = 200  # long side of each preview panel, pixels
PREVIEW_MAX_FRAMES = 40
ZOOM_MAX_FACE = 0.3  # a zoomed face row is added when the main face is smaller (of the short side)
DIFF_GAIN = 4  # the difference panel shows |edited - original| times this

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:980px;
color:#222;padding:0 12px}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.92em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
img.preview,img.plot{max-width:100%;display:block;margin:8px 0;image-rendering:auto}
code{font-size:.9em;word-break:break-all}.good{color:#17702a}.bad{color:#a3161b}.muted{color:#777}
"""

_DESCRIPTIONS = {
    "id_sim": "identity cosine, edited vs original crop (1 = same; same person above ~{sim})",
    "id_dist": "identity distance, dlib scale (same person below {dist})",
    "id_drift": "id_dist / the input's own identity spread across frames",
    "tl_id": "adjacent-frame identity consistency, edited / original (1 = as consistent)",
    "tg_id": "all-pairs identity consistency, edited / original (1 = as consistent)",
    "clip_direction": "CLIP: image change vs text change (source → target prompt), cosine",
    "clip_score": "CLIP: edited face vs target prompt, cosine",
    "warp_error_ratio": "flow-warped frame error, edited / original (1 = no added flicker)",
    "flicker": "mean |frame t − t−1|, edited minus original (0–255; 0 = no added change)",
    "background_psnr": "PSNR outside the faces, dB (high = background untouched)",
    "face_detection_rate": "fraction of edited frames with a detected face",
    "face_warp_error_ratio": "warp_error_ratio inside the face regions",
    "face_flicker": "flicker inside the face regions",
    "face_detection_rate_original": "fraction of original frames with a face",
    "clip_score_original": "CLIP: original face vs target prompt, cosine",
}


def _text(value: Any) -> str:
    """HTML-escaped text; "://" is written with entities so no URL appears in the page source."""
    return html.escape(str(value)).replace("://", ":&#47;&#47;")


def _fmt(value: Any) -> str:
    if value is None:
        return '<span class="muted">—</span>'
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return _text(value)


def _domain_warning(metrics: dict) -> str:
    """A banner when the edit ran on faces its model is not made for (``--allow-out-of-domain``)."""
    domain = metrics.get("domain") or {}
    refused = [face for face, verdict in (domain.get("faces") or {}).items() if not verdict.get("passed")]
    if not domain.get("overridden") or not refused:
        return ""
    return (
        f'<p class="bad"><strong>Out of domain:</strong> the model is made for {_text(domain.get("description"))}; '
        f"face(s) {_text(', '.join(refused))} failed its check and were edited anyway "
        "(the override: --allow-out-of-domain, or the web page's “Edit anyway” box). Expect nonsense; the "
        "figures below do not say otherwise: identity similarity does not judge whether the face was drawn "
        "correctly.</p>"
    )


def edit_judged(metrics: dict) -> bool:
    """Whether the edit itself was scored (CLIP): without it only identity and flicker were."""
    return isinstance(metrics.get("clip_direction"), float)


def summary_line(metrics: dict) -> str:
    """One line for a terminal: the figures, and what they do not say."""
    keys = ("id_sim", "id_drift", "tl_id", "tg_id", "warp_error_ratio", "flicker", "clip_direction")
    figures = ", ".join(f"{key} {metrics[key]:.3f}" for key in keys if isinstance(metrics.get(key), float))
    if not figures:
        return "no face to score"
    if not edit_judged(metrics):
        figures += " (identity and flicker only: the edit itself was not judged; pass --clip to judge it)"
    return figures


def _verdict(metrics: dict) -> str:
    """The headline's words: identity is about the person, never about whether the edit worked."""
    same = metrics.get("same_person")
    parts = []
    if same is not None:
        parts.append(
            ' — identity: <span class="good">same person</span> (id_dist below the threshold)'
            if same
            else ' — identity: <span class="bad">identity lost</span> (id_dist above the threshold)'
        )
    if not edit_judged(metrics):
        parts.append(
            ' — <span class="muted">the edit itself was not judged (no CLIP model: identity and flicker only)</span>'
        )
    return "".join(parts)


def _metrics_table(metrics: dict) -> str:
    keys = [k for k in METRIC_KEYS if k != "seconds"] + [
        "face_warp_error_ratio",
        "face_flicker",
        "face_detection_rate_original",
        "clip_score_original",
    ]
    rows = ["<table><tr><th>metric</th><th>value</th><th>meaning</th></tr>"]
    for key in keys:
        if key not in metrics:
            continue
        meaning = _DESCRIPTIONS.get(key, "").format(sim=ID_SAME_PERSON_COSINE, dist=DLIB_SAME_PERSON_THRESHOLD)
        rows.append(
            f'<tr><td><code>{key}</code></td><td class="num">{_fmt(metrics[key])}</td><td>{_text(meaning)}</td></tr>'
        )
    if metrics.get("prompt"):
        rows.append(
            f'<tr><td>prompts</td><td colspan="2">{_text(metrics.get("source_prompt"))} → '
            f"{_text(metrics['prompt'])}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _tracks_table(tracks: list[dict]) -> str:
    keys = ["frames", *TRACK_KEYS]
    head = "".join(f"<th>{k}</th>" for k in keys)
    rows = [f"<table><tr><th>face</th>{head}</tr>"]
    for track in tracks:
        cells = "".join(f'<td class="num">{_fmt(track.get(k))}</td>' for k in keys)
        rows.append(f"<tr><td>{_text(track.get('id'))}</td>{cells}</tr>")
    rows.append("</table>")
    return "".join(rows)


def _dict_table(data: dict, *, unset: str = "—") -> str:
    """Key-value rows; a None value says ``unset`` (a setting left empty took its default, e.g. the
    adapter's tuned identity guidance: a dash there would read as "off")."""
    rows = ["<table>"]
    for key, value in data.items():
        shown = json.dumps(_jsonable(value)) if isinstance(value, (dict, list, tuple)) else value
        if shown is None:
            cell = f'<span class="muted">{_text(unset)}</span>'
        else:
            cell = _fmt(shown) if not isinstance(shown, str) else _text(shown)
        rows.append(f"<tr><th>{_text(key)}</th><td>{cell}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _timings_table(seconds: dict) -> str:
    plain = {k: v for k, v in seconds.items() if not isinstance(v, dict) and v is not None}
    parts = ["<p>evaluation</p>", _dict_table(plain) if plain else "<p>—</p>"]
    if isinstance(seconds.get("edit_seconds"), dict):
        parts += ["<p>edit</p>", _dict_table(seconds["edit_seconds"])]
    return "".join(parts)


def _main_track(metrics: dict) -> dict | None:
    tracks = [t for t in metrics.get("tracks") or [] if t.get("per_frame", {}).get("boxes")]
    if not tracks:
        return None

    def area(track: dict) -> float:
        boxes = np.asarray(track["per_frame"]["boxes"], dtype=np.float64)
        return float(np.median((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))

    return max(tracks, key=lambda t: (t["frames"], area(t)))


def _preview_animation(metrics: dict, original: Path, edited: Path) -> tuple[bytes, str]:
    """Animated WebP (GIF where Pillow lacks WebP): original | edited | difference, and below
    them the same zoomed on the main face when there is one."""
    from PIL import Image, features

    from ipfacediff.video import iter_frames, probe_video

    info = probe_video(original)
    step = max(1, math.ceil(info.frame_count / PREVIEW_MAX_FRAMES))
    scale = PREVIEW_PANEL / max(info.width, info.height)
    pw, ph = max(2, round(info.width * scale)), max(2, round(info.height * scale))
    track = _main_track(metrics)
    if track and _median_side(track) > ZOOM_MAX_FACE * min(info.width, info.height):
        track = None  # the face already fills the frame: a zoomed row would repeat it
    boxes = dict(zip(track["per_frame"]["frames"], track["per_frame"]["boxes"])) if track else {}
    images = []
    last_box = None
    for t, (o, e) in enumerate(zip(iter_frames(original), iter_frames(edited))):
        last_box = boxes.get(t, last_box)
        if t % step:
            continue
        diff = np.clip(cv2.absdiff(o, e).astype(np.int32) * DIFF_GAIN, 0, 255).astype(np.uint8)
        row = [
            _panel(cv2.resize(x, (pw, ph), interpolation=cv2.INTER_AREA), label)
            for x, label in ((o, "original"), (e, "edited"), (diff, f"difference x{DIFF_GAIN}"))
        ]
        sheet = [np.concatenate(row, axis=1)]
        if track:
            zoom = [
                _panel(_zoom(x, last_box, pw, ph), label)
                for x, label in ((o, "face"), (e, "face, edited"), (diff, "face difference"))
            ]
            sheet.append(np.concatenate(zoom, axis=1))
        images.append(Image.fromarray(np.concatenate(sheet, axis=0)))
    duration = max(20, round(1000 * step / (info.fps or 10)))
    buffer = io.BytesIO()
    if features.check("webp"):
        images[0].save(
            buffer,
            format="WEBP",
            save_all=True,
            append_images=images[1:],
            duration=duration,
            loop=0,
            quality=55,
            method=4,
        )
        return buffer.getvalue(), "image/webp"
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0, optimize=False
    )
    return buffer.getvalue(), "image/gif"


def _median_side(track: dict) -> float:
    boxes = np.asarray(track["per_frame"]["boxes"], dtype=np.float64)
    return float(np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))


def _zoom(image: np.ndarray, box: list[int] | None, pw: int, ph: int) -> np.ndarray:
    """The face region (box enlarged 1.8 times, at the panel's aspect) resized to the panel."""
    if box is None:
        return np.full((ph, pw, 3), 40, np.uint8)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = 1.8 * max(box[2] - box[0], box[3] - box[1], 4)
    s = min(pw, ph) / side
    M = np.array([[s, 0, pw / 2 - s * cx], [0, s, ph / 2 - s * cy]])
    flags = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(image, M, (pw, ph), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=(40, 40, 40))


def _panel(image: np.ndarray, label: str) -> np.ndarray:
    """Label at the bottom left (clips often carry their own caption at the top)."""
    out = np.ascontiguousarray(image)
    y = out.shape[0] - 6
    for colour, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.putText(out, label, (5, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, thickness, cv2.LINE_AA)
    return out


def _figure_png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _identity_plot(metrics: dict) -> tuple[str, bytes]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    tracks = metrics.get("tracks") or []
    for track in tracks:
        ax.plot(track["per_frame"]["frames"], track["per_frame"]["id_sim"], marker=".", label=f"face {track['id']}")
    if tracks:
        ax.axhline(
            ID_SAME_PERSON_COSINE,
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"same-person threshold ({ID_SAME_PERSON_COSINE})",
        )
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no face tracks", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("frame")
    ax.set_ylabel("identity cosine")
    ax.set_title("identity similarity, edited vs original", fontsize=10)
    ax.grid(alpha=0.3)
    return "per-frame identity similarity", _figure_png(fig)


def _temporal_plot(metrics: dict) -> tuple[str, bytes]:
    from matplotlib.figure import Figure

    per_frame = metrics.get("per_frame") or {}
    fig = Figure(figsize=(9, 2.8), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    for ax, key, title in (
        (left, "warp_error", "flow-warp error (frame t−1 → t)"),
        (right, "temporal_diff", "mean |frame t − frame t−1|"),
    ):
        edited = [np.nan if v is None else v for v in per_frame.get(key, [])]
        original = [np.nan if v is None else v for v in per_frame.get(f"{key}_original", [])]
        x = np.arange(1, len(edited) + 1)
        if len(x):
            ax.plot(x, edited, marker=".", label="edited")
            ax.plot(x, original, marker=".", label="original")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "single frame", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("frame t")
        ax.set_ylabel("grey levels (0–255)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    return "per-frame warp error and temporal difference", _figure_png(fig)
