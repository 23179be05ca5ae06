"""The settings of a training run as one piece of data.

ε1's and ε2's trainers share the training loop, and with it a dozen settings (steps, batch, LoRA
rank, learning rate, precision, checkpoints, ...). They were written out in both trainers'
signatures and in both ``train`` commands, each with its own defaults and checks. Here they are
declared once, like :class:`ipfacediff.settings.EditSettings`: ``train identity`` and ``train
edit`` build their options from the fields, ``train library`` and FaceWorld's adapters pass the
same names, and a bad value is one line when the object is made, before any model loads.

:class:`TrainingSettings` holds what both trainers take (its defaults are ε1's);
:class:`IdentityTrainingSettings` and :class:`EditTrainingSettings` add each loss's own settings.
This module imports no torch, so the command line can build its options from it quickly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ipfacediff.errors import UserError
from ipfacediff.settings import DEFAULT_STEPS, LARGEST_RESOLUTION, LARGEST_SEED, Settings, setting

MIXED_PRECISION = ("no", "fp16", "bf16")
# ε1: the identity term only where the one-step estimate of the clean image is still a face.
ID_MAX_TIMESTEP = 400
# DiffusionCLIP's settings for face attributes: invert to t0 = 500 in 40 steps, regenerate in 6.
DEFAULT_T0 = 500
DEFAULT_INVERSION_STEPS = 40
DEFAULT_GENERATION_STEPS = 6
# `train library --tune`: the faces of --data kept from training to measure on (each grid point
# edits them all), and each trial edit's DDIM steps: the values are for edits at the default steps.
DEFAULT_TUNE_FRAMES = 4
DEFAULT_TUNE_STEPS = DEFAULT_STEPS

# Settings that decide how a run is carried out, not what it trains: they may change between a
# run and its resumption, and the run's record leaves them out.
RUN_ONLY = ("checkpoint_every", "keep_checkpoints", "gradient_checkpointing")


@dataclass(frozen=True)
class TrainingSettings(Settings):
    """What both trainers take: the training loop's settings and the identity term's weight."""

    max_steps: int = setting(500, "Optimizer steps.", low=1)
    resolution: int | None = setting(
        None, "Side of the training face crops. Default: the model's.", low=8, high=LARGEST_RESOLUTION, multiple_of=8
    )
    rank: int = setting(4, "LoRA rank.", low=1)
    batch_size: int = setting(4, "Faces per batch.", low=1)
    learning_rate: float = setting(1e-4, "AdamW's learning rate.", low=0, low_open=True)
    lambda_id: float = setting(0.1, "Weight of the identity loss (0: off, no identity net is loaded).", low=0)
    full: bool = setting(False, "Fine-tune the whole UNet instead of a LoRA.")
    checkpoint_every: int = setting(100, "Optimizer steps between checkpoints (0: only at the end).", low=0)
    keep_checkpoints: int | None = setting(3, "How many of the latest checkpoints are kept.", low=1)
    seed: int = setting(
        0,
        "Seed of the adapter's initialisation and of the batches, noise and timesteps drawn.",
        low=0,
        high=LARGEST_SEED,
    )
    mixed_precision: str = setting("no", "no, fp16 or bf16.")
    gradient_accumulation: int = setting(1, "Batches per optimizer step.", low=1)
    gradient_checkpointing: bool = setting(
        True,
        "Recompute the UNet's and VAE's activations in the backward pass (less memory, more time).",
        negative="--no-gradient-checkpointing",
    )
    max_images: int | None = setting(None, "At most this many training faces, evenly spread.", low=1)

    def check(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(
                f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )

    def record(self) -> dict[str, Any]:
        """The settings that decide what is trained: a run resumes only with the same ones."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_ONLY}


def _shared(name: str, default: Any) -> Any:
    """A field of :class:`TrainingSettings` with another default: same help, range and flag."""
    base = next(f for f in fields(TrainingSettings) if f.name == name)
    return field(default=default, metadata=base.metadata)


@dataclass(frozen=True)
class IdentityTrainingSettings(TrainingSettings):
    """ε1: the denoising loss plus the identity term on the one-step estimate of the clean face."""

    id_max_timestep: int = setting(
        ID_MAX_TIMESTEP,
        "The identity term applies to the samples at this timestep "
        "or below, where the one-step estimate is still a face.",
        low=0,
        high=999,
    )


@dataclass(frozen=True)
class EditTrainingSettings(TrainingSettings):
    """ε2 (DiffusionCLIP): directional CLIP, identity and L1 terms on faces regenerated from t0."""

    max_steps: int = _shared("max_steps", 200)
    batch_size: int = _shared("batch_size", 2)
    checkpoint_every: int = _shared("checkpoint_every", 50)
    lambda_dir: float = setting(1.0, "Weight of the directional CLIP loss.", low=0)
    lambda_l1: float = setting(
        0.1, "Weight of the L1 distance to the training face (to its edited partner with --paired-targets).", low=0
    )
    t0: int = setting(DEFAULT_T0, "Timestep the faces are inverted to before regeneration.", low=1, high=999)
    inversion_steps: int = setting(
        DEFAULT_INVERSION_STEPS, "DDIM steps inverting each face to --t0, once, with the base model.", low=1, high=999
    )
    generation_steps: int = setting(
        DEFAULT_GENERATION_STEPS,
        "DDIM steps regenerating it from --t0 in every training step, with gradients.",
        low=1,
        high=999,
    )

    def check(self) -> None:
        super().check()
        if max(self.inversion_steps, self.generation_steps) > self.t0:
            raise UserError(
                f"--inversion-steps and --generation-steps must be between 1 and --t0 ({self.t0}), got "
                f"{self.inversion_steps} and {self.generation_steps}"
            )


__all__ = ["EditTrainingSettings", "IdentityTrainingSettings", "TrainingSettings"]
