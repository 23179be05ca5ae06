"""DDIM written out: the sampler's timesteps and levels, the step and its exact inverse, and the
noise in a model's output whatever it predicts.

DDIM is written out here rather than through ``DDIMInverseScheduler`` because editing needs the
exact algebraic inverse of the sampling step on the sampler's own timesteps: with it the noise
each inversion step used can be recovered from two cached latents (:func:`eps_between`), and
sampling from the inverted latents with those recovered noises gives back the input exactly.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from ipfacediff.errors import SettingError, UserError


PREDICTION_TYPES = ("epsilon", "v_prediction")


TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def check_scheduler(scheduler: DDIMScheduler) -> None:
    """Refuse, before any work, a schedule the DDIM maths here cannot drive.

    The model's output must give the noise ε: an ε model's does, a v model's does with the latent
    it was given (:func:`predicted_noise`); an x₀ ("sample") model's would only through 1/√(1−ᾱ),
    which at the clean end of the schedule blows its error up; SD-1.x fine-tunes predict ε or v.
    """
    config = scheduler.config
    if config.prediction_type not in PREDICTION_TYPES:
        raise UserError(
            f"the model's scheduler has prediction_type {config.prediction_type!r}: ipfacediff drives SD-1.x models "
            "that predict the noise ('epsilon') or the velocity ('v_prediction'); use one of those"
        )
    if config.timestep_spacing not in TIMESTEP_SPACINGS:
        raise UserError(
            f"the model's scheduler has timestep_spacing {config.timestep_spacing!r}: use one of "
            f"{', '.join(TIMESTEP_SPACINGS)} in scheduler/scheduler_config.json"
        )


def predicted_noise(
    output: torch.Tensor, x_t: torch.Tensor, alpha_t: float | torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The noise ε in a UNet's ``output`` for input ``x_t`` at level ᾱ_t.

    A v-prediction model (v = √ᾱ·ε − √(1−ᾱ)·x₀) gives ε = √ᾱ·v + √(1−ᾱ)·x_t, exactly, so every
    step here (and the inversion's exact reversal) works on ε whatever the model predicts. The
    map is affine with weights that do not depend on the prompt, so classifier-free guidance on v
    and on ε agree.
    """
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha_t**0.5 * output + (1 - alpha_t) ** 0.5 * x_t
    raise UserError(f"prediction_type {prediction_type!r} is not one ipfacediff drives: {', '.join(PREDICTION_TYPES)}")


def sampling_timesteps(scheduler: DDIMScheduler, steps: int) -> torch.Tensor:
    """The sampler's timesteps for ``steps`` steps, noisiest first, without the ones that step nowhere.

    A step goes from its timestep's ᾱ to the next one's (the last to ``final_alpha_cumprod``). Some
    schedules give a step whose two levels are the same: ``linspace`` ends on t = 0, and with
    ``set_alpha_to_one: false`` the final level is ᾱ₀ too; ``leading`` with ``steps_offset: 1`` at
    as many steps as levels asks for t = 1000, past the last one. Such a step changes nothing when
    sampling (diffusers' DDIM step makes the same latent there) but its noise cannot be recovered
    from two equal latents (:func:`eps_between`), so it is left out: the chain of levels stays the
    one the scheduler gives. The terminal level of a zero-terminal-SNR schedule
    (``rescale_betas_zero_snr``, ᾱ = 0) is left out too: nothing of the frames is left there, so
    no inversion can reach it and come back; the edit starts from the level below.
    """
    levels = scheduler.config.num_train_timesteps
    if steps > levels:
        raise SettingError(
            "steps", f"{{setting}} {steps} is more than the model's {levels} noise levels: use at most {levels}"
        )
    check_scheduler(scheduler)
    scheduler.set_timesteps(steps)
    inside = [t for t in scheduler.timesteps.tolist() if 0 <= t < levels]
    alphas = [float(scheduler.alphas_cumprod[t]) for t in inside] + [float(scheduler.final_alpha_cumprod)]
    kept = [t for index, t in enumerate(inside) if 0 < alphas[index] < alphas[index + 1]]
    return torch.tensor(kept, dtype=scheduler.timesteps.dtype)


def alpha_pairs(scheduler: DDIMScheduler, timesteps: torch.Tensor) -> list[tuple[float, float]]:
    """(ᾱ_t, ᾱ_prev) for every sampling timestep: the DDIM step goes from level t to level prev."""
    cumprod = scheduler.alphas_cumprod
    final = float(scheduler.final_alpha_cumprod)
    pairs = []
    for index, t in enumerate(timesteps.tolist()):
        prev = timesteps[index + 1].item() if index + 1 < len(timesteps) else None
        pairs.append((float(cumprod[t]), float(cumprod[prev]) if prev is not None else final))
    return pairs


def schedule_record(scheduler: DDIMScheduler, steps: int) -> dict:
    """What an edit's DDIM made of the model's schedule, for the run's metadata."""
    config = scheduler.config
    converted = config.prediction_type == "v_prediction"
    return {
        "prediction_type": config.prediction_type,
        "noise": "from v and x_t: eps = sqrt(a)*v + sqrt(1-a)*x_t" if converted else "the model's output",
        "timestep_spacing": config.timestep_spacing,
        "ddim_steps": len(sampling_timesteps(scheduler, steps)),
    }


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: float, alpha_prev: float) -> torch.Tensor:
    """Deterministic DDIM step (η = 0) from level ᾱ_t to the less noisy ᾱ_prev."""
    x0 = (x_t - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
    return alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


def ddim_inverse_step(x_prev: torch.Tensor, eps: torch.Tensor, alpha_prev: float, alpha_t: float) -> torch.Tensor:
    """Exact inverse of :func:`ddim_step` for the same ``eps``: from ᾱ_prev up to ᾱ_t."""
    x0 = (x_prev - (1 - alpha_prev) ** 0.5 * eps) / alpha_prev**0.5
    return alpha_t**0.5 * x0 + (1 - alpha_t) ** 0.5 * eps


def eps_between(x_prev: torch.Tensor, x_t: torch.Tensor, alpha_prev: float, alpha_t: float) -> torch.Tensor:
    """The noise that maps ``x_prev`` to ``x_t`` in :func:`ddim_inverse_step` (and back)."""
    a, b = (alpha_t / alpha_prev) ** 0.5, (1 - alpha_t) ** 0.5 - (alpha_t * (1 - alpha_prev) / alpha_prev) ** 0.5
    return (x_t - a * x_prev) / b


def ddim_walk(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    levels: list[int],
    *,
    prediction_type: str,
) -> torch.Tensor:
    """Deterministic DDIM from timestep ``levels[0]`` to ``levels[-1]`` through the levels between:
    ascending it inverts, descending it samples. Level 0 is the clean latent itself (ᾱ = 1), so a
    walk can start or end exactly on the image, at any levels rather than the sampler's.

    The UNet runs on ``latents`` cast to ``prompt_embeds``' dtype, the steps in float32; gradients
    flow through every step unless the caller turns them off (a trainer regenerating with them).
    A v-prediction UNet's output is read at the ᾱ of the timestep it was given, ᾱ₀ at level 0.
    """

    def alpha(t: int) -> float:
        return 1.0 if t == 0 else float(alphas_cumprod[t])

    x = latents
    embeds = prompt_embeds.expand(len(x), -1, -1)
    for t, following in zip(levels[:-1], levels[1:]):
        output = unet(x.to(embeds.dtype), t, encoder_hidden_states=embeds).sample.float()
        eps = predicted_noise(output, x, float(alphas_cumprod[t]), prediction_type)
        x = ddim_step(x, eps, alpha(t), alpha(following))
    return x
