"""Identity guidance while sampling: each keyframe's predicted clean face moved up the gradient of
its identity similarity to the source face, through the VAE decoder and an identity net."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ipfacediff.diffusion import InversionCache, InvertedVideo, StageTimer, decoder_checkpointing, frames_digest
from ipfacediff.editing.plan import EditPlan
from ipfacediff.editing.windows import EditWindow
from ipfacediff.identity import IdentityEncoder, IdentityNet
from ipfacediff.models import module_fingerprint
from ipfacediff.settings import EditSettings


# The identity similarity is multiplied by this before the backward pass through a float16
# decoder, and the gradient divided by it in float32 (mixed-precision training's loss scaling):
# at 512² the gradient of one pixel lies in float16's subnormal range and would lose its digits.
HALF_GRADIENT_SCALE = 2.0**10

# Bumped whenever what the source identities' cache file holds changes, so that an older one is not read.
SOURCE_IDENTITIES_VERSION = 1


def identity_gradient(
    vae: AutoencoderKL,
    net: IdentityNet,
    point: torch.Tensor,
    target: torch.Tensor,
    *,
    scale: float | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, float]:
    """The gradient, float32 on the CPU, of the identity similarity between the face ``point``
    (one scaled latent, (1, 4, h, w)) decodes to and ``target`` (1, D), and that similarity.

    ``scale``: the loss scale of the backward pass (default :data:`HALF_GRADIENT_SCALE` for a
    float16 decoder, else 1); what the decoder's float16 range still loses shows as NaN or inf,
    which the caller checks. ``device``, ``dtype``: the VAE's, given by a caller of many calls
    (a diffusers model looks them up through all its modules)."""
    device, dtype = device or vae.device, dtype or vae.dtype
    if scale is None:
        scale = HALF_GRADIENT_SCALE if dtype == torch.float16 else 1.0
    with torch.enable_grad(), decoder_checkpointing(vae):
        point = point.to(device, dtype).requires_grad_(True)
        image = vae.decode(point / vae.config.scaling_factor).sample.float().clamp(-1, 1)
        similarity = F.cosine_similarity(net(image), target.to(image.device), dim=-1).sum()
        (gradient,) = torch.autograd.grad(similarity * scale, point)
    return gradient.float().cpu() / scale, similarity.item()


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Torch's CPU work on one thread while open (nothing changes for a GPU device)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class IdentityGuidanceMixin:
    """The pipeline's identity guidance (step 5, and in step 6 the late steps): needs its ``vae``."""

    identity_steps_skipped: int = 0  # keyframe steps left unguided, their gradient not finite (a running count)

    def set_identity_net(self, net: IdentityNet | None) -> None:
        """The identity net that identity guidance differentiates (None: the model card's, else
        dlib's). It is not a saved component: it belongs to the faces, not to the model's weights."""
        self._identity_net = net

    def identity_net(self) -> IdentityNet:
        """The net set by :meth:`set_identity_net`, else the one the model's card names (a
        FaceWorld model's own trainers' net: the report's oracle must not be the one optimised),
        else the one its adapter library's ε1 was trained against, else dlib's, for real faces.
        Loaded on first use."""
        net = getattr(self, "_identity_net", None)
        if net is None:
            library = self.adapter_library
            own = str(library.identity_net) if library and library.identity_net else None
            named = (self.config.model_card or {}).get("identity_net") or own
            net = IdentityEncoder.from_pretrained(named)
            self._identity_net = net
        return net.to(self.vae.device)

    @torch.no_grad()
    def source_identities(self, frames: np.ndarray, *, batch_size: int = 8) -> torch.Tensor:
        """(N, D) identity embeddings of the source crops: what identity guidance holds each frame to."""
        net = self.identity_net()
        out = []
        for start in range(0, len(frames), batch_size):
            crops = torch.from_numpy(np.ascontiguousarray(frames[start : start + batch_size])).permute(0, 3, 1, 2)
            out.append(net(crops.to(self.vae.device).float() / 127.5 - 1.0).float().cpu())
        return torch.cat(out)

    def guide_identity(
        self, x_t: torch.Tensor, eps: torch.Tensor, alpha_t: float, targets: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``eps`` changed so that each frame's predicted clean latent x̂0 moves up the gradient of
        the identity similarity between its decoded face and ``targets``.

        The gradient is taken through the VAE decoder and the identity net at x̂0 only, not through
        the UNet: one decoder backward per keyframe instead of a UNet backward, and x̂0 is what the
        late steps draw. The move is the gradient's direction at ``scale`` RMS latent units times
        the similarity still missing, so it fades as the face comes back and does not depend on
        the net's gradient magnitude. One frame at a time: the decoder's backward at 512² needs
        several GB per frame. On the CPU on one thread: some of the convolutions' backward passes
        sum in an order that varies between threads, and the same seed must give the same edit.

        A frame whose gradient is not finite (a float16 decoder overflowed) keeps ``eps`` as it
        was: NaN would reach every frame through the blend and the propagation. Such frames are
        counted in :attr:`identity_steps_skipped`, which the edit reports once.
        """
        net, vae = self.identity_net(), self.vae
        device, dtype = vae.device, vae.dtype
        x0 = (x_t.float() - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
        guided = eps.float().clone()
        for row in range(len(x0)):
            with one_cpu_thread(device):
                gradient, similarity = identity_gradient(
                    vae, net, x0[row : row + 1], targets[row : row + 1], device=device, dtype=dtype
                )
            gradient = gradient[0]
            if not (math.isfinite(similarity) and bool(gradient.isfinite().all())):
                self.identity_steps_skipped += 1
                continue
            size = gradient.pow(2).mean().sqrt().clamp_min(1e-12)
            moved = x0[row] + scale * max(0.0, 1.0 - similarity) * gradient / size
            guided[row] = (x_t[row].float() - alpha_t**0.5 * moved) / (1 - alpha_t) ** 0.5
        return guided

    def window_identities(
        self,
        frames: np.ndarray,
        settings: EditSettings,
        plan: EditPlan,
        window: EditWindow,
        timer: StageTimer,
        batch_size: int,
        *,
        inverted: InvertedVideo | None = None,
        cache: InversionCache | None = None,
    ) -> torch.Tensor | None:
        """Step 5 for one window: its source faces' identities (:meth:`source_identities`, measured
        with its anchors'), which identity guidance holds each keyframe to; None when the plan
        guides nothing or the frames are whole frames, not aligned crops. They do not depend on the
        prompt: kept in ``cache`` under the window's inversion (``inverted``, whose keys digest the
        frames), a re-edit reads them."""
        if plan.identity_gradient <= 0 or settings.whole_frame:
            return None
        with timer("identity_gradient"):
            faces = window.faces(frames)
            chunks = inverted.chunk_keys() if inverted is not None and cache is not None else None
            key = None
            if chunks:
                anchors = frames_digest(window.anchors.frames) if window.anchors is not None else None
                key = InversionCache.key(
                    source_identities=SOURCE_IDENTITIES_VERSION,
                    chunks=chunks,
                    anchors=anchors,
                    net=module_fingerprint(self.identity_net()),
                    batch_size=batch_size,
                )
                stored = cache.load(key, "source_identities")
                if stored is not None and len(stored["identities"]) == len(faces):
                    return window.split_identities(stored["identities"])
            identities = self.source_identities(faces, batch_size=batch_size)
            if key is not None:
                cache.save(key, "source_identities", {"identities": identities})
            return window.split_identities(identities)
