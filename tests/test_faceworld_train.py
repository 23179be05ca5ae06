"""Training the FaceWorld model set: the smoke preset end to end, resuming, loading, sizes, tokenizer."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPTokenizer

from ipfacediff.errors import UserError
from ipfacediff.settings import EditSettings
from faceworld import caption, dataset, random_attributes
from faceworld.cli import main
from faceworld.train import (
    PRESETS,
    PROMPT_WORDS,
    SHIPPED_LIMIT_BYTES,
    STATE_DIR,
    build_tokenizer,
    caption_words,
    shipped_fp16_bytes,
    train_faceworld_models,
)


class Interrupted(Exception):
    """Stands for the kill of a training process."""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A smoke run killed after the VAE's second step, then resumed: (output, report, the
    progress calls of the resumed run)."""
    # One thread: on a CPU shared with other jobs, two OpenMP threads of small models wait on
    # each other far longer than they compute (10x slower measured); restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        output = tmp_path_factory.mktemp("faceworld") / "models"

        def kill_in_vae(stage: str, done: int, total: int) -> None:
            if stage == "vae" and done == 2:
                raise Interrupted

        with pytest.raises(Interrupted):
            train_faceworld_models(output, preset="smoke", progress=kill_in_vae)
        with pytest.raises(UserError, match="seed"):
            train_faceworld_models(output, preset="smoke", seed=1, resume=True)
        calls: list[tuple[str, int, int]] = []
        report = train_faceworld_models(output, preset="smoke", resume=True, progress=lambda *call: calls.append(call))
    finally:
        torch.set_num_threads(threads)
    return output, report, calls


def test_resume_continues_where_the_run_was_killed(run):
    output, report, calls = run
    stages = [stage for stage, _, _ in calls]
    assert "render" not in stages and "clip" not in stages  # done before the kill: not redone
    vae_calls = [done for stage, done, _ in calls if stage == "vae"]
    assert vae_calls == [3]  # steps 1 and 2 came from the checkpoint
    assert report["stages"]["vae"]["steps"] == PRESETS["smoke"].vae.steps
    assert report["stages"]["unet"]["steps"] == PRESETS["smoke"].unet.steps
    assert not (output / STATE_DIR).exists()
    again = []
    assert train_faceworld_models(output, preset="smoke", resume=True, progress=lambda *c: again.append(c)) == report
    assert again == []
    with pytest.raises(UserError, match="--resume"):
        train_faceworld_models(output, preset="smoke")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(output), "--preset", "smoke"])
    assert exit_info.value.code == 2


def test_model_set_loads_in_float32_and_edits(run):
    from ipfacediff.editing import IPFaceDiffPipeline
    from ipfacediff.models import load_model_set

    output, _, _ = run
    models = load_model_set(str(output))
    assert {m.dtype for m in (models.vae, models.text_encoder, models.unet)} == {torch.float32}  # saved fp16
    assert models.tokenizer.model_max_length == models.text_encoder.config.max_position_embeddings
    frames = np.stack([sample.image for sample in dataset("held_out", 3, seed=5)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = IPFaceDiffPipeline.from_model_set(models)(
            frames, EditSettings(prompt="a face with eyeglasses", steps=3)
        )
    finally:
        torch.set_num_threads(threads)
    assert result.frames.shape == frames.shape and result.frames.dtype == np.uint8


def test_clip_folder_loads(run):
    from ipfacediff.models import load_clip

    output, _, _ = run
    model = CLIPModel.from_pretrained(output / "clip")
    assert model.config.vision_config.image_size == 64
    scorer = load_clip(str(output / "clip"))
    assert scorer.text_embeddings(["a face", "a face with eyeglasses"]).shape == (2, model.config.projection_dim)
    assert scorer.image_embeddings(torch.zeros(1, 3, 64, 64)).shape == (1, model.config.projection_dim)


def test_tokenizer_has_whole_words_and_falls_back_to_bytes(run):
    output, _, _ = run
    tokenizer = CLIPTokenizer.from_pretrained(output / "tokenizer")
    assert tokenizer.convert_ids_to_tokens(tokenizer("a face with eyeglasses").input_ids) == [
        "<|startoftext|>",
        "a</w>",
        "face</w>",
        "with</w>",
        "eyeglasses</w>",
        "<|endoftext|>",
    ]
    unknown = tokenizer("a zqxv face").input_ids
    assert len(unknown) == 2 + 1 + 4 + 1  # the unknown word in single bytes
    assert tokenizer.decode(unknown, skip_special_tokens=True).strip() == "a zqxv face"
    assert CLIPTokenizer.from_pretrained(output / "clip").get_vocab() == tokenizer.get_vocab()


def test_every_caption_and_prompt_word_is_one_token():
    tokenizer = build_tokenizer()
    rng = np.random.default_rng(0)
    used = {w for _ in range(500) for w in re.findall(r"[a-z]+", caption(random_attributes(rng)))}
    assert used <= set(caption_words())
    for word in [*caption_words(), *PROMPT_WORDS]:
        assert len(tokenizer(word).input_ids) == 3, word


def test_report_and_sizes(run):
    output, report, _ = run
    assert json.loads((output / "training.json").read_text()) == report
    files = {str(p.relative_to(output)): p.stat().st_size for p in output.rglob("*.safetensors")}
    assert report["weights_bytes"] == files and report["weights_total_bytes"] == sum(files.values())
    # The smoke preset trains the cpu architecture, so its files check the parameter count.
    assert abs(report["weights_total_bytes"] - shipped_fp16_bytes("smoke")) < 0.01 * report["weights_total_bytes"]
    for preset in ("cpu", "gpu"):
        assert shipped_fp16_bytes(preset) <= SHIPPED_LIMIT_BYTES, preset
    for name in ("clip", "vae", "unet"):
        assert report["seconds"][name] > 0 and report["stages"][name]["loss_curve"]
    assert report["stages"]["vae"]["held_out_psnr_db"] > 0
    assert report["versions"]["diffusers"] and report["seed"] == 0 and report["preset"] == "smoke"


def test_decoder_stage_moves_the_decoder_only(run):
    output, report, _ = run
    assert report["stages"]["decoder"]["steps"] == PRESETS["smoke"].decoder.steps
    assert report["stages"]["decoder"]["held_out_face_psnr_db"] > 0


def test_a_finished_run_without_the_decoder_stage_gets_it_on_resume(run, tmp_path):
    """A model set finished by a version without the decoder stage: --resume adds the stage,
    rewrites vae/ only, and leaves the encoder (so the UNet's latent space) as it was."""
    import shutil

    from diffusers import AutoencoderKL

    output, report, _ = run
    older = tmp_path / "older"
    shutil.copytree(output, older)
    stripped = json.loads((older / "training.json").read_text())
    del stripped["stages"]["decoder"]
    (older / "training.json").write_text(json.dumps(stripped))
    unet_before = (older / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    before = AutoencoderKL.from_pretrained(older / "vae")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        completed = train_faceworld_models(older, preset="smoke", resume=True)
    finally:
        torch.set_num_threads(threads)
    after = AutoencoderKL.from_pretrained(older / "vae")
    assert completed["stages"]["decoder"]["added_to_finished_run"] is True
    assert completed["stages"]["decoder"]["steps"] == PRESETS["smoke"].decoder.steps
    assert not (older / STATE_DIR).exists()
    trained = ("decoder.", "post_quant_conv.")
    changed = {
        name for name, tensor in before.state_dict().items() if not torch.equal(tensor, after.state_dict()[name])
    }
    assert changed and all(name.startswith(trained) for name in changed)
    # Nearly all of the decoder moved (a key bias, which softmax ignores, gets no gradient).
    decoder = [name for name in before.state_dict() if name.startswith(trained)]
    assert len(changed) >= 0.9 * len(decoder)
    assert (older / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet_before
