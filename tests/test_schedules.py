"""The schedules real SD-1.x checkpoints ship, on tiny models of the real classes.

Each case is a copy of the tiny model folder whose scheduler/scheduler_config.json is written as a
kind of real checkpoint writes it: SD-1.5's own PNDM config (``leading``), DDIM configs with
``linspace`` or ``trailing`` spacing, an SD-2-style v-prediction config, a zero-terminal-SNR
v-prediction fine-tune's, and one that predicts x₀, which is refused. The DDIM maths is compared
with diffusers' own DDIMScheduler where the two take the same step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ipfacediff.diffusion import (
    alpha_pairs,
    ddim_inverse_step,
    ddim_step,
    eps_between,
    encode_prompt,
    predicted_noise,
    sampling_timesteps,
)
from ipfacediff.errors import UserError
from ipfacediff.settings import EditSettings
from ipfacediff.video import read_frames

from conftest import moving_texture
from test_ranges import psnr
from test_settings import run_entry_point
from test_training import drawn_faces

SD1_NOISE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# As the checkpoints write them, keys and all ("skip_prk_steps" and "trained_betas" included).
SCHEDULER_CONFIGS = {
    # runwayml/stable-diffusion-v1-5 and most SD-1.5 fine-tunes
    "leading": dict(
        _class_name="PNDMScheduler",
        _diffusers_version="0.6.0",
        **SD1_NOISE,
        clip_sample=False,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        trained_betas=None,
    ),
    "linspace": dict(
        _class_name="DDIMScheduler",
        _diffusers_version="0.21.4",
        **SD1_NOISE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="linspace",
        prediction_type="epsilon",
    ),
    "trailing": dict(
        _class_name="DDIMScheduler",
        _diffusers_version="0.21.4",
        **SD1_NOISE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
        prediction_type="epsilon",
    ),
    # stabilityai/stable-diffusion-2 style, as SD-1.x v-prediction fine-tunes copy it
    "v_prediction": dict(
        _class_name="DDIMScheduler",
        _diffusers_version="0.8.0",
        **SD1_NOISE,
        clip_sample=False,
        prediction_type="v_prediction",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        trained_betas=None,
    ),
    # a zero-terminal-SNR v-prediction fine-tune (Lin et al. 2023: trailing, rescaled betas)
    "v_zero_snr": dict(
        _class_name="DDIMScheduler",
        _diffusers_version="0.24.0",
        **SD1_NOISE,
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
    ),
}
ACCEPTED = list(SCHEDULER_CONFIGS)


@pytest.fixture(scope="module")
def schedule_dirs(tiny_dir, tmp_path_factory):
    """name -> a copy of the tiny model folder with that scheduler config (``sample``: x₀ prediction)."""
    root = tmp_path_factory.mktemp("schedules")
    configs = {**SCHEDULER_CONFIGS, "sample": {**SCHEDULER_CONFIGS["linspace"], "prediction_type": "sample"}}
    folders = {}
    for name, config in configs.items():
        folder = root / name
        shutil.copytree(tiny_dir, folder)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
        folders[name] = folder
    return folders


def loaded_scheduler(folder: Path) -> DDIMScheduler:
    """The scheduler as the model loader reads it (whatever class the config names)."""
    return DDIMScheduler.from_pretrained(str(folder / "scheduler"))


def diffusers_reference(scheduler: DDIMScheduler) -> DDIMScheduler:
    """diffusers' DDIM on the same config; the DDIM maths here never clips latents."""
    return DDIMScheduler.from_config(scheduler.config, clip_sample=False)


@pytest.mark.parametrize("name", ["leading", "trailing", "v_prediction", "v_zero_snr"])
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_steps_are_diffusers_ddim_steps(schedule_dirs, name, steps):
    """Where the next sampled timestep is diffusers' t − 1000 // steps, every step is diffusers' step.
    A zero-terminal-SNR schedule starts one level lower: at ᾱ = 0 nothing of the frames is left."""
    ours = loaded_scheduler(schedule_dirs[name])
    reference = diffusers_reference(ours)
    timesteps = sampling_timesteps(ours, steps)
    reference.set_timesteps(steps)
    if name == "v_zero_snr":
        assert reference.alphas_cumprod[reference.timesteps[0]] == 0
        assert torch.equal(timesteps, reference.timesteps[1:])
    else:
        assert torch.equal(timesteps, reference.timesteps)
    generator = torch.Generator().manual_seed(steps)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    prediction = ours.config.prediction_type
    for t, (alpha_t, alpha_prev) in zip(timesteps, alpha_pairs(ours, timesteps)):
        output = torch.randn(x.shape, generator=generator)  # what a UNet predicted, ε or v
        expected = reference.step(output, t, x, eta=0.0).prev_sample
        step = ddim_step(x, predicted_noise(output, x, alpha_t, prediction), alpha_t, alpha_prev)
        torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-5)
        x = expected


def test_v_prediction_is_read_as_the_noise_it_stands_for():
    """A v model's exact output for a noised latent gives back the very noise that was added."""
    scheduler = DDIMScheduler(**SD1_NOISE, prediction_type="v_prediction")
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 3, 4, 4, 4, generator=generator)
    for t in (1, 250, 999):
        timesteps = torch.tensor([t, t, t])
        x_t = scheduler.add_noise(clean, noise, timesteps)
        v = scheduler.get_velocity(clean, noise, timesteps)
        torch.testing.assert_close(predicted_noise(v, x_t, float(scheduler.alphas_cumprod[t]), "v_prediction"), noise)


def test_linspace_leaves_out_only_the_step_that_goes_nowhere(schedule_dirs):
    scheduler = loaded_scheduler(schedule_dirs["linspace"])
    reference = diffusers_reference(scheduler)
    reference.set_timesteps(50)
    assert reference.timesteps[-1] == 0  # its last step goes from ᾱ₀ to ᾱ₀ (set_alpha_to_one: false)
    x, output = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reference.step(output, 0, x).prev_sample, x)  # diffusers makes nothing of it
    timesteps = sampling_timesteps(scheduler, 50)
    assert torch.equal(timesteps, reference.timesteps[:-1])
    pairs = alpha_pairs(scheduler, timesteps)
    assert all(alpha_t < alpha_prev for alpha_t, alpha_prev in pairs)
    assert pairs[-1][1] == float(scheduler.final_alpha_cumprod)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_as_many_steps_as_noise_levels(spacing):
    """--steps 1000 walks every level once, whatever the spacing, and the inversion's noise is
    recovered exactly at every step; more steps than levels is one line."""
    scheduler = DDIMScheduler(**SD1_NOISE, set_alpha_to_one=False, steps_offset=1, timestep_spacing=spacing)
    timesteps = sampling_timesteps(scheduler, 1000)
    assert timesteps.tolist() == list(range(999, 0, -1))  # t = 1000 (leading) and the t = 0 no-op left out
    pairs = alpha_pairs(scheduler, timesteps)
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(1, 4, 4, 4, generator=generator, dtype=torch.float64)
    latents, current = [], clean
    for alpha_t, alpha_prev in reversed(pairs):
        current = ddim_inverse_step(current, torch.randn(clean.shape, generator=generator), alpha_prev, alpha_t)
        latents.insert(0, current)
    for step, (alpha_t, alpha_prev) in enumerate(pairs):
        lower = latents[step + 1] if step + 1 < len(latents) else clean
        eps = eps_between(lower, latents[step], alpha_prev, alpha_t)
        assert torch.isfinite(eps).all()
        torch.testing.assert_close(ddim_step(latents[step], eps, alpha_t, alpha_prev), lower)
    with pytest.raises(UserError, match="--steps 1001 is more than the model's 1000 noise levels"):
        sampling_timesteps(scheduler, 1001)


@pytest.fixture(scope="module")
def pipelines(schedule_dirs):
    from ipfacediff.job import load_pipeline

    return {name: load_pipeline(str(schedule_dirs[name]), device="cpu", dtype="float32") for name in ACCEPTED}


@pytest.mark.parametrize("name", ACCEPTED)
def test_a_no_op_edit_returns_its_input_on_every_schedule(pipelines, name, tmp_path, one_thread):
    frames = moving_texture(3)
    settings = EditSettings(prompt="a face", source_prompt="a face", adapters="none", steps=10)
    result = pipelines[name](frames, settings)
    assert min(psnr(a, b) for a, b in zip(frames, result.frames)) >= 40


def test_a_v_model_is_driven_as_one(pipelines):
    """The same weights under an ε and a v config make different edits: v is not read as ε."""
    frames = moving_texture(3)
    settings = EditSettings(prompt="a face with eyeglasses", adapters="none", steps=6, local_blend=False)
    as_epsilon = pipelines["leading"](frames, settings).frames
    as_v = pipelines["v_prediction"](frames, settings).frames
    assert psnr(as_epsilon, as_v) < 40


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from ipfacediff.demo import sample_clip

    folder = tmp_path_factory.mktemp("clip")
    sample_clip(folder / "clip.mp4", frames=4).save(folder / "clip.tracks.json")
    return folder / "clip.mp4"


def edit_command(clip: Path, folder: Path, out: Path, *options: str):
    return run_entry_point(
        "edit",
        str(clip),
        "-o",
        str(out),
        "--model",
        str(folder),
        "--tracks",
        str(clip.with_suffix(".tracks.json")),
        "--cache-dir",
        str(out.parent / "cache"),
        *options,
    )


LONG_PROMPT = "a photo of a face " + "smiling " * 80 + "with a red hat"


@pytest.mark.parametrize("name", ["linspace", "v_prediction"])
def test_the_command_edits_nothing_in_a_no_op_and_records_the_schedule(schedule_dirs, clip, name, tmp_path):
    """The linspace case also has a prompt longer than CLIP's 77 tokens: named once, on one line."""
    out = tmp_path / "out.mp4"
    prompt = LONG_PROMPT if name == "linspace" else "a face"
    no_op = ("-p", prompt, "--source-prompt", prompt, "--adapters", "none", "--steps", "10")
    done = edit_command(clip, schedule_dirs[name], out, *no_op)
    assert done.returncode == 0, done.stderr
    assert min(psnr(a, b) for a, b in zip(read_frames(clip), read_frames(out))) >= 40
    schedule = json.loads((tmp_path / "out.run.json").read_text())["model"]["schedule"]
    notes = [line for line in done.stderr.splitlines() if "is left out" in line]
    if name == "linspace":
        assert schedule == dict(
            prediction_type="epsilon", noise="the model's output", timestep_spacing="linspace", ddim_steps=9
        )
        tokens = len(loaded_tokenizer(schedule_dirs[name])(LONG_PROMPT).input_ids)
        assert tokens > 77 and len(notes) == 1, done.stderr
        assert (
            f"{tokens} tokens" in notes[0] and 'from "smiling smiling smiling smiling smiling smiling …" on' in notes[0]
        )
    else:
        assert schedule["prediction_type"] == "v_prediction" and schedule["noise"].startswith("from v and x_t")
        assert schedule["ddim_steps"] == 10 and not notes


def test_a_model_that_predicts_x0_is_refused_in_one_line(schedule_dirs, clip, tmp_path):
    done = edit_command(clip, schedule_dirs["sample"], tmp_path / "out.mp4", "-p", "a face", "--steps", "2")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "prediction_type 'sample'" in done.stderr, done.stderr
    assert not (tmp_path / "out.mp4").exists()


def test_too_many_steps_is_one_line(schedule_dirs, clip, tmp_path):
    done = edit_command(clip, schedule_dirs["leading"], tmp_path / "out.mp4", "-p", "a face", "--steps", "1001")
    assert done.returncode == 2 and done.stderr.startswith("error:") and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr


def test_a_prompt_within_77_tokens_says_nothing(tiny_dir, caplog):
    from ipfacediff.models import load_model_set

    models = load_model_set(str(tiny_dir), adapters=False)
    fits = " ".join(["face"] * 75)  # with the start and end tokens, exactly 77
    with caplog.at_level("WARNING", logger="ipfacediff.diffusion"):
        encode_prompt(models.tokenizer, models.text_encoder, [fits])
        assert not notes(caplog)
        encode_prompt(models.tokenizer, models.text_encoder, [fits + " hat", fits + " hat"])
    assert len(notes(caplog)) == 1 and 'from "hat" on it is left out' in notes(caplog)[0]


def notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ipfacediff.diffusion"]


def loaded_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))


def test_a_v_model_is_trained_to_predict_v(schedule_dirs, tmp_path):
    """The trainer's target, read back as the sampler reads the model's output, is the noise."""
    from ipfacediff.training import denoising_target, train_identity

    for name in ("leading", "v_prediction"):
        scheduler = loaded_scheduler(schedule_dirs[name])
        generator = torch.Generator().manual_seed(1)
        clean, noise = torch.randn(2, 3, 4, 8, 8, generator=generator)
        timesteps = torch.tensor([5, 500, 990])
        x_t = scheduler.add_noise(clean, noise, timesteps)
        alphas = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        target = denoising_target(scheduler, clean, noise, timesteps)
        torch.testing.assert_close(predicted_noise(target, x_t, alphas, scheduler.config.prediction_type), noise)
        if name == "v_prediction":
            assert not torch.allclose(target, noise)

    faces = tmp_path / "faces"
    faces.mkdir()
    for index, frame in enumerate(drawn_faces(2)):
        cv2.imwrite(str(faces / f"face_{index}.png"), frame[..., ::-1])
    result = train_identity(
        str(schedule_dirs["v_prediction"]), faces, tmp_path / "out", max_steps=4, batch_size=2, lambda_id=0.0
    )
    assert np.isfinite(result.losses).all() and result.validation_after < result.validation_before
