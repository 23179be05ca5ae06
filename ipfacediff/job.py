"""The Python API's names for an edit, kept where the README has always imported them from
(``from ipfacediff.job import edit_video, load_pipeline``). Each now lives in the module that
says what it is: :mod:`ipfacediff.edit` (the edit and inversion of a video), :mod:`ipfacediff.crops`
(faces as aligned crops), :mod:`ipfacediff.runs` (output checks, ``.run.json``),
:mod:`ipfacediff.models.defaults` (the default model, device and dtype) and :mod:`ipfacediff.service`
(loading a pipeline, the service the front-ends call)."""

from ipfacediff.crops import CropStore, FaceCrops, face_crops, resize_image
from ipfacediff.crops import resize_image as _resize
from ipfacediff.edit import (
    check_domain,
    check_face_prompts,
    edit_video,
    faded,
    invert_video,
    model_card,
    paste_whole_frame,
)
from ipfacediff.models.defaults import SHIPPED_MODELS, default_model_dir
from ipfacediff.models.devices import pick_device, pick_dtype
from ipfacediff.runs import VIDEO_SUFFIXES, RunReport, check_paths, run_metadata_path
from ipfacediff.service import load_pipeline

__all__ = [
    "SHIPPED_MODELS",
    "VIDEO_SUFFIXES",
    "CropStore",
    "FaceCrops",
    "RunReport",
    "_resize",
    "check_domain",
    "check_face_prompts",
    "check_paths",
    "default_model_dir",
    "edit_video",
    "face_crops",
    "faded",
    "invert_video",
    "load_pipeline",
    "model_card",
    "paste_whole_frame",
    "pick_device",
    "pick_dtype",
    "resize_image",
    "run_metadata_path",
]
