"""Batch editing on Ray: a manifest of clips and prompts, edited by a pool of model-holding workers.

One manifest row names an input clip and one or more prompts (plus optional settings, face tracks
and adapters). All the prompts of one input make one *clip task*, so the clip is DDIM-inverted once
and edited many times. Clip tasks run on Ray actors (:class:`BatchWorker`): each loads the models
once and keeps them for every clip it gets; every worker shares one inversion cache under
``OUTPUT_DIR/.cache``. A clip that fails (bad file, no face, out of memory) is recorded with its
one-line error and the rest go on; a clip whose worker dies is given to a fresh worker; running the
same command again skips every output that is already complete.

This is what ``ipfacediff batch`` runs; :func:`run_batch` is the Python API.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from ipfacediff.errors import SettingError, UserError
from ipfacediff.evaluation.metrics import SUMMARY_KEYS
from ipfacediff.files import check_writable_folder, write_atomic, write_json
from ipfacediff.models import parse_lora_spec
from ipfacediff.settings import ModelSpec, check_option

Progress = Callable[[str, int, int], None]

RESULTS_NAME = "results.jsonl"
CACHE_NAME = ".cache"
SUMMARY_METRICS = SUMMARY_KEYS  # the old name
DEFAULT_RETRIES = 2  # a clip whose worker dies is tried this many more times on a fresh worker
_COLUMNS = ("input", "prompt", "prompts", "output", "tracks", "identity_lora", "edit_lora", "adapters_dir")
_VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")
# A manifest names a setting by its column: the setting's own name, except these model options.
_MODEL_COLUMNS = {"edit_loras": "edit_lora"}


# ---------------------------------------------------------------------------------------------
# Manifest


@dataclass
class BatchJob:
    """One output: an input clip edited with one prompt and its settings."""

    line: int  # manifest line (CSV: counting the header as line 1)
    index: int  # prompt index within the row
    input: str  # absolute
    output: str  # absolute, inside the output folder
    settings: dict  # EditSettings fields, prompt included
    tracks: str | None = None
    identity_lora: str | None = None
    edit_loras: list[tuple[str, float]] = field(default_factory=list)
    adapters_dir: str | None = None  # an adapter library outside the model folder (load_pipeline's)

    @property
    def prompt(self) -> str:
        return self.settings["prompt"]

    def model_spec(self, model: str | None, device: str, dtype: str) -> ModelSpec:
        """The models this job runs on: the batch's model, device and dtype, the row's adapters."""
        return ModelSpec(
            model=model,
            identity_lora=self.identity_lora,
            edit_loras=tuple(tuple(x) for x in self.edit_loras),
            adapters_dir=self.adapters_dir,
            device=device,
            dtype=dtype,
        )


def column_names() -> dict[str, str]:
    """Each setting's manifest column, the words a :class:`SettingError` is said in here."""
    from ipfacediff.settings import EditSettings

    names = {f.name: f.name for cls in (EditSettings, ModelSpec) for f in fields(cls)}
    return names | _MODEL_COLUMNS


def in_columns(error: UserError) -> UserError:
    """``error`` as one line naming its setting by the manifest's column (a :class:`SettingError`)."""
    return UserError(error.worded(column_names())) if isinstance(error, SettingError) else error


def _setting_names() -> list[str]:
    from ipfacediff.settings import EditSettings

    return [f.name for f in fields(EditSettings) if f.name != "prompt"]


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _split(value: Any, sep: str) -> list:
    if value is None:
        return []
    if isinstance(value, list):
        return [v for v in value if not (isinstance(v, str) and not v.strip())]
    return [part.strip() for part in str(value).split(sep) if part.strip()]


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return slug or "edit"


def _read_rows(manifest: Path) -> list[tuple[int, dict]]:
    suffix = manifest.suffix.lower()
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"manifest {manifest} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read manifest {manifest}: {exc}") from None
    rows: list[tuple[int, dict]] = []
    if suffix == ".csv":
        lines = text.splitlines()
        header = [name.strip() for name in _csv_cells(lines[0], f"{manifest.name} line 1")] if lines else []
        if not any(header):
            raise UserError(f"manifest {manifest.name} is empty: it needs a header row such as input,prompt")
        for line, raw in enumerate(lines[1:], start=2):
            cells = _csv_cells(raw, f"{manifest.name} line {line}")
            if len(cells) > len(header):
                raise UserError(
                    f"{manifest.name} line {line}: more cells than header columns (quote cells with commas)"
                )
            if all(not cell.strip() for cell in cells):
                continue
            record = dict(zip(header, [cell.strip() for cell in cells] + [None] * (len(header) - len(cells))))
            rows.append((line, {k: v for k, v in record.items() if k}))
    elif suffix in (".jsonl", ".ndjson"):
        for line, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise UserError(f"{manifest.name} line {line}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{manifest.name} line {line}: each line must be a JSON object")
            rows.append((line, record))
    else:
        raise UserError(f"manifest {manifest.name} must be a .csv or .jsonl file")
    if not rows:
        raise UserError(f"manifest {manifest.name} has no rows: add one line per clip (input and prompt)")
    return rows


def _csv_cells(raw: str, where: str) -> list[str]:
    """The cells of one CSV line. A row is one line: a quote left open would otherwise take the
    lines after it into one cell (a prompt holding the rest of the manifest), so it is refused."""
    try:
        return next(csv.reader([raw], strict=True), [])
    except csv.Error as error:
        problem = (
            "a quoted cell is not closed on this line" if "end of data" in str(error) else f"not valid CSV ({error})"
        )
        raise UserError(
            f'{where}: {problem}: a cell in quotes ends with " on its own line; write a " inside it as ""'
        ) from None


def read_manifest(
    manifest: str | os.PathLike, output_dir: str | os.PathLike, *, log: Callable[[str], None] | None = None
) -> list[BatchJob]:
    """Read a CSV/JSONL manifest into jobs, one per output; any mistake is one :class:`UserError`
    line, naming a setting by its column. A renamed setting's old column is read as the new one,
    with one ``note:`` line to ``log``."""
    try:
        return _read_manifest(Path(manifest), Path(output_dir), log or (lambda _line: None))
    except SettingError as error:
        raise in_columns(error) from None


def _read_manifest(manifest: Path, output_dir: Path, log: Callable[[str], None]) -> list[BatchJob]:
    from ipfacediff.settings import EditSettings

    output_dir = output_dir.resolve()
    base = manifest.resolve().parent
    setting_names = _setting_names()
    known = set(_COLUMNS) | set(setting_names) | set(EditSettings.renamed)
    jobs: list[BatchJob] = []
    explicit: dict[str, int] = {}
    noted: set[str] = set()
    for line, record in _read_rows(manifest):
        where = f"{manifest.name} line {line}"
        unknown = sorted(k for k in record if k not in known)
        if unknown:
            raise UserError(f"{where}: unknown column {unknown[0]!r}; columns are {', '.join(sorted(known))}")
        source = record.get("input")
        if not isinstance(source, str) or not source.strip():
            raise UserError(f"{where}: the input column is empty: give the clip's path")
        input_path = (base / source.strip()).resolve()
        prompts = _split(record.get("prompts"), "|") + _split(record.get("prompt"), "|")
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise UserError(f'{where}: no prompt: fill prompt (or prompts, "|"-separated) with the edit to make')
        for old, new in EditSettings.renamed.items():
            if old in record and old not in noted:
                noted.add(old)
                log(f"note: manifest column {old} is now {new}")
        # An empty cell takes the setting's default.
        settings = {
            name: record[name]
            for name in [*setting_names, *EditSettings.renamed]
            if name in record and not _blank(record[name])
        }
        names = _split(record.get("output"), "|")
        if names and len(names) not in (1, len(prompts)):
            raise UserError(
                f"{where}: {len(names)} output names for {len(prompts)} prompts: give one, or one per prompt"
            )
        tracks = record.get("tracks") or None
        identity_lora = record.get("identity_lora") or None
        adapters_dir = record.get("adapters_dir") or None
        if adapters_dir:  # a bad library is this line's one error, before any worker starts
            from ipfacediff.models import AdapterLibrary

            adapters_dir = str((base / str(adapters_dir).strip()).resolve())
            try:
                AdapterLibrary.read_dir(adapters_dir)
            except UserError as error:
                raise UserError(f"{where}: {error}") from None
        loras = []
        for spec in _split(record.get("edit_lora"), ";"):
            path, weight = (
                (spec[0], float(spec[1])) if isinstance(spec, list) and len(spec) == 2 else parse_lora_spec(str(spec))
            )
            loras.append((str((base / path).resolve()), weight))
        for index, prompt in enumerate(prompts):
            job_settings = EditSettings.from_mapping({**settings, "prompt": prompt.strip()}, where=where)
            if names:
                name = names[index] if len(names) == len(prompts) else names[0]
                if len(names) != len(prompts) and len(prompts) > 1:
                    stem, dot, suffix = name.rpartition(".")
                    name = f"{stem}-{index + 1}.{suffix}" if dot else f"{name}-{index + 1}"
                output = (output_dir / name).resolve()
                if output_dir not in output.parents:
                    raise UserError(f"{where}: output {name!r} must be a relative path inside the output folder")
                if output.suffix.lower() not in _VIDEO_SUFFIXES:
                    raise UserError(f"{where}: output {name!r} must end in .mp4")
                if str(output) in explicit:
                    raise UserError(f"{where}: output {name!r} is also written by line {explicit[str(output)]}")
                explicit[str(output)] = line
            else:
                output = output_dir / f"{input_path.stem}-{_slug(prompt)}.mp4"
            jobs.append(
                BatchJob(
                    line=line,
                    index=index,
                    input=str(input_path),
                    output=str(output),
                    settings=_jsonable(job_settings.to_dict()),
                    tracks=str((base / tracks).resolve()) if tracks else None,
                    identity_lora=str((base / identity_lora).resolve()) if identity_lora else None,
                    edit_loras=loras,
                    adapters_dir=adapters_dir,
                )
            )
    # Default names that collide (same input and prompt on two rows) get the manifest line.
    seen: dict[str, int] = {}
    for job in jobs:
        seen[job.output] = seen.get(job.output, 0) + 1
    for job in jobs:
        if seen[job.output] > 1 and job.output not in explicit:
            path = Path(job.output)
            job.output = str(path.with_name(f"{path.stem}-line{job.line}{path.suffix}"))
    return jobs


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


# ---------------------------------------------------------------------------------------------
# Completeness (skip on re-run)


def _metrics_path(output: Path) -> Path:
    return output.with_name(output.stem + ".metrics.json")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def job_state(job: BatchJob, evaluate: bool) -> str:
    """``complete``, ``evaluate`` (edit done, metrics missing) or ``todo``.

    An output is complete when the video and its ``.run.json`` exist (both are written atomically,
    the metadata last) and the metadata holds the same input and settings as the job.
    """
    from ipfacediff.runs import run_metadata_path

    output = Path(job.output)
    meta = _read_json(run_metadata_path(output)) if output.is_file() else None
    if not meta or _current_names(meta.get("settings")) != job.settings:
        return "todo"
    if Path(str(meta.get("input"))).resolve() != Path(job.input):
        return "todo"
    if evaluate and _read_json(_metrics_path(output)) is None:
        return "evaluate"
    return "complete"


def _current_names(settings: Any) -> Any:
    """A run's recorded settings under today's names (an output made before a rename is complete)."""
    from ipfacediff.settings import EditSettings

    if not isinstance(settings, dict):
        return settings
    return {EditSettings.renamed.get(name, name): value for name, value in settings.items()}


def _summary_metrics(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    return {k: metrics.get(k) for k in SUMMARY_KEYS if isinstance(metrics.get(k), (int, float))} or None


def _row(
    job: BatchJob,
    status: str,
    *,
    error: str | None = None,
    seconds: float = 0.0,
    inversion_reused: bool | None = None,
    metrics: dict | None = None,
    attempts: int = 0,
    worker: str | None = None,
) -> dict:
    from ipfacediff.runs import run_metadata_path

    done = status in ("done", "skipped")
    return {
        "line": job.line,
        "input": job.input,
        "prompt": job.prompt,
        "output": job.output,
        "status": status,
        "error": error,
        "seconds": round(seconds, 3),
        "inversion_reused": inversion_reused,
        "metrics": _summary_metrics(metrics),
        "run_metadata": str(run_metadata_path(Path(job.output))) if done else None,
        "attempts": attempts,
        "worker": worker,
    }


def _skipped_row(job: BatchJob) -> dict:
    from ipfacediff.runs import run_metadata_path

    output = Path(job.output)
    meta = _read_json(run_metadata_path(output)) or {}
    return _row(
        job, "skipped", inversion_reused=meta.get("inversion_reused"), metrics=_read_json(_metrics_path(output))
    )


def one_line(exc: BaseException) -> str:
    """The error of a failed clip as one line."""
    from ipfacediff.errors import UserError as _UserError

    if isinstance(exc, SettingError):
        exc = in_columns(exc)
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    if not isinstance(exc, _UserError):
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return message[:400]


# ---------------------------------------------------------------------------------------------
# The worker


class BatchWorker:
    """Runs clip tasks; made a Ray actor by :func:`run_batch`. Models load on the first clip and stay."""

    def __init__(
        self,
        model: str | None,
        device: str,
        dtype: str,
        cache_root: str,
        running_dir: str,
        evaluate: bool,
        cache_max_bytes: int | None = None,
    ):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        self.model, self.device, self.dtype, self.evaluate = model, device, dtype, evaluate
        self.cache_root, self.running_dir = cache_root, Path(running_dir)
        self.cache_max_bytes = cache_max_bytes
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        from ipfacediff.service import EditService

        self.service = EditService(max_pipelines=1)  # one model set in memory at a time

    @property
    def loads(self) -> int:
        return self.service.loads

    def info(self) -> dict:
        return {"worker": self.name, "pid": os.getpid(), "loads": self.loads}

    def run_clip(self, clip_id: str, jobs: list[BatchJob], attempt: int) -> list[dict]:
        """Edit every job of one clip, in order; a failing job gives a failed row, never an exception."""
        marker = self.running_dir / f"{clip_id}.json"
        self.running_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            marker,
            {
                "pid": os.getpid(),
                "worker": self.name,
                "input": jobs[0].input,
                "attempt": attempt,
                "started": time.time(),
            },
        )
        try:
            return [self._run_job(job, attempt) for job in jobs]
        finally:
            marker.unlink(missing_ok=True)

    def _run_job(self, job: BatchJob, attempt: int) -> dict:
        from ipfacediff.diffusion import InversionCache
        from ipfacediff.settings import EditSettings

        started = time.perf_counter()
        state = job_state(job, self.evaluate)
        reused, stage = None, ""
        try:
            if state == "todo":  # (a killed earlier attempt may have finished it)
                output = Path(job.output)
                output.parent.mkdir(parents=True, exist_ok=True)
                result = self.service.edit(
                    job.input,
                    output,
                    EditSettings(**job.settings),
                    job.model_spec(self.model, self.device, self.dtype),
                    tracks=job.tracks,
                    cache=InversionCache(self.cache_root, max_bytes=self.cache_max_bytes),
                    log=lambda _message: None,
                )
                reused = result.report.inversion_reused
            else:
                from ipfacediff.runs import run_metadata_path

                reused = (_read_json(run_metadata_path(Path(job.output))) or {}).get("inversion_reused")
            stage = "evaluate: "  # the edit is kept; a re-run only evaluates
            metrics = (
                self._evaluate(job)
                if self.evaluate and state != "complete"
                else (_read_json(_metrics_path(Path(job.output))) if self.evaluate else None)
            )
        except Exception as exc:  # noqa: BLE001 - every failure of one output is recorded, the batch goes on
            self._after_failure(exc)
            return _row(
                job,
                "failed",
                error=stage + one_line(exc),
                seconds=time.perf_counter() - started,
                attempts=attempt,
                worker=self.name,
            )
        return _row(
            job,
            "done",
            seconds=time.perf_counter() - started,
            inversion_reused=reused,
            metrics=metrics,
            attempts=attempt,
            worker=self.name,
        )

    def _evaluate(self, job: BatchJob) -> dict:
        return self.service.evaluate(
            job.input, job.output, tracks=job.tracks, shared_identity=True, metrics_path=_metrics_path(Path(job.output))
        ).metrics

    @staticmethod
    def _after_failure(exc: BaseException) -> None:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            import gc

            gc.collect()
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class BatchSummary:
    """What a batch did: counts, one row per output (as in ``results.jsonl``), the mean metrics."""

    done: int
    failed: int
    skipped: int
    rows: list[dict]
    seconds: float
    results: Path
    mean_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.rows)

    def table(self):
        from rich.table import Table

        table = Table(title=f"batch: {self.total} outputs in {self.seconds:.1f} s")
        table.add_column("status")
        table.add_column("outputs", justify="right")
        table.add_column("edit seconds", justify="right")
        for status in ("done", "failed", "skipped"):
            rows = [r for r in self.rows if r["status"] == status]
            table.add_row(status, str(len(rows)), f"{sum(r['seconds'] for r in rows):.1f}")
        return table

    def metrics_table(self):
        from rich.table import Table

        table = Table(title="mean metrics (done and skipped outputs)")
        table.add_column("metric")
        table.add_column("mean", justify="right")
        for key, value in self.mean_metrics.items():
            table.add_row(key, f"{value:.4f}")
        return table


def _mean_metrics(rows: list[dict]) -> dict[str, float]:
    means = {}
    for key in SUMMARY_KEYS:
        values = [
            r["metrics"][key] for r in rows if r.get("metrics") and isinstance(r["metrics"].get(key), (int, float))
        ]
        if values:
            means[key] = sum(values) / len(values)
    return means


def _clip_id(input_path: str) -> str:
    return f"{_slug(Path(input_path).stem, 24)}-{hashlib.sha256(input_path.encode()).hexdigest()[:10]}"


def _write_results(path: Path, rows: list[dict]) -> None:
    ordered = sorted(rows, key=lambda r: (r["line"], r["output"]))
    write_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in ordered))


def run_batch(
    manifest: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    address: str | None = None,
    gpus_per_task: float = 0,
    evaluate: bool = False,
    model: str | None = None,
    num_workers: int | None = None,
    progress: Progress | None = None,
    retries: int = DEFAULT_RETRIES,
    dtype: str = "auto",
    console=None,
    cache_max_bytes: int | None = None,
) -> BatchSummary:
    """Edit every clip of ``manifest`` on Ray; write the videos, their metadata and ``results.jsonl``.

    ``address``: None starts a small local Ray instance (stopped at the end); ``"auto"`` or
    ``"ray://host:10001"`` joins an existing cluster (paths must then be on storage every node sees).
    ``gpus_per_task``: GPUs per worker (fractions share a GPU); 0 runs on CPUs. ``num_workers``:
    default as many as the resources allow, at most one per clip. ``progress(stage, done, total)``
    replaces the built-in rich progress display (stages ``clips`` and ``outputs``). A clip whose
    worker dies is retried ``retries`` times on a fresh worker. ``cache_max_bytes`` bounds the
    shared inversion cache (least recently used entries are evicted).
    """
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # an optional extra: say how to get it
        raise UserError('ray is not installed: pip install "ipfacediff[batch]"')
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    started = time.perf_counter()
    manifest, output_dir = Path(manifest), Path(output_dir)
    gpus_per_task = check_option(gpus_per_task, "--gpus-per-task", low=0)
    num_workers = check_option(num_workers, "--workers", kind=int, low=1)
    retries = check_option(retries, "--retries", kind=int, low=0)
    check_writable_folder(output_dir)
    jobs = read_manifest(manifest, output_dir, log=lambda m: console.print(m, markup=False, highlight=False))
    output_dir.mkdir(parents=True, exist_ok=True)
    output_dir = output_dir.resolve()
    results_path = output_dir / RESULTS_NAME

    rows: list[dict] = []
    clips: dict[str, list[BatchJob]] = {}
    for job in jobs:
        state = job_state(job, evaluate)
        if state == "complete":
            rows.append(_skipped_row(job))
        else:
            clips.setdefault(job.input, []).append(job)
    for clip_jobs in clips.values():  # jobs with the same adapters together: one model load
        clip_jobs.sort(key=lambda j: (j.identity_lora or "", str(j.edit_loras), j.adapters_dir or ""))

    total_clips = len({j.input for j in jobs})
    with _progress_display(progress, console) as report:
        tracker = _Tracker(rows, results_path, report, total_clips, total_clips - len(clips), len(jobs))
        tracker.show()
        if clips:
            _run_on_ray(
                clips,
                output_dir,
                tracker,
                address=address,
                gpus_per_task=gpus_per_task,
                evaluate=evaluate,
                model=model,
                num_workers=num_workers,
                retries=retries,
                dtype=dtype,
                cache_max_bytes=cache_max_bytes,
            )
    _write_results(results_path, rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "skipped")}
    summary = BatchSummary(
        counts["done"],
        counts["failed"],
        counts["skipped"],
        sorted(rows, key=lambda r: (r["line"], r["output"])),
        time.perf_counter() - started,
        results_path,
        _mean_metrics([r for r in rows if r["status"] != "failed"]),
    )
    console.print(summary.table())
    if summary.mean_metrics:
        console.print(summary.metrics_table())
    for row in summary.rows:
        if row["status"] == "failed":
            line = escape(f"{Path(row['output']).name}: {row['error']}")
            console.print(f"[red]failed[/red] {line}", highlight=False, soft_wrap=True)  # one line, as the error
    console.print(f"results: {results_path}", highlight=False)
    return summary


class _Tracker:
    """Collects finished rows, rewrites results.jsonl after every clip and moves the progress display."""

    def __init__(
        self,
        rows: list[dict],
        results_path: Path,
        report: Progress,
        total_clips: int,
        done_clips: int,
        total_outputs: int,
    ):
        self.rows, self.results_path, self.report = rows, results_path, report
        self.total_clips, self.done_clips, self.total_outputs = total_clips, done_clips, total_outputs

    def show(self) -> None:
        self.report("clips", self.done_clips, self.total_clips)
        self.report("outputs", len(self.rows), self.total_outputs)

    def __call__(self, new_rows: list[dict]) -> None:
        self.rows += new_rows
        self.done_clips += 1
        _write_results(self.results_path, self.rows)
        self.show()


@contextmanager
def _progress_display(progress: Progress | None, console) -> Iterator[Progress]:
    if progress is not None:
        yield progress
        return
    from ipfacediff.progress import progress_bars

    with progress_bars(console) as bars:
        yield bars


def _start_ray(address: str | None, num_cpus: int) -> bool:
    """Join ``address`` or start a light local instance; True when this call started Ray (and must stop it)."""
    try:
        import ray
    except ImportError:
        raise UserError(
            'batch editing needs Ray: pip install "ray>=2.9" (or "ray[client]" for ray:// addresses)'
        ) from None
    if ray.is_initialized():
        return False
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=128 * 1024**2, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise UserError(f"could not start or reach {where}: {one_line(exc)}") from None
    return True


def _worker_count(clips: int, gpus_per_task: float, num_workers: int | None) -> int:
    import ray

    resources = ray.cluster_resources()
    if gpus_per_task > 0:
        gpus = resources.get("GPU", 0)
        if gpus < gpus_per_task:
            raise UserError(
                f"the Ray cluster has {gpus:g} GPUs, fewer than --gpus-per-task {gpus_per_task:g}; "
                "use --gpus-per-task 0 to run on CPUs"
            )
        capacity = int(gpus // gpus_per_task + 1e-9)
    else:
        capacity = int(resources.get("CPU", 1))
    return max(1, min(num_workers or capacity, clips))


def _run_on_ray(
    clips: dict[str, list[BatchJob]],
    output_dir: Path,
    on_clip: Callable[[list[dict]], None],
    *,
    address: str | None,
    gpus_per_task: float,
    evaluate: bool,
    model: str | None,
    num_workers: int | None,
    retries: int,
    dtype: str,
    cache_max_bytes: int | None = None,
) -> None:
    """Give the clips to a pool of actors; a clip whose actor dies goes to a fresh actor."""
    local_cpus = num_workers or min(len(clips), os.cpu_count() or 1)
    started_here = _start_ray(address, max(1, local_cpus))
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    try:
        count = _worker_count(len(clips), gpus_per_task, num_workers)
        cache = output_dir / CACHE_NAME
        for stale in (cache / "running").glob("*.json"):  # markers of clips whose worker died in an earlier run
            stale.unlink(missing_ok=True)
        actor_class = ray.remote(BatchWorker).options(num_cpus=1, num_gpus=gpus_per_task, max_restarts=0)
        args = (
            model,
            "cuda" if gpus_per_task > 0 else "cpu",
            dtype,
            str(cache / "inversion"),
            str(cache / "running"),
            evaluate,
            cache_max_bytes,
        )
        idle = [actor_class.remote(*args) for _ in range(count)]
        pending = deque((_clip_id(source), jobs, 1) for source, jobs in clips.items())
        running: dict[Any, tuple[Any, str, list[BatchJob], int]] = {}
        while pending or running:
            while idle and pending:
                actor = idle.pop()
                clip_id, jobs, attempt = pending.popleft()
                running[actor.run_clip.remote(clip_id, jobs, attempt)] = (actor, clip_id, jobs, attempt)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                actor, clip_id, jobs, attempt = running.pop(ref)
                try:
                    on_clip(ray.get(ref))
                    idle.append(actor)
                except RayActorError as exc:  # the worker died (killed, node lost, out of host memory)
                    ray.kill(actor, no_restart=True)
                    idle.append(actor_class.remote(*args))
                    if attempt <= retries:
                        pending.appendleft((clip_id, jobs, attempt + 1))
                    else:
                        error = f"worker died {attempt} times on this clip: {one_line(exc)}"
                        on_clip([_row(j, "failed", error=error, attempts=attempt) for j in jobs])
                except RayTaskError as exc:  # a bug outside the per-output handling
                    idle.append(actor)
                    on_clip([_row(j, "failed", error=one_line(exc.cause or exc), attempts=attempt) for j in jobs])
        for actor in idle:
            ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()
