from __future__ import annotations

from pathlib import Path

import numpy as np
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
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
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
    with pytest.raises(UserError, match="UNet weight file .* is not a safetensors file"):
        load_model_set(str(broken))


def test_single_file_checkpoint_that_is_not_sd_is_a_user_error(tiny_dir, tmp_path):
    """The single-file path goes through diffusers' converter; a file it cannot read is the user's to fix."""
    from safetensors.torch import save_file

    bogus = tmp_path / "model.safetensors"
    save_file({"not_a_unet": torch.zeros(2)}, str(bogus))
    with pytest.raises(UserError, match="not a Stable Diffusion 1.x checkpoint") as error:
        load_model_set(str(bogus), config=str(tiny_dir))
    assert "\n" not in str(error.value) and str(bogus) in str(error.value)


# ---------------------------------------------------------------------------------------------
# Every file a user names is read behind one error line (files.reading): hostile files, one per
# kind of damage. The files sit in a folder with a long name, so a message that cuts the path
# (or names only the file) fails.


@pytest.fixture
def hostile(tmp_path):
    folder = tmp_path / ("a-folder-with-a-long-name-" * 8)
    folder.mkdir()
    return folder


def one_line_naming(error: pytest.ExceptionInfo, path, *words: str) -> str:
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    return message


def copy_of(tiny_dir, folder):
    import shutil

    return shutil.copytree(tiny_dir, folder / "model")


@pytest.mark.parametrize("option", ["edit_loras", "identity_lora"])
def test_a_lora_of_random_bytes_is_one_line(tiny_dir, hostile, option):
    import os

    lora = hostile / "random.safetensors"
    lora.write_bytes(os.urandom(4096))
    with pytest.raises(UserError) as error:
        load_model_set(str(tiny_dir), **{option: [(str(lora), 1.0)] if option == "edit_loras" else str(lora)})
    one_line_naming(error, lora, "not a safetensors file", "LoRA")


def test_a_safetensors_file_that_is_no_lora_is_one_line(tiny_dir, hostile):
    from safetensors.torch import save_file

    lora = hostile / "wrong-keys.safetensors"
    save_file({"foo.bar": torch.zeros(3)}, str(lora))
    with pytest.raises(UserError) as error:
        load_model_set(str(tiny_dir), edit_loras=[(str(lora), 1.0)])
    one_line_naming(error, lora, "no LoRA weights", "'foo.bar'")


def test_a_lora_for_another_unet_is_one_line(tiny_dir, hostile):
    from safetensors.torch import save_file

    lora = hostile / "other-unet.safetensors"
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{layer}.lora_A.weight": torch.zeros(4, 7), f"{layer}.lora_B.weight": torch.zeros(7, 4)}, str(lora))
    with pytest.raises(UserError) as error:
        load_model_set(str(tiny_dir), edit_loras=[(str(lora), 1.0)])
    one_line_naming(error, lora, "does not fit this UNet")


@pytest.mark.parametrize(
    "weight, says",
    [
        ("abc", "is not a number"),
        ("", "is not a number"),
        ("nan", "finite number from -10 to 10"),
        ("inf", "finite number from -10 to 10"),
        ("-inf", "finite number from -10 to 10"),
        ("80", "finite number from -10 to 10"),
    ],
)
def test_a_lora_weight_that_is_not_a_sane_number_is_one_line(hostile, weight, says):
    from ipfacediff.models import parse_lora_spec

    lora = hostile / "edit.safetensors"
    with pytest.raises(UserError) as error:
        parse_lora_spec(f"{lora}:{weight}")
    one_line_naming(error, lora, says, f"{lora}:0.8")


def test_lora_specs_that_are_fine(hostile):
    from ipfacediff.models import parse_lora_spec

    assert parse_lora_spec("a/b.safetensors:-0.5") == ("a/b.safetensors", -0.5)
    assert parse_lora_spec("eyeglasses:0.8") == ("eyeglasses", 0.8)  # a library adapter's name
    assert parse_lora_spec("C:\\x\\y.safetensors") == ("C:\\x\\y.safetensors", 1.0)
    odd = hostile / "run:3.safetensors"  # a colon in an existing file's name is part of its path
    odd.write_bytes(b"")
    assert parse_lora_spec(str(odd)) == (str(odd), 1.0)


def test_a_weight_given_as_a_number_is_checked_too(tiny_dir):
    """Manifests and the UI hand load_model_set (path, weight) pairs without parse_lora_spec."""
    with pytest.raises(UserError, match="edit.safetensors must be a finite number"):
        load_model_set(str(tiny_dir), edit_loras=[("edit.safetensors", float("nan"))])


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_a_junk_config_json_in_a_model_folder_is_one_line(tiny_dir, hostile, part):
    model = copy_of(tiny_dir, hostile)
    config = model / part / "config.json"
    config.write_text("{not json")
    with pytest.raises(UserError) as error:
        load_model_set(str(model))
    message = one_line_naming(error, config, "is not JSON (line 1, column 2")
    assert "pickle" not in message and "--config" not in message


def test_truncated_unet_weights_are_one_line(tiny_dir, hostile):
    model = copy_of(tiny_dir, hostile)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError) as error:
        load_model_set(str(model))
    message = one_line_naming(error, weights, "is truncated")
    assert "pickle" not in message
    with pytest.raises(UserError) as error:  # the same folder as the identity UNet
        load_model_set(str(tiny_dir), identity_model=str(model))
    one_line_naming(error, weights, "identity UNet", "is truncated")


def test_unet_weights_of_another_model_are_one_line(tiny_dir, hostile):
    """Weights that leave the UNet's tensors unset were a NotImplementedError (meta tensors) at .to()."""
    from safetensors.torch import save_file

    model = copy_of(tiny_dir, hostile)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({"x": torch.zeros(2)}, str(weights))
    with pytest.raises(UserError) as error:
        load_model_set(str(model))
    one_line_naming(error, weights, "does not hold the weights of this UNet")


def test_a_junk_single_safetensors_model_is_one_line(tiny_dir, hostile):
    import os

    checkpoint = hostile / "junk.safetensors"
    checkpoint.write_bytes(os.urandom(2000))
    for config in (None, str(tiny_dir)):
        with pytest.raises(UserError) as error:
            load_model_set(str(checkpoint), config=config)
        message = one_line_naming(error, checkpoint, "is not a safetensors file")
        assert "--config" not in message


@pytest.mark.skipif(not __import__("os").path.exists("/dev/zero"), reason="no /dev/zero here")
@pytest.mark.parametrize("option", ["model", "edit_loras", "identity_lora", "identity_model"])
def test_dev_zero_is_not_a_regular_file(tiny_dir, option):
    arguments = (
        {"model": "/dev/zero"}
        if option == "model"
        else {"model": str(tiny_dir), option: [("/dev/zero", 1.0)] if option == "edit_loras" else "/dev/zero"}
    )
    with pytest.raises(UserError) as error:
        load_model_set(**arguments)
    one_line_naming(error, "/dev/zero", "it is a character device")


def test_a_junk_adapter_library_is_one_line(tiny_dir, hostile):
    model = copy_of(tiny_dir, hostile)
    (model / "adapters").mkdir()
    library = model / "adapters" / "adapters.json"
    library.write_text('{"edits": [1')
    with pytest.raises(UserError) as error:
        load_model_set(str(model))
    one_line_naming(error, library, "is not JSON", "--no-adapter-library")
    library.write_text('{"edits": {"glasses": {"path": "glasses.safetensors", "words": ["glasses"]}}}')
    (model / "adapters" / "glasses.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(UserError) as error:
        load_model_set(str(model))
    one_line_naming(error, model / "adapters" / "glasses.safetensors", "not a safetensors file", str(library))


def test_explicit_edit_loras_replace_a_librarys_edits_but_keep_its_identity_net(tiny_dir, tmp_path):
    """``--edit-lora`` with ``--adapters-dir``: the library's ε2 edits give way, its ε1 and the identity
    net ε1 was trained against (which identity guidance uses) stay."""
    import shutil

    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    from ipfacediff.adapters import AdapterLibrary
    from ipfacediff.editing import IPFaceDiffPipeline
    from ipfacediff.files import write_json
    from ipfacediff.job import SHIPPED_MODELS

    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False))
    lora = tmp_path / "glasses.safetensors"
    save_file({f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}, str(lora))
    library = tmp_path / "lib"
    shutil.copytree(SHIPPED_MODELS / "identity_net", library / "identity_net" / "net")
    write_json(library / "adapters.json", AdapterLibrary(None, (), Path("identity_net/net")).to_json())
    models = load_model_set(str(tiny_dir), adapters_dir=library, edit_loras=[(str(lora), 0.5)])
    assert models.edit_adapter_weights == {"edit_0": 0.5}
    assert models.library.edits == () and models.library.identity_net == library / "identity_net" / "net"
    assert type(IPFaceDiffPipeline.from_model_set(models).identity_net()).__name__ == "FaceWorldIdentity"


def test_a_pipeline_with_an_adapter_library_saves_and_loads_it(tiny_pipe, tmp_path):
    """The pipeline's config holds the library once (its adapters.json form), so from_pretrained plans
    edits as the saved pipeline did."""
    from ipfacediff.adapters import AdapterEntry, AdapterLibrary
    from ipfacediff.editing import IPFaceDiffPipeline
    from ipfacediff.settings import EditSettings

    library = AdapterLibrary(
        tmp_path / "identity.safetensors",
        (
            AdapterEntry("glasses", path=tmp_path / "g.safetensors", words=("glasses",), weight=0.3, guidance=5.0),
            AdapterEntry("smile", path=tmp_path / "s.safetensors", words=("smiling",), hair=True, blend_threshold=0.3),
        ),
        tmp_path / "net",
    )
    pipe = IPFaceDiffPipeline(**tiny_pipe.components, model_source="tiny", adapter_library=library.to_json())
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = IPFaceDiffPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.adapter_library == library
    settings = EditSettings(prompt="a smiling face with glasses")
    plan = loaded.plan_edit(settings)
    assert plan == pipe.plan_edit(settings)
    assert plan.edit_weights == {"edit:glasses": 0.3, "edit:smile": 1.0}
    assert (plan.guidance, plan.blend_threshold, plan.hair) == (7.5, 0.3, True)


def test_an_adapters_tuned_strength_caps_the_edits_strength(tiny_pipe, tmp_path):
    """A tuned value added as one field of AdapterEntry (``strength``): read from the library, combined
    by its rule (the lowest of the setting and the picked adapters'), used by the edit."""
    from conftest import moving_texture

    from ipfacediff.adapters import AdapterEntry, AdapterLibrary
    from ipfacediff.editing import IPFaceDiffPipeline
    from ipfacediff.settings import EditSettings

    entries = (
        AdapterEntry("tattoo", path=tmp_path / "t.safetensors", words=("tattoo",), strength=0.5),
        AdapterEntry("smile", path=tmp_path / "s.safetensors", words=("smiling",)),
    )
    pipe = IPFaceDiffPipeline(
        **tiny_pipe.components, model_source="tiny", adapter_library=AdapterLibrary(None, entries).to_json()
    )
    assert pipe.plan_edit(EditSettings(prompt="a face with a tattoo")).strength == 0.5
    assert pipe.plan_edit(EditSettings(prompt="a face with a tattoo", strength=0.25)).strength == 0.25
    assert pipe.plan_edit(EditSettings(prompt="a smiling face", strength=0.75)).strength == 0.75  # untuned
    frames = moving_texture(3)
    tuned = pipe(frames, EditSettings(prompt="a face with a tattoo", steps=4))
    by_hand = tiny_pipe(frames, EditSettings(prompt="a face with a tattoo", steps=4, strength=0.5))
    full = tiny_pipe(frames, EditSettings(prompt="a face with a tattoo", steps=4))
    assert np.array_equal(tuned.frames, by_hand.frames) and not np.array_equal(tuned.frames, full.frames)
