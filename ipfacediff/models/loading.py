"""Loading the SD-1.x model set: VAE, text encoder, tokenizer, ε2 (edit UNet), ε1 (identity UNet).

A model set comes from a diffusers folder, a hub id (resolved from the local Hugging Face cache;
``local_files_only`` whenever the hub is offline) or a single ``.safetensors`` checkpoint. ε1 and
ε2 are either two UNets or LoRA adapters over one shared base, so the usual case costs one UNet of
memory. Weights are read as safetensors only, in the variant the dtype asks for when a folder has
it (an fp16 download has only ``*.fp16.safetensors``); pickled checkpoints run arbitrary code when
loaded, so they need an explicit ``allow_pickle=True``. Models of another Stable Diffusion
generation (SD-2.x, SDXL) are refused in one line. LoRAs go through diffusers' ``lora_state_dict``:
peft/diffusers files with the LoraConfig they record, kohya/A1111 files converted.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import platform
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ipfacediff.errors import UserError
from ipfacediff.files import (
    FileProblem,
    check_file,
    read_json,
    reading,
    safetensors_header,
    short_detail,
)

from ipfacediff.settings import ModelSpec
from ipfacediff.models.adapters import ADAPTER_LIBRARY, AdapterLibrary, edit_adapter_name, lora_weight

Role = Literal["identity", "edit"]

IDENTITY_ADAPTER = "identity"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SD_CHECKPOINT_UNET_PREFIX = "model.diffusion_model."  # the UNet's tensors in an original SD-1.x checkpoint
MODEL_PARTS = ("unet", "vae", "text_encoder")  # the weighted parts of a model folder

# Stable Diffusion 1.x noise schedule: every SD-1.x checkpoint was trained with it.
SD1_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


@dataclass
class ModelSet:
    """Everything the pipeline needs; ``identity_unet`` may be the very object ``unet`` is."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    identity_unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    source: str
    edit_adapter_weights: dict[str, float] = field(default_factory=dict)
    library: AdapterLibrary | None = None  # the model folder's adapters, when loaded
    notices: list[str] = field(default_factory=list)  # what loading left out, said to the user

    def to(self, device: torch.device | str) -> "ModelSet":
        """Move every module (once, though ε1 may be ε2); dtypes are chosen at loading."""
        for module in {id(m): m for m in (self.vae, self.text_encoder, self.unet, self.identity_unet)}.values():
            module.to(device)
        return self


def hub_offline() -> bool:
    """True when the hub must not be contacted (HF_HUB_OFFLINE), as on CI and air-gapped GPUs."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def model_resolution(vae: AutoencoderKL, unet: UNet2DConditionModel) -> int:
    """The image side the model was trained at: latent sample size × VAE downscale factor."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return int(unet.config.sample_size) * factor


def library_versions(*extra: str) -> dict[str, str]:
    """Versions of ipfacediff and the libraries that decide what a model computes (plus ``extra``
    importable packages), for run metadata."""
    import diffusers
    import transformers

    from ipfacediff import __version__

    versions = {
        "ipfacediff": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    versions.update({name: importlib.import_module(name).__version__ for name in extra})
    versions["python"] = platform.python_version()
    return versions


def activate_role(unet: UNet2DConditionModel, role: Role, edit_adapter_weights: dict[str, float]) -> None:
    """Switch LoRA adapters of a shared base UNet to ε1 ("identity") or ε2 ("edit").

    A UNet without adapters is left alone: then each role has its own UNet (or both are the base).
    """
    loaded = set(getattr(unet, "peft_config", {}) or {})
    if not loaded:
        return
    if role == "identity":
        names, weights = ([IDENTITY_ADAPTER], [1.0]) if IDENTITY_ADAPTER in loaded else ([], [])
    else:
        names = [n for n in edit_adapter_weights if n in loaded]
        weights = [edit_adapter_weights[n] for n in names]
    if names:
        unet.enable_adapters()
        unet.set_adapters(names, weights)
    else:
        unet.disable_adapters()


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's config and weights, for cache keys.

    It samples at most 256 values of each tensor, so it costs milliseconds even for SD-1.5 while any
    fine-tune, LoRA or reinitialisation still changes it.
    """
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        public = {k: v for k, v in dict(config).items() if not k.startswith("_")}  # not _name_or_path
        digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(flat[::step][:256].to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()


def _is_hub_id(source: str) -> bool:
    """``owner/name``, as opposed to a relative or absolute path."""
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def folder_files(listing: list[str], folder: str, dtype: torch.dtype, *, pickled_ok: bool) -> list[str]:
    """Of a repo's files (``listing``), the weights ``from_pretrained`` reads in ``folder`` ("" for
    the root; :func:`pick_weight_files`) and its config.json."""
    prefix = f"{folder}/" if folder else ""
    names = [n[len(prefix) :] for n in listing if n.startswith(prefix) and "/" not in n[len(prefix) :]]
    files = pick_weight_files(names, dtype, pickled_ok=pickled_ok)
    chosen = ["config.json"] if "config.json" in names else []
    return [prefix + name for name in chosen + list(files.names if files else ())]


def model_hub_files(
    listing: list[str], dtype: torch.dtype, *, allow_pickle: bool = False, parts: tuple[str, ...] = MODEL_PARTS
) -> list[str]:
    """The files of a diffusers SD-1.x hub repo that loading reads, as diffusers' ``download``
    picks them: model_index.json, the tokenizer and scheduler, and each part's weights in the
    variant ``dtype`` asks for. Not the root's single-file checkpoints, the EMA copies, the other
    precision's copies or the safety checker: several GB a download would fetch for nothing."""
    wanted = [n for n in listing if n == "model_index.json" or n.split("/")[0] in ("tokenizer", "scheduler")]
    for part in parts:
        wanted += folder_files(listing, part, dtype, pickled_ok=allow_pickle)
    return wanted


def _snapshot(source: str, local_files_only: bool, select: Callable[[list[str]], list[str]]) -> str:
    """A hub id's local snapshot folder: from the cache only with ``local_files_only``, else the
    files ``select`` picks from the repo's listing, downloaded; hub errors propagate."""
    from huggingface_hub import HfApi, snapshot_download

    if local_files_only:
        return snapshot_download(source, local_files_only=True)
    return snapshot_download(source, allow_patterns=select(HfApi().list_repo_files(source)))


def _resolve_repo(source: str, local_files_only: bool, select: Callable[[list[str]], list[str]]) -> str:
    """Turn a hub id into a local snapshot folder, or explain in one line why that is impossible."""
    try:
        return _snapshot(source, local_files_only, select)
    except Exception as error:  # hub errors come in many classes; all mean "not available"
        where = "in the local Hugging Face cache" if local_files_only else "on the hub"
        raise UserError(
            f"model {source!r} is not a folder, a .safetensors file or a model {where} "
            f"({type(error).__name__}); pass a diffusers folder or download it first with `hf download {source}`"
        ) from None


# What to do about a damaged part of a model folder (or a UNet folder given as the identity model).
MODEL_FIX = (
    "download the model again or write it again with save_pretrained (`ipfacediff build-tiny-models` for the tiny set)"
)
# The loggers that list a checkpoint's missing or unused tensors, or repeat an adapter's error, before
# the one line that says what is wrong: quiet while a file is read behind reading().
_LOADING_LOGGERS = (
    "diffusers.models.modeling_utils",
    "transformers.modeling_utils",
    "transformers.utils.loading_report",
    "diffusers.loaders.peft",
)
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' weight file names
# A weight file as save_pretrained names it: one file or shards, optionally of a variant ("fp16"),
# or the index of the shards (diffusers and transformers put the variant before ".json").
_WEIGHT_FILE = re.compile(
    r"^(?P<stem>diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<variant>\w+))?(?:-\d+-of-\d+)?\.(?P<ext>safetensors|bin)$"
    r"|^(?P<index_stem>diffusion_pytorch_model|model|pytorch_model)\.(?P<index_ext>safetensors|bin)\.index"
    r"(?:\.(?P<index_variant>\w+))?\.json$"
)
# The variant a dtype asks for (what diffusers' `variant=` and the hub's fp16 copies call it).
_DTYPE_VARIANTS = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_PRECISION_VARIANTS = ("fp16", "bf16", "fp32")  # copies of the same weights, unlike ema / non_ema


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of one part (a folder of a model) that ``from_pretrained`` is to read."""

    names: tuple[str, ...]  # file names in the folder: one file, or shards with their index
    variant: str | None  # what from_pretrained's ``variant=`` must be
    pickled: bool  # .bin files (torch.load), not safetensors


def weight_groups(names: list[str]) -> dict[tuple[str | None, bool], list[str]]:
    """The weight files among ``names`` (file names of one folder) by (variant, pickled)."""
    groups: dict[tuple[str | None, bool], list[str]] = {}
    for name in names:
        found = _WEIGHT_FILE.match(name)
        if found is None:
            continue
        variant = found["variant"] if found["stem"] else found["index_variant"]
        pickled = (found["ext"] or found["index_ext"]) == "bin"
        groups.setdefault((variant, pickled), []).append(name)
    return groups


def pick_weight_files(names: list[str], dtype: torch.dtype, *, pickled_ok: bool) -> WeightFiles | None:
    """The weight files ``from_pretrained`` should read among ``names``, as diffusers picks them
    with ``variant=``: the variant ``dtype`` asks for ("fp16" for float16) when the folder has it,
    else the plain files, else another precision's copy (an fp16 download has only those);
    safetensors before pickles, which only with ``pickled_ok``. None: no weights."""
    groups = weight_groups(names)
    found = {variant for variant, _ in groups}
    order = [_DTYPE_VARIANTS.get(dtype), None, *_PRECISION_VARIANTS, *sorted(v for v in found if v)]
    for pickled in (False, True) if pickled_ok else (False,):
        for variant in dict.fromkeys(order):
            if (variant, pickled) in groups:
                return WeightFiles(tuple(sorted(groups[variant, pickled])), variant, pickled)
    return None


@contextmanager
def _quiet_loading() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _LOADING_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _weight_files(
    folder: Path, what: str, allow_pickle: bool, dtype: torch.dtype = torch.float32, fix: str | None = None
) -> WeightFiles:
    """The weight files ``from_pretrained`` is to read in ``folder`` (:func:`pick_weight_files`),
    with the shards a safetensors index lists; else one UserError line (``fix``: what to do)."""
    fix = fix or MODEL_FIX
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    files = pick_weight_files(names, dtype, pickled_ok=allow_pickle)
    if files is None:
        pickled = sorted(n for n in names if Path(n).suffix in PICKLE_SUFFIXES)
        if pickled and not allow_pickle:
            raise UserError(
                f"{what} folder {folder} holds only pickled weights ({pickled[0]}), which can run code when "
                "loaded; convert them to .safetensors or pass --allow-pickle if you trust them"
            )
        raise UserError(
            f"{what} folder {folder} has no weights ({_WEIGHT_STEMS[0]}.safetensors or "
            f"{_WEIGHT_STEMS[1]}.safetensors, or their .fp16 variant); {fix}"
        )
    index = next((n for n in files.names if n.endswith(".json")), None)
    if index is None or files.pickled:
        return files
    table = read_json(folder / index, f"{what} weight index", fix)
    with reading(folder / index, f"{what} weight index", fix):
        if not isinstance(table, dict) or not isinstance(table.get("weight_map"), dict):
            raise FileProblem("is not a safetensors index (no weight_map)")
        shards = tuple(sorted(set(table["weight_map"].values())))
    return WeightFiles(shards, files.variant, files.pickled)


def _load_part(cls, folder: Path, what: str, dtype: torch.dtype, allow_pickle: bool):
    """A weighted part (UNet, VAE, text encoder) from its folder, every file read behind
    :func:`~ipfacediff.files.reading`: its config must be JSON, its safetensors complete, and its
    weights must be this part's (a missing tensor would be left unset)."""
    read_json(folder / "config.json", f"{what} config", MODEL_FIX)  # also: the folder exists
    files = _weight_files(folder, what, allow_pickle, dtype)
    paths = [folder / name for name in files.names]
    if not files.pickled:
        for file in paths:
            safetensors_header(file, f"{what} weight file", MODEL_FIX)
    # A problem of the weights names the weight file (or the folder of the shards).
    weights = dict(path=paths[0], what=f"{what} weight file") if len(paths) == 1 else {}
    with reading(folder, f"{what} folder", MODEL_FIX, folder=True), _quiet_loading():
        try:
            module, info = cls.from_pretrained(
                str(folder),
                torch_dtype=dtype,
                output_loading_info=True,
                use_safetensors=not files.pickled,
                variant=files.variant,
            )
        except (ValueError, RuntimeError) as error:
            if "size mismatch" not in str(error) and "expected shape" not in str(error):
                raise
            raise FileProblem(
                f"holds weights of other shapes than {folder / 'config.json'} describes ({short_detail(error)})",
                **weights,
            ) from None
        missing = list(info.get("missing_keys") or [])
        if missing:
            total = len(module.state_dict())
            raise FileProblem(
                f"does not hold the weights of this {what} ({len(missing)} of its {total} tensors "
                f"are missing, such as {sorted(missing)[0]!r})",
                **weights,
            )
    return module


SD1_ONLY = "ipfacediff drives Stable Diffusion 1.x models (768-d CLIP text states), such as stable-diffusion-v1-5"
# What tells another Stable Diffusion generation from SD-1.x in a single-file checkpoint's tensors.
_OTHER_GENERATION_TENSORS = {
    "conditioner.embedders.": "Stable Diffusion XL (two text encoders, 2048-d text states)",
    "cond_stage_model.model.": "Stable Diffusion 2.x (OpenCLIP text encoder, 1024-d text states)",
}


def other_generation(unet_config: dict, model_index: dict | None = None) -> str | None:
    """What a diffusers model is when it is not SD-1.x (SDXL, SD-2.x), from its configs; None for
    SD-1.x. The method's layers (which decoder blocks are injected, the 77×768 text states) are
    SD-1.x's: another generation would run, wrongly, or fail deep inside."""
    index = model_index or {}
    if (
        "text_encoder_2" in index
        or "XL" in str(index.get("_class_name", ""))
        or unet_config.get("addition_embed_type") == "text_time"
        or unet_config.get("cross_attention_dim") == 2048
    ):
        return "Stable Diffusion XL (two text encoders, 2048-d text states)"
    if unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024:
        return "Stable Diffusion 2.x (1024-d text states, linear attention projections)"
    return None


def _check_sd1(root: Path) -> None:
    """Refuse, in one line and before any weights are read, a model folder of another generation."""
    index_file = root / "model_index.json"
    index = read_json(index_file, "model index", MODEL_FIX) if index_file.is_file() else None
    unet_config = read_json(root / "unet" / "config.json", "UNet config", MODEL_FIX)
    generation = other_generation(
        unet_config if isinstance(unet_config, dict) else {}, index if isinstance(index, dict) else None
    )
    if generation:
        raise UserError(f"model {root} is {generation}; {SD1_ONLY}")


def _load_components(folder: str, dtype: torch.dtype, allow_pickle: bool) -> dict:
    root = Path(folder)
    _check_sd1(root)
    parts = dict(
        vae=_load_part(AutoencoderKL, root / "vae", "VAE", dtype, allow_pickle),
        text_encoder=_load_part(CLIPTextModel, root / "text_encoder", "text encoder", dtype, allow_pickle),
        unet=_load_part(UNet2DConditionModel, root / "unet", "UNet", dtype, allow_pickle),
    )
    for file in sorted((root / "tokenizer").glob("*.json")):
        read_json(file, "tokenizer file", MODEL_FIX)
    with reading(root / "tokenizer", "tokenizer folder", MODEL_FIX, folder=True) as tokenizer:
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(str(tokenizer))
    read_json(root / "scheduler" / "scheduler_config.json", "scheduler config", MODEL_FIX)
    with reading(root / "scheduler", "scheduler folder", MODEL_FIX, folder=True) as scheduler:
        parts["scheduler"] = DDIMScheduler.from_pretrained(str(scheduler))
    return parts


def _load_single_file(path: Path, config: str | None, dtype: torch.dtype, local_files_only: bool) -> dict:
    from diffusers import StableDiffusionPipeline

    fix = (
        "pass a Stable Diffusion 1.x .safetensors checkpoint (download it again if it is damaged) or a diffusers folder"
    )
    if path.suffix == ".safetensors":  # pickles (--allow-pickle) have no header to check first
        tensors = safetensors_header(path, "checkpoint", fix)
        for prefix, generation in _OTHER_GENERATION_TENSORS.items():
            if any(name.startswith(prefix) for name in tensors):
                raise UserError(f"checkpoint {path} is {generation}; {SD1_ONLY}")
        if not any(name.startswith(SD_CHECKPOINT_UNET_PREFIX) for name in tensors):
            first = f"; its first tensor is {next(iter(sorted(tensors)))!r}" if tensors else ""
            raise UserError(
                f"checkpoint {path} is not a Stable Diffusion 1.x checkpoint (it has no "
                f"'{SD_CHECKPOINT_UNET_PREFIX}*' UNet tensors{first}); {fix}"
            )
    if config is None:  # the architecture comes from the hub: the user must supply it when that fails
        fix = "pass --config with a diffusers SD-1.x folder or cached hub id describing its architecture"
    else:
        fix = f"check that --config {config} is a diffusers SD-1.x folder or cached hub id of the same architecture"
    with reading(path, "checkpoint", fix), _quiet_loading():
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=config,
            torch_dtype=dtype,
            local_files_only=local_files_only,
            safety_checker=None,
            requires_safety_checker=False,
        )
    generation = other_generation(dict(pipe.unet.config))
    if generation:  # a pickled checkpoint, or a --config of another generation
        raise UserError(f"checkpoint {path} is read as {generation}; {SD1_ONLY}")
    return dict(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
    )


def _load_set(
    source: str, *, config: str | None, dtype: torch.dtype, allow_pickle: bool, local_files_only: bool
) -> dict:
    path = Path(source).expanduser()
    if path.is_dir():
        if not _is_diffusers_folder(path):
            raise UserError(
                f"{source} is a folder but not a diffusers model (no model_index.json or unet/config.json); "
                "point --model at a folder written by save_pretrained or `ipfacediff build-tiny-models`"
            )
        return _load_components(str(path), dtype, allow_pickle)
    if os.path.lexists(path):  # a file, or something that is not one (a device, a pipe, a broken link)
        check_file(path, "model", "pass a diffusers folder, a .safetensors checkpoint or a hub id")
        if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise UserError(
                f"{path} is a pickled checkpoint, which can run code when loaded; convert it to "
                ".safetensors or pass --allow-pickle if you trust it"
            )
        if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
            raise UserError(f"{source} is neither a model folder nor a .safetensors checkpoint")
        return _load_single_file(path, config, dtype, local_files_only)
    if _is_hub_id(source):
        select = partial(model_hub_files, dtype=dtype, allow_pickle=allow_pickle)
        return _load_components(_resolve_repo(source, local_files_only, select), dtype, allow_pickle)
    raise UserError(f"model {source!r} does not exist: pass a diffusers folder, a .safetensors file or a hub id")


def _load_identity_unet(source: str, dtype: torch.dtype, allow_pickle: bool, local_files_only: bool):
    fix = "pass a model folder, a UNet folder, or a LoRA file with --identity-lora"
    path = Path(source).expanduser()
    if not os.path.lexists(path) and _is_hub_id(source):
        select = partial(model_hub_files, dtype=dtype, allow_pickle=allow_pickle, parts=("unet",))
        path = Path(_resolve_repo(source, local_files_only, select))
    check_file(path, "identity model", fix, folder=True)
    folder = path / "unet" if os.path.lexists(path / "unet" / "config.json") else path
    if not os.path.lexists(folder / "config.json"):
        raise UserError(
            f"identity model {source!r} is not a diffusers UNet folder (no config.json); pass a model folder, "
            "a UNet folder, or a LoRA file with --identity-lora"
        )
    unet_config = read_json(folder / "config.json", "identity UNet config", MODEL_FIX)
    generation = other_generation(unet_config) if isinstance(unet_config, dict) else None
    if generation:
        raise UserError(f"identity model {source!r} is {generation}; {SD1_ONLY}")
    return _load_part(UNet2DConditionModel, folder, "identity UNet", dtype, allow_pickle)


LORA_FIX = (
    "pass a LoRA .safetensors file for this model: one `ipfacediff train` or diffusers/peft wrote, "
    "or a kohya/A1111 (lora_unet_...) one"
)
# Tensor names of the LoRA formats diffusers reads: peft's lora_A/lora_B, diffusers' older
# lora.down/lora.up and kohya/A1111's lora_down/lora_up (with .alpha), which lora_state_dict converts.
_LORA_TENSOR = re.compile(
    r"(^|\.)(lora_[AB]|lora\.(down|up)|lora_linear_layer\.(down|up)|lora_(down|up)|lora_magnitude_vector)(\.|$)"
)
# The two halves of a LoRA pair in each format: down (A) and up (B).
_LORA_HALVES = {"lora_A": "lora_B", "lora.down": "lora.up", "lora_linear_layer.down": "lora_linear_layer.up"}
_LORA_HALVES["lora_down"] = "lora_up"
_LORA_HALF = re.compile(r"(lora_[AB]|lora\.(?:down|up)|lora_linear_layer\.(?:down|up)|lora_(?:down|up))\.")
_TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")


def _unpaired_lora_tensor(names: list[str]) -> str | None:
    """A LoRA tensor whose other half is missing, said as the rest of a sentence (diffusers fails
    on such a file with an IndexError)."""
    other = {**_LORA_HALVES, **{up: down for down, up in _LORA_HALVES.items()}}
    present = set(names)
    for name in names:
        found = _LORA_HALF.search(name)
        if found is None:
            continue
        partner = name[: found.start(1)] + other[found[1]] + name[found.end(1) :]
        if partner not in present:
            return f"{name!r} has no partner {partner!r}"
    return None


def _load_adapter(
    unet: UNet2DConditionModel, path: str, name: str, what: str = "LoRA file", fix: str = LORA_FIX
) -> list[str]:
    """Add the UNet part of the LoRA in ``path`` (a .safetensors file, or a folder holding one) to
    ``unet`` as adapter ``name``, read by diffusers' ``lora_state_dict``: peft/diffusers files with
    the LoraConfig their ``lora_adapter_metadata`` records (its lora_alpha), and kohya/A1111 files
    converted with their ``.alpha`` values. The file is read behind :func:`~ipfacediff.files.reading`:
    ``what`` and ``fix`` word its error line. Returns notices for the user: the file's parts that
    are not applied (a text-encoder part)."""
    from diffusers import StableDiffusionPipeline

    file = Path(path).expanduser()
    if file.is_dir():
        candidates = sorted(file.glob("*.safetensors"))
        if len(candidates) != 1:
            raise UserError(
                f"LoRA folder {file} must hold exactly one .safetensors file, found {len(candidates)}; {fix}"
            )
        file = candidates[0]
    check_file(file, what, fix)
    if file.suffix != ".safetensors":
        raise UserError(f"{what} {file} is not a .safetensors file; only safetensors adapters are read: {fix}")
    tensors = sorted(safetensors_header(file, what, fix))
    if not any(_LORA_TENSOR.search(key) for key in tensors):
        first = f"; its first tensor is {tensors[0]!r}" if tensors else ", it holds no tensors"
        raise UserError(
            f"{what} {file} holds no LoRA weights (tensors named like 'unet.<layer>.lora_A.weight' or "
            f"'lora_unet_<layer>.lora_down.weight'{first}); {fix}"
        )
    unpaired = _unpaired_lora_tensor(tensors)
    if unpaired:
        raise UserError(f"{what} {file} is incomplete: its tensor {unpaired}; {fix}")
    with reading(file, what, fix), _quiet_loading():
        state, network_alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(file), use_safetensors=True, local_files_only=True, return_lora_metadata=True
        )
    text_encoder_part = [k for k in state if k.startswith(_TEXT_ENCODER_PREFIXES)]
    unet_state = {k: v for k, v in state.items() if not k.startswith(_TEXT_ENCODER_PREFIXES)}
    if not unet_state:
        raise UserError(
            f"{what} {file} holds only text-encoder LoRA weights ({len(text_encoder_part)} tensors, such as "
            f"{text_encoder_part[0]!r}); ipfacediff applies a LoRA's UNet part: {fix}"
        )
    prefix = "unet" if any(k.startswith("unet.") for k in unet_state) else None
    with reading(file, what, fix), _quiet_loading(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # ε1 and ε2s share a UNet
        try:
            unet.load_lora_adapter(
                unet_state,
                adapter_name=name,
                prefix=prefix,
                network_alphas=network_alphas or None,
                metadata=metadata if not network_alphas else None,
            )
        except Exception as error:  # peft raises several types for a mismatched adapter
            missing = re.search(r"Target modules (\{.*?\}) not found", str(error))
            if missing:  # a LoRA of another architecture (or an SDXL one): its layers are not here
                names = missing[1] if len(missing[1]) <= 120 else missing[1][:120] + " …"
                raise FileProblem(
                    f"does not fit this UNet: it names layers this UNet does not have ({names})"
                ) from None
            raise FileProblem(f"does not fit this UNet ({short_detail(error)})") from None
        if name not in (getattr(unet, "peft_config", None) or {}):
            raise FileProblem("holds no LoRA weights for this UNet (none of its tensors matched a layer)")
    if not text_encoder_part:
        return []
    return [
        f"{what} {file}: its text-encoder part ({len(text_encoder_part)} tensors) is not applied, only its UNet "
        "part: ipfacediff keeps one text encoder for the source and the edit prompts"
    ]


def model_set_options(spec: ModelSpec) -> dict:
    """:func:`load_model_set`'s keywords from a spec, its "auto" device and dtype resolved as every
    front-end resolves them. The spec names its model: the embedded default is resolved above the
    loader (:func:`ipfacediff.service.load_pipeline`), as the tiny set it may build is made with it."""
    from ipfacediff.models.devices import pick_device, pick_dtype

    if spec.model is None:
        raise ValueError("load_model_set(spec) needs spec.model; ipfacediff.service.load_pipeline gives the default")
    device = pick_device(spec.device)
    return {
        "model": spec.model,
        "identity_model": spec.identity_model,
        "identity_lora": spec.identity_lora,
        "edit_loras": list(spec.edit_loras) or None,
        "config": spec.config,
        "dtype": pick_dtype(spec.dtype, device),
        "device": device,
        "allow_pickle": spec.allow_pickle,
        "adapters": spec.adapter_library,
        "adapters_dir": spec.adapters_dir,
        "compile": spec.compile,
    }


def load_model_set(
    model: str | ModelSpec,
    *,
    identity_model: str | None = None,
    identity_lora: str | None = None,
    edit_loras: list[tuple[str, float]] | None = None,
    config: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
    local_files_only: bool | None = None,
    adapters: bool = True,
    adapters_dir: str | Path | None = None,
    compile: bool = False,
) -> ModelSet:
    """Load the full set; ε1 defaults to the base UNet when neither identity option is given.

    A model folder with an :class:`AdapterLibrary` (``adapters=True``) brings its own ε1 and ε2
    adapters: its ε1 unless ``identity_model``/``identity_lora`` is given, its ε2 adapters (picked
    per prompt at edit time) unless ``edit_loras`` is given. ``adapters_dir``: a library kept
    outside the model folder (``ipfacediff train library --output LIB``), used instead of the
    model folder's own; checked before the model loads.

    ``model`` may be a :class:`~ipfacediff.settings.ModelSpec`, every option in one record (its
    device and dtype words resolved); the keywords are then not given.
    """
    if isinstance(model, ModelSpec):
        return load_model_set(local_files_only=local_files_only, **model_set_options(model))
    if local_files_only is None:
        local_files_only = hub_offline()
    if identity_model and identity_lora:
        raise UserError("give either --identity-model or --identity-lora, not both")
    if adapters_dir is not None and not adapters:
        raise UserError(
            "--adapters-dir names an adapter library and --no-adapter-library turns libraries off: give one of them"
        )
    edit_loras = [(path, lora_weight(weight, path)) for path, weight in edit_loras or []]  # before minutes of loading
    library = AdapterLibrary.read_dir(adapters_dir) if adapters_dir is not None else None
    parts = _load_set(model, config=config, dtype=dtype, allow_pickle=allow_pickle, local_files_only=local_files_only)
    if adapters_dir is None:
        library = AdapterLibrary.read(model) if adapters and Path(model).expanduser().is_dir() else None
    unet = parts["unet"]
    weights: dict[str, float] = {}
    notices: list[str] = []
    for index, (path, weight) in enumerate(edit_loras):
        name = f"edit_{index}"
        notices += _load_adapter(unet, path, name, "edit LoRA")
        weights[name] = weight
    if adapters_dir is not None:
        library_file = Path(adapters_dir).expanduser()
        library_file = (
            library_file if library_file.name == ADAPTER_LIBRARY.name else library_file / ADAPTER_LIBRARY.name
        )
        library_fix = (
            f"fix its entry in {library_file}, or build the library for this model with `ipfacediff train library`"
        )
    else:
        library_fix = f"fix its entry in {Path(model).expanduser() / ADAPTER_LIBRARY} or pass --no-adapter-library"
    if library is not None and not edit_loras:
        for entry in library.edits:
            notices += _load_adapter(
                unet, str(entry.path), edit_adapter_name(entry.name), f"LoRA of adapter {entry.name!r}", library_fix
            )
    elif library is not None:  # explicit edit LoRAs replace its edits; ε1 and its identity net stay
        library = library.without_edits()
    if identity_model:
        identity_unet = _load_identity_unet(identity_model, dtype, allow_pickle, local_files_only)
    else:
        identity_unet = unet
        if identity_lora:
            notices += _load_adapter(unet, identity_lora, IDENTITY_ADAPTER, "identity LoRA")
        elif library is not None and library.identity is not None:
            notices += _load_adapter(
                unet, str(library.identity), IDENTITY_ADAPTER, "identity LoRA of the library", library_fix
            )
    models = ModelSet(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=unet,
        identity_unet=identity_unet,
        scheduler=parts["scheduler"],
        source=model,
        edit_adapter_weights=weights,
        library=library,
        notices=notices,
    )
    for notice in notices:
        print(f"warning: {notice}", file=sys.stderr)
    for module in (models.vae, models.text_encoder, models.unet, models.identity_unet):
        module.eval().requires_grad_(False)
    models = models.to(device)
    if compile:
        from ipfacediff.models.devices import compile_unets

        compile_unets([models.unet, models.identity_unet])
    return models
