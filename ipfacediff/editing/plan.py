"""The plan of an edit under an adapter library, decided before any model work."""

from __future__ import annotations

from dataclasses import dataclass

from ipfacediff.errors import UserError
from ipfacediff.models import edit_adapter_name, parse_lora_spec, pick_edit_adapters
from ipfacediff.settings import DEFAULT_BLEND_THRESHOLD, DEFAULT_GUIDANCE, DEFAULT_IDENTITY_GRADIENT, EditSettings


@dataclass(frozen=True)
class EditPlan:
    """What the adapter library decides for one edit, before any model work: the ε2 adapters
    (peft name → weight), the guidance and blend threshold they were tuned with, and whether the
    edit is of the hair, and the identity guidance while sampling. Decided by :func:`plan_edit`, not
    inside the denoising code, so that a caller can inspect it, log it or set it by hand (as
    diffusers leaves ``set_adapters`` to the caller)."""

    edit_weights: dict[str, float]
    guidance: float
    blend_threshold: float
    hair: bool
    identity_gradient: float = DEFAULT_IDENTITY_GRADIENT

    @property
    def edit_adapters(self) -> dict[str, float]:
        """The library adapters by their library names."""
        return {n.removeprefix("edit:"): w for n, w in self.edit_weights.items()}


def plan_edit(
    settings: EditSettings,
    *,
    loaded_edit_weights: dict[str, float],
    words: dict[str, list[str]],
    tuned_weights: dict[str, float],
    tuned_guidances: dict[str, float],
    tuned_thresholds: dict[str, float],
    hair_adapters: list[str],
    tuned_identity_gradients: dict[str, float] | None = None,
) -> EditPlan:
    """The plan of an edit under an adapter library.

    Adapters given at loading (``--edit-lora``) always apply. Otherwise ``settings.adapters``
    decides: "auto" picks the library's adapters whose words the prompt has and the source prompt
    has not, "none" edits with the base model, or names them ("eyeglasses", "eyeglasses:0.8,smile");
    one picked or named without a weight edits at the library's tuned weight (1 unless tuned).
    Guidance left unset is the highest the picked adapters were tuned with (an untuned one counts
    as :data:`DEFAULT_GUIDANCE`), so none of their attributes is drawn weaker than tuned; a blend
    threshold left unset is the lowest they were tuned with. A hair adapter makes it a hair edit.
    Identity guidance left unset is the lowest the picked adapters were tuned with (an untuned one
    counts as :data:`DEFAULT_IDENTITY_GRADIENT`), so it pulls back none of their attributes more
    than tuned.
    """
    if loaded_edit_weights:
        weights = dict(loaded_edit_weights)
    elif settings.adapters == "auto":
        weights = {
            edit_adapter_name(n): tuned_weights.get(n, 1.0)
            for n in pick_edit_adapters(words, settings.prompt, settings.source_prompt)
        }
    elif settings.adapters == "none":
        weights = {}
    else:
        weights = {}
        for spec in filter(None, (part.strip() for part in settings.adapters.split(","))):
            name, weight = parse_lora_spec(spec)
            if name not in words:
                offered = ", ".join(words) if words else "none: this model has no adapter library"
                raise UserError(f"unknown edit adapter {name!r}; this model offers: {offered}")
            weights[edit_adapter_name(name)] = weight if name != spec else tuned_weights.get(name, 1.0)
    names = [n.removeprefix("edit:") for n in weights]
    guidance = settings.guidance
    if guidance is None:
        guidance = max((tuned_guidances.get(n, DEFAULT_GUIDANCE) for n in names), default=DEFAULT_GUIDANCE)
    threshold = settings.blend_threshold
    if threshold is None:
        threshold = min((tuned_thresholds[n] for n in names if n in tuned_thresholds), default=DEFAULT_BLEND_THRESHOLD)
    identity_gradient = settings.identity_gradient
    if identity_gradient is None:
        tuned = tuned_identity_gradients or {}
        identity_gradient = min(
            (tuned.get(n, DEFAULT_IDENTITY_GRADIENT) for n in names), default=DEFAULT_IDENTITY_GRADIENT
        )
    return EditPlan(
        weights, guidance, threshold, settings.hair or any(n in hair_adapters for n in names), identity_gradient
    )
