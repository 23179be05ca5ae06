"""``ipfacediff ui``: a local web page (Gradio) to edit the faces of a video from a prompt.

Upload a video (or take the built-in sample), see its faces with their track ids, choose which to
edit, type a prompt, run with a live progress bar, watch the input and the edit side by side and
download the edited video, the evaluation report (HTML) and the metrics (JSON).

* The server listens on 127.0.0.1 unless told otherwise; ``share`` is off.
* Everything a session writes lives in its own folder ``WORK_DIR/sessions/<session>``; Gradio's
  upload cache is ``WORK_DIR/uploads``. ``WORK_DIR`` defaults to a new temporary folder.
* A user's mistake (a file that is not a video, no face, an empty prompt, a bad adapter path, a
  video over the size or duration limit) is shown as the same one-line message as the CLI prints.
* Requests queue one at a time; the model pipeline is loaded once per server, on first use.
"""

import html
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ipfacediff.errors import UserError

DEFAULT_PROMPT = "a face with eyeglasses"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_CACHED_PIPELINES = 2  # the base model set and the last adapter combination




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


@dataclass
class Loaded:
    """The video a session works on: its copy in the session folder and its face tracks."""

    video: str
    tracks: str
    frames: int
    ids: list[int] = field(default_factory=list)


class Server:
    """What the page's callbacks share: limits, folders, and the lazily loaded models."""

    def __init__(self, *, model: str | None, work_dir: Path, max_upload_mb: float, max_seconds: float,
                 device: str = "auto", dtype: str = "auto"):
        self.model = model
        self.work_dir = work_dir
        self.max_upload_mb = max_upload_mb
        self.max_seconds = max_seconds
        self.device, self.dtype = device, dtype
        self._pipes: dict[tuple, Any] = {}
        self._identity = None
        self._lock = threading.Lock()

    # --- shared, loaded once ---------------------------------------------------------------

    def pipeline(self, identity_lora: str | None = None, edit_loras: tuple[tuple[str, float], ...] = ()):
        from ipfacediff.job import load_pipeline

        key = (identity_lora, edit_loras)
        with self._lock:
            if key not in self._pipes:
                if len(self._pipes) >= MAX_CACHED_PIPELINES:  # keep the base, drop adapter sets
                    for old in [k for k in self._pipes if k != (None, ())]:
                        del self._pipes[old]
                self._pipes[key] = load_pipeline(self.model, identity_lora=identity_lora,
                                                 edit_loras=list(edit_loras) or None,
                                                 device=self.device, dtype=self.dtype)
            return self._pipes[key]

    def identity(self):
        from ipfacediff.identity import IdentityEncoder

        with self._lock:
            if self._identity is None:
                self._identity = IdentityEncoder.from_pretrained(None)
            return self._identity

    # --- per session -----------------------------------------------------------------------

    def session_dir(self, request) -> Path:
        session = getattr(request, "session_hash", None) or "local"
        folder = self.work_dir / "sessions" / re.sub(r"[^A-Za-z0-9_-]", "_", session)[:64]
        folder.mkdir(parents=True, exist_ok=True)
        return folder

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
            raise UserError(f"{path.name} is {size_mb:.0f} MB; this page takes videos up to {self.max_upload_mb:g} MB "
                            "(trim or compress it, or use `ipfacediff edit`)")
        info = probe_video(path)
        if info.duration > self.max_seconds:
            raise UserError(f"{path.name} is {info.duration:.0f} s long; this page takes videos up to "
                            f"{self.max_seconds:g} s (trim it, or use `ipfacediff edit` for long videos)")
        if info.frame_count == 0:
            raise UserError(f"{path.name} has no video frames")
        return info

    def load_upload(self, upload: str, request, progress=None) -> Loaded:
        from ipfacediff.face import detect_video_faces, require_face

        source = Path(upload)
        folder = self.new_folder(self.session_dir(request), "videos")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", source.name)[-80:] or "input"
        video = folder / name
        shutil.copyfile(source, video)
        info = self.check_video(video)
        report = (lambda done: progress("faces", done, info.frame_count)) if progress else None
        tracks = require_face(detect_video_faces(video, progress=report), video.name)
        return Loaded(str(video), str(tracks.save(folder / "tracks.json")), info.frame_count,
                      [t.id for t in tracks.tracks])

    def load_sample(self, request) -> Loaded:
        from ipfacediff.demo import sample_clip

        folder = self.new_folder(self.session_dir(request), "videos")
        video = folder / "sample.mp4"
        tracks = sample_clip(video)
        return Loaded(str(video), str(tracks.save(folder / "tracks.json")), tracks.frames,
                      [t.id for t in tracks.tracks])

    def thumbnail(self, loaded: Loaded) -> np.ndarray:
        from ipfacediff.face import FaceTracks
        from ipfacediff.video import read_frames

        tracks = FaceTracks.load(loaded.tracks)
        index = best_frame(tracks)
        return face_thumbnail(read_frames(loaded.video, start=index, count=1)[0], tracks, index)

    def run(self, loaded: Loaded, settings, request, *, identity_lora: str | None,
            edit_loras: tuple[tuple[str, float], ...], progress=None) -> dict:
        from ipfacediff.demo import side_by_side
        from ipfacediff.diffusion import InversionCache
        from ipfacediff.evaluation import evaluate_videos, write_html_report, write_metrics_json
        from ipfacediff.face import FaceTracks
        from ipfacediff.job import edit_video

        session = self.session_dir(request)
        settings.validate()
        if progress:
            progress("loading models", 0, 1)
        pipe = self.pipeline(identity_lora, edit_loras)
        folder = self.new_folder(session, "runs")
        edited = folder / "edited.mp4"
        report = edit_video(loaded.video, edited, settings, pipeline=pipe, tracks_path=loaded.tracks,
                            cache=InversionCache(session / "inversion"), progress=progress, log=lambda m: None)
        preview = side_by_side(Path(loaded.video), edited, folder / "side_by_side.mp4")
        tracks = FaceTracks.load(loaded.tracks).select(settings.faces)
        metrics = evaluate_videos(loaded.video, edited, tracks=tracks, identity=self.identity(), progress=progress)
        metrics_path = write_metrics_json(metrics, folder / "metrics.json")
        report_path = write_html_report(metrics, loaded.video, edited, folder / "report.html")
        return {"report": report, "edited": edited, "preview": preview, "metrics": metrics,
                "metrics_path": metrics_path, "report_path": report_path}


# --- page -----------------------------------------------------------------------------------

CSS = """
.status-ok { border-left: 4px solid #16a34a; padding: 6px 12px; background: rgba(22,163,74,.08); border-radius: 6px; }
.status-error { border-left: 4px solid #dc2626; padding: 6px 12px; background: rgba(220,38,38,.08); border-radius: 6px; }
.status-info { border-left: 4px solid #2563eb; padding: 6px 12px; background: rgba(37,99,235,.08); border-radius: 6px; }
#run-button { min-height: 48px; }
footer { display: none !important; }
"""


def _status(kind: str, text: str) -> str:
    return f'<div class="status-{kind}" id="status-{kind}">{html.escape(text)}</div>'


def _fmt_metric(metrics: dict, key: str) -> str | None:
    value = metrics.get(key)
    return f"{key} {value:.3f}" if isinstance(value, float) and np.isfinite(value) else None


def build(server: Server):
    """The Gradio Blocks of the page, bound to ``server``."""
    import gradio as gr

    from ipfacediff.job import EditSettings

    def cleanup(value):
        if isinstance(value, dict) and value.get("session"):
            shutil.rmtree(value["session"], ignore_errors=True)

    def shown(error: Exception) -> str:
        """The one-line message, without the session folders' paths (the user knows the file by name)."""
        return re.sub(re.escape(str(server.work_dir)) + r"[^\s:]*/", "", str(error)).replace("\n", " ")

    def progress_adapter(bar):
        def update(stage: str, done: int, total: int) -> None:
            bar((done, max(total, 1)), desc=stage, unit="")
        return update

    def loaded_outputs(loaded: Loaded, request, message: str):
        choices = [(f"face {i}", i) for i in loaded.ids]
        state = {"loaded": loaded.__dict__, "session": str(server.session_dir(request))}
        return (state, server.thumbnail(loaded), gr.update(choices=choices, value=list(loaded.ids)),
                _status("info", message))

    def on_upload(video, request: gr.Request, bar=gr.Progress()):
        if not video:
            return None, None, gr.update(choices=[], value=[]), _status("info", "upload a video or take the sample")
        try:
            loaded = server.load_upload(video, request, progress_adapter(bar))
        except UserError as error:
            gr.Warning(shown(error), title="error")
            return None, None, gr.update(choices=[], value=[]), _status("error", f"error: {shown(error)}")
        return loaded_outputs(loaded, request, f"{len(loaded.ids)} face(s) found in {loaded.frames} frames: "
                                               "choose the faces to edit and type a prompt")

    def on_sample(request: gr.Request):
        loaded = server.load_sample(request)
        outs = loaded_outputs(loaded, request, f"built-in sample: {loaded.frames} frames, face tracks given "
                                               "(a cartoon face that the detector may miss)")
        return (gr.update(value=loaded.video),) + outs

    def on_run(state, faces, prompt, source_prompt, strength, keyframes, steps, seed, identity_lora, adapters_text,
               adapter_files, request: gr.Request, bar=gr.Progress()):
        empty = (None, None, None, None)
        try:
            if not state or not state.get("loaded"):
                raise UserError("no video yet: upload a video or take the built-in sample first")
            loaded = Loaded(**state["loaded"])
            if not faces:
                raise UserError("no face chosen: tick at least one face to edit")
            chosen = sorted(int(f) for f in faces)
            spec = "all" if chosen == sorted(loaded.ids) else ",".join(str(i) for i in chosen)
            keyframes = int(keyframes) if keyframes else None
            settings = EditSettings(prompt=prompt or "", source_prompt=source_prompt or "", steps=int(steps),
                                    keyframes=keyframes, strength=float(strength), seed=int(seed or 0), faces=spec)
            from ipfacediff.models import parse_lora_spec

            specs = [line.strip() for line in (adapters_text or "").splitlines() if line.strip()]
            specs += [str(f) for f in adapter_files or []]
            edit_loras = tuple(parse_lora_spec(s) for s in specs)
            for path, _ in edit_loras + (((identity_lora.strip(), 1.0),) if identity_lora and identity_lora.strip() else ()):
                if not Path(path).is_file():
                    raise UserError(f"adapter {path} does not exist; give the path of a .safetensors file")
            out = server.run(loaded, settings, request, identity_lora=(identity_lora or "").strip() or None,
                             edit_loras=edit_loras, progress=progress_adapter(bar))
        except UserError as error:
            gr.Warning(shown(error), title="error")
            return empty + (_status("error", f"error: {shown(error)}"),)
        report, metrics = out["report"], out["metrics"]
        reused = " — inversion reused from the cache (same video, same source prompt and steps)" \
            if report.inversion_reused else ""
        scores = ", ".join(s for s in (_fmt_metric(metrics, k) for k in ("id_sim", "tl_id", "warp_error_ratio",
                                                                          "flicker")) if s)
        text = f"{report.message} in {report.seconds.get('total', 0):.1f} s{reused}. " + (scores or "")
        files = [str(out["edited"]), str(out["report_path"]), str(out["metrics_path"])]
        return (str(out["preview"]), str(out["edited"]), files,
                json.dumps({k: metrics.get(k) for k in ("id_sim", "id_drift", "tl_id", "tg_id", "warp_error_ratio",
                                                        "flicker", "frames")}, default=str),
                _status("ok", text))

    with gr.Blocks(title="ipfacediff") as demo:
        state = gr.State(None, delete_callback=cleanup)
        gr.Markdown("# ipfacediff\nEdit the faces in a video from a text prompt; the person stays "
                    "recognisable and the result does not flicker. Upload a video or take the built-in sample.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                video = gr.Video(label="Input video", sources=["upload"], elem_id="input-video", height=300)
                sample = gr.Button("Use the built-in sample", elem_id="sample-button", variant="secondary")
                thumb = gr.Image(label="Detected faces (track ids)", interactive=False, elem_id="faces-image",
                                 height=260, type="numpy")
                faces = gr.CheckboxGroup(label="Faces to edit", choices=[], elem_id="faces-choice")
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, elem_id="prompt",
                                    placeholder="what the face should show")
                source_prompt = gr.Textbox(label="Source prompt (optional)", elem_id="source-prompt",
                                           placeholder="what the input shows, e.g. a face")
                with gr.Row():
                    strength = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Strength", elem_id="strength")
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="steps")
                with gr.Row():
                    keyframes = gr.Number(value=0, precision=0, minimum=0, label="Keyframes (0 = one per 8 frames)",
                                          elem_id="keyframes")
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                with gr.Accordion("Adapters (LoRA)", open=False):
                    identity_lora = gr.Textbox(label="Identity adapter ε1 (path to .safetensors)", elem_id="identity-lora")
                    adapters_text = gr.Textbox(label="Edit adapters ε2: one PATH or PATH:WEIGHT per line", lines=2,
                                               elem_id="edit-loras")
                    adapter_files = gr.File(label="…or upload edit adapters", file_count="multiple",
                                            file_types=[".safetensors"], type="filepath", elem_id="edit-lora-files")
                run = gr.Button("Edit faces", variant="primary", elem_id="run-button")
                status = gr.HTML(_status("info", "upload a video or take the built-in sample"), elem_id="status")
        gr.Markdown("## Result: input | edited")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                result = gr.Video(label="Side by side", interactive=False, elem_id="result-video", height=320)
            with gr.Column(scale=1):
                edited = gr.File(label="Edited video", interactive=False, elem_id="edited-file")
                downloads = gr.File(label="Downloads: edited video, report (HTML), metrics (JSON)",
                                    file_count="multiple", interactive=False, elem_id="downloads")
                summary = gr.Code(label="Metrics", language="json", interactive=False, elem_id="metrics", visible=False)

        load_outputs = [state, thumb, faces, status]
        video.upload(on_upload, [video], load_outputs)
        sample.click(on_sample, None, [video] + load_outputs)
        run.click(on_run, [state, faces, prompt, source_prompt, strength, keyframes, steps, seed, identity_lora,
                           adapters_text, adapter_files], [result, edited, downloads, summary, status])
    return demo


def launch(host: str = "127.0.0.1", port: int = 7860, *, model: str | None = None, work_dir: str | Path | None = None,
           max_upload_mb: float = 200, max_seconds: float = 120, share: bool = False,
           device: str = "auto", dtype: str = "auto", block: bool = True):
    """Serve the page at http://HOST:PORT. ``block=False`` returns the running Blocks (close with ``.close()``)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix="ipfacediff-ui-"))
    work_dir = Path(work_dir).resolve()
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the working folder {work_dir}: {exc.strerror}") from None
    if not os.access(work_dir, os.W_OK | os.X_OK):
        raise UserError(f"working folder {work_dir} is not writable; choose another with --work-dir")
    if max_upload_mb <= 0 or max_seconds <= 0:
        raise UserError("the upload size and duration limits must be positive")
    server = Server(model=model, work_dir=work_dir, max_upload_mb=max_upload_mb, max_seconds=max_seconds,
                    device=device, dtype=dtype)
    uploads = work_dir / "uploads"
    uploads.mkdir(exist_ok=True)
    # Gradio keeps uploads and served files under GRADIO_TEMP_DIR, read by Blocks(), launch() and every
    # upload check: it stays set for the life of the process (the server's process).
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    import gradio as gr

    demo = build(server)
    demo.queue(default_concurrency_limit=1)
    if host not in LOCAL_HOSTS:
        print(f"warning: serving on {host}: anyone who can reach this address can use the page")
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                max_file_size=f"{max_upload_mb:g}mb", allowed_paths=[str(work_dir)], ssr_mode=False,
                theme=gr.themes.Soft(), css=CSS, show_error=True, quiet=not block, inbrowser=False)
    demo.ipfacediff_server = server  # type: ignore[attr-defined]
    return demo
