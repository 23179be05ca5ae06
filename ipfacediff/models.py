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
import os
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ipfacediff.errors import UserError

Role = Literal["identity", "edit"]

IDENTITY_ADAPTER = "identity"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
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
    push leaves more of the face.
    """

    identity: Path | None
    edits: tuple[EditAdapter, ...]

    @classmethod
    def read(cls, model_folder: str | Path) -> "AdapterLibrary | None":
        file = Path(model_folder).expanduser() / ADAPTER_LIBRARY
        if not file.is_file():
            return None
        try:
            spec = json.loads(file.read_text())
            identity = file.parent / spec["identity"] if spec.get("identity") else None
            edits = tuple(EditAdapter(name, file.parent / entry["path"], tuple(w.lower() for w in entry["words"]),
                                      entry.get("target", ""), bool(entry.get("hair", False)),
                                      None if entry.get("blend_threshold") is None else
                                      _number("blend_threshold", entry["blend_threshold"], lambda v: 0 <= v < 1, "[0, 1)"),
                                      _number("weight", entry.get("weight", 1.0), lambda v: 0 <= v <= 4, "[0, 4]"),
                                      None if entry.get("guidance") is None else
                                      _number("guidance", entry["guidance"], lambda v: 0 <= v <= 50, "[0, 50]"))
                          for name, entry in spec.get("edits", {}).items())
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{file} is not a valid adapter library ({type(error).__name__}: {error})") from None
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


def _load_components(folder: str, dtype: torch.dtype, allow_pickle: bool) -> dict:
    kwargs = dict(torch_dtype=dtype, use_safetensors=None if allow_pickle else True)
    try:
        return dict(
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", **kwargs),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kwargs),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kwargs),
            scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
        )
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        hint = "" if allow_pickle else " (only .safetensors weights are read; --allow-pickle reads .bin/.ckpt)"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read the model folder {folder}: {first_line[:200]}{hint}") from None


def _load_single_file(path: Path, config: str | None, dtype: torch.dtype, local_files_only: bool) -> dict:
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=config,
            torch_dtype=dtype,
            local_files_only=local_files_only,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except Exception as error:  # conversion and hub errors alike: the user must supply a config
        raise UserError(
            f"cannot load the checkpoint {path.name} ({type(error).__name__}); pass --config with a "
            "diffusers SD-1.x folder or cached hub id describing its architecture"
        ) from None
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
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise UserError(
                f"{path.name} is a pickled checkpoint, which can run code when loaded; convert it to "
                ".safetensors or pass --allow-pickle if you trust it"
            )
        if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
            raise UserError(f"{source} is neither a model folder nor a .safetensors checkpoint")
        return _load_single_file(path, config, dtype, local_files_only)
    if _is_hub_id(source):
        return _load_components(_resolve_repo(source, local_files_only), dtype, allow_pickle)
    raise UserError(f"model {source!r} does not exist: pass a diffusers folder, a .safetensors file or a hub id")


def _load_identity_unet(source: str, dtype: torch.dtype, allow_pickle: bool, local_files_only: bool):
    path = Path(source).expanduser()
    if not path.exists() and _is_hub_id(source):
        path = Path(_resolve_repo(source, local_files_only))
    folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise UserError(
            f"identity model {source!r} is not a diffusers UNet folder (no config.json); pass a model folder, "
            "a UNet folder, or a LoRA file with --identity-lora"
        )
    try:
        return UNet2DConditionModel.from_pretrained(
            str(folder), torch_dtype=dtype, use_safetensors=None if allow_pickle else True
        )
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the identity UNet in {folder}: {str(error).splitlines()[0][:200]}") from None


def _load_adapter(unet: UNet2DConditionModel, path: str, name: str) -> None:
    file = Path(path).expanduser()
    if file.is_dir():
        candidates = sorted(file.glob("*.safetensors"))
        if len(candidates) != 1:
            raise UserError(f"LoRA folder {path} must hold exactly one .safetensors file, found {len(candidates)}")
        file = candidates[0]
    if not file.is_file():
        raise UserError(f"LoRA file {path} does not exist")
    if file.suffix != ".safetensors":
        raise UserError(f"LoRA {file.name} is not a .safetensors file; only safetensors adapters are read")
    from safetensors.torch import load_file

    state = load_file(str(file))
    prefix = "unet" if any(k.startswith("unet.") for k in state) else None
    try:
        with warnings.catch_warnings():  # several adapters in one UNet is the design (ε1 and ε2s)
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            unet.load_lora_adapter(state, adapter_name=name, prefix=prefix)
    except Exception as error:  # peft raises several types for a mismatched adapter
        raise UserError(f"LoRA {file.name} does not fit this UNet: {str(error).splitlines()[0][:200]}") from None


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:WEIGHT``, as ``--edit-lora`` and manifests write an adapter."""
    path, sep, weight = spec.rpartition(":")
    if sep and path and not weight.startswith(("/", "\\")):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


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
) -> ModelSet:
    """Load the full set; ε1 defaults to the base UNet when neither identity option is given.

    A model folder with an :class:`AdapterLibrary` (``adapters=True``) brings its own ε1 and ε2
    adapters: its ε1 unless ``identity_model``/``identity_lora`` is given, its ε2 adapters (picked
    per prompt at edit time) unless ``edit_loras`` is given.
    """
    if local_files_only is None:
        local_files_only = hub_offline()
    if identity_model and identity_lora:
        raise UserError("give either --identity-model or --identity-lora, not both")
    parts = _load_set(model, config=config, dtype=dtype, allow_pickle=allow_pickle, local_files_only=local_files_only)
    library = AdapterLibrary.read(model) if adapters and Path(model).expanduser().is_dir() else None
    unet = parts["unet"]
    weights: dict[str, float] = {}
    for index, (path, weight) in enumerate(edit_loras or []):
        name = f"edit_{index}"
        _load_adapter(unet, path, name)
        weights[name] = float(weight)
    if library is not None and not edit_loras:
        for entry in library.edits:
            _load_adapter(unet, str(entry.path), edit_adapter_name(entry.name))
    elif library is not None:
        library = AdapterLibrary(library.identity, ())
    if identity_model:
        identity_unet = _load_identity_unet(identity_model, dtype, allow_pickle, local_files_only)
    else:
        identity_unet = unet
        if identity_lora or (library is not None and library.identity is not None):
            _load_adapter(unet, identity_lora or str(library.identity), IDENTITY_ADAPTER)
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
    try:
        folder = path if path.is_dir() else Path(_snapshot(source, local_files_only))
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                          dtype=torch.float32)  # FaceWorld ships fp16 weights
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # hub, config and weight errors come in many classes; all mean "unusable"
        text = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        hint = ("it must hold a CLIPModel (config.json, model.safetensors) and its tokenizer files" if path.is_dir()
                else f"download it first with `huggingface-cli download {source}`")
        raise UserError(f"cannot load the CLIP model {source} ({type(error).__name__}: {text}); {hint}") from None
    mean, std = CLIP_MEAN, CLIP_STD
    config_file = folder / "preprocessor_config.json"
    if config_file.is_file():
        try:
            preprocessor = json.loads(config_file.read_text())
            mean, std = preprocessor.get("image_mean", mean), preprocessor.get("image_std", std)
        except (OSError, json.JSONDecodeError):
            pass
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
    byte_symbols = _byte_symbols()
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _byte_symbols() -> list[str]:
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
