"""Scoring a face-video edit (:mod:`~ipfacediff.evaluation.metrics`: identity, edit strength,
flicker, background, detection) and showing it (:mod:`~ipfacediff.evaluation.report`: the HTML
report and the one-line summary): two independent parts, one module each."""

from ipfacediff.evaluation.metrics import (
    DEFAULT_SOURCE_PROMPT,
    CropScorer,
    ID_SAME_PERSON_COSINE,
    METRIC_KEYS,
    SUMMARY_KEYS,
    TRACK_KEYS,
    evaluate_videos,
    write_metrics_json,
)
from ipfacediff.evaluation.report import edit_judged, summary_line, write_html_report

__all__ = [
    "DEFAULT_SOURCE_PROMPT",
    "CropScorer",
    "ID_SAME_PERSON_COSINE",
    "METRIC_KEYS",
    "SUMMARY_KEYS",
    "TRACK_KEYS",
    "edit_judged",
    "evaluate_videos",
    "summary_line",
    "write_html_report",
    "write_metrics_json",
]
