"""Train the FaceWorld model set from scratch: tokenizer, mini CLIP, VAE and UNet.

No real Stable Diffusion weights can be downloaded where this project is built, so it trains small
models of the very same classes on FaceWorld renders and writes them exactly as an SD-1.x model
folder (``vae/ text_encoder/ tokenizer/ unet/ scheduler/ model_index.json``, fp16 safetensors),
which :func:`ipfacediff.models.load_model_set` reads like any other, plus ``OUTPUT/clip`` (the
whole CLIPModel with its tokenizer, for the directional CLIP loss and the evaluation) and
``OUTPUT/training.json`` (what was trained, for how long, how well, with which versions).

    ipfacediff faceworld train OUTPUT [--preset smoke|cpu-1h|cpu|gpu] [--device auto] [--resume]
    (the same as python -m faceworld train ...)

The stages run in order, each on the last one's result:

1. data: training-split items of :func:`faceworld.dataset`, each rendered twice, with
   its own attributes and with one captioned attribute changed (same person, pose, light and
   backdrop: the hard negative CLIP needs to look at the attributes rather than the person);
   a few more items, never trained on, are held out for the scores;
2. tokenizer: CLIP's real BPE class over the 256 byte symbols plus one whole-word token for each
   word of FaceWorld captions and of common prompts (any other word falls back to bytes);
3. clip: a small CLIPModel trained contrastively on the renders and their captions; its text
   tower is the SD folder's text encoder, frozen afterwards as in SD;
4. vae: an f=4 AutoencoderKL (64x64 images, 16x16x4 latents), L1 + L2 + a tiny KL; its
   ``scaling_factor`` makes the training latents unit-variance, as SD's does;
5. encode: the training latents, once, for the UNet;
6. unet: a UNet2DConditionModel, DDPM ε-prediction on SD-1's noise schedule, cross-attending to
   the frozen text encoder, with 10 % of the captions dropped for classifier-free guidance;
7. decoder: the VAE's decoder alone fine-tuned on the frozen encoder's latents (as SD's "ft-MSE"
   decoder was), with the face weighted above the backdrop and an edge term. The latent space
   does not move, so the UNet stays valid; what it buys is the face: after the joint VAE stage
   the backdrop dominates the loss, and the decoder blurs the eyes, nose and mouth an identity
   net looks at (a round trip through the cpu-1h VAE kept identity similarity at 0.41-0.90).

Every stage writes its state to ``OUTPUT/train_state/`` (safetensors and JSON: nothing is
unpickled) at the end and every ``checkpoint_seconds`` during training, so ``--resume`` carries
on a killed run from its last checkpoint; the folder is removed once the model set is saved.

Each training stage stops after its planned steps or its wall-clock cap, whichever comes first,
and its learning rate follows a cosine over that same progress, so a slower machine still ends
with a decayed learning rate within the preset's time. ``training.json`` records the steps done.
On a CPU shared with other jobs, ``OMP_NUM_THREADS=1`` can be several times faster than threads
that wait on each other (the smoke preset: 6 s of training against 36 s with two threads).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ipfacediff.diffusion import Progress
from ipfacediff.errors import UserError
from faceworld.attributes import Attributes, caption
from faceworld.identity import HAIR_COLOURS
from faceworld.scene import dataset_item, random_attributes
from ipfacediff.files import write_json
from ipfacediff.job import pick_device
from ipfacediff.models import CLIP_MEAN, CLIP_STD, SD1_SCHEDULER_CONFIG, byte_symbols, library_versions

SIZE = 64  # image side: FaceWorld's aligned crops, and the SD folder's resolution
MAX_LENGTH = 32  # tokens per prompt (SD's 77 is mostly padding); the longest FaceWorld caption needs 17
STATE_DIR = "train_state"
SHIPPED_LIMIT_BYTES = 30_000_000  # the whole fp16 model set, CLIP included

CAPTION_DROPOUT = 0.1  # the share of empty prompts, so the UNet also learns ε(x, "") for guidance
MIN_SNR_GAMMA = 5.0  # min-SNR loss weighting (Hang et al. 2023): several times faster convergence
KL_WEIGHT = 1e-6  # keeps the latents near a unit Gaussian without costing reconstruction
GRAD_CLIP = 1.0

# Words that get a whole-word token besides those of FaceWorld captions: what people type in edit
# prompts. Words the models never saw in training still tokenize; this keeps them short.
PROMPT_WORDS = (
    "a an the of and or with without in on to into add remove make turn give wearing wears has is are "
    "photo picture portrait image face faces person people man woman boy girl head "
    "glasses eyeglasses sunglasses spectacles hair hairs blonde blond beard bearded moustache mustache "
    "smiling smile smiles happy laughing grin teeth old older elderly young younger age aged hat cap "
    "black brown red grey gray white golden yellow dark light long short curly straight eyes mouth nose"
).split()


# ---------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class Stage:
    """One training stage: it stops after ``steps`` or ``seconds``, whichever comes first."""

    steps: int
    batch: int
    lr: float
    seconds: float
    warmup: int = 100  # steps of linear warm-up


@dataclass(frozen=True)
class Architecture:
    """Model sizes; the text tower is both CLIP's and the UNet's text encoder."""

    text_hidden: int = 128
    text_layers: int = 4
    vision_hidden: int = 128
    vision_layers: int = 4
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_layers: int = 1
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_layers: int = 2


@dataclass(frozen=True)
class Preset:
    pairs: int  # training items, each rendered twice (own attributes, then a hard negative)
    held_out_pairs: int  # further items, never trained on: VAE PSNR, CLIP accuracy, UNet loss
    clip: Stage
    vae: Stage
    unet: Stage
    decoder: Stage | None = None  # the decoder-only fine-tune; None skips it
    architecture: Architecture = field(default_factory=Architecture)
    checkpoint_seconds: float = 120.0
    evaluate_seconds: float = 120.0  # held-out scores during training, for the trend


MINUTE = 60.0
PRESETS: dict[str, Preset] = {
    # A few steps of each stage on the cpu architecture: the whole pipeline in well under a minute.
    "smoke": Preset(
        pairs=32,
        held_out_pairs=4,
        clip=Stage(4, 8, 1e-3, MINUTE, warmup=1),
        vae=Stage(3, 4, 2e-3, MINUTE, warmup=1),
        unet=Stage(4, 8, 1e-3, MINUTE, warmup=1),
        decoder=Stage(3, 4, 5e-4, MINUTE, warmup=1),
        checkpoint_seconds=0.0,
        evaluate_seconds=math.inf,
    ),
    # About 130 minutes on two CPU cores (100 before the decoder stage). The VAE limits quality
    # first (PSNR 19 dB after 4 minutes, 21.5 after 10 and still rising), so it gets the largest
    # share; the UNet needs thousands of steps before attributes appear (2,500 drew faint eyeglasses).
    "cpu": Preset(
        pairs=8000,
        held_out_pairs=32,
        clip=Stage(2000, 32, 1e-3, 8 * MINUTE),
        vae=Stage(5000, 8, 2e-3, 45 * MINUTE),
        unet=Stage(6500, 32, 1e-3, 38 * MINUTE, warmup=200),
        decoder=Stage(6000, 8, 5e-4, 30 * MINUTE),
    ),
    # The cpu schedule's first stages cut to about an hour, plus the decoder stage (30 min), for
    # a session that cannot wait two hours (the shipped default until a GPU was lent).
    "cpu-1h": Preset(
        pairs=4000,
        held_out_pairs=32,
        clip=Stage(1200, 32, 1e-3, 5 * MINUTE),
        vae=Stage(2500, 8, 2e-3, 22 * MINUTE),
        unet=Stage(3500, 32, 1e-3, 25 * MINUTE, warmup=200),
        decoder=Stage(6000, 8, 5e-4, 30 * MINUTE),
    ),
    # Batches large enough to fill the GPU and bf16 autocast; every stage stops at its time cap.
    # Measured on one H100 with 16 cores: 240 s (rendering 14 s; CLIP 723 steps, VAE 2457, UNet
    # 980, decoder 1693: kernel launches, not arithmetic, bound these small models), about 4.5 min
    # with start-up. The shipped default. The architecture stays the cpu one: a wider UNet
    # (48, 96, 192) would take the shipped set (with oracles and adapters) past 30 MB.
    "gpu": Preset(
        pairs=20000,
        held_out_pairs=128,
        clip=Stage(4000, 256, 2e-3, 25),
        vae=Stage(10000, 64, 2e-3, 80, warmup=200),
        unet=Stage(8000, 256, 1e-3, 90, warmup=200),
        decoder=Stage(4000, 64, 5e-4, 30, warmup=100),
        checkpoint_seconds=30.0,
        evaluate_seconds=30.0,
    ),
}


# ---------------------------------------------------------------------------------------------
# Tokenizer


def caption_words() -> list[str]:
    """Every word a FaceWorld caption can use (captions of all attributes, each hair colour)."""
    everything = [
        Attributes(eyeglasses=True, hair_colour=c, beard=True, smile=1.0, age=1.0, hat=True) for c in HAIR_COLOURS
    ]
    texts = [caption(a) for a in everything] + [caption(Attributes(age=1.0))]  # "an old face"
    return sorted({word for text in texts for word in re.findall(r"[a-z]+", text)})


def build_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer (real BPE) over the byte symbols plus one token for each word of
    :func:`caption_words` and :data:`PROMPT_WORDS`; ``model_max_length`` is :data:`MAX_LENGTH`.

    The vocabulary is laid out as CLIP's: the 256 byte symbols, the same with ``</w>``, the merged
    tokens, then ``<|startoftext|>`` and ``<|endoftext|>``. Each word's merges are found by running
    BPE with the merges so far and joining its first two symbols until one is left; every merge is
    ranked after all earlier ones, so it never changes how an earlier word tokenizes.
    """
    words = list(dict.fromkeys([*caption_words(), *PROMPT_WORDS]))
    symbols = byte_symbols()
    vocab = {token: index for index, token in enumerate(symbols + [s + "</w>" for s in symbols])}
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not re.fullmatch(r"[a-z]+", word):  # letters are their own byte symbols; others are not
            raise ValueError(f"vocabulary words must be lowercase ASCII letters, got {word!r}")
        while len(parts := _bpe([*word[:-1], word[-1] + "</w>"], ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            vocab.setdefault(parts[0] + parts[1], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=MAX_LENGTH)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word: merge the best-ranked adjacent pair (all its occurrences) until
    no known pair is left."""
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


# ---------------------------------------------------------------------------------------------
# Models


def build_clip(arch: Architecture, tokenizer: CLIPTokenizer) -> CLIPModel:
    """A small CLIP: 64x64 images in 8x8 patches; text of ``tokenizer.model_max_length`` tokens."""
    text = clip_text_config(arch, tokenizer)
    heads = arch.vision_hidden // 32
    vision = dict(
        image_size=SIZE,
        patch_size=8,
        hidden_size=arch.vision_hidden,
        intermediate_size=4 * arch.vision_hidden,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=heads,
        projection_dim=arch.text_hidden,
    )
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=arch.text_hidden))


def clip_text_config(arch: Architecture, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    # The eos id matters: CLIP pools the hidden state at the first <|endoftext|> of each prompt.
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_hidden,
        intermediate_size=4 * arch.text_hidden,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_hidden // 32,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=arch.text_hidden,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos,
        pad_token_id=eos,
    )


def build_vae(arch: Architecture) -> AutoencoderKL:
    """f=4 (three blocks, two downsamplings): 64x64x3 images <-> 16x16x4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=SIZE,
        block_out_channels=arch.vae_channels,
        layers_per_block=arch.vae_layers,
        norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * len(arch.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(arch.vae_channels),
    )


def build_unet(arch: Architecture) -> UNet2DConditionModel:
    """SD-1's layout, shrunk: self- and cross-attention at 16x16 and 8x8, a plain block at 4x4,
    an attention mid block; heads of 16 channels."""
    channels = arch.unet_channels
    down = ("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1)
    return UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=arch.unet_layers,
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=arch.text_hidden,
        attention_head_dim=tuple(c // 16 for c in channels),
        norm_num_groups=16,
    )


def shipped_fp16_bytes(preset: str) -> int:
    """The fp16 size of the weights a preset ships, from parameter counts (nothing is trained):
    VAE, UNet, the text encoder, and the whole CLIP (whose text tower is a second copy of it)."""
    arch = PRESETS[preset].architecture
    tokenizer = build_tokenizer()
    modules = [
        build_vae(arch),
        build_unet(arch),
        CLIPTextModel(clip_text_config(arch, tokenizer)),
        build_clip(arch, tokenizer),
    ]
    return 2 * sum(p.numel() for m in modules for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Data:
    """Training renders (pairs: item ``k`` is images ``2k`` and ``2k + 1``, its hard negative) and
    held-out ones, uint8 (N, 3, 64, 64) on the training device, with caption indices."""

    images: torch.Tensor
    caption_ids: np.ndarray
    held_out: torch.Tensor
    held_out_caption_ids: np.ndarray
    captions: list[str]


def _hard_negative(attributes: Attributes, rng: np.random.Generator) -> Attributes:
    """The same face with one captioned attribute redrawn (from the training distribution)."""
    while True:
        name = str(rng.choice(["eyeglasses", "hair_colour", "beard", "smile", "age", "hat"]))
        other = attributes.replace(**{name: getattr(random_attributes(rng), name)})
        if caption(other) != caption(attributes):
            return other


def render_pairs(span: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    """Items ``start .. stop - 1`` of ``dataset("train", ..., seed)``, each followed by its hard
    negative: (2n, 64, 64, 3) uint8 and the captions. A process-pool worker."""
    start, stop, seed = span
    images, captions = [], []
    for index in range(start, stop):
        item = dataset_item("train", index, seed)  # what dataset("train", ..., seed) yields at index
        negative = _hard_negative(item.attributes, np.random.default_rng([seed, index, 0x4E6]))
        images += [item.render(SIZE), item.render(SIZE, negative)]
        captions += [caption(item.attributes), caption(negative)]
    return np.stack(images), captions


def render_data(preset: Preset, seed: int, progress: Progress | None = None) -> tuple[np.ndarray, list[str]]:
    """All renders, training pairs first, then the held-out ones, on a process per CPU core.

    Rendering (~1.5 ms per image and core) is numpy/OpenCV work, so processes, not threads."""
    total = preset.pairs + preset.held_out_pairs
    chunk = 250
    spans = [(start, min(start + chunk, total), seed) for start in range(0, total, chunk)]
    workers = min(os.cpu_count() or 1, len(spans))
    images, captions = [], []
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        for done, (array, texts) in enumerate((pool.map if pool else map)(render_pairs, spans), 1):
            images.append(array)
            captions += texts
            if progress:
                progress("render", done, len(spans))
    return np.concatenate(images), captions


def _load_data(state: _State, preset: Preset, seed: int, device: torch.device, progress: Progress | None) -> Data:
    if state.has("data"):
        tensors, meta = state.load("data")
        images, captions = tensors["images"].numpy(), json.loads(meta["captions"])
    else:
        images, captions = render_data(preset, seed, progress)
        state.save("data", {"images": torch.from_numpy(images)}, {"captions": json.dumps(captions)})
    unique = sorted(set(captions))
    position = {text: i for i, text in enumerate(unique)}
    ids = np.array([position[text] for text in captions])
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    cut = 2 * preset.pairs
    return Data(images[:cut], ids[:cut], images[cut:], ids[cut:], unique)


# ---------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file per stage, its JSON in the metadata


class _State:
    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def save(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.folder / f".{name}.{os.getpid()}.tmp"  # renamed whole: a kill leaves the old file
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(temporary), metadata=meta)
        os.replace(temporary, self.path(name))

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        with safe_open(str(self.path(name)), "pt") as file:
            meta = file.metadata() or {}
        return load_file(str(self.path(name))), meta


@dataclass
class StageLog:
    """What a training stage did: steps, seconds (all runs), the loss curve, held-out scores."""

    steps: int = 0
    seconds: float = 0.0
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, mean loss since the last point]
    evaluations: list[list[float]] = field(default_factory=list)  # [step, seconds, score]
    done: bool = False


def _save_stage(
    state: _State, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, log: StageLog
) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta = {"log": json.dumps(asdict(log))}
    if optimizer is not None:  # AdamW's state is all tensors (step included); the groups are JSON
        optim = optimizer.state_dict()
        tensors |= {f"optim.{i}.{k}": v for i, values in optim["state"].items() for k, v in values.items()}
        meta["param_groups"] = json.dumps(optim["param_groups"])
    state.save(name, tensors, meta)


def _load_stage(state: _State, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> StageLog:
    if not state.has(name):
        return StageLog()
    tensors, meta = state.load(name)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    log = StageLog(**json.loads(meta["log"]))
    if not log.done:
        optim: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                index, slot = key[6:].split(".", 1)
                optim.setdefault(int(index), {})[slot] = value
        optimizer.load_state_dict({"state": optim, "param_groups": json.loads(meta["param_groups"])})
    return log


# ---------------------------------------------------------------------------------------------
# The training loop all three models share


@dataclass
class _Context:
    device: torch.device
    seed: int
    state: _State
    preset: Preset
    progress: Progress | None

    def rng(self, stage: str, step: int) -> np.random.Generator:
        """The randomness of one step, from (seed, stage, step) alone: a resumed run draws the
        very batches and noise an uninterrupted one would have."""
        return np.random.default_rng([self.seed, int.from_bytes(stage.encode(), "little"), step])

    def generator(self, rng: np.random.Generator) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(int(rng.integers(2**62)))

    def autocast(self):
        # bf16 on CUDA for speed (no loss scaling needed); CPUs train in fp32.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")


def _train_stage(
    ctx: _Context,
    name: str,
    model: torch.nn.Module,
    stage: Stage,
    loss_at: Callable[[int], torch.Tensor],
    evaluate: Callable[[], float],
) -> StageLog:
    """AdamW with warm-up and a cosine decay over max(steps done / steps, seconds / cap)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.01, fused=ctx.device.type == "cuda")
    log = _load_stage(ctx.state, name, model, optimizer)
    if log.done:
        return log
    started = time.perf_counter() - log.seconds
    last_save = last_evaluation = time.perf_counter()
    every = max(1, stage.steps // 100)  # ~100 points on the loss curve
    running, count = torch.zeros((), device=ctx.device), 0
    while (fraction := max(log.steps / stage.steps, (time.perf_counter() - started) / stage.seconds)) < 1:
        for group in optimizer.param_groups:
            group["lr"] = stage.lr * min(1.0, (log.steps + 1) / stage.warmup) * 0.5 * (1 + math.cos(math.pi * fraction))
        with ctx.autocast():
            loss = loss_at(log.steps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.steps += 1
        running, count = running + loss.detach().float(), count + 1  # no .item(): the GPU runs ahead
        if log.steps % every == 0:
            log.loss_curve.append([log.steps, round(running.item() / count, 6)])
            running, count = torch.zeros((), device=ctx.device), 0
        now = time.perf_counter()
        log.seconds = now - started
        # Scored in train mode: no model here has dropout or batch norm, so it scores the same.
        if now - last_evaluation >= ctx.preset.evaluate_seconds:
            log.evaluations.append([log.steps, round(log.seconds, 1), round(evaluate(), 4)])
            last_evaluation = now
        if now - last_save >= ctx.preset.checkpoint_seconds:
            _save_stage(ctx.state, name, model, optimizer, log)
            last_save = now
        if ctx.progress:
            ctx.progress(name, log.steps, stage.steps)
    if count:
        log.loss_curve.append([log.steps, round(running.item() / count, 6)])
    log.evaluations.append([log.steps, round(time.perf_counter() - started, 1), round(evaluate(), 4)])
    log.done = True
    _save_stage(ctx.state, name, model, None, log)
    return log


def _indices(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host indices on ``device``. A plain copy to a GPU waits for all the work queued before it;
    from pinned memory it is queued too, so the CPU keeps running ahead of the GPU."""
    tensor = torch.from_numpy(array)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def _batch(images: torch.Tensor, index: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 images at ``index`` -> float in [-1, 1]."""
    return images[_indices(index, device)].float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# Stages


def _clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> CLIP's normalised input, as :meth:`ipfacediff.models.ClipScorer.pixels`
    prepares them (64x64 already, so no resize)."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def train_clip(ctx: _Context, data: Data, tokenizer: CLIPTokenizer) -> tuple[CLIPModel, StageLog]:
    """Contrastive image-caption training. Each batch holds whole pairs, so every caption meets
    its image's hard negative; captions that repeat within a batch are all counted as right."""
    stage = ctx.preset.clip
    torch.manual_seed(ctx.seed)
    model = build_clip(ctx.preset.architecture, tokenizer).to(ctx.device)
    tokens = tokenizer(
        data.captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    ids, mask = tokens.input_ids.to(ctx.device), tokens.attention_mask.to(ctx.device)
    lengths = tokens.attention_mask.sum(1).numpy()

    def features(images: torch.Tensor, caption_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        width = int(lengths[caption_ids].max())  # padding past the longest prompt changes nothing
        which = _indices(caption_ids, ctx.device)
        out = model(input_ids=ids[which, :width], attention_mask=mask[which, :width], pixel_values=_clip_pixels(images))
        return out.logits_per_image, which

    def loss_at(step: int) -> torch.Tensor:
        rng = ctx.rng("clip", step)
        pairs = rng.choice(len(data.images) // 2, size=min(stage.batch, len(data.images) // 2), replace=False)
        index = np.stack([2 * pairs, 2 * pairs + 1], 1).reshape(-1)
        logits, which = features(_batch(data.images, index, ctx.device), data.caption_ids[index])
        same = (which[:, None] == which[None, :]).float()
        target = same / same.sum(1, keepdim=True)  # symmetric, so it serves both directions
        logits = logits.float()
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    @torch.no_grad()
    def evaluate() -> float:
        """Held-out pair accuracy: how often an image's own caption beats its hard negative's."""
        logits, _ = features(data.held_out.float() / 127.5 - 1, data.held_out_caption_ids)
        own = logits.diagonal()
        twin = torch.arange(len(own), device=ctx.device) ^ 1  # 2k <-> 2k + 1
        return (own > logits[torch.arange(len(own), device=ctx.device), twin]).float().mean().item()

    log = _train_stage(ctx, "clip", model, stage, loss_at, evaluate)
    return model.requires_grad_(False).eval(), log


def _psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean PSNR (dB) of uint8 images after a round trip through ``vae`` (latent means, rounded
    to uint8 as the pipeline decodes)."""
    with torch.no_grad():
        x = images.float() / 127.5 - 1
        out = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        out = ((out + 1) * 127.5).round()
        mse = (out - images.float()).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return (10 * torch.log10(255.0**2 / mse)).mean().item()


def train_vae(ctx: _Context, data: Data) -> tuple[AutoencoderKL, StageLog]:
    """L1 + L2 reconstruction of a posterior sample, plus a tiny KL."""
    stage = ctx.preset.vae
    torch.manual_seed(ctx.seed + 1)
    vae = build_vae(ctx.preset.architecture).to(ctx.device)

    def loss_at(step: int) -> torch.Tensor:
        rng = ctx.rng("vae", step)
        x = _batch(data.images, rng.integers(0, len(data.images), stage.batch), ctx.device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(ctx.generator(rng))).sample.float()
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + KL_WEIGHT * posterior.kl().mean()

    log = _train_stage(ctx, "vae", vae, stage, loss_at, lambda: _psnr(vae, data.held_out))
    return vae.requires_grad_(False).eval(), log


def encode_latents(ctx: _Context, vae: AutoencoderKL, data: Data) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Latent means of the training and held-out renders, scaled by 1/std of the training ones
    (SD's ``scaling_factor``: unit-variance latents suit the noise schedule); the factor."""
    if ctx.state.has("latents"):
        tensors, meta = ctx.state.load("latents")
        return tensors["train"].to(ctx.device), tensors["held_out"].to(ctx.device), float(meta["scaling_factor"])
    batch = 1024 if ctx.device.type == "cuda" else 64

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch):
            with ctx.autocast():
                x = images[start : start + batch].float() / 127.5 - 1
                out.append(vae.encode(x).latent_dist.mean.float())
            if ctx.progress:
                ctx.progress("encode", min(start + batch, len(images)), len(images))
        return torch.cat(out)

    train, held_out = encode(data.images), encode(data.held_out)
    scale = 1.0 / train.std().item()
    train, held_out = train * scale, held_out * scale
    ctx.state.save("latents", {"train": train, "held_out": held_out}, {"scaling_factor": repr(scale)})
    return train, held_out, scale


def train_unet(
    ctx: _Context,
    data: Data,
    latents: torch.Tensor,
    held_out_latents: torch.Tensor,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
) -> tuple[UNet2DConditionModel, StageLog]:
    """ε-prediction on SD-1's schedule with min-SNR weighting; the text encoder stays frozen, so
    each caption's hidden states are computed once (the last row is the empty prompt)."""
    stage = ctx.preset.unet
    torch.manual_seed(ctx.seed + 2)
    unet = build_unet(ctx.preset.architecture).to(ctx.device)
    alphas = DDIMScheduler(**SD1_SCHEDULER_CONFIG).alphas_cumprod.to(ctx.device)
    with torch.no_grad():
        ids = tokenizer(
            [*data.captions, ""],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        texts = text_encoder(ids.to(ctx.device))[0].float()
    empty = len(data.captions)

    def loss(x0: torch.Tensor, caption_ids: np.ndarray, rng: np.random.Generator, weighted: bool) -> torch.Tensor:
        generator = ctx.generator(rng)
        t = torch.randint(0, len(alphas), (len(x0),), device=ctx.device, generator=generator)
        noise = torch.randn(x0.shape, device=ctx.device, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        which = _indices(caption_ids, ctx.device)
        eps = unet(xt, t, encoder_hidden_states=texts[which]).sample.float()
        per_sample = (eps - noise).square().mean(dim=(1, 2, 3))
        if weighted:  # min-SNR-γ for ε-prediction: min(SNR, γ) / SNR
            snr = alphas[t] / (1 - alphas[t])
            per_sample = per_sample * snr.clamp(max=MIN_SNR_GAMMA) / snr
        return per_sample.mean()

    def loss_at(step: int) -> torch.Tensor:
        rng = ctx.rng("unet", step)
        index = rng.integers(0, len(latents), stage.batch)
        caption_ids = np.where(rng.random(stage.batch) < CAPTION_DROPOUT, empty, data.caption_ids[index])
        return loss(latents[_indices(index, ctx.device)], caption_ids, rng, weighted=True)

    @torch.no_grad()
    def evaluate() -> float:
        """Held-out plain ε-MSE, with the same timesteps and noise every time."""
        with ctx.autocast():
            return loss(held_out_latents, data.held_out_caption_ids, ctx.rng("unet-eval", 0), weighted=False).item()

    log = _train_stage(ctx, "unet", unet, stage, loss_at, evaluate)
    return unet.requires_grad_(False).eval(), log


FACE_WEIGHT = 4.0  # the decoder stage's loss weight inside the canonical face ellipse (1 outside)


def face_weights(size: int = SIZE) -> torch.Tensor:
    """(1, 1, size, size): FACE_WEIGHT inside the aligned crop's canonical face ellipse, 1 outside,
    normalised to mean 1 so the loss keeps its scale."""
    from ipfacediff.face import CANONICAL_FACE_ELLIPSE

    cx, cy, rx, ry = CANONICAL_FACE_ELLIPSE
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    inside = ((x / size - cx) / rx) ** 2 + ((y / size - cy) / ry) ** 2 <= 1
    weights = torch.where(inside, FACE_WEIGHT, 1.0)
    return (weights / weights.mean()).view(1, 1, size, size)


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def _face_psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean PSNR (dB) inside the canonical face ellipse after a round trip through ``vae``."""
    inside = (face_weights(images.shape[-1]) > 1).to(images.device)
    with torch.no_grad():
        x = images.float() / 127.5 - 1
        out = ((vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1) + 1) * 127.5).round()
        mse = ((out - images.float()).square() * inside).sum(dim=(1, 2, 3)) / (inside.sum() * 3)
    return (10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))).mean().item()


def train_decoder(ctx: _Context, data: Data, vae: AutoencoderKL) -> tuple[AutoencoderKL, StageLog]:
    """Fine-tune ``post_quant_conv`` and the decoder on the frozen encoder's latent means (what
    the pipeline decodes): face-weighted L1 + L2 plus L1 on the image gradients, which the
    plain losses under-weight and the eye's and the identity net's attention over-weight."""
    stage = ctx.preset.decoder
    torch.manual_seed(ctx.seed + 3)
    vae.requires_grad_(False)
    vae.post_quant_conv.requires_grad_(True)
    vae.decoder.requires_grad_(True)
    weights = face_weights().to(ctx.device)

    def loss_at(step: int) -> torch.Tensor:
        rng = ctx.rng("decoder", step)
        x = _batch(data.images, rng.integers(0, len(data.images), stage.batch), ctx.device)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mean
        recon = vae.decode(latents).sample.float()
        error = ((recon - x).abs() + (recon - x).square()) * weights
        edges = sum(((a - b).abs()).mean() for a, b in zip(_gradients(recon), _gradients(x)))
        return error.mean() + edges

    log = _train_stage(ctx, "decoder", vae, stage, loss_at, lambda: _face_psnr(vae, data.held_out))
    return vae.requires_grad_(False).eval(), log


# ---------------------------------------------------------------------------------------------
# The whole run


def _start(output: Path, preset: str, seed: int, resume: bool) -> dict | None:
    """Check the output folder; returns the report of a run that is already complete."""
    state = output / STATE_DIR
    report = output / "training.json"
    if not resume:
        if output.exists() and any(output.iterdir()):
            raise UserError(f"{output} is not empty: pass --resume to continue a run there, or choose a new folder")
        return None
    if report.is_file():  # complete (a state folder beside it: a later stage being added)
        return json.loads(report.read_text())
    run = state / "run.json"
    if run.is_file():
        started = json.loads(run.read_text())
        if (started["preset"], started["seed"]) != (preset, seed):
            raise UserError(
                f"cannot resume: {output} holds a run of preset {started['preset']!r} with seed "
                f"{started['seed']}, not {preset!r} with seed {seed}"
            )
    return None


def train_faceworld_models(
    output: Path,
    *,
    preset: str = "cpu",
    device: str = "auto",
    seed: int = 0,
    progress: Progress | None = None,
    resume: bool = False,
) -> dict:
    """Train the FaceWorld model set into ``output`` (see the module docstring); returns the
    report also written to ``output/training.json``.

    ``progress(stage, done, total)`` is called for "render", "clip", "vae", "encode" and "unet".
    ``resume`` continues the run a killed process left in ``output``; without it ``output`` must be
    empty or absent.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    output = Path(output)
    finished = _start(output, preset, seed, resume)
    chosen = PRESETS[preset]
    target = pick_device(device)
    if finished is not None:
        if chosen.decoder is None or "decoder" in finished["stages"]:
            return finished
        return _add_decoder_stage(output, finished, chosen, target, progress)
    state = _State(output / STATE_DIR)
    state.folder.mkdir(parents=True, exist_ok=True)
    write_json(state.folder / "run.json", {"preset": preset, "seed": seed})
    ctx = _Context(target, seed, state, chosen, progress)
    seconds: dict[str, float] = {}
    tick = time.perf_counter()

    data = _load_data(state, chosen, seed, target, progress)
    seconds["render"] = time.perf_counter() - tick
    tokenizer = build_tokenizer()
    clip, clip_log = train_clip(ctx, data, tokenizer)
    vae, vae_log = train_vae(ctx, data)
    tick = time.perf_counter()
    latents, held_out_latents, scale = encode_latents(ctx, vae, data)
    seconds["encode"] = time.perf_counter() - tick
    vae.register_to_config(scaling_factor=scale)
    text_encoder = CLIPTextModel(clip.config.text_config).to(target)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    text_encoder.requires_grad_(False).eval()
    unet, unet_log = train_unet(ctx, data, latents, held_out_latents, tokenizer, text_encoder)
    logs = {"clip": clip_log, "vae": vae_log, "unet": unet_log}
    decoder_scores = {}
    if chosen.decoder is not None:
        vae, logs["decoder"] = train_decoder(ctx, data, vae)
        decoder_scores = _decoder_scores(vae, data)

    tick = time.perf_counter()
    weights = save_model_set(output, vae=vae, text_encoder=text_encoder, unet=unet, clip=clip, tokenizer=tokenizer)
    seconds["save"] = time.perf_counter() - tick
    seconds |= {name: log.seconds for name, log in logs.items()}
    stages = {name: {"stage": asdict(getattr(chosen, name)), **asdict(log)} for name, log in logs.items()}
    stages["clip"]["held_out_pair_accuracy"] = clip_log.evaluations[-1][2]
    stages["vae"]["held_out_psnr_db"] = vae_log.evaluations[-1][2]
    stages["unet"]["held_out_eps_mse"] = unet_log.evaluations[-1][2]
    if "decoder" in stages:
        stages["decoder"] |= decoder_scores
    report = {
        "preset": preset,
        "seed": seed,
        "device": str(target),
        "device_name": torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu",
        "architecture": asdict(chosen.architecture),
        "data": {
            "train_images": len(data.images),
            "held_out_images": len(data.held_out),
            "captions": len(data.captions),
            "size": SIZE,
        },
        "tokenizer": {"vocab_size": len(tokenizer), "model_max_length": tokenizer.model_max_length},
        "stages": stages,
        "vae_scaling_factor": scale,
        "seconds": {k: round(v, 1) for k, v in seconds.items()} | {"total": round(sum(seconds.values()), 1)},
        "weights_bytes": weights,
        "weights_total_bytes": sum(weights.values()),
        "versions": library_versions(),
    }
    write_json(output / "training.json", report)
    shutil.rmtree(state.folder)
    return json.loads((output / "training.json").read_text())  # as a resumed call would return it


def _decoder_scores(vae: AutoencoderKL, data: Data) -> dict[str, float]:
    return {
        "held_out_psnr_db": round(_psnr(vae, data.held_out), 4),
        "held_out_face_psnr_db": round(_face_psnr(vae, data.held_out), 4),
    }


def _add_decoder_stage(
    output: Path, report: dict, chosen: Preset, target: torch.device, progress: Progress | None
) -> dict:
    """Run the decoder stage on a model set that an earlier version of this script finished
    without it: the same renders (they follow from the seed), the saved VAE as the start, only
    ``vae/`` rewritten. The result differs from a run that had the stage from the start only
    in that the stage starts from the fp16-rounded VAE."""
    state = _State(output / STATE_DIR)
    state.folder.mkdir(parents=True, exist_ok=True)
    write_json(state.folder / "run.json", {"preset": report["preset"], "seed": report["seed"]})
    ctx = _Context(target, report["seed"], state, chosen, progress)
    tick = time.perf_counter()
    data = _load_data(state, chosen, report["seed"], target, progress)
    render_seconds = time.perf_counter() - tick
    vae = AutoencoderKL.from_pretrained(output / "vae", torch_dtype=torch.float32).to(target)
    before = _decoder_scores(vae, data)
    vae, log = train_decoder(ctx, data, vae)
    staging = output / f".vae.{os.getpid()}.tmp"
    vae.to(device="cpu", dtype=torch.float16).save_pretrained(staging, safe_serialization=True)
    config = json.loads((staging / "config.json").read_text())
    config.pop("_name_or_path", None)  # where it was loaded from: a path of this machine
    write_json(staging / "config.json", config)
    shutil.rmtree(output / "vae")
    os.replace(staging, output / "vae")
    report["stages"]["decoder"] = {
        "stage": asdict(chosen.decoder),
        **asdict(log),
        "before": before,
        **_decoder_scores(vae.to(target, torch.float32), data),
        "added_to_finished_run": True,
    }
    seconds = report["seconds"]
    seconds["render"] = round(seconds["render"] + render_seconds, 1)
    seconds["decoder"] = round(log.seconds, 1)
    seconds["total"] = round(sum(v for k, v in seconds.items() if k != "total"), 1)
    weights = weight_files(output)
    report |= {"weights_bytes": weights, "weights_total_bytes": sum(weights.values()), "versions": library_versions()}
    write_json(output / "training.json", report)
    shutil.rmtree(state.folder)
    return json.loads((output / "training.json").read_text())


def save_model_set(
    output: Path,
    *,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    clip: CLIPModel,
    tokenizer: CLIPTokenizer,
) -> dict[str, int]:
    """The SD-1.x folder and ``output/clip``, fp16 safetensors; returns each weight file's bytes.

    fp16 halves the files; the loaders cast to the dtype asked for (float32 on CPUs)."""
    from diffusers import StableDiffusionPipeline

    half = dict(device="cpu", dtype=torch.float16)
    pipe = StableDiffusionPipeline(
        vae=vae.to(**half),
        text_encoder=text_encoder.to(**half),
        tokenizer=tokenizer,
        unet=unet.to(**half),
        scheduler=DDIMScheduler(**SD1_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(output, safe_serialization=True)
    clip.to(**half).save_pretrained(output / "clip", safe_serialization=True)
    tokenizer.save_pretrained(output / "clip")
    return weight_files(output)


def weight_files(output: Path) -> dict[str, int]:
    """Bytes of each weight file of the model set in ``output`` (training state excluded)."""
    return {
        str(p.relative_to(output)): p.stat().st_size
        for p in sorted(output.rglob("*.safetensors"))
        if STATE_DIR not in p.parts
    }


# ---------------------------------------------------------------------------------------------
# Command line


def progress_lines() -> Progress:
    """Progress on stdout: a line per stage every 15 seconds, and at each stage's end (a log of a
    long run, where a progress bar would leave nothing to read)."""
    last: dict[str, float] = {}

    def show(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done >= total or now - last.get(stage, 0.0) >= 15:
            last[stage] = now
            print(f"{stage}: {done}/{total}", flush=True)

    return show
