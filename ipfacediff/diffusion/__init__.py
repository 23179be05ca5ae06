"""Latent encoding, DDIM maths and cached DDIM inversion of video frames.

- :mod:`~ipfacediff.diffusion.ddim`: the sampler's timesteps and levels, the DDIM step and its
  exact inverse, the noise in a model's output whatever it predicts.
- :mod:`~ipfacediff.diffusion.latents`: frames to latents and back (the VAE), prompts to CLIP
  hidden states.
- :mod:`~ipfacediff.diffusion.inversion`: a clip's frames inverted step by step, with the guiding
  UNet's correspondence features (:class:`InvertedVideo`: the frames' rows only).
- :mod:`~ipfacediff.diffusion.cache`: the inversion cache on disk, its chunks and keys.
- :mod:`~ipfacediff.diffusion.timing`: progress callbacks and per-stage seconds.
"""

from ipfacediff.diffusion.cache import (
    CACHE_CHUNK,
    CACHE_FIX,
    InversionCache,
    chunk_bounds,
    default_cache_dir,
    frames_digest,
)
from ipfacediff.diffusion.ddim import (
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    alpha_pairs,
    check_scheduler,
    ddim_inverse_step,
    ddim_step,
    ddim_walk,
    eps_between,
    predicted_noise,
    sampling_timesteps,
    schedule_record,
)
from ipfacediff.diffusion.inversion import (
    FEATURE_DIM,
    InvertedVideo,
    capture_output,
    default_feature_steps,
    feature_basis,
    invert_frames,
    join_inverted,
    sample_from_inverted,
    select_rows,
)
from ipfacediff.diffusion.latents import (
    decode_latents,
    decoder_checkpointing,
    encode_frames,
    encode_prompt,
    logger,
    report_cut_prompts,
)
from ipfacediff.diffusion.timing import Progress, StageObserver, StageTimer, observing_stages

__all__ = [
    "CACHE_CHUNK",
    "CACHE_FIX",
    "FEATURE_DIM",
    "PREDICTION_TYPES",
    "TIMESTEP_SPACINGS",
    "InversionCache",
    "InvertedVideo",
    "Progress",
    "StageObserver",
    "StageTimer",
    "alpha_pairs",
    "capture_output",
    "check_scheduler",
    "chunk_bounds",
    "ddim_inverse_step",
    "ddim_step",
    "ddim_walk",
    "decode_latents",
    "decoder_checkpointing",
    "default_cache_dir",
    "default_feature_steps",
    "encode_frames",
    "encode_prompt",
    "eps_between",
    "feature_basis",
    "frames_digest",
    "invert_frames",
    "join_inverted",
    "logger",
    "observing_stages",
    "predicted_noise",
    "report_cut_prompts",
    "sample_from_inverted",
    "sampling_timesteps",
    "schedule_record",
    "select_rows",
]
