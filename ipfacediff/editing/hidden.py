"""The face where no frame shows it: a region of a crop painted by the identity model.

A microphone held still at the mouth hides the mouth in every frame, so the face's other frames
(:func:`~ipfacediff.occlusion.face_behind_occluders`) cannot give it. Left as it is, ε2 edits a
face with a microphone for a mouth and draws a smile only faintly around it; filled by OpenCV's
inpainting it gets a blur with no mouth, which it draws less still. ε1 knows faces: a blended DDIM
sample from it (the known pixels' latents put back, noised to each step's level, after every step)
draws a mouth under the microphone that fits the face around it, and ε2 then edits that face.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from ipfacediff.diffusion import decode_latents, encode_frames, encode_prompt, predicted_noise
from ipfacediff.diffusion.ddim import alpha_pairs, ddim_step, sampling_timesteps

# The share of the DDIM steps the painted region is sampled over: from noise that leaves a trace
# of what is there (the occluder's colour and place), so the face is drawn anew but at its level
# of light.
HIDDEN_STRENGTH = 0.8
# The most DDIM steps the painting takes (fewer when the edit takes fewer): on FaceWorld's held-out
# people the benchmarks do not use, its error to the true face behind a microphone or a cup stopped
# falling from here (benchmarks/README.md, session 23).
HIDDEN_STEPS = 6
# Share of a latent cell a region must cover to be sampled there; the cells it touches are then
# grown by one, so the cells at its edge are drawn as well as its middle.
HIDDEN_CELL_SHARE = 0.05


class HiddenFaceMixin:
    """Painting a hidden region of a crop with ε1: needs the pipeline's VAE, text encoder, scheduler and ε1."""

    @torch.no_grad()
    def paint_hidden(self, crop: np.ndarray, region: np.ndarray, *, steps: int, seed: int = 0) -> np.ndarray:
        """``crop`` (s, s, 3) uint8 with ``region`` ((s, s) float, 1 where hidden) painted by ε1
        (prompt "", as it was fine-tuned) in at most HIDDEN_STEPS of ``steps``' DDIM steps: blended
        in by the region's weight, every other pixel exactly the crop's."""
        side = crop.shape[0]
        region = np.clip(np.asarray(region, np.float32), 0.0, 1.0)
        if region.shape != crop.shape[:2]:
            region = cv2.resize(region, (side, side), interpolation=cv2.INTER_LINEAR)
        unet = self._role("identity")
        device, dtype = unet.device, unet.dtype  # each reading of dtype walks the model's parameters
        clean = encode_frames(self.vae, crop[None]).to(device)
        cells = cv2.resize(region, clean.shape[-1:-3:-1], interpolation=cv2.INTER_AREA) > HIDDEN_CELL_SHARE
        cells = cv2.dilate(cells.astype(np.uint8), np.ones((3, 3), np.uint8))
        sampled = torch.from_numpy(cells.astype(np.float32)).to(device)[None, None]
        timesteps = sampling_timesteps(self.scheduler, min(steps, HIDDEN_STEPS))
        alphas = alpha_pairs(self.scheduler, timesteps)
        first = min(len(timesteps) - 1, round(len(timesteps) * (1 - HIDDEN_STRENGTH)))
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed)).to(device)
        embeds = encode_prompt(self.tokenizer, self.text_encoder, [""]).to(device, dtype)
        x = alphas[first][0] ** 0.5 * clean + (1 - alphas[first][0]) ** 0.5 * noise
        for index in range(first, len(timesteps)):
            alpha_t, alpha_prev = alphas[index]
            known = alpha_t**0.5 * clean + (1 - alpha_t) ** 0.5 * noise
            x = sampled * x + (1 - sampled) * known
            output = unet(x.to(dtype), timesteps[index], encoder_hidden_states=embeds).sample.float()
            eps = predicted_noise(output, x, alpha_t, self.scheduler.config.prediction_type)
            x = ddim_step(x, eps, alpha_t, alpha_prev)
        painted = decode_latents(self.vae, sampled * x + (1 - sampled) * clean)[0].astype(np.float32)
        weight = region[..., None]
        return np.clip(crop + weight * (painted - crop), 0, 255).round().astype(np.uint8)
