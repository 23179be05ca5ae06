from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from ipfacediff.errors import UserError
from ipfacediff.models import activate_role, build_tiny_models, load_model_set, module_fingerprint


def test_tiny_models_load_through_the_real_loader(tiny_dir):
    models = load_model_set(str(tiny_dir))
    assert isinstance(models.vae, AutoencoderKL)
    assert isinstance(models.text_encoder, CLIPTextModel)
    assert isinstance(models.tokenizer, CLIPTokenizer)
    assert isinstance(models.unet, UNet2DConditionModel)
    assert isinstance(models.scheduler, DDIMScheduler)
    assert models.identity_unet is models.unet  # ε1 defaults to the base UNet
    # CLIP's real BPE vocabulary: the ids of the public CLIP tokenizer for this sentence.
    assert models.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(models.tokenizer) == 49408
    # Self- and cross-attention at two or more resolutions.
    attention_blocks = [name for name in models.unet.attn_processors if name.startswith("down_blocks")]
    assert {name.split(".")[1] for name in attention_blocks} >= {"0", "1"}
    assert any(n.endswith("attn1.processor") for n in attention_blocks)
    assert any(n.endswith("attn2.processor") for n in attention_blocks)
    assert CLIPModel.from_pretrained(tiny_dir / "clip").config.projection_dim == 32


def test_tiny_models_are_seeded(tmp_path):
    a = build_tiny_models(tmp_path / "a", seed=3)
    b = build_tiny_models(tmp_path / "b", seed=3)
    c = build_tiny_models(tmp_path / "c", seed=4)
    fingerprint = lambda d: module_fingerprint(load_model_set(str(d)).unet)  # noqa: E731
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_two_unets_and_lora_adapters(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    other = build_tiny_models(tmp_path / "other", seed=1)
    two = load_model_set(str(tiny_dir), identity_model=str(other))
    assert two.identity_unet is not two.unet
    assert module_fingerprint(two.identity_unet) != module_fingerprint(two.unet)

    # A LoRA in diffusers' format (what `train identity` saves), loaded as ε1 over the base.
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    save_file(state, str(tmp_path / "identity.safetensors"))
    shared = load_model_set(str(tiny_dir), identity_lora=str(tmp_path / "identity.safetensors"))
    assert shared.identity_unet is shared.unet
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        activate_role(shared.unet, "identity", shared.edit_adapter_weights)
        identity = shared.unet(x, 500, encoder_hidden_states=context).sample
        activate_role(shared.unet, "edit", shared.edit_adapter_weights)
        edit = shared.unet(x, 500, encoder_hidden_states=context).sample
        base = load_model_set(str(tiny_dir)).unet(x, 500, encoder_hidden_states=context).sample
    assert not torch.allclose(identity, edit)
    torch.testing.assert_close(edit, base)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("missing", "does not exist"),
        ("empty/", "not a diffusers model"),
        ("model.ckpt", "pickled checkpoint"),
        ("notes.txt", "neither a model folder"),
    ],
)
def test_bad_model_sources_are_user_errors(tmp_path, name, expected):
    path = tmp_path / name.rstrip("/")
    if name.endswith("/"):
        path.mkdir()
    elif name != "missing":
        path.write_bytes(b"x")
    with pytest.raises(UserError, match=expected) as error:
        load_model_set(str(path))
    assert "\n" not in str(error.value)


def test_hub_id_offline_without_cache_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="not .* in the local Hugging Face cache|local Hugging Face cache"):
        load_model_set("someone/not-a-cached-model")


def test_broken_weights_are_a_user_error(tiny_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="cannot read the model folder"):
        load_model_set(str(broken))


def test_single_file_checkpoint_that_is_not_sd_is_a_user_error(tiny_dir, tmp_path):
    """The single-file path goes through diffusers' converter; a file it cannot read is the user's to fix."""
    from safetensors.torch import save_file

    bogus = tmp_path / "model.safetensors"
    save_file({"not_a_unet": torch.zeros(2)}, str(bogus))
    with pytest.raises(UserError, match="cannot load the checkpoint model.safetensors") as error:
        load_model_set(str(bogus), config=str(tiny_dir))
    assert "\n" not in str(error.value)
