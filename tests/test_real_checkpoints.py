"""Models and LoRAs as users download them: an fp16 variant folder, a hub repo's file list, a CLIP
that comes as pytorch_model.bin, kohya/A1111 LoRAs, peft LoRAs with lora_alpha ≠ r, text-encoder
parts, other Stable Diffusion generations. Each is built the way the real files come (diffusers'
and transformers' own writers, real kohya key names) on tiny models of the real classes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ipfacediff.errors import UserError
from ipfacediff.models import activate_role, load_clip, load_model_set
from ipfacediff.models.clip import clip_hub_files
from ipfacediff.models.loading import model_hub_files, pick_weight_files

from test_cli import run

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# The file list of stable-diffusion-v1-5/stable-diffusion-v1-5 on the hub.
SD15_REPO = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
    "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned-emaonly.fp16.safetensors",
    "v1-inference.yaml",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
# The file list of openai/clip-vit-base-patch32, ipfacediff's default CLIP.
CLIP_REPO = [
    ".gitattributes",
    "README.md",
    "config.json",
    "flax_model.msgpack",
    "merges.txt",
    "preprocessor_config.json",
    "pytorch_model.bin",
    "special_tokens_map.json",
    "tf_model.h5",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A short clip and its true face track."""
    from ipfacediff.demo import sample_clip

    folder = tmp_path_factory.mktemp("sample")
    tracks = sample_clip(folder / "clip.mp4", frames=6)
    tracks.save(folder / "clip.tracks.json")
    return folder / "clip.mp4", folder / "clip.tracks.json"


SD15_COMMON = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "vae/config.json",
]


# ---------------------------------------------------------------------------------------------
# §1: what a download leaves


def test_the_hub_download_takes_only_what_the_pipeline_reads_in_the_dtypes_variant():
    fp16 = model_hub_files(SD15_REPO, torch.float16)
    assert sorted(fp16) == sorted(
        SD15_COMMON
        + [
            "text_encoder/model.fp16.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ]
    )
    fp32 = model_hub_files(SD15_REPO, torch.float32)
    assert sorted(fp32) == sorted(
        SD15_COMMON
        + [
            "text_encoder/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ]
    )
    # A repo that ships only fp16 copies still loads in float32; pickles only when allowed.
    fp16_only = [n for n in SD15_REPO if ".fp16." in n or not n.endswith((".safetensors", ".bin"))]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in model_hub_files(fp16_only, torch.float32)
    pickles = [n for n in SD15_REPO if not n.endswith(".safetensors")]
    assert not any(n.endswith(".bin") for n in model_hub_files(pickles, torch.float32))
    allowed = model_hub_files(pickles, torch.float16, allow_pickle=True)
    assert "unet/diffusion_pytorch_model.fp16.bin" in allowed and "unet/diffusion_pytorch_model.bin" not in allowed
    # The identity model of a hub id: its UNet only.
    assert model_hub_files(SD15_REPO, torch.float32, parts=("unet",)) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]


@pytest.mark.parametrize("dtype, variant", [("float16", ".fp16"), ("float32", "")])
def test_a_hub_id_downloads_the_chosen_files(tiny_dir, tmp_path, monkeypatch, dtype, variant):
    """The hub client is asked for SD-1.5's listing and for exactly the files chosen from it (the
    hub itself is out of reach here); what it returns, a snapshot folder, loads."""
    import huggingface_hub

    from ipfacediff.job import load_pipeline

    asked = {}
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, **_: SD15_REPO)

    def snapshot_download(repo, **options):
        asked.update(options, repo=repo)
        return str(tiny_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cpu", dtype=dtype)
    assert asked["repo"] == "stable-diffusion-v1-5/stable-diffusion-v1-5" and pipe.unet.dtype == getattr(torch, dtype)
    weights = sorted(n for n in asked["allow_patterns"] if n.endswith(".safetensors"))
    assert weights == [
        f"text_encoder/model{variant}.safetensors",
        f"unet/diffusion_pytorch_model{variant}.safetensors",
        f"vae/diffusion_pytorch_model{variant}.safetensors",
    ]


def test_sharded_variant_weights_are_one_choice():
    names = [
        "config.json",
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
        "diffusion_pytorch_model.safetensors.index.fp16.json",
        "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    ]
    half = pick_weight_files(names, torch.float16, pickled_ok=False)
    assert half.variant == "fp16" and len(half.names) == 3 and all(".fp16" in n for n in half.names)
    full = pick_weight_files(names, torch.float32, pickled_ok=False)
    assert full.variant is None and len(full.names) == 3 and not any("fp16" in n for n in full.names)


@pytest.fixture(scope="module")
def fp16_dir(tiny_dir, tmp_path_factory):
    """The tiny model as an fp16 download leaves it: only *.fp16.safetensors weights."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("fp16") / "model"
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_dir, torch_dtype=torch.float16, safety_checker=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder, variant="fp16")
    return folder


def test_an_fp16_variant_folder_loads_in_every_dtype(fp16_dir, tiny_dir):
    weights = sorted(p.name for p in fp16_dir.rglob("*.safetensors"))
    assert weights == ["diffusion_pytorch_model.fp16.safetensors"] * 2 + ["model.fp16.safetensors"]
    reference = load_model_set(str(tiny_dir)).unet.state_dict()
    for dtype in (torch.float32, torch.float16):
        models = load_model_set(str(fp16_dir), dtype=dtype)
        assert models.unet.dtype == models.vae.dtype == models.text_encoder.dtype == dtype
        loaded = models.unet.state_dict()
        name = "conv_in.weight"
        torch.testing.assert_close(loaded[name].float(), reference[name].half().float())


def test_an_fp16_folder_edits_from_the_command_line(fp16_dir, sample, tmp_path, capsys):
    clip, tracks = sample
    code, _, stderr = run(
        ["edit", str(clip), "-o", str(tmp_path / "out.mp4"), "-p", "a face with eyeglasses"]
        + ["--model", str(fp16_dir), "--steps", "2", "--tracks", str(tracks), "--dtype", "float32"],
        capsys,
    )
    assert code == 0, stderr


def test_the_hub_hint_names_the_hf_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError) as error:
        load_model_set("someone/not-a-cached-model")
    assert "`hf download someone/not-a-cached-model`" in str(error.value)
    with pytest.raises(UserError) as error:
        load_clip("someone/not-a-cached-clip")
    assert "`hf download someone/not-a-cached-clip`" in str(error.value) and "huggingface-cli" not in str(error.value)


def test_the_default_clip_is_fetched_as_its_repo_serves_it():
    assert sorted(clip_hub_files(CLIP_REPO)) == sorted(
        [
            "config.json",
            "merges.txt",
            "preprocessor_config.json",
            "pytorch_model.bin",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
        ]
    )
    with_safetensors = clip_hub_files([*CLIP_REPO, "model.safetensors"])
    assert "model.safetensors" in with_safetensors and "pytorch_model.bin" not in with_safetensors


@pytest.fixture(scope="module")
def bin_clip(tiny_dir, tmp_path_factory):
    """The tiny CLIP as openai's repos serve theirs: config, tokenizer and pytorch_model.bin only
    (transformers 5 writes safetensors only, so the state dict is saved in the real layout)."""
    from transformers import CLIPModel

    folder = tmp_path_factory.mktemp("clip-bin") / "clip"
    folder.mkdir()
    model = CLIPModel.from_pretrained(tiny_dir / "clip")
    model.config.save_pretrained(folder)
    for file in (tiny_dir / "clip").glob("tokenizer*"):
        shutil.copy(file, folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_a_clip_of_pytorch_model_bin_loads_weights_only(bin_clip, tiny_dir):
    assert sorted(p.name for p in bin_clip.iterdir()) == [
        "config.json",
        "pytorch_model.bin",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    texts = ["a face", "a face with eyeglasses"]
    torch.testing.assert_close(
        load_clip(str(bin_clip)).text_embeddings(texts), load_clip(str(tiny_dir / "clip")).text_embeddings(texts)
    )


def test_a_clip_without_weights_names_what_clip_loading_reads(bin_clip, tmp_path):
    folder = shutil.copytree(bin_clip, tmp_path / "clip")
    (folder / "pytorch_model.bin").rename(folder / "weights.ckpt")
    with pytest.raises(UserError) as error:
        load_clip(str(folder))
    message = str(error.value)
    assert "\n" not in message and str(folder) in message and "has no weights" in message
    assert "--allow-pickle" not in message


def _faces(folder: Path) -> Path:
    import cv2

    from conftest import moving_texture

    folder.mkdir()
    for i, image in enumerate(moving_texture(2)):
        cv2.imwrite(str(folder / f"{i}.png"), image[..., ::-1])
    return folder


def test_train_edit_takes_a_clip_of_pytorch_model_bin(tiny_dir, bin_clip, tmp_path, capsys):
    code, _, stderr = run(
        ["train", "edit", "--model", str(tiny_dir), "--source", "a face", "--target", "a face with eyeglasses"]
        + ["--data", str(_faces(tmp_path / "faces")), "--clip", str(bin_clip), "-o", str(tmp_path / "out")]
        + ["--max-steps", "1", "--batch-size", "1", "--inversion-steps", "2", "--generation-steps", "1"],
        capsys,
    )
    assert code == 0, stderr
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("command", ["identity", "edit", "library"])
def test_train_commands_take_the_model_options_of_edit(command, tiny_dir, tmp_path, capsys):
    """--config and --allow-pickle reach the loader: a single-file checkpoint is read against
    --config's architecture, and a model folder of pickled weights loads with --allow-pickle only."""
    from safetensors.torch import save_file

    faces = _faces(tmp_path / "faces")
    extra = {
        "identity": [],
        "edit": ["--source", "a face", "--target", "a face with eyeglasses", "--clip", str(tiny_dir / "clip")],
        "library": ["--edits", "eyeglasses", "--aligned", "--clip", str(tiny_dir / "clip")],
    }[command]
    checkpoint = tmp_path / "checkpoint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(checkpoint))
    args = ["train", command, "--data", str(faces), "-o", str(tmp_path / "out"), *extra]
    code, _, stderr = run([*args, "--model", str(checkpoint), "--config", str(tiny_dir)], capsys)
    assert code == 2 and f"--config {tiny_dir}" in stderr and "Traceback" not in stderr, stderr

    pickled = shutil.copytree(tiny_dir, tmp_path / "pickled")
    unet = pickled / "unet"
    from safetensors.torch import load_file

    torch.save(load_file(unet / "diffusion_pytorch_model.safetensors"), unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    code, _, stderr = run([*args, "--model", str(pickled), "--max-steps", "1"], capsys)
    assert code == 2 and "--allow-pickle" in stderr, stderr
    if command == "identity":  # the one cheap enough to train through
        code, _, stderr = run([*args, "--model", str(pickled), "--max-steps", "1", "--allow-pickle"], capsys)
        assert code == 0, stderr


# ---------------------------------------------------------------------------------------------
# §2: other generations of Stable Diffusion


def _tiny_sdxl(folder: Path) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ipfacediff.models import clip_bpe_tokenizer

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
    )
    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32
    )
    tokenizer = clip_bpe_tokenizer()
    StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    ).save_pretrained(folder)
    return folder


def test_an_sdxl_or_sd2_model_is_one_line_saying_what_this_tool_drives(tiny_dir, sample, tmp_path, capsys):
    from safetensors.torch import save_file

    sdxl = _tiny_sdxl(tmp_path / "sdxl")
    sd2 = shutil.copytree(tiny_dir, tmp_path / "sd2")  # SD-2.x's UNet: linear projections, 1024-d text states
    config = json.loads((sd2 / "unet" / "config.json").read_text())
    (sd2 / "unet" / "config.json").write_text(json.dumps({**config, "use_linear_projection": True}))
    sdxl_file = tmp_path / "sd_xl_base.safetensors"  # the key names of an original SDXL checkpoint
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
            "conditioner.embedders.1.model.ln_final.weight": torch.zeros(2),
        },
        str(sdxl_file),
    )
    sd2_file = tmp_path / "v2-1_768-ema-pruned.safetensors"  # SD-2.x's OpenCLIP text encoder
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
            "cond_stage_model.model.ln_final.weight": torch.zeros(2),
        },
        str(sd2_file),
    )
    clip, tracks = sample
    capsys.readouterr()  # the writers' progress bars
    for model, generation in [
        (sdxl, "Stable Diffusion XL"),
        (sd2, "Stable Diffusion 2"),
        (sdxl_file, "Stable Diffusion XL"),
        (sd2_file, "Stable Diffusion 2"),
    ]:
        code, _, stderr = run(
            ["edit", str(clip), "-o", str(tmp_path / "out.mp4"), "-p", "x", "--model", str(model)], capsys
        )
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, stderr
        assert lines[0].startswith("error: ") and generation in lines[0] and "Stable Diffusion 1.x" in lines[0]
    with pytest.raises(UserError, match="identity model .* is Stable Diffusion XL"):
        load_model_set(str(tiny_dir), identity_model=str(sdxl))


# ---------------------------------------------------------------------------------------------
# §3: community LoRAs


def _lora_state(tiny_dir: Path, rank: int = 4) -> dict[str, torch.Tensor]:
    """A peft LoRA of the tiny UNet's attention with values an fp16 file holds exactly."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(7)
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False))
    return {k: (v * 4 if "lora_B" in k else v).half().float() for k, v in get_peft_model_state_dict(unet).items()}


def _save_peft(folder: Path, state: dict, rank: int, alpha: float) -> Path:
    """As diffusers' save_lora_weights writes a trained LoRA: its LoraConfig in lora_adapter_metadata."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict()
    )
    return folder / "pytorch_lora_weights.safetensors"


def _kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def _save_kohya(path: Path, state: dict, alpha: float, text_encoder: bool = True) -> Path:
    """As kohya's sd-scripts saves an SD-1.5 LoRA (fp16): lora_unet_<module>.lora_down/lora_up.weight
    and a scalar .alpha per module (the up weights scaled by rank / alpha, so the same LoRA), plus
    a text-encoder part lora_te_text_model_encoder_layers_<n>_self_attn_<proj>."""
    from safetensors.torch import save_file

    rank = next(v for k, v in state.items() if "lora_A" in k).shape[0]
    tensors = {}
    for key, value in state.items():
        module, half = key.rsplit(".lora_", 1)
        name = _kohya_name(module)
        if half.startswith("A"):
            tensors[f"{name}.lora_down.weight"] = value.half()
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
        else:
            tensors[f"{name}.lora_up.weight"] = (value * rank / alpha).half()
    if text_encoder:
        for proj in ("q_proj", "v_proj"):
            name = f"lora_te_text_model_encoder_layers_0_self_attn_{proj}"
            tensors[f"{name}.lora_down.weight"] = torch.randn(rank, 32).half()
            tensors[f"{name}.lora_up.weight"] = torch.randn(32, rank).half()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return path


@pytest.fixture(scope="module")
def loras(tiny_dir, tmp_path_factory):
    """One LoRA in four files: peft with alpha = r, peft with alpha = 2r and B halved, kohya with
    alpha = r/2 and up doubled, kohya with alpha = r."""
    folder = tmp_path_factory.mktemp("loras")
    state = _lora_state(tiny_dir)
    halved = {k: v / 2 if "lora_B" in k else v for k, v in state.items()}
    return dict(
        peft=_save_peft(folder / "peft", state, 4, 4),
        alpha=_save_peft(folder / "alpha", halved, 4, 8),
        kohya=_save_kohya(folder / "kohya.safetensors", state, alpha=2.0),
        kohya_rank=_save_kohya(folder / "kohya_rank.safetensors", state, alpha=4.0, text_encoder=False),
    )


def _edit_output(models) -> torch.Tensor:
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    activate_role(models.unet, "edit", models.edit_adapter_weights)
    with torch.no_grad():
        return models.unet(x, 500, encoder_hidden_states=context).sample


def test_kohya_and_alpha_lora_files_act_as_the_peft_file(tiny_dir, loras):
    outputs = {
        name: _edit_output(load_model_set(str(tiny_dir), edit_loras=[(str(path), 1.0)])) for name, path in loras.items()
    }
    base = _edit_output(load_model_set(str(tiny_dir)))
    assert (outputs["peft"] - base).abs().max() > 0.1  # the LoRA does something
    for name in ("alpha", "kohya", "kohya_rank"):
        torch.testing.assert_close(outputs[name], outputs["peft"], rtol=0, atol=1e-6, msg=name)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(255**2 / error)


def test_kohya_and_alpha_loras_give_the_peft_files_video(loras, sample, tiny_dir, tmp_path, capsys):
    from ipfacediff.video import read_frames

    clip, tracks = sample
    videos, warnings = {}, {}
    for name in ("peft", "alpha", "kohya"):
        out = tmp_path / f"{name}.mp4"
        code, _, stderr = run(
            ["edit", str(clip), "-o", str(out), "-p", "a face with eyeglasses", "--model", str(tiny_dir)]
            + ["--edit-lora", f"{loras[name]}:1.0", "--steps", "2", "--tracks", str(tracks)]
            + ["--cache-dir", str(tmp_path / "cache")],
            capsys,
        )
        assert code == 0, stderr
        videos[name], warnings[name] = read_frames(out), [line for line in stderr.splitlines() if "warning:" in line]
    for name in ("alpha", "kohya"):
        assert _psnr(videos[name], videos["peft"]) >= 60, name
    # The kohya file's text-encoder part is said to be left out, in one line naming the file.
    assert warnings["peft"] == warnings["alpha"] == []
    assert len(warnings["kohya"]) == 1 and str(loras["kohya"]) in warnings["kohya"][0]
    assert "text-encoder part (4 tensors) is not applied" in warnings["kohya"][0]


@pytest.mark.parametrize(
    "tensors, says",
    [
        ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 32)}, "has no partner"),
        (
            {_kohya_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") + ".lora_up.weight": (32, 4)},
            "has no partner",
        ),
        (
            {
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 32),
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": (32, 4),
            },
            "holds only text-encoder LoRA weights",
        ),
        (
            {"unet.foo.lora_A.weight": (4, 32), "unet.foo.lora_B.weight": (32, 4)},
            "names layers this UNet does not have",
        ),
        (  # kohya's SDXL naming (the original UNet's block numbers)
            {
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 32),
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": (32, 4),
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha": (),
            },
            "does not fit this UNet",
        ),
    ],
)
def test_a_lora_with_wrong_keys_is_one_line_naming_the_file(tiny_dir, tmp_path, tensors, says):
    from safetensors.torch import save_file

    lora = tmp_path / "wrong-keys.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(lora))
    with pytest.raises(UserError) as error:
        load_model_set(str(tiny_dir), edit_loras=[(str(lora), 1.0)])
    message = str(error.value)
    assert "\n" not in message and str(lora) in message and says in message, message
    assert "IndexError" not in message
