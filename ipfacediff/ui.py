"""``ipfacediff ui``: a local web page (Gradio) to edit the faces of a video from a prompt.

Upload a video (or take the built-in sample), see its faces with their track ids, choose which to
edit, type a prompt, run with one progress bar over the whole run (with the time left), watch the
input and the edit side by side and download the edited video, the evaluation report (HTML) and
the metrics (JSON), by buttons (a file list's × would take them off the page for good).

* The server listens on 127.0.0.1 unless told otherwise; ``share`` is off.
* Everything a session writes lives in its own folder ``WORK_DIR/sessions/<session>``; Gradio's
  upload cache (uploads, and the copies of the files the page shows) is ``WORK_DIR/uploads``.
  ``WORK_DIR`` defaults to a new temporary folder.
* People's videos do not outlive their use: a new input (upload, sample, ×) removes the previous
  video and results; a session's folder and its cache copies are removed when its browser tab
  closes, or after ``keep_minutes`` without activity; SIGINT/SIGTERM remove the work folder (all of
  it when the server made it, else its ``sessions`` and ``uploads``) before the server exits.
* The page's state follows its input: a new or cleared input clears the faces and the results.
* A user's mistake (a file that is not a video, no face, an empty prompt, a bad adapter file, a
  video over the size or duration limit) is shown once, in the status line, as the same one-line
  message as the CLI prints, except that a setting is named by its label on the page, never by a
  flag (the page's settings are checked in its words; a SettingError is worded with its labels).
* The edit settings' controls are made from EditSettings' fields (PAGE_SETTINGS says which the page
  shows, and where); the Edit button's callback reads them as one mapping into one EditSettings.
* A face the model's card refuses is refused in the page's words, and brings up the override box
  ("Edit anyway") under the Edit button; a new input unticks and hides it again, and says so. An
  overridden result says it is out of domain as loudly as the report, and its scores get no verdict.
* Downloads and report.html name the videos by file name, never by the server's paths.
* Adapters (ε1 identity, ε2 edit) are uploaded .safetensors files; the page takes no server paths.
* Requests queue one at a time; the model pipeline is loaded once per server, on first use.
"""

import atexit
import html
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import typing
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ipfacediff.errors import OutOfDomainError, SettingError, UserError
from ipfacediff.progress import OverallProgress
from ipfacediff.settings import (
    DEFAULT_IDENTITY_GRADIENT,
    EditSettings,
    ModelSpec,
    check_number,
    default_of,
    field_type,
    parse_value,
)

DEFAULT_PROMPT = "a face with eyeglasses"
START = "upload a video or take the built-in sample"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_CACHED_PIPELINES = 2  # the base model set and the last adapter combination
FACE_PROMPT_SLOTS = 8  # per-face prompt boxes; faces past these take the main prompt
DEFAULT_KEEP_MINUTES = 60  # a session idle for longer is removed (its videos, results and cache copies)
OVERRIDE_LABEL = "Edit anyway: faces this model was not made for"
OVERRIDE_RESET = f"\u201c{OVERRIDE_LABEL}\u201d is unticked again: it was for the previous video"


def face_thumbnail(frame: np.ndarray, tracks, frame_index: int) -> np.ndarray:
    """``frame`` with each face's box and id drawn, as the `faces` preview draws them."""
    import cv2

    out = np.ascontiguousarray(frame.copy())
    scale = max(1.0, max(out.shape[:2]) / 400)
    for track in tracks.in_frame(frame_index):
        x0, y0, x1, y1 = (round(v) for v in track.boxes[track.position(frame_index)])
        colour = (255, 200, 0)
        thick = max(2, round(2 * scale))
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, thick)
        label = f"face {track.id}"
        font = 0.5 * scale
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font, thick)
        top = max(0, y0 - th - base - 4)
        cv2.rectangle(out, (x0, top), (x0 + tw + 6, top + th + base + 4), colour, -1)
        cv2.putText(out, label, (x0 + 3, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, font, (20, 20, 20), thick // 2 + 1)
    return out


def best_frame(tracks) -> int:
    """The frame showing the most faces (the earliest of those)."""
    counts = np.zeros(max(tracks.frames, 1), dtype=int)
    for track in tracks.tracks:
        for f in track.frames:
            if f < len(counts):
                counts[f] += 1
    return int(np.argmax(counts))


def minutes_words(minutes: float) -> str:
    """``1`` -> "1 minute", ``0.5`` -> "0.5 minutes"."""
    return f"{minutes:g} minute" + ("" if minutes == 1 else "s")


def _mtime(path: Path) -> float:
    """When ``path`` last changed (0 when it is gone)."""
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


@dataclass
class Loaded:
    """The video a session works on: its copy in the session folder and its face tracks."""

    video: str
    tracks: str
    frames: int
    ids: list[int] = field(default_factory=list)
    fps: float = 0.0
    width: int = 0
    height: int = 0
    times: list[float] | None = None  # each frame's time (s): a variable-frame-rate range selects by it

    @property
    def seconds(self) -> float:
        return self.frames / self.fps if self.fps else 0.0

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


class Server:
    """What the page's callbacks share: limits, folders, and the lazily loaded models."""

    def __init__(
        self,
        *,
        model: str | None,
        work_dir: Path,
        max_upload_mb: float,
        max_seconds: float,
        device: str = "auto",
        dtype: str = "auto",
        keep_minutes: float = DEFAULT_KEEP_MINUTES,
        owns_work_dir: bool = False,
        adapters_dir: str | Path | None = None,
    ):
        self.model = model
        self.adapters_dir = adapters_dir  # an adapter library kept outside the model folder
        self.work_dir = work_dir
        self.uploads = work_dir / "uploads"  # Gradio's upload cache (GRADIO_TEMP_DIR) when launched
        self.max_upload_mb = max_upload_mb
        self.max_seconds = max_seconds
        self.device, self.dtype = device, dtype
        self.keep_minutes = keep_minutes
        self.owns_work_dir = owns_work_dir  # made by the server: removed whole when it stops
        from ipfacediff.service import EditService

        # the models, by the adapters a run adds to the server's own; those keep their place
        self.service = EditService(max_pipelines=MAX_CACHED_PIPELINES, base=self.model_spec())
        self._lock = threading.Lock()
        # per session (key = its folder's name): last activity, running events, ended while running,
        # and the folders of Gradio's cache holding its files, by kind ("input", "result", "adapters")
        self._sessions_lock = threading.RLock()
        self._seen: dict[str, float] = {}
        self._busy: dict[str, int] = {}
        self._ended: set[str] = set()
        self._claims: dict[str, dict[str, set[Path]]] = {}

    # --- shared, loaded once ---------------------------------------------------------------

    def model_spec(self, identity_lora: str | None = None, edit_loras: tuple[tuple[str, float], ...] = ()) -> ModelSpec:
        """The server's models, with a run's own ε1/ε2 adapters."""
        return ModelSpec(
            model=self.model,
            identity_lora=identity_lora,
            edit_loras=edit_loras,
            adapters_dir=self.adapters_dir,
            device=self.device,
            dtype=self.dtype,
        )

    def pipeline(self, identity_lora: str | None = None, edit_loras: tuple[tuple[str, float], ...] = ()):
        return self.service.pipeline(self.model_spec(identity_lora, edit_loras))

    def has_pipeline(self, identity_lora: str | None = None, edit_loras: tuple[tuple[str, float], ...] = ()) -> bool:
        """Whether :meth:`pipeline` has these models loaded already."""
        return self.service.has_pipeline(self.model_spec(identity_lora, edit_loras))

    def identity(self):
        return self.service.identity()

    # --- per session -----------------------------------------------------------------------

    @staticmethod
    def session_key(request) -> str:
        """The name of a session's folder: its Gradio session hash (``request`` or the key itself)."""
        session = request if isinstance(request, str) else getattr(request, "session_hash", None) or "local"
        return re.sub(r"[^A-Za-z0-9_-]", "_", session)[:64]

    def session_dir(self, request) -> Path:
        """The session's folder (made when missing); counts as activity for the idle sweep."""
        key = self.session_key(request)
        with self._sessions_lock:
            self._seen[key] = time.time()
        folder = self.work_dir / "sessions" / key
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @contextmanager
    def busy(self, request):
        """Around an event: the session is not swept or removed while it runs (a tab closed
        meanwhile ends the session when the event is done)."""
        key = self.session_key(request)
        with self._sessions_lock:
            self._busy[key] = self._busy.get(key, 0) + 1
        try:
            yield self.session_dir(request)
        finally:
            with self._sessions_lock:
                self._busy[key] -= 1
                done = not self._busy[key]
                if done:
                    del self._busy[key]
            if done and key in self._ended:
                self.end_session(key)

    def cache_dir_of(self, path: str | Path) -> Path | None:
        """The folder of Gradio's upload cache that holds ``path``: the upload's own folder for an
        upload, else the folder (named by the content hash) Gradio copies a shown file into."""
        path = Path(path).resolve()
        uploads = self.uploads.resolve()
        if path.is_relative_to(uploads):
            parts = path.relative_to(uploads).parts
            return uploads / parts[0] if parts else None
        if not path.is_file():
            return None
        from gradio.processing_utils import hash_file

        return uploads / hash_file(path)

    def claim(self, request, kind: str, paths) -> None:
        """Note the cache copies of ``paths`` as the session's ``kind`` files, removed with them."""
        key = self.session_key(request)
        folders = {d for d in (self.cache_dir_of(p) for p in paths if p) if d is not None}
        with self._sessions_lock:
            self._claims.setdefault(key, {}).setdefault(kind, set()).update(folders)

    def release(self, request, *kinds: str, keep=()) -> None:
        """Remove the session's cache copies of ``kinds`` (but those of ``keep``, and any another
        session also shows)."""
        key = self.session_key(request)
        kept = {d for d in (self.cache_dir_of(p) for p in keep if p) if d is not None}
        with self._sessions_lock:
            claims = self._claims.get(key, {})
            folders = set().union(*(claims.pop(kind, set()) for kind in kinds))
            if kept & folders:
                claims.setdefault(kinds[0], set()).update(kept & folders)
            held = set().union(*(s for other in self._claims.values() for s in other.values()))
        for folder in folders - kept - held:
            shutil.rmtree(folder, ignore_errors=True)

    def forget_input(self, request, state, keep=()) -> None:
        """A new input replaces the old: remove the old video, its results and their cache copies."""
        session = self.session_dir(request)
        loaded = (state or {}).get("loaded") if isinstance(state, dict) else None
        if loaded and Path(loaded["video"]).parent.parent == session / "videos":
            shutil.rmtree(Path(loaded["video"]).parent, ignore_errors=True)
        for name in ("runs", "inversion"):  # the inversion cache holds the old video's latents
            shutil.rmtree(session / name, ignore_errors=True)
        self.release(request, "input", "result", keep=keep)

    def end_session(self, key: str) -> None:
        """Remove everything of session ``key`` (later, when one of its events is still running)."""
        key = self.session_key(key)
        with self._sessions_lock:
            if self._busy.get(key):
                self._ended.add(key)
                return
            self._ended.discard(key)
            kinds = list(self._claims.get(key, {}))
        self.release(key, *kinds)
        with self._sessions_lock:
            self._claims.pop(key, None)
            self._seen.pop(key, None)
        shutil.rmtree(self.work_dir / "sessions" / key, ignore_errors=True)

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove the sessions idle for over ``keep_minutes`` (activity = their last event, else
        their folder's time), and cache entries no session holds that are as old; return the
        sessions removed."""
        now = time.time() if now is None else now
        ttl = self.keep_minutes * 60
        removed = []
        sessions = self.work_dir / "sessions"
        keys = {p.name for p in sessions.iterdir()} if sessions.is_dir() else set()
        with self._sessions_lock:
            keys |= set(self._seen) | set(self._claims)
        for key in sorted(keys):
            with self._sessions_lock:
                if self._busy.get(key):
                    continue
                seen = self._seen.get(key)
            if seen is None:
                seen = _mtime(sessions / key)
            if now - seen > ttl:
                self.end_session(key)
                removed.append(key)
        with self._sessions_lock:
            held = set().union(*(s for claims in self._claims.values() for s in claims.values()))
        if self.uploads.is_dir():
            for entry in self.uploads.iterdir():
                if entry not in held and now - _mtime(entry) > ttl:
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        return removed

    def remove_all(self) -> None:
        """The server stops: remove every session and the upload cache (and the work folder when
        the server made it)."""
        for _ in range(2):  # a running event may still be writing: once more after it
            if self.owns_work_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)
            else:
                for name in ("sessions", "uploads"):
                    shutil.rmtree(self.work_dir / name, ignore_errors=True)

    def new_folder(self, session: Path, kind: str) -> Path:
        stamp = time.strftime("%H%M%S")
        for n in range(1, 10_000):
            folder = session / kind / f"{stamp}-{n}"
            try:
                folder.mkdir(parents=True)
                return folder
            except FileExistsError:
                continue
        raise RuntimeError("no free folder name")

    def check_video(self, path: Path) -> Any:
        from ipfacediff.video import probe_video

        size_mb = path.stat().st_size / 2**20
        if size_mb > self.max_upload_mb:
            raise UserError(
                f"{path.name} is {size_mb:.0f} MB; this page takes videos up to {self.max_upload_mb:g} MB "
                "(trim or compress it, or use `ipfacediff edit`)"
            )
        info = probe_video(path)
        if info.duration > self.max_seconds:
            raise UserError(
                f"{path.name} is {info.duration:.0f} s long; this page takes videos up to "
                f"{self.max_seconds:g} s (trim it, or use `ipfacediff edit` for long videos)"
            )
        if info.frame_count == 0:
            raise UserError(f"{path.name} has no video frames")
        return info

    def load_upload(self, upload: str, request, progress=None) -> Loaded:
        from ipfacediff.face import detect_video_faces, require_face

        source = Path(upload)
        folder = self.new_folder(self.session_dir(request), "videos")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", source.name)[-80:] or "input"
        video = folder / name
        try:
            shutil.copyfile(source, video)
            info = self.check_video(video)
            report = (lambda done: progress("faces", done, info.frame_count)) if progress else None
            tracks = require_face(detect_video_faces(video, progress=report), video.name)
        except BaseException:  # a rejected video is not kept
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Loaded(
            str(video),
            str(tracks.save(folder / "tracks.json")),
            info.frame_count,
            [t.id for t in tracks.tracks],
            float(info.fps or 0.0),
            info.width,
            info.height,
            info.times.seconds(),
        )

    def load_sample(self, request) -> Loaded:
        from ipfacediff.demo import sample_clip

        folder = self.new_folder(self.session_dir(request), "videos")
        video = folder / "sample.mp4"
        tracks = sample_clip(video)
        return Loaded(
            str(video),
            str(tracks.save(folder / "tracks.json")),
            tracks.frames,
            [t.id for t in tracks.tracks],
            float(tracks.fps or 0.0),
            tracks.width,
            tracks.height,
        )

    def thumbnail(self, loaded: Loaded) -> Path:
        """The faces preview, as a PNG next to the video (a file: its cache copy is known and removed)."""
        import cv2

        from ipfacediff.face import FaceTracks
        from ipfacediff.video import read_frames

        tracks = FaceTracks.load(loaded.tracks)
        index = best_frame(tracks)
        image = face_thumbnail(read_frames(loaded.video, start=index, count=1)[0], tracks, index)
        path = Path(loaded.video).parent / "faces.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        return path

    def run(
        self,
        loaded: Loaded,
        settings,
        request,
        *,
        identity_lora: str | None,
        edit_loras: tuple[tuple[str, float], ...],
        progress=None,
    ) -> dict:
        from ipfacediff.demo import side_by_side
        from ipfacediff.diffusion import InversionCache

        session = self.session_dir(request)
        if not Path(loaded.video).is_file() or not Path(loaded.tracks).is_file():
            raise UserError(
                f"the video is no longer on the server (cleared, or idle for over {minutes_words(self.keep_minutes)})"
                ": upload it again or take the built-in sample"
            )
        if progress:
            progress("loading models", 0, 1)
        spec = self.model_spec(identity_lora, edit_loras)
        self.service.pipeline(spec)
        folder = self.new_folder(session, "runs")
        edited = folder / "edited.mp4"
        report = self.service.edit(
            loaded.video,
            edited,
            settings,
            spec,
            tracks=loaded.tracks,
            cache=InversionCache(session / "inversion"),
            progress=progress,
            log=lambda m: None,
        ).report
        if progress:
            progress("side by side", 0, 1)
        preview = side_by_side(Path(loaded.video), edited, folder / "side_by_side.mp4")
        # The downloads name the videos by file name: the server's folders are none of the user's business.
        evaluation = self.service.evaluate(
            loaded.video,
            edited,
            tracks=loaded.tracks,
            faces=settings.faces,
            shared_identity=True,
            progress=progress,
            metrics_path=folder / "metrics.json",
            report_path=folder / "report.html",
            metrics_extra={
                "original": Path(loaded.video).name,
                "edited": edited.name,
                "run_metadata": "edited.run.json",
            },
        )
        metrics, metrics_path, report_path = evaluation.metrics, evaluation.metrics_path, evaluation.report_path
        return {
            "report": report,
            "edited": edited,
            "preview": preview,
            "metrics": metrics,
            "metrics_path": metrics_path,
            "report_path": report_path,
        }


# --- page -----------------------------------------------------------------------------------

CSS = """
.status-ok { border-left: 4px solid #16a34a; padding: 6px 12px; background: rgba(22,163,74,.08); border-radius: 6px; }
.status-error { border-left: 4px solid #dc2626; padding: 6px 12px; background: rgba(220,38,38,.08); border-radius: 6px; }
.status-warn { border-left: 4px solid #d97706; padding: 6px 12px; background: rgba(217,119,6,.12); border-radius: 6px; }
.status-info { border-left: 4px solid #2563eb; padding: 6px 12px; background: rgba(37,99,235,.08); border-radius: 6px; }
#run-button { min-height: 48px; }
#status [data-testid="status-tracker"].translucent { background: var(--block-background-fill); }
#status:has([data-testid="status-tracker"].translucent:not(.hide)) [id^="status-"] { visibility: hidden; }
.result-line { padding: 4px 2px; line-height: 1.5; }
.result-warning { color: #a3161b; border-left: 4px solid #dc2626; padding: 6px 12px; background: rgba(220,38,38,.08);
  border-radius: 6px; margin-bottom: 6px; }
.result-line ul { margin: 4px 0 0 1.2em; padding: 0; list-style: disc; }
footer { display: none !important; }
"""

# The input player cannot play a file that is not a video (or one the browser does not decode) and
# raises its own "Video not playable" pop-up: the server says what is wrong, once, in the status
# line, so that pop-up is stopped before it reaches the player (capture phase, input player only).
HEAD = """<script>
window.addEventListener("error", (event) => {
  const target = event.target;
  if (target instanceof HTMLMediaElement && target.closest("#input-video")) event.stopImmediatePropagation();
}, true);
</script>"""


def _status(kind: str, text: str) -> str:
    return f'<div class="status-{kind}" id="status-{kind}">{html.escape(text)}</div>'


def _number(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def result_summary(metrics: dict, *, overridden: bool = False) -> tuple[str, list[str]]:
    """The edit's scores for a person, as a heading and one line per figure: what it is, and what
    is good (README's "Evaluation output"); says plainly when the edit itself was not judged (no
    CLIP figures), and that identity similarity is about the person, not about whether the face
    was drawn correctly. An ``overridden`` run (faces its model is not made for) gets no verdict:
    its faces are not to be trusted, whatever the figure."""
    from ipfacediff.evaluation import ID_SAME_PERSON_COSINE

    parts = []
    if (v := _number(metrics, "id_sim")) is not None:
        if overridden:
            verdict = "no verdict: out of the model's domain"
        else:
            verdict = "the same person" if v >= ID_SAME_PERSON_COSINE else "may not look like the same person"
        parts.append(
            f"same person: identity similarity {v:.2f} (1 = unchanged, {ID_SAME_PERSON_COSINE:g} or more = "
            f"the same person; {verdict}). It does not judge whether the face was drawn correctly"
        )
    if (v := _number(metrics, "tl_id")) is not None:
        parts.append(f"steady identity: frame-to-frame identity consistency {v:.2f} (1 = as consistent as the input)")
    if (v := _number(metrics, "warp_error_ratio")) is not None:
        parts.append(f"flicker: warp error ratio {v:.2f} (1 = as steady as the input, higher = more flicker)")
    clip = [
        f"edit direction: CLIP {v:.2f} (0 = unchanged, higher = further towards the prompt)"
        for v in [_number(metrics, "clip_direction")]
        if v is not None
    ]
    clip += [
        f"prompt match: CLIP score {v:.2f} (higher = closer to the prompt)"
        for v in [_number(metrics, "clip_score")]
        if v is not None
    ]
    if not parts:
        parts.append("no face found in the edit to score")
    lead = "Checks" if clip else "Checks: identity and flicker only; the edit itself was not judged"
    return lead, parts + clip


def _result_line(lead: str, lines: list[str], faces: list[str] = (), *, warning: str = "") -> str:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    title, _, rest = warning.partition(": ")
    banner = (
        f'<div class="result-warning" id="result-warning"><strong>{html.escape(title)}:</strong> {html.escape(rest)}</div>'
        if warning
        else ""
    )
    prompts = "".join(f"<li>{html.escape(line)}</li>" for line in faces)
    head = (
        f'<div class="result-line" id="result-faces"><strong>Prompts</strong><ul>{prompts}</ul></div>' if faces else ""
    )
    return (
        banner
        + head
        + (f'<div class="result-line" id="result-text"><strong>{html.escape(lead)}</strong><ul>{items}</ul></div>')
    )


def seconds_text(value: Any, *, clip_seconds: float = 0.0, end: bool = False) -> str:
    """A range field's number as the seconds EditSettings takes: empty (the clip's own start or
    end) for an empty field, a start at 0 or an end at (or past) the clip's end."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    value = float(value)
    if (not end and value == 0) or (end and clip_seconds and value >= clip_seconds - 1e-3):
        return ""
    return format(value, "g")


def optional_number(text: Any, name: str, setting: str) -> float | None:
    """A text field's number for the EditSettings field ``setting`` (an int or float that may be
    unset), checked against its range in the field's ``name``; None when it is empty (the setting's
    default)."""
    text = "" if text is None else str(text).strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{name} must be a number, or empty for the default, not {text!r}") from None
    kind, _ = setting_kind(setting)
    return check_number(value, kind, name, dict(_field(setting).metadata))


def check_range(start: Any, end: Any, clip_seconds: float) -> None:
    """The page's Start and End (s) against the clip: one line, in the fields' own names, for a
    range that is empty, reversed or past the clip's end (an End past it is not quietly taken as it)."""
    values = {}
    for name, value in (("Start", start), ("End", end)):
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{name} (s) must be a number of seconds from 0 to the clip's length, not {value:g}")
        values[name] = value
    first, last = values.get("Start", 0.0), values.get("End")
    if not clip_seconds:
        return
    if first >= clip_seconds:
        raise UserError(
            f"Start {first:g} s is at or past the end of the clip ({clip_seconds:g} s): start earlier, or at 0"
        )
    if last is not None and last > clip_seconds + 1e-3:
        raise UserError(
            f"End {last:g} s is past the end of the clip ({clip_seconds:g} s): set End to {clip_seconds:g} or "
            "less, or empty for the clip's end"
        )
    if last is not None and last <= first:
        raise UserError(f"End {last:g} s is not after Start {first:g} s: the range is empty or reversed")


# The stages an edit runs once per face (and per window of a long clip), in their order.
PER_FACE_STAGES = ("invert", "edit region", "edit")
# What each stage of an edit costs, relative to one frame's inversion step: the shares the overall
# bar gives them (measured with the embedded model; the time left follows the real pace anyway).
LOAD_COST = 150.0  # loading a model set, once per server and adapter set
EDIT_REGION_COST = 6.0  # per frame edited
PER_MEGAPIXEL_FRAME_COST = {  # per frame of the clip and megapixel, after the edit
    "write": 9.0,
    "side by side": 30.0,
    "faces (edited)": 6.0,
    "evaluate": 70.0,
    "report": 25.0,
}


def run_phases(
    settings, *, frames: int, clip_frames: int, megapixels: float, load_models: bool
) -> list[tuple[str, float]]:
    """The stages of one page run in their order, each with its share of the work (``frames``
    edited of ``clip_frames``, per face), for :class:`ipfacediff.progress.OverallProgress`."""
    after = [(stage, cost * clip_frames * max(megapixels, 0.01)) for stage, cost in PER_MEGAPIXEL_FRAME_COST.items()]
    return [
        ("loading models", LOAD_COST if load_models else 0.0),
        ("invert", float(settings.steps * frames)),
        ("edit region", EDIT_REGION_COST * frames if settings.local_blend else 0.0),
        ("edit", settings.steps * settings.strength * frames),
        *after,
    ]


def overridden_faces(domain: dict) -> list[str]:
    """The faces a run edited although the model's card refused them (the override), by id."""
    if not (domain or {}).get("overridden"):
        return []
    return [face for face, verdict in (domain.get("faces") or {}).items() if not verdict.get("passed")]


def refusal_text(error: OutOfDomainError) -> str:
    """The in-domain refusal in the page's words: what the model edits, that the face is not one,
    and what the page offers (the override box it shows below the Edit button)."""
    return (
        f"error: {error.model_name} edits {error.description} only, and {error.label} is not one (its "
        f"in-domain check scored {error.score:.1f} dB, at least {error.threshold:g} dB is needed): it would draw "
        "nonsense. Real faces need a model made for them, which whoever started this page chooses. To edit this "
        f"video anyway, tick \u201c{OVERRIDE_LABEL}\u201d below the Edit faces button and run again."
    )


def override_warning(domain: dict) -> str:
    """The banner over an overridden run's scores (as loud as the report's)."""
    return (
        f"Out of domain: the model is made for {domain.get('description', 'other faces')}, and face(s) "
        f"{', '.join(overridden_faces(domain))} failed its check; they were edited anyway (\u201c{OVERRIDE_LABEL}"
        "\u201d). Expect nonsense: a high identity similarity does not mean the face was drawn correctly."
    )


def face_prompt_items(ids: list[int], chosen: list[int], texts) -> list[str]:
    """``ID=TEXT`` for each ticked face whose own prompt box (slot i = face ``ids[i]``) is filled."""
    return [
        f"{face}={text.strip()}"
        for face, text in zip(ids, texts)
        if face in chosen and isinstance(text, str) and text.strip()
    ]


def face_summary(faces: list[dict], settings) -> list[str]:
    """Which prompt each edited face got (a run report's ``faces``), its adapters and the identity
    guidance it was edited with (the tuned value an empty field stands for), in words."""
    own = {int(item.partition("=")[0]) for item in settings.face_prompts}
    lines = []
    for face in faces:
        prompt = face.get("prompt")
        if prompt is None:
            lines.append(f"face {face['id']}: not edited")
            continue
        whose = "its own prompt" if face["id"] in own else "the main prompt"
        line = f"face {face['id']}: \u201c{prompt}\u201d ({whose})"
        if not face.get("frames"):
            line += ", no frame in the range"
        adapters = face.get("edit_adapters")
        if isinstance(adapters, dict):
            line += "; adapters " + ", ".join(f"{name} {weight:g}" for name, weight in adapters.items())
        elif adapters:
            names = [":".join(str(v) for v in a) if isinstance(a, (list, tuple)) else str(a) for a in adapters]
            line += f"; adapters {', '.join(names)}"
        gradient = face.get("identity_gradient")
        if face.get("frames") and isinstance(gradient, (int, float)):
            how = " (the tuned default)" if settings.identity_gradient is None else ""
            line += f"; identity guidance {gradient:g}{how}" if gradient else "; identity guidance off"
        lines.append(line)
    return lines


# --- the edit settings the page shows ----------------------------------------------------------


@dataclass(frozen=True)
class Control:
    """One :class:`~ipfacediff.settings.EditSettings` field on the page. The control, its label,
    first value and range check come from the field (:func:`setting_control`); this says only how
    the page presents it."""

    setting: str
    hint: str = ""  # after the label, in brackets: what an empty field means, or "optional"
    info: str | None = None  # the line under the label; None: the setting's help, "": none
    placeholder: str | None = None
    step: float | None = None  # a slider's step
    elem_id: str | None = None  # default: the setting's name with dashes
    value: Any = None  # the page's first value, for a setting without a default (the prompt)
    min_width: int = 160
    scale: int | None = None  # its share of the row's width

    @property
    def id(self) -> str:
        return self.elem_id or self.setting.replace("_", "-")

    @property
    def label(self) -> str:
        return setting_label(self.setting) + (f" ({self.hint})" if self.hint else "")


TUNED = "empty = the tuned default"
# Which settings the page shows, and where: each section's rows of controls, left to right. Settings
# not listed keep their defaults; the page's own fields (range in seconds, faces, per-face prompts,
# the override box) go into the settings beside these, in `edit_settings`.
PAGE_SETTINGS: dict[str, tuple[tuple[Control, ...], ...]] = {
    "range": ((Control("fade", info="", elem_id="range-fade", min_width=100),),),  # beside Start and End (s)
    "prompts": (
        (Control("prompt", info="", value=DEFAULT_PROMPT, placeholder="what the face should show"),),
        (Control("source_prompt", hint="optional", info="", placeholder="what the input shows, e.g. a face"),),
    ),
    "main": (
        (Control("strength", info="", step=0.05), Control("steps", info="")),
        (
            Control("keyframes", hint="empty = one per 8 frames", info="", placeholder="one per 8 frames", scale=2),
            Control("seed", info="", scale=1),
        ),
    ),
    "identity": (
        (
            Control(
                "identity_gradient",
                hint=TUNED,
                info="pulls each keyframe's face towards the input's identity in the late steps; empty: the value the "
                f"edit's adapter was tuned with (else {DEFAULT_IDENTITY_GRADIENT:g}); 0 = off. The result says the "
                "value used",
                placeholder="tuned default",
            ),
            Control("identity_gradient_from", info="acts at this timestep and below"),
        ),
    ),
    "adapters": ((Control("adapters"),),),
    "more": (
        (
            Control("guidance", hint=TUNED, placeholder="tuned default"),
            Control("blend_threshold", hint=TUNED, placeholder="tuned default"),
        ),
        (Control("local_blend"), Control("detail_transfer")),
        (Control("occlusion"),),
        (Control("temporal_smoothing", step=0.05),),
        (Control("propagation_temperature", step=0.1),),
        (
            Control("random_keyframes", info="a new random offset of the keyframes every step (off: evenly spaced)"),
            Control("all_keyframes_below"),
        ),
        (Control("inject_feature_until"), Control("inject_attention_until")),
        (Control("hair"),),
    ),
}
# The page's names of the settings it fills from its own fields (the others: `setting_label`).
OWN_FIELD_LABELS = {
    "start": "Start (s)",
    "end": "End (s)",
    "faces": "Faces to edit",
    "face_prompts": "Prompt for this face",
    "allow_out_of_domain": OVERRIDE_LABEL,
}


def _field(name: str):
    return next(f for f in fields(EditSettings) if f.name == name)


def setting_kind(name: str) -> tuple[type, bool]:
    """(int, float, bool or str; whether it may be unset) of an EditSettings field."""
    hint = field_type(EditSettings, name)
    args = typing.get_args(hint)
    return next((a for a in args if a is not type(None)), hint), type(None) in args


def setting_label(name: str) -> str:
    """The page's name of a setting: its ``label``, else its field name in words."""
    return _field(name).metadata.get("label") or name.replace("_", " ").capitalize()


def page_labels() -> dict[str, str]:
    """Every setting's name on the page, for :meth:`SettingError.worded`."""
    return {f.name: setting_label(f.name) for f in fields(EditSettings)} | OWN_FIELD_LABELS


def control_info(control: Control) -> str:
    return _field(control.setting).metadata["help"] if control.info is None else control.info


def setting_control(gr, control: Control):
    """The Gradio control of a setting, made from its field: a checkbox for a switch, a textbox for
    text, a slider for a float in a closed range, a number field for another number, and a one-line
    textbox for a number that may be unset (empty is its default: Gradio's number field shows 0 for
    empty, and 0 is not the default)."""
    meta = _field(control.setting).metadata
    kind, optional = setting_kind(control.setting)
    value = default_of(EditSettings, control.setting) if control.value is None else control.value
    common = dict(label=control.label, elem_id=control.id, info=control_info(control) or None)
    common |= dict(min_width=control.min_width, scale=control.scale)
    if kind is bool:
        return gr.Checkbox(value=value, **common)
    if kind is str:
        return gr.Textbox(value=value, placeholder=control.placeholder, **common)
    if optional:
        text = "" if value is None else str(value)
        return gr.Textbox(value=text, lines=1, max_lines=1, placeholder=control.placeholder, **common)
    low, high = meta["low"], meta["high"]
    if kind is float and low is not None and high is not None:
        step = control.step or (high - low) / 100
        low, high = low + (step if meta["low_open"] else 0), high - (step if meta["high_open"] else 0)
        return gr.Slider(low, high, value=value, step=step, **common)
    return gr.Number(value=value, precision=0 if kind is int else None, placeholder=control.placeholder, **common)


def setting_value(name: str, value: Any) -> Any:
    """A control's value as its setting takes it, checked against the setting's range in the
    page's name for it (the command line's checks would name its flag); an emptied field is the
    setting's default."""
    kind, optional = setting_kind(name)
    label = setting_label(name)
    if kind is bool:
        return bool(value)
    if kind is str:  # an emptied text with a default (the library adapters' "auto") is that default
        text, default = value or "", default_of(EditSettings, name)
        return default if not text.strip() and isinstance(default, str) and default else text
    if optional:
        return optional_number(value, label, name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return default_of(EditSettings, name)
    if isinstance(value, str):
        value = parse_value(value, kind, False, label)
    return check_number(value, kind, label, dict(_field(name).metadata))


def shown_settings() -> list[str]:
    """The settings the page shows, in their order on it."""
    return [c.setting for rows in PAGE_SETTINGS.values() for row in rows for c in row]


# --- the page -------------------------------------------------------------------------------


@dataclass
class Page:
    """The page's components, as :func:`layout` declares them, for the events to read and set."""

    demo: Any
    state: Any
    video: Any
    sample: Any
    start: Any
    end: Any
    thumb: Any
    faces: Any
    face_prompts: list
    settings: dict[str, Any]  # EditSettings field -> its control (PAGE_SETTINGS)
    identity_file: Any
    edit_files: Any
    edit_weights: Any
    run: Any
    allow_out_of_domain: Any
    status: Any
    result: Any
    result_line: Any
    edited: Any
    report_file: Any
    metrics_file: Any
    summary: Any

    @property
    def results(self) -> list:
        """Side by side, the three downloads (edited video, report, metrics), metrics JSON, result line."""
        return [self.result, self.edited, self.report_file, self.metrics_file, self.summary, self.result_line]

    @property
    def load_outputs(self) -> list:
        """What a new input sets: the loaded state, faces and results together (see `_cleared`)."""
        inputs = [self.start, self.end, self.allow_out_of_domain]
        return [self.state, self.thumb, self.faces, self.status] + self.results + inputs + self.face_prompts

    @property
    def run_inputs(self) -> set:
        """What an edit reads: a set, so that the callback gets one mapping of component to value."""
        own = {self.state, self.faces, self.start, self.end, self.allow_out_of_domain, *self.face_prompts}
        return own | {self.identity_file, self.edit_files, self.edit_weights, *self.settings.values()}


def _place(gr, controls: dict, section: str, *, inline: bool = False) -> None:
    """The controls of a section of PAGE_SETTINGS, a row each (or into the row it is in)."""
    for row in PAGE_SETTINGS[section]:
        with nullcontext() if inline or len(row) == 1 else gr.Row(equal_height=False):
            for control in row:
                controls[control.setting] = setting_control(gr, control)


def layout(gr, on_state_deleted) -> Page:
    """The page, declared: what goes where. The edit settings' controls are made from the settings
    (PAGE_SETTINGS says which, in which section); the rest is the page's own."""
    settings: dict[str, Any] = {}
    place = partial(_place, gr, settings)
    with gr.Blocks(title="ipfacediff") as demo:
        state = gr.State(None, delete_callback=on_state_deleted)
        gr.Markdown(
            "# ipfacediff\nEdit the faces in a video from a text prompt; the person stays "
            "recognisable and the result does not flicker. Upload a video or take the built-in sample."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                video = gr.Video(label="Input video", sources=["upload"], elem_id="input-video", height=300)
                sample = gr.Button("Use the built-in sample", elem_id="sample-button", variant="secondary")
                with gr.Row(equal_height=False):
                    start = gr.Number(
                        label=OWN_FIELD_LABELS["start"], elem_id="range-start", placeholder="clip start", min_width=100
                    )
                    end = gr.Number(
                        label=OWN_FIELD_LABELS["end"], elem_id="range-end", placeholder="clip end", min_width=100
                    )
                    place("range", inline=True)
                thumb = gr.Image(
                    label="Detected faces (track ids)",
                    interactive=False,
                    elem_id="faces-image",
                    height=260,
                    type="numpy",
                )
                with gr.Row(equal_height=False):
                    faces = gr.CheckboxGroup(
                        label=OWN_FIELD_LABELS["faces"], choices=[], elem_id="faces-choice", scale=1, min_width=120
                    )
                    with gr.Column(scale=3, min_width=200):
                        face_prompts = [
                            gr.Textbox(
                                label="Prompt for this face (empty = the main prompt)",
                                visible=False,
                                lines=1,
                                max_lines=2,
                                elem_id=f"face-prompt-{i}",
                                placeholder="empty = the main prompt",
                            )
                            for i in range(FACE_PROMPT_SLOTS)
                        ]
            with gr.Column(scale=1):
                place("prompts")
                place("main")
                with gr.Accordion("Identity", open=False):
                    place("identity")
                with gr.Accordion("Adapters (LoRA)", open=False):
                    place("adapters")
                    identity_file = gr.File(
                        label="Identity adapter ε1 (.safetensors)",
                        file_count="single",
                        file_types=[".safetensors"],
                        type="filepath",
                        elem_id="identity-lora",
                    )
                    edit_files = gr.File(
                        label="Edit adapters ε2 (.safetensors)",
                        file_count="multiple",
                        file_types=[".safetensors"],
                        type="filepath",
                        elem_id="edit-loras",
                    )
                    edit_weights = gr.Textbox(
                        label="Edit adapter weights: one per adapter, in order (empty = 1 each)",
                        placeholder="e.g. 0.8, 1",
                        elem_id="edit-lora-weights",
                    )
                with gr.Accordion("More settings", open=False):
                    place("more")
                run = gr.Button("Edit faces", variant="primary", elem_id="run-button")
                # Shown when the model refuses a face of this video; a new video unticks and hides it.
                allow_out_of_domain = gr.Checkbox(
                    value=False,
                    visible=False,
                    label=OVERRIDE_LABEL,
                    elem_id="allow-out-of-domain",
                    info="for this video only: the model draws nonsense on faces it was not made for; "
                    "the result and the report say the edit was overridden",
                )
                status = gr.HTML(_status("info", START), elem_id="status", min_height=56)
        gr.Markdown("## Result: input | edited")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                result = gr.Video(label="Side by side", interactive=False, elem_id="result-video", height=320)
                result_line = gr.HTML("", elem_id="result-line")
            with gr.Column(scale=1):
                # Buttons, not a file list: a list's × would take a download off the page for good.
                edited = gr.DownloadButton(
                    "Download the edited video (MP4)", interactive=False, elem_id="edited-file", variant="primary"
                )
                report_file = gr.DownloadButton("Download the report (HTML)", interactive=False, elem_id="report-file")
                metrics_file = gr.DownloadButton(
                    "Download the metrics (JSON)", interactive=False, elem_id="metrics-file"
                )
                summary = gr.Code(label="Metrics", language="json", interactive=False, elem_id="metrics", visible=False)
    return Page(
        demo=demo,
        state=state,
        video=video,
        sample=sample,
        start=start,
        end=end,
        thumb=thumb,
        faces=faces,
        face_prompts=face_prompts,
        settings=settings,
        identity_file=identity_file,
        edit_files=edit_files,
        edit_weights=edit_weights,
        run=run,
        allow_out_of_domain=allow_out_of_domain,
        status=status,
        result=result,
        result_line=result_line,
        edited=edited,
        report_file=report_file,
        metrics_file=metrics_file,
        summary=summary,
    )


# --- the page's events ----------------------------------------------------------------------


def _no_download():
    import gradio as gr

    return gr.update(value=None, interactive=False)


def _no_result() -> tuple:
    """Page.results emptied."""
    return (None, _no_download(), _no_download(), _no_download(), None, "")


def _input_controls(loaded: Loaded | None) -> tuple:
    """For a new input (or none): the range fields (start, end), the override box (unticked and
    hidden: an override is for the video it was given for) and the per-face prompt boxes."""
    import gradio as gr

    seconds = round(loaded.seconds, 3) if loaded else None
    end_label = f"End (s; the clip is {seconds:g} s)" if seconds else OWN_FIELD_LABELS["end"]
    ranges = (
        gr.update(value=0 if loaded else None),
        gr.update(value=seconds if seconds else None, label=end_label),
        gr.update(value=False, visible=False),
    )
    ids = loaded.ids if loaded else []
    boxes = tuple(
        gr.update(
            visible=i < len(ids),
            value="",
            label=f"Prompt for face {ids[i]} (empty = the main prompt)" if i < len(ids) else None,
        )
        for i in range(FACE_PROMPT_SLOTS)
    )
    return ranges + boxes


def _unticked(message: str, allow) -> str:
    """The status for a new input; says so when it unticked the override box."""
    return message + (f" ({OVERRIDE_RESET})" if allow else "")


def _cleared(kind: str, message: str) -> tuple:
    """Page.load_outputs with no video loaded: the state, faces image, face choices and results empty."""
    import gradio as gr

    return (None, None, gr.update(choices=[], value=[]), _status(kind, message)) + _no_result() + _input_controls(None)


def _loaded_outputs(server: Server, loaded: Loaded, request, message: str) -> tuple:
    """Page.load_outputs for a loaded video."""
    import gradio as gr

    thumb = server.thumbnail(loaded)
    server.claim(request, "input", [loaded.video, thumb])
    choices = [(f"face {i}", i) for i in loaded.ids]
    state = {"loaded": loaded.__dict__, "session": str(server.session_dir(request)), "key": server.session_key(request)}
    return (
        (state, str(thumb), gr.update(choices=choices, value=list(loaded.ids)), _status("info", message))
        + _no_result()
        + _input_controls(loaded)
    )


def _message(server: Server, error: UserError) -> str:
    """The one-line message in the page's words (a setting by its label, never a flag), without the
    session folders' paths (the user knows the file by name)."""
    text = error.worded(page_labels()) if isinstance(error, SettingError) else str(error)
    return re.sub(re.escape(str(server.work_dir)) + r"[^\s:]*/", "", text).replace("\n", " ")


def _progress_adapter(bar, overall: OverallProgress):
    """The library's per-stage reports as one bar over the whole run, with the time left."""

    def update(stage: str, done: int, total: int) -> None:
        bar(overall.update(stage, done, total), desc=overall.text(), unit="")

    return update


def _end_state_session(server: Server, value) -> None:
    # Gradio calls this an hour after the tab closed (its STATE_TTL_WHEN_CLOSED), if ever: the
    # page's unload event ends the session at once; this only catches what that missed.
    if isinstance(value, dict) and value.get("key"):
        server.end_session(value["key"])


def adapter_file(path, what: str) -> str | None:
    """An uploaded adapter's path, refused unless it is a .safetensors file."""
    if not path:
        return None
    if Path(path).suffix.lower() != ".safetensors":
        raise UserError(f"{what} {Path(path).name} is not a .safetensors file; upload the adapter's .safetensors")
    return str(path)


def adapter_weights(text: str | None, count: int) -> list[float]:
    """The weights typed for ``count`` uploaded edit adapters (none: 1 each)."""
    from ipfacediff.models import LORA_WEIGHT_RANGE

    items = [t for t in re.split(r"[,;\s]+", text or "") if t]
    if not items:
        return [1.0] * count
    if len(items) != count:
        raise UserError(
            f"{len(items)} weight(s) for {count} edit adapter(s): give one weight per uploaded edit "
            "adapter, in order, or none (1 each)"
        )
    low, high = LORA_WEIGHT_RANGE
    weights = []
    for item in items:
        try:
            weight = float(item)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or not low <= weight <= high:
            raise UserError(
                f"edit adapter weight {item!r} must be a number from {low:g} to {high:g} (1 = the adapter as trained)"
            )
        weights.append(weight)
    return weights


def edit_settings(page: Page, values: dict) -> tuple[Loaded, EditSettings, list[int]]:
    """The video, the edit's settings and the faces ticked, from the page's values (component ->
    value): the settings' own controls, and the page's fields that fill settings (the range in
    seconds, the faces ticked and their prompts, the override box); a mistake is one line."""
    state = values[page.state]
    if not state or not state.get("loaded"):
        raise UserError("no video yet: upload a video or take the built-in sample first")
    loaded = Loaded(**state["loaded"])
    if not values[page.faces]:
        raise UserError("no face chosen: tick at least one face to edit")
    chosen = sorted(int(f) for f in values[page.faces])
    own = face_prompt_items(loaded.ids, chosen, [values[box] for box in page.face_prompts])
    start, end = values[page.start], values[page.end]
    check_range(start, end, loaded.seconds)
    mapping = {name: setting_value(name, values[control]) for name, control in page.settings.items()}
    if not mapping["prompt"].strip() and own and len(own) == len(chosen):  # every face has its own
        mapping["prompt"] = own[0].partition("=")[2]
    if not mapping["prompt"].strip():  # in the page's words: the settings' own line names the flag
        raise UserError(
            'the prompt is empty: say what the faces should show, e.g. "a face with eyeglasses", '
            "or give each ticked face its own prompt"
        )
    mapping |= {
        "faces": "all" if chosen == sorted(loaded.ids) else ",".join(str(i) for i in chosen),
        "face_prompts": own,
        "start": seconds_text(start),
        "end": seconds_text(end, clip_seconds=loaded.seconds, end=True),
        "allow_out_of_domain": bool(values[page.allow_out_of_domain]),
    }
    return loaded, EditSettings.from_mapping(mapping), chosen


def _run_outputs(out: dict, settings: EditSettings, took: str) -> tuple:
    """Page.results and the status line for a finished edit (an overridden one says so loudly)."""
    import gradio as gr

    report, metrics = out["report"], out["metrics"]
    reused = (
        " — inversion reused from the cache (same video, same source prompt and steps)"
        if report.inversion_reused
        else ""
    )
    overridden = overridden_faces(report.domain)
    if overridden:
        kind = "warn"
        text = (
            f"done, out of the model's domain: {report.message} in {took}, but the model is not made for "
            f"face(s) {', '.join(overridden)} (\u201cEdit anyway\u201d is ticked). Expect nonsense, whatever "
            f"the scores below say.{reused}"
        )
    else:
        kind, text = "ok", f"done: {report.message} in {took}{reused}."
    scores = {
        k: metrics.get(k) for k in ("id_sim", "id_drift", "tl_id", "tg_id", "warp_error_ratio", "flicker", "frames")
    }
    return (
        str(out["preview"]),
        gr.update(value=str(out["edited"]), interactive=True),
        gr.update(value=str(out["report_path"]), interactive=True),
        gr.update(value=str(out["metrics_path"]), interactive=True),
        json.dumps(scores, default=str),
        _result_line(
            *result_summary(metrics, overridden=bool(overridden)),
            face_summary(report.faces, settings),
            warning=override_warning(report.domain) if overridden else "",
        ),
        _status(kind, text),
        gr.update(),
    )


def _input_events(server: Server):
    """The events of a new input (upload, sample, ×): each sets Page.load_outputs."""
    import gradio as gr

    def on_upload(video, state, allow, request: gr.Request, bar=gr.Progress()):
        with server.busy(request):
            server.forget_input(request, state, keep=[video])
            if not video:
                return (gr.update(),) + _cleared("info", _unticked(START, allow))
            server.claim(request, "input", [video])
            try:
                overall = OverallProgress([("faces", 1.0)])
                loaded = server.load_upload(video, request, _progress_adapter(bar, overall))
            except UserError as error:  # shown once, in the status line; the rejected file goes
                server.release(request, "input")
                return (None,) + _cleared("error", f"error: {_message(server, error)}")
            found = (
                f"{len(loaded.ids)} face(s) found in {loaded.frames} frames: choose the faces to edit and type a prompt"
            )
            return (gr.update(),) + _loaded_outputs(server, loaded, request, _unticked(found, allow))

    def on_sample(state, allow, request: gr.Request):
        with server.busy(request):
            server.forget_input(request, state)
            loaded = server.load_sample(request)
            said = f"built-in sample: {loaded.frames} frames, face tracks given (a cartoon face that the detector may miss)"
            return (loaded.video,) + _loaded_outputs(server, loaded, request, _unticked(said, allow))

    def on_clear(state, allow, request: gr.Request):
        with server.busy(request):
            server.forget_input(request, state)
            return _cleared("info", _unticked(START, allow))

    def on_unload(request: gr.Request):
        server.end_session(server.session_key(request))

    return on_upload, on_sample, on_clear, on_unload


def _run_event(server: Server, page: Page):
    """The Edit button's event: reads Page.run_inputs as one mapping, sets Page.results, the status
    line and the override box."""
    import gradio as gr

    def on_run(values: dict, request: gr.Request, bar=gr.Progress()):
        with server.busy(request) as session:
            try:
                loaded, settings, chosen = edit_settings(page, values)
                frames = range(loaded.frames)
                if loaded.fps:  # a bad range is refused before any model loads
                    frames = settings.frame_range(loaded.fps, loaded.frames, times=loaded.times)
                identity_lora = adapter_file(values[page.identity_file], "identity adapter")
                edit_paths = [adapter_file(f, "edit adapter") for f in values[page.edit_files] or []]
                edit_loras = tuple(zip(edit_paths, adapter_weights(values[page.edit_weights], len(edit_paths))))
                server.claim(request, "adapters", [identity_lora, *edit_paths])
                overall = OverallProgress(
                    run_phases(
                        settings,
                        frames=len(frames),
                        clip_frames=loaded.frames,
                        megapixels=loaded.megapixels,
                        load_models=not server.has_pipeline(identity_lora, edit_loras),
                    ),
                    per_face=PER_FACE_STAGES,
                    faces=sum(settings.prompt_for(face) is not None for face in chosen),
                )
                out = server.run(
                    loaded,
                    settings,
                    request,
                    identity_lora=identity_lora,
                    edit_loras=edit_loras,
                    progress=_progress_adapter(bar, overall),
                )
            except UserError as error:  # shown once, in the status line; no stale result beside it
                shutil.rmtree(session / "runs", ignore_errors=True)
                server.release(request, "result")
                if isinstance(error, OutOfDomainError):  # in the page's words, and the override box shown
                    return _no_result() + (_status("error", refusal_text(error)), gr.update(visible=True))
                return _no_result() + (_status("error", f"error: {_message(server, error)}"), gr.update())
            shown_files = [out["preview"], out["edited"], out["report_path"], out["metrics_path"]]
            for old in (session / "runs").iterdir():  # the previous result leaves the page: and the disk
                if old != Path(out["edited"]).parent:
                    shutil.rmtree(old, ignore_errors=True)
            server.release(request, "result", keep=shown_files)
            server.claim(request, "result", shown_files)
        took = f"{overall.clock() - overall.started:.1f} s"  # the whole run: the edit, the preview and the scores
        return _run_outputs(out, settings, took)

    return on_run


def build(server: Server):
    """The Gradio Blocks of the page, bound to ``server``."""
    import gradio as gr

    page = layout(gr, partial(_end_state_session, server))
    on_upload, on_sample, on_clear, on_unload = _input_events(server)
    with page.demo:
        # Every new input (upload, sample, ×) sets the loaded state, faces and results together; one
        # progress bar, on the status line, follows the stages as the pipeline reports them.
        once = dict(show_progress="full", show_progress_on=[page.status])
        new_input = [page.state, page.allow_out_of_domain]
        page.video.upload(on_upload, [page.video] + new_input, [page.video] + page.load_outputs, **once)
        page.video.clear(on_clear, new_input, page.load_outputs, show_progress="hidden")
        page.sample.click(on_sample, new_input, [page.video] + page.load_outputs, **once)
        run_outputs = page.results + [page.status, page.allow_out_of_domain]
        page.run.click(_run_event(server, page), page.run_inputs, run_outputs, **once)
        page.demo.unload(on_unload)
    return page.demo


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    model: str | None = None,
    work_dir: str | Path | None = None,
    max_upload_mb: float = 200,
    max_seconds: float = 120,
    share: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    block: bool = True,
    keep_minutes: float = DEFAULT_KEEP_MINUTES,
    adapters_dir: str | Path | None = None,
):
    """Serve the page at http://HOST:PORT. ``block=False`` returns the running Blocks (close with ``.close()``).

    ``keep_minutes``: a session idle for longer is removed with its videos and results (a background
    sweep). A blocking server removes its work folder on SIGINT/SIGTERM before it exits (all of it
    when it made the folder, else the ``sessions`` and ``uploads`` it keeps there); any server does
    so at a normal interpreter exit."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:  # an optional extra: say how to get it
        raise UserError('gradio is not installed: pip install "ipfacediff[ui]"')
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if (
        isinstance(keep_minutes, bool)
        or not isinstance(keep_minutes, (int, float))
        or not math.isfinite(keep_minutes)
        or keep_minutes <= 0
    ):
        raise UserError(f"keep minutes must be a positive number of minutes, not {keep_minutes!r}")
    if work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix="ipfacediff-ui-"))
        owns = True
    else:
        owns = not Path(work_dir).exists()
    work_dir = Path(work_dir).resolve()
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the working folder {work_dir}: {exc.strerror}") from None
    if not os.access(work_dir, os.W_OK | os.X_OK):
        raise UserError(f"working folder {work_dir} is not writable; choose another with --work-dir")
    if max_upload_mb <= 0 or max_seconds <= 0:
        raise UserError("the upload size and duration limits must be positive")
    server = Server(
        model=model,
        work_dir=work_dir,
        max_upload_mb=max_upload_mb,
        max_seconds=max_seconds,
        device=device,
        dtype=dtype,
        keep_minutes=keep_minutes,
        owns_work_dir=owns,
        adapters_dir=adapters_dir,
    )
    uploads = server.uploads
    uploads.mkdir(exist_ok=True)
    atexit.register(server.remove_all)
    if block and threading.current_thread() is threading.main_thread():
        _remove_on_signals(server)
    threading.Thread(target=_sweep_forever, args=(server,), name="ipfacediff-ui-sweep", daemon=True).start()
    # Gradio keeps uploads and served files under GRADIO_TEMP_DIR, read by Blocks(), launch() and every
    # upload check: it stays set for the life of the process (the server's process).
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    import gradio as gr

    demo = build(server)
    demo.queue(default_concurrency_limit=1)
    if host not in LOCAL_HOSTS:
        print(f"warning: serving on {host}: anyone who can reach this address can use the page")
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        max_file_size=f"{max_upload_mb:g}mb",
        allowed_paths=[str(work_dir)],
        ssr_mode=False,
        theme=gr.themes.Soft(),
        css=CSS,
        head=HEAD,
        show_error=True,
        quiet=not block,
        inbrowser=False,
        run_history=False,
    )  # the browser keeps no copies of runs whose files the server removes
    demo.ipfacediff_server = server  # type: ignore[attr-defined]
    return demo


def _sweep_forever(server: Server) -> None:
    """Every tenth of ``keep_minutes`` (1 s to 1 min): remove the sessions idle for longer."""
    interval = min(60.0, max(1.0, server.keep_minutes * 6))
    while True:
        time.sleep(interval)
        try:
            server.sweep()
        except Exception as exc:  # the sweep never stops; the next one retries
            print(f"warning: removing idle sessions failed: {exc}", file=sys.stderr)


def _remove_on_signals(server: Server) -> None:
    """On SIGINT/SIGTERM: remove the work folder, then end the process by that signal."""

    def stop(signum, frame):
        server.remove_all()
        what = server.work_dir if server.owns_work_dir else f"the sessions and uploads in {server.work_dir}"
        print(f"stopped ({signal.Signals(signum).name}): removed {what}", flush=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # not reached where the signal ends the process

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
