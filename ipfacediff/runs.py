"""A run's files: the output's path checks, and the metadata written next to it (``.run.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ipfacediff.errors import UserError
from ipfacediff.files import check_writable, write_json
from ipfacediff.video import VideoInfo, probe_video

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")


def check_paths(input_path: Path, output_path: Path) -> VideoInfo:
    """Catch the user's path mistakes before any work is done."""
    info = probe_video(input_path)
    if output_path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(f"output {output_path.name} must end in .mp4 (the edit is written as H.264 mp4)")
    if output_path.resolve() == input_path.resolve():
        raise UserError("the output path is the input path; inputs are never overwritten, choose another name")
    check_writable(output_path)
    check_writable(run_metadata_path(output_path), what="run metadata")
    return info


@dataclass
class RunReport:
    """Run metadata, written next to the output as ``<output>.run.json``."""

    input: str
    output: str
    settings: dict
    model: dict
    video: dict
    faces: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    inversion_reused: bool = False  # every face's inversion came whole from the cache
    inversion_reused_share: float = 0.0  # share of the inversion steps read from the cache (a resumed run)
    domain: dict = field(default_factory=dict)  # the model card's check of every edited face, and any override
    cache_bytes: int = 0  # what the inversion cache takes on disk after the run
    versions: dict[str, str] = field(default_factory=dict)
    message: str = ""

    def save(self, path: Path) -> Path:
        return write_json(path, asdict(self))


def run_metadata_path(output: Path) -> Path:
    return output.with_name(output.stem + ".run.json")
