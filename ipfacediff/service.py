"""The one way in to the method for every front-end: the command line, the web page and batch.

Each used to keep its own pipeline cache, fill its own subset of the model options and repeat the
sequence load → :func:`~ipfacediff.edit.edit_video` → identity encoder → evaluate → metrics.json.
:class:`EditService` holds the loaded pipelines, keyed by the :class:`~ipfacediff.settings.ModelSpec`
that names them, and runs that sequence once; a front-end only turns what a person gave into an
:class:`~ipfacediff.settings.EditSettings` and a ``ModelSpec`` and words the result (and the
:class:`~ipfacediff.errors.SettingError`) its own way.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ipfacediff.diffusion import InversionCache, Progress
from ipfacediff.editing import IPFaceDiffPipeline
from ipfacediff.runs import RunReport
from ipfacediff.settings import EditSettings, ModelSpec

DEFAULT_CACHED_PIPELINES = 4  # model sets held at once; the base one is kept, adapter sets make room


def load_pipeline(model: str | ModelSpec | None = None, **options: Any) -> IPFaceDiffPipeline:
    """Load a model set (default: the embedded one) as an :class:`IPFaceDiffPipeline`, with its
    model card (the in-domain check's) in its config. ``model`` is a :class:`ModelSpec`, or the
    model and the spec's fields as keywords (``identity_lora=``, ``edit_loras=[(path, weight)]``,
    ``adapter_library=False``, ``adapters_dir=``, ``device=``, ``dtype=``, ...)."""
    from ipfacediff.domain import ModelCard
    from ipfacediff.models import load_model_set
    from ipfacediff.models.defaults import default_model_dir

    spec = model if isinstance(model, ModelSpec) else ModelSpec(model=model, **options)
    source = Path(spec.model) if spec.model else default_model_dir()
    pipeline = IPFaceDiffPipeline.from_model_set(load_model_set(replace(spec, model=spec.model or str(source))))
    card = ModelCard.read(source) if source.is_dir() else None
    pipeline.register_to_config(model_card=card.to_dict() if card else None)
    return pipeline


@dataclass
class Evaluation:
    """What an edit's scoring wrote: the metrics, and where the files are (None: not written)."""

    metrics: dict
    metrics_path: Path | None = None
    report_path: Path | None = None


@dataclass
class EditOutcome:
    """An edited video: its run metadata and, when asked for, its evaluation."""

    report: RunReport
    output: Path
    evaluation: Evaluation | None = None


class EditService:
    """Loaded pipelines (by :class:`ModelSpec`) and the identity net the scores use, shared by every
    request; thread-safe, so the web page's sessions can share one."""

    def __init__(self, *, max_pipelines: int = DEFAULT_CACHED_PIPELINES, base: ModelSpec | None = None):
        self.max_pipelines = max_pipelines
        self.base = base  # the spec kept when the cache makes room (a front-end's own models)
        self._pipelines: dict[ModelSpec, IPFaceDiffPipeline] = {}
        self._identity = None
        self._lock = threading.RLock()
        self.loads = 0  # model sets loaded so far

    # --- shared, loaded once -------------------------------------------------------------------

    def pipeline(self, spec: ModelSpec) -> IPFaceDiffPipeline:
        """The pipeline of ``spec``, loaded on first use; with the cache full, the other specs'
        pipelines are let go first (one model set is a few GB)."""
        with self._lock:
            if spec not in self._pipelines:
                if len(self._pipelines) >= self.max_pipelines:
                    for old in [k for k in self._pipelines if k != self.base]:
                        del self._pipelines[old]
                self._pipelines[spec] = load_pipeline(spec)
                self.loads += 1
            return self._pipelines[spec]

    def has_pipeline(self, spec: ModelSpec) -> bool:
        """Whether :meth:`pipeline` has ``spec`` loaded already (a front-end says "loading models")."""
        with self._lock:
            return spec in self._pipelines

    def identity(self):
        """The identity encoder the evaluation scores with (dlib's face net), loaded once."""
        from ipfacediff.identity import IdentityEncoder

        with self._lock:
            if self._identity is None:
                self._identity = IdentityEncoder.from_pretrained(None)
            return self._identity

    # --- the method ----------------------------------------------------------------------------

    def edit(
        self,
        input: str | Path,
        output: str | Path,
        settings: EditSettings,
        spec: ModelSpec,
        *,
        tracks: str | Path | None = None,
        cache: InversionCache | None = None,
        progress: Progress | None = None,
        log: Callable[[str], None] = print,
        evaluate: bool = False,
        clip: str | None = None,
        metrics_path: str | Path | None = None,
        report_path: str | Path | None = None,
        score_tracks: bool = False,
        shared_identity: bool = False,
        metrics_extra: dict | None = None,
    ) -> EditOutcome:
        """Edit ``input`` into ``output`` (and its ``.run.json``) with the pipeline of ``spec``;
        with ``evaluate``, score it (:meth:`evaluate`) into ``metrics_path`` / ``report_path``."""
        from ipfacediff.edit import edit_video

        output = Path(output)
        report = edit_video(
            input,
            output,
            settings,
            pipeline=self.pipeline(spec),
            tracks_path=tracks,
            cache=cache,
            progress=progress,
            log=log,
        )
        result = EditOutcome(report, output)
        if evaluate:
            result.evaluation = self.evaluate(
                input,
                output,
                prompt=settings.prompt,
                source_prompt=settings.source_prompt or None,
                clip=clip,
                tracks=tracks if score_tracks else None,
                faces=None,
                shared_identity=shared_identity,
                metrics_path=metrics_path,
                report_path=report_path,
                progress=progress,
                metrics_extra=metrics_extra,
            )
        return result

    def evaluate(
        self,
        original: str | Path,
        edited: str | Path,
        *,
        prompt: str | None = None,
        source_prompt: str | None = None,
        clip: str | None = None,
        tracks: str | Path | None = None,
        faces: str | None = None,
        shared_identity: bool = False,
        metrics_path: str | Path | None = None,
        report_path: str | Path | None = None,
        progress: Progress | None = None,
        metrics_extra: dict | None = None,
    ) -> Evaluation:
        """Score an edit (identity, edit strength, flicker) and write its metrics JSON and HTML
        report where asked. ``tracks``: the faces to score (those ``faces`` selects, when given),
        else found again; ``shared_identity``: score with this service's identity encoder (loaded once for
        many edits) rather than a fresh one; ``metrics_extra``: fields added to the JSON only."""
        from ipfacediff.evaluation import evaluate_videos, write_html_report, write_metrics_json

        chosen = None
        if tracks is not None:
            from ipfacediff.face import FaceTracks

            chosen = FaceTracks.load(tracks)
            chosen = chosen if faces is None else chosen.select(faces)
        metrics = evaluate_videos(
            original,
            edited,
            prompt=prompt,
            source_prompt=source_prompt,
            clip=clip,
            tracks=chosen,
            identity=self.identity() if shared_identity else None,
            progress=progress,
        )
        written = Evaluation(metrics)
        if progress is not None and (metrics_path is not None or report_path is not None):
            progress("report", 0, 1)
        if metrics_path is not None:
            written.metrics_path = write_metrics_json({**metrics, **(metrics_extra or {})}, metrics_path)
        if report_path is not None:
            written.report_path = write_html_report(metrics, original, edited, report_path)
        return written

    def invert(
        self,
        input: str | Path,
        spec: ModelSpec,
        settings: EditSettings,
        *,
        tracks: str | Path | None = None,
        cache: InversionCache | None = None,
        progress: Progress | None = None,
    ) -> list[str]:
        """Fill the inversion cache for the faces ``settings`` selects, as an edit with these
        settings would invert them; returns lines saying what was done."""
        from ipfacediff.edit import invert_video

        return invert_video(
            input,
            pipeline=self.pipeline(spec),
            source_prompt=settings.source_prompt,
            resolution=settings.resolution,
            steps=settings.steps,
            faces=settings.faces,
            tracks_path=tracks,
            whole_frame=settings.whole_frame,
            cache=cache,
            progress=progress,
            allow_out_of_domain=settings.allow_out_of_domain,
        )

    @staticmethod
    def train(kind: str, *args: Any, **options: Any):
        """Fine-tune an adapter: ``kind`` "identity" (ε1), "edit" (ε2) or "library" (ε1 and one ε2
        per edit); the arguments are those of :mod:`ipfacediff.training`'s / the library's builder."""
        if kind == "library":
            from ipfacediff.adapters.build import build_library

            return build_library(*args, **options)
        from ipfacediff import training

        trainers = {"identity": training.train_identity, "edit": training.train_edit}
        return trainers[kind](*args, **options)
