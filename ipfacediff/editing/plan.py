"""The plan of an edit under an adapter library, decided before any model work."""

from __future__ import annotations

from dataclasses import dataclass

from ipfacediff.errors import UserError
from ipfacediff.adapters import AdapterLibrary, combine_tuned, edit_adapter_name, parse_lora_spec, pick_edit_adapters
from ipfacediff.settings import DEFAULT_IDENTITY_GRADIENT, EditSettings


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
    strength: float | None = None  # the share of the schedule regenerated (None: the settings')

    @property
    def edit_adapters(self) -> dict[str, float]:
        """The library adapters by their library names."""
        return {n.removeprefix("edit:"): w for n, w in self.edit_weights.items()}


def plan_edit(
    settings: EditSettings, library: AdapterLibrary | None, loaded_edit_weights: dict[str, float] | None = None
) -> EditPlan:
    """The plan of an edit under an adapter library.

    Adapters given at loading (``--edit-lora``) always apply. Otherwise ``settings.adapters``
    decides: "auto" picks the library's adapters whose words the prompt has and the source prompt
    has not, "none" edits with the base model, or names them ("eyeglasses", "eyeglasses:0.8,smile");
    one picked or named without a weight edits at the library's tuned weight (1 unless tuned).
    Every other tuned value (guidance, blend threshold, hair, ...: the fields of
    :class:`~ipfacediff.adapters.AdapterEntry` with a rule) is the edit's setting when given, else
    its field's rule over the picked adapters (:func:`~ipfacediff.adapters.combine_tuned`).
    """
    library = library or AdapterLibrary(None, ())
    words = library.words()
    if loaded_edit_weights:
        weights = dict(loaded_edit_weights)
    elif settings.adapters == "auto":
        weights = {
            edit_adapter_name(n): library.entry(n).tuned_value("weight")
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
            weights[edit_adapter_name(name)] = weight if name != spec else library.entry(name).tuned_value("weight")
    entries = [library.entry(n.removeprefix("edit:")) for n in weights]
    return EditPlan(weights, **combine_tuned(entries, settings))
