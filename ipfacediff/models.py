"""Loading the SD-1.x model set: VAE, text encoder, tokenizer, ε2 (edit UNet), ε1 (identity UNet).

A model set comes from a diffusers folder, a hub id (resolved from the local Hugging Face cache;
``local_files_only`` whenever the hub is offline) or a single ``.safetensors`` checkpoint. ε1 and
ε2 are either two UNets or LoRA adapters over one shared base, so the usual case costs one UNet of
memory. Weights are read as safetensors only; pickled checkpoints run arbitrary code when loaded,
so they need an explicit ``allow_pickle=True``.

:func:`load_clip` loads the CLIP model that training (the directional loss) and evaluation (the
edit-strength scores) share, from a folder or a hub id resolved the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import platform
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ipfacediff.errors import UserError
from ipfacediff.files import (FileProblem, check_file, read_json, read_safetensors, reading, safetensors_header,
                              short_detail)

Role = Literal["identity", "edit"]

IDENTITY_ADAPTER = "identity"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SD_CHECKPOINT_UNET_PREFIX = "model.diffusion_model."  # the UNet's tensors in an original SD-1.x checkpoint
HUB_FILE_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model"]

# OpenAI CLIP's image normalisation; a model folder's preprocessor_config.json overrides it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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


ADAPTER_LIBRARY = Path("adapters") / "adapters.json"


@dataclass(frozen=True)
class EditAdapter:
    """One ε2 adapter of a model folder's library: the attribute it adds and the prompt words
    that ask for it."""

    name: str
    path: Path
    words: tuple[str, ...]
    target: str = ""  # the caption it was trained towards, for the record
    hair: bool = False  # it changes hair: its edits are pasted back with the hair-extended mask
    blend_threshold: float | None = None  # the local blend's threshold its edits were tuned with
    weight: float = 1.0  # the weight it edits at unless the edit names one (tuned like the threshold)
    guidance: float | None = None  # the classifier-free guidance its edits were tuned with
    # Where the tuned values came from when they were not tuned on this model ("faceworld tuning":
    # FaceWorld's values, a starting point); None: tuned on it, or no tuned values.
    defaults_from: str | None = None


@dataclass(frozen=True)
class AdapterLibrary:
    """``MODEL/adapters/adapters.json``: ε1 and per-attribute ε2 LoRA adapters shipped with a model.

    Fine-tuning happens once per model (ε1) and once per model and attribute (ε2); a model folder
    that carries its adapters edits with them without any flag: ε1 is always on, and the ε2
    adapters an edit uses are picked from its prompt (:meth:`pick`)::

        {"identity": "identity/pytorch_lora_weights.safetensors",
         "edits": {"eyeglasses": {"path": "eyeglasses/pytorch_lora_weights.safetensors",
                                  "words": ["eyeglasses", "glasses"], "target": "a face with eyeglasses"},
                   "blonde_hair": {..., "hair": true}}}

    ``hair``: the adapter changes the hair, so its edits are blended back with the hair mask.
    ``blend_threshold`` (optional): the local blend's threshold its edits were tuned with, used
    unless the edit sets one; an edit of a shape (a smile widens the mouth) needs more room than
    where the prompt changes the prediction most. ``weight`` (optional, default 1): the weight the
    adapter edits at when the edit does not name one; tuned on held-out people, it can be below 1
    (or 0) where the base model already draws the attribute better than the adapter does.
    ``guidance`` (optional): the classifier-free guidance its edits were tuned with, used unless
    the edit sets one; an attribute that the adapter draws readily needs less push, and less
    push leaves more of the face. ``defaults_from`` (optional): where those tuned values came
    from when they were not tuned on this model (``"faceworld tuning"``: FaceWorld's values, written
    by ``ipfacediff train library`` as starting values); kept, not acted on. Other keys are ignored.

    A library may also live outside the model folder (``ipfacediff train library --output LIB``,
    read with ``--adapters-dir LIB``: :meth:`read_dir`); its paths are relative to LIB.
    """

    identity: Path | None
    edits: tuple[EditAdapter, ...]

    @classmethod
    def read(cls, model_folder: str | Path) -> "AdapterLibrary | None":
        """``MODEL/adapters/adapters.json``, or None when the model folder has none."""
        file = Path(model_folder).expanduser() / ADAPTER_LIBRARY
        if not os.path.lexists(file):
            return None
        return cls._read_file(file, "fix it (see AdapterLibrary in ipfacediff/models.py) or pass --no-adapter-library")

    @classmethod
    def read_dir(cls, folder: str | Path) -> "AdapterLibrary":
        """The library in ``folder`` (``LIB/adapters.json``; the file itself is accepted too), every
        adapter file it names checked to be there: any problem is one UserError line."""
        path = Path(folder).expanduser()
        if path.name == ADAPTER_LIBRARY.name and not path.is_dir():
            path = path.parent
        check_file(path, "adapter library folder", "give the folder `ipfacediff train library --output LIB` wrote",
                   folder=True)
        file = path / ADAPTER_LIBRARY.name
        if not os.path.lexists(file):
            raise UserError(f"adapter library folder {path} has no {ADAPTER_LIBRARY.name}: it is not a library, or "
                            "its build did not finish (the same `ipfacediff train library` command with --resume "
                            "completes it)")
        library = cls._read_file(file, "fix it (see AdapterLibrary in ipfacediff/models.py) or build the library "
                                       "again with `ipfacediff train library`")
        for name, adapter in [("identity", library.identity), *((e.name, e.path) for e in library.edits)]:
            if adapter is not None:
                check_file(adapter, f"the {name!r} adapter of {file},", "the same `ipfacediff train library` "
                           "command with --resume trains what is missing; or fix its entry")
        return library

    @classmethod
    def _read_file(cls, file: Path, fix: str) -> "AdapterLibrary":
        spec = read_json(file, "adapter library", fix)
        try:
            identity = file.parent / spec["identity"] if spec.get("identity") else None
            edits = tuple(EditAdapter(name, file.parent / entry["path"], tuple(w.lower() for w in entry["words"]),
                                      entry.get("target", ""), bool(entry.get("hair", False)),
                                      None if entry.get("blend_threshold") is None else
                                      _number("blend_threshold", entry["blend_threshold"], lambda v: 0 <= v < 1, "[0, 1)"),
                                      _number("weight", entry.get("weight", 1.0), lambda v: 0 <= v <= 4, "[0, 4]"),
                                      None if entry.get("guidance") is None else
                                      _number("guidance", entry["guidance"], lambda v: 0 <= v <= 50, "[0, 50]"),
                                      None if entry.get("defaults_from") is None else str(entry["defaults_from"]))
                          for name, entry in spec.get("edits", {}).items())
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"{file} is not a valid adapter library ({type(error).__name__}: {error}); {fix}") from None
        return cls(identity, edits)

    def words(self) -> dict[str, list[str]]:
        return {e.name: list(e.words) for e in self.edits}

    def blend_thresholds(self) -> dict[str, float]:
        return {e.name: e.blend_threshold for e in self.edits if e.blend_threshold is not None}

    def guidances(self) -> dict[str, float]:
        return {e.name: e.guidance for e in self.edits if e.guidance is not None}

    def weights(self) -> dict[str, float]:
        """The tuned weights that differ from 1."""
        return {e.name: e.weight for e in self.edits if e.weight != 1.0}


def _number(name: str, value: object, ok, interval: str) -> float:
    """A library entry's number, checked: ``ok(value)`` must hold (``interval`` says it in words)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def pick_edit_adapters(words: dict[str, list[str]], prompt: str, source_prompt: str = "") -> list[str]:
    """Library adapters an edit asks for: those whose words the prompt has and the source prompt
    has not ("a face with a beard and eyeglasses" from "a face with a beard" picks eyeglasses)."""
    asked, there = _words(prompt), _words(source_prompt)
    return [name for name, names in words.items() if asked & set(names) and not there & set(names)]


def _words(text: str) -> set[str]:
    return set("".join(c if c.isalnum() else " " for c in text.lower()).split())


def edit_adapter_name(name: str) -> str:
    """The peft adapter name of library adapter ``name`` in the UNet."""
    return f"edit:{name}"


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

    versions = {"ipfacediff": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__}
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


def _snapshot(source: str, local_files_only: bool) -> str:
    """A hub id's local snapshot folder (from the cache only with ``local_files_only``); hub
    errors propagate."""
    from huggingface_hub import snapshot_download

    return snapshot_download(source, local_files_only=local_files_only, allow_patterns=HUB_FILE_PATTERNS)


def _resolve_repo(source: str, local_files_only: bool) -> str:
    """Turn a hub id into a local snapshot folder, or explain in one line why that is impossible."""
    try:
        return _snapshot(source, local_files_only)
    except Exception as error:  # hub errors come in many classes; all mean "not available"
        where = "in the local Hugging Face cache" if local_files_only else "on the hub"
        raise UserError(
            f"model {source!r} is not a folder, a .safetensors file or a model {where} "
            f"({type(error).__name__}); pass a diffusers folder or download it first with "
            f"`huggingface-cli download {source}`"
        ) from None


# What to do about a damaged part of a model folder (or a UNet folder given as the identity model).
MODEL_FIX = "download the model again or write it again with save_pretrained (`ipfacediff build-tiny-models` for the tiny set)"
# The loggers that list a checkpoint's missing or unused tensors, or repeat an adapter's error, before
# the one line that says what is wrong: quiet while a file is read behind reading().
_LOADING_LOGGERS = ("diffusers.models.modeling_utils", "transformers.modeling_utils",
                    "transformers.utils.loading_report", "diffusers.loaders.peft")
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' weight file names


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


def _weight_files(folder: Path, what: str, allow_pickle: bool) -> list[Path]:
    """The safetensors files ``from_pretrained`` reads in ``folder`` (one, or the shards its index
    lists); [] for pickled weights with ``allow_pickle``; else one UserError line."""
    for stem in _WEIGHT_STEMS:
        single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
        if os.path.lexists(single):
            return [single]
        if os.path.lexists(index):
            table = read_json(index, f"{what} weight index", MODEL_FIX)
            with reading(index, f"{what} weight index", MODEL_FIX):
                if not isinstance(table, dict) or not isinstance(table.get("weight_map"), dict):
                    raise FileProblem("is not a safetensors index (no weight_map)")
                return [folder / name for name in sorted(set(table["weight_map"].values()))]
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled and allow_pickle:
        return []
    if pickled:
        raise UserError(f"{what} folder {folder} holds only pickled weights ({pickled[0]}), which can run code when "
                        "loaded; convert them to .safetensors or pass --allow-pickle if you trust them")
    raise UserError(f"{what} folder {folder} has no weights ({_WEIGHT_STEMS[0]}.safetensors or "
                    f"{_WEIGHT_STEMS[1]}.safetensors); {MODEL_FIX}")


def _load_part(cls, folder: Path, what: str, dtype: torch.dtype, allow_pickle: bool):
    """A weighted part (UNet, VAE, text encoder) from its folder, every file read behind
    :func:`~ipfacediff.files.reading`: its config must be JSON, its safetensors complete, and its
    weights must be this part's (a missing tensor would be left unset)."""
    read_json(folder / "config.json", f"{what} config", MODEL_FIX)  # also: the folder exists
    files = _weight_files(folder, what, allow_pickle)
    for file in files:
        safetensors_header(file, f"{what} weight file", MODEL_FIX)
    # A problem of the weights names the weight file (or the folder of the shards).
    weights = dict(path=files[0], what=f"{what} weight file") if len(files) == 1 else {}
    with reading(folder, f"{what} folder", MODEL_FIX, folder=True), _quiet_loading():
        try:
            module, info = cls.from_pretrained(str(folder), torch_dtype=dtype, output_loading_info=True,
                                               use_safetensors=None if allow_pickle else True)
        except (ValueError, RuntimeError) as error:
            if "size mismatch" not in str(error) and "expected shape" not in str(error):
                raise
            raise FileProblem(f"holds weights of other shapes than {folder / 'config.json'} describes "
                              f"({short_detail(error)})", **weights) from None
        missing = list(info.get("missing_keys") or [])
        if missing:
            total = len(module.state_dict())
            raise FileProblem(f"does not hold the weights of this {what} ({len(missing)} of its {total} tensors "
                              f"are missing, such as {sorted(missing)[0]!r})", **weights)
    return module


def _load_components(folder: str, dtype: torch.dtype, allow_pickle: bool) -> dict:
    root = Path(folder)
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

    fix = "pass a Stable Diffusion 1.x .safetensors checkpoint (download it again if it is damaged) or a diffusers folder"
    if path.suffix == ".safetensors":  # pickles (--allow-pickle) have no header to check first
        tensors = safetensors_header(path, "checkpoint", fix)
        if not any(name.startswith(SD_CHECKPOINT_UNET_PREFIX) for name in tensors):
            first = f"; its first tensor is {next(iter(sorted(tensors)))!r}" if tensors else ""
            raise UserError(f"checkpoint {path} is not a Stable Diffusion 1.x checkpoint (it has no "
                            f"'{SD_CHECKPOINT_UNET_PREFIX}*' UNet tensors{first}); {fix}")
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
    return dict(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
    )


def _load_set(source: str, *, config: str | None, dtype: torch.dtype, allow_pickle: bool,
              local_files_only: bool) -> dict:
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
        return _load_components(_resolve_repo(source, local_files_only), dtype, allow_pickle)
    raise UserError(f"model {source!r} does not exist: pass a diffusers folder, a .safetensors file or a hub id")


def _load_identity_unet(source: str, dtype: torch.dtype, allow_pickle: bool, local_files_only: bool):
    fix = "pass a model folder, a UNet folder, or a LoRA file with --identity-lora"
    path = Path(source).expanduser()
    if not os.path.lexists(path) and _is_hub_id(source):
        path = Path(_resolve_repo(source, local_files_only))
    check_file(path, "identity model", fix, folder=True)
    folder = path / "unet" if os.path.lexists(path / "unet" / "config.json") else path
    if not os.path.lexists(folder / "config.json"):
        raise UserError(
            f"identity model {source!r} is not a diffusers UNet folder (no config.json); pass a model folder, "
            "a UNet folder, or a LoRA file with --identity-lora"
        )
    return _load_part(UNet2DConditionModel, folder, "identity UNet", dtype, allow_pickle)


LORA_FIX = "pass a LoRA .safetensors file that `ipfacediff train` (or diffusers/peft) wrote for this model"
# Tensor names of the LoRA formats diffusers' load_lora_adapter reads (peft's lora_A/lora_B and
# diffusers' older lora.down/lora.up); kohya/A1111 names (lora_unet_..., lora_down) are not read.
_LORA_TENSOR = re.compile(r"(^|\.)(lora_[AB]|lora\.(down|up)|lora_linear_layer\.(down|up)|lora_magnitude_vector)(\.|$)")


def _load_adapter(unet: UNet2DConditionModel, path: str, name: str, what: str = "LoRA file",
                  fix: str = LORA_FIX) -> None:
    """Add the LoRA in ``path`` (a .safetensors file, or a folder holding one) to ``unet`` as
    adapter ``name``; the file is read behind :func:`~ipfacediff.files.reading`: ``what`` and
    ``fix`` word its error line."""
    file = Path(path).expanduser()
    if file.is_dir():
        candidates = sorted(file.glob("*.safetensors"))
        if len(candidates) != 1:
            raise UserError(f"LoRA folder {file} must hold exactly one .safetensors file, found {len(candidates)}; {fix}")
        file = candidates[0]
    check_file(file, what, fix)
    if file.suffix != ".safetensors":
        raise UserError(f"{what} {file} is not a .safetensors file; only safetensors adapters are read: {fix}")
    tensors = safetensors_header(file, what, fix)
    if not any(_LORA_TENSOR.search(key) for key in tensors):
        first = f"; its first tensor is {next(iter(sorted(tensors)))!r}" if tensors else ", it holds no tensors"
        raise UserError(f"{what} {file} holds no LoRA weights in the diffusers/peft format (tensors named like "
                        f"'unet.<layer>.lora_A.weight'{first}); {fix}")
    state = read_safetensors(file, what, fix)
    prefix = "unet" if any(k.startswith("unet.") for k in state) else None
    with reading(file, what, fix), _quiet_loading(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # ε1 and ε2s share a UNet
        try:
            unet.load_lora_adapter(state, adapter_name=name, prefix=prefix)
        except Exception as error:  # peft raises several types for a mismatched adapter
            raise FileProblem(f"does not fit this UNet ({short_detail(error)})") from None
        if name not in (getattr(unet, "peft_config", None) or {}):
            raise FileProblem("holds no LoRA weights for this UNet (none of its tensors matched a layer)")


LORA_WEIGHT_RANGE = (-10.0, 10.0)  # far past any useful strength; a typo like 80 for 0.8 is caught


def lora_weight(value: object, name: str) -> float:
    """The weight of adapter ``name``, checked: a finite number in :data:`LORA_WEIGHT_RANGE`."""
    low, high = LORA_WEIGHT_RANGE
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"weight {value!r} of {name} is not a number; give a number from {low:g} to {high:g} "
                            f"after the colon, such as {name}:0.8") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise UserError(f"weight {value!r} of {name} must be a finite number from {low:g} to {high:g}; "
                        f"give one after the colon, such as {name}:0.8 (1 is the adapter as trained)")
    return float(value)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:WEIGHT`` (or ``NAME[:WEIGHT]`` of a library adapter), as ``--edit-lora``,
    manifests and ``--adapters`` write an adapter. A colon followed by a path (``C:/x``) or in the
    name of an existing file is part of the path; any other text after the last colon must be a
    weight (:func:`lora_weight`), so ``x.safetensors:O.8`` is an error, not a missing file."""
    path, sep, weight = spec.rpartition(":")
    if not sep or not path or any(c in weight for c in "/\\") or _exists(spec):
        return spec, 1.0
    return path, lora_weight(weight.strip(), path)


def _exists(path: str) -> bool:
    try:
        return os.path.lexists(Path(path).expanduser())
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def load_model_set(
    model: str,
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
) -> ModelSet:
    """Load the full set; ε1 defaults to the base UNet when neither identity option is given.

    A model folder with an :class:`AdapterLibrary` (``adapters=True``) brings its own ε1 and ε2
    adapters: its ε1 unless ``identity_model``/``identity_lora`` is given, its ε2 adapters (picked
    per prompt at edit time) unless ``edit_loras`` is given. ``adapters_dir``: a library kept
    outside the model folder (``ipfacediff train library --output LIB``), used instead of the
    model folder's own; checked before the model loads.
    """
    if local_files_only is None:
        local_files_only = hub_offline()
    if identity_model and identity_lora:
        raise UserError("give either --identity-model or --identity-lora, not both")
    if adapters_dir is not None and not adapters:
        raise UserError("--adapters-dir names an adapter library and --no-adapter-library turns libraries off: "
                        "give one of them")
    edit_loras = [(path, lora_weight(weight, path)) for path, weight in edit_loras or []]  # before minutes of loading
    library = AdapterLibrary.read_dir(adapters_dir) if adapters_dir is not None else None
    parts = _load_set(model, config=config, dtype=dtype, allow_pickle=allow_pickle, local_files_only=local_files_only)
    if adapters_dir is None:
        library = AdapterLibrary.read(model) if adapters and Path(model).expanduser().is_dir() else None
    unet = parts["unet"]
    weights: dict[str, float] = {}
    for index, (path, weight) in enumerate(edit_loras):
        name = f"edit_{index}"
        _load_adapter(unet, path, name, "edit LoRA")
        weights[name] = weight
    if adapters_dir is not None:
        library_file = Path(adapters_dir).expanduser()
        library_file = library_file if library_file.name == ADAPTER_LIBRARY.name else library_file / ADAPTER_LIBRARY.name
        library_fix = (f"fix its entry in {library_file}, or build the library for this model with "
                       "`ipfacediff train library`")
    else:
        library_fix = f"fix its entry in {Path(model).expanduser() / ADAPTER_LIBRARY} or pass --no-adapter-library"
    if library is not None and not edit_loras:
        for entry in library.edits:
            _load_adapter(unet, str(entry.path), edit_adapter_name(entry.name), f"LoRA of adapter {entry.name!r}",
                          library_fix)
    elif library is not None:
        library = AdapterLibrary(library.identity, ())
    if identity_model:
        identity_unet = _load_identity_unet(identity_model, dtype, allow_pickle, local_files_only)
    else:
        identity_unet = unet
        if identity_lora:
            _load_adapter(unet, identity_lora, IDENTITY_ADAPTER, "identity LoRA")
        elif library is not None and library.identity is not None:
            _load_adapter(unet, str(library.identity), IDENTITY_ADAPTER, "identity LoRA of the library", library_fix)
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
    )
    for module in (models.vae, models.text_encoder, models.unet, models.identity_unet):
        module.eval().requires_grad_(False)
    return models.to(device)


# ---------------------------------------------------------------------------------------------
# CLIP: image and text embeddings for the edit model's directional loss and the evaluation.


@dataclass
class ClipScorer:
    """A frozen CLIPModel with its tokenizer and the image normalisation, all in torch."""

    model: torch.nn.Module
    tokenizer: CLIPTokenizer
    image_size: int
    mean: torch.Tensor
    std: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ClipScorer":
        self.model.to(device=device, dtype=dtype)
        return self

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> CLIP's input: resized (bicubic, antialiased), clamped
        to [0, 1] and normalised. Differentiable; the faces are square, so no crop is needed."""
        x = (images.float().clamp(-1, 1) + 1) / 2
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False, antialias=True).clamp(0, 1)
        mean, std = self.mean.to(x.device).view(1, 3, 1, 1), self.std.to(x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.model.dtype)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float32 embeddings (B, D) of images in [-1, 1], on the model's device;
        differentiable."""
        device = next(self.model.parameters()).device
        features = self.model.get_image_features(pixel_values=self.pixels(images.to(device)))
        return F.normalize(_pooled(features).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Normalised float32 embeddings (len(texts), D), on the model's device."""
        limit = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        device = next(self.model.parameters()).device
        features = self.model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                attention_mask=tokens["attention_mask"].to(device))
        return F.normalize(_pooled(features).float(), dim=-1)

    def text_direction(self, source: str, target: str) -> torch.Tensor:
        """Unit vector E_T(target) − E_T(source), (1, D)."""
        source_embedding, target_embedding = self.text_embeddings([source, target])
        return F.normalize((target_embedding - source_embedding)[None], dim=-1)


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip(source: str, *, local_files_only: bool | None = None) -> ClipScorer:
    """A frozen CLIPModel and its tokenizer from a folder or a hub id (from the local Hugging Face
    cache only whenever the hub is offline), on the CPU. Weights are read as safetensors only."""
    from transformers import CLIPModel

    if local_files_only is None:
        local_files_only = hub_offline()
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"CLIP model folder {source} has no config.json: pass a folder written by "
                            "CLIPModel.save_pretrained (with its tokenizer files) or a hub id")
    elif path.exists():
        raise UserError(f"CLIP model {source} is a file: pass a CLIPModel folder or a hub id such as "
                        "openai/clip-vit-base-patch32")
    elif not _is_hub_id(source):
        raise UserError(f"CLIP model {source} does not exist: pass a CLIPModel folder or a hub id such as "
                        "openai/clip-vit-base-patch32")
    clip_fix = "pass a folder written by CLIPModel.save_pretrained (with its tokenizer files) or a hub id"
    if path.is_dir():  # its files read behind reading(): a damaged one is named, not a library's error
        read_json(path / "config.json", "CLIP config", clip_fix)
        for file in _weight_files(path, "CLIP model", allow_pickle=False):
            safetensors_header(file, "CLIP weight file", clip_fix)
    try:
        folder = path if path.is_dir() else Path(_snapshot(source, local_files_only))
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                          dtype=torch.float32)  # FaceWorld ships fp16 weights
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # hub, config and weight errors come in many classes; all mean "unusable"
        hint = ("it must hold a CLIPModel (config.json, model.safetensors) and its tokenizer files" if path.is_dir()
                else f"download it first with `huggingface-cli download {source}`")
        raise UserError(f"cannot load the CLIP model {source} ({short_detail(error)}); {hint}") from None
    mean, std = CLIP_MEAN, CLIP_STD
    config_file = folder / "preprocessor_config.json"
    if os.path.lexists(config_file):
        preprocessor = read_json(config_file, "CLIP preprocessor config", clip_fix)
        with reading(config_file, "CLIP preprocessor config", clip_fix):
            mean, std = preprocessor.get("image_mean", mean), preprocessor.get("image_std", std)
            if not all(len(v) == 3 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
                       for v in (mean, std)) or min(std) <= 0:
                raise FileProblem("has no 3-number image_mean and positive image_std")
    model.eval().requires_grad_(False)
    return ClipScorer(model, tokenizer, int(model.config.vision_config.image_size),
                      torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# Tiny models: the real classes at toy size, so tests and the offline demo run the real loader.


def clip_bpe_tokenizer() -> CLIPTokenizer:
    """CLIP's real BPE vocabulary (49,408 tokens), read from the file open_clip_torch ships.

    open_clip is not imported (it needs torchvision); only its vocabulary file is read.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("open_clip_torch is not installed: it ships CLIP's BPE vocabulary (pip install --no-deps open_clip_torch)")
    bpe_path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def byte_symbols() -> list[str]:
    """The byte-level alphabet of GPT-2/CLIP BPE, in vocabulary order.

    Printable bytes stand for themselves; the other bytes get characters from 256 upwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def build_tiny_models(directory: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random SD-1.x-layout model set (plus ``clip/``, a tiny CLIPModel) to ``directory``.

    Same classes, same folder layout and same scheduler as SD-1.5 (64x64 images, f=4 latents of
    16x16, self- and cross-attention at two resolutions), small enough for CPU tests.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    directory = Path(directory)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=64,
    )
    with torch.no_grad():  # unit-variance latents, as SD's scaling factor gives its real VAE
        probe = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        std = vae.encode(probe).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_bpe_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(**SD1_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)

    clip = CLIPModel(CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        projection_dim=32,
    ))
    clip.save_pretrained(directory / "clip", safe_serialization=True)
    pipe.tokenizer.save_pretrained(directory / "clip")
    return directory
