"""Identity guidance while sampling: each keyframe's predicted clean face moved up the gradient of
its identity similarity to the source face, through the VAE decoder and an identity net."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from ipfacediff.diffusion import StageTimer
from ipfacediff.editing.plan import EditPlan
from ipfacediff.editing.windows import EditWindow
from ipfacediff.identity import IdentityEncoder, IdentityNet
from ipfacediff.settings import EditSettings


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
        """
        net, vae = self.identity_net(), self.vae
        x0 = (x_t.float() - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
        moved = []
        for row in range(len(x0)):
            with torch.enable_grad(), one_cpu_thread(vae.device):
                point = x0[row : row + 1].to(vae.device, vae.dtype).requires_grad_(True)
                image = vae.decode(point / vae.config.scaling_factor).sample.float().clamp(-1, 1)
                similarity = F.cosine_similarity(net(image), targets[row : row + 1].to(image.device), dim=-1).sum()
                (gradient,) = torch.autograd.grad(similarity, point)
            gradient = gradient.float().cpu()[0]
            size = gradient.pow(2).mean().sqrt().clamp_min(1e-12)
            moved.append(x0[row] + scale * max(0.0, 1.0 - similarity.item()) * gradient / size)
        x0 = torch.stack(moved)
        return (x_t.float() - alpha_t**0.5 * x0) / (1 - alpha_t) ** 0.5

    def window_identities(
        self,
        frames: np.ndarray,
        settings: EditSettings,
        plan: EditPlan,
        window: EditWindow,
        timer: StageTimer,
        batch_size: int,
    ) -> torch.Tensor | None:
        """Step 5 for one window: its source faces' identities (:meth:`source_identities`, measured
        with its anchors'), which identity guidance holds each keyframe to; None when the plan
        guides nothing or the frames are whole frames, not aligned crops."""
        if plan.identity_gradient <= 0 or settings.whole_frame:
            return None
        with timer("identity_gradient"):
            return window.split_identities(self.source_identities(window.faces(frames), batch_size=batch_size))
