"""The IP-FaceDiff editing method, as a package of its stages (Fig. 1 of the paper, in order):

- :mod:`~ipfacediff.editing.plan`: what the adapter library decides before any model work.
- :mod:`~ipfacediff.editing.hooks`: ε1's features into ε2 (attention processors, feature hooks).
- :mod:`~ipfacediff.editing.region`: the local blend's edit region, and detail transfer.
- :mod:`~ipfacediff.editing.guidance`: identity guidance while sampling.
- :mod:`~ipfacediff.editing.propagation`: keyframes, nearest neighbours, smoothing over time.
- :mod:`~ipfacediff.editing.denoise`: one window's denoising loop over a step state.
- :mod:`~ipfacediff.editing.windows`: a long clip's windows, the only place anchors exist.
- :mod:`~ipfacediff.editing.pipeline`: :class:`IPFaceDiffPipeline`, whose ``__call__`` lists the steps.
"""

from ipfacediff.editing.denoise import DEFAULT_KEYFRAME_BATCH, Denoised, KeyframeEditMixin, StepState, WindowDenoiser
from ipfacediff.editing.guidance import IdentityGuidanceMixin, one_cpu_thread
from ipfacediff.editing.hooks import (
    FeatureController,
    IPFaceDiffAttnProcessor,
    extended_attention,
    feature_hooks,
    residual_injection_block,
)
from ipfacediff.editing.pipeline import DEFAULT_VAE_BATCH, STAGES, EditResult, IPFaceDiffPipeline, RunStats
from ipfacediff.editing.plan import EditPlan, plan_edit
from ipfacediff.editing.propagation import (
    nearest_neighbour_field,
    propagate_by_nearest_neighbour,
    select_keyframes,
    smooth_over_time,
    squared_distances,
    token_similarity,
    two_nearest,
)
from ipfacediff.editing.region import (
    BLEND_TIMESTEPS,
    DETAIL_TOLERANCE,
    FRAME_WORDS,
    MASK_SMOOTHING_PASSES,
    EditRegionMixin,
    local_blend_mask,
    mask_reference_prompt,
    transfer_detail,
)
from ipfacediff.editing.windows import (
    ANCHOR_KEYFRAMES,
    Anchors,
    ClipWindows,
    EditWindow,
    cross_fade,
    edit_windows,
    keyframe_batches,
    release_pages,
    window_plan,
    window_progress,
)
from ipfacediff.settings import (
    DEFAULT_BLEND_THRESHOLD,
    DEFAULT_GUIDANCE,
    DEFAULT_IDENTITY_GRADIENT,
    DEFAULT_KEYFRAME_SPACING,
    DEFAULT_STEPS,
)

__all__ = [
    "ANCHOR_KEYFRAMES",
    "BLEND_TIMESTEPS",
    "DEFAULT_BLEND_THRESHOLD",
    "DEFAULT_GUIDANCE",
    "DEFAULT_IDENTITY_GRADIENT",
    "DEFAULT_KEYFRAME_BATCH",
    "DEFAULT_KEYFRAME_SPACING",
    "DEFAULT_STEPS",
    "DEFAULT_VAE_BATCH",
    "DETAIL_TOLERANCE",
    "FRAME_WORDS",
    "MASK_SMOOTHING_PASSES",
    "STAGES",
    "Anchors",
    "ClipWindows",
    "Denoised",
    "EditPlan",
    "EditRegionMixin",
    "EditResult",
    "EditWindow",
    "FeatureController",
    "IPFaceDiffAttnProcessor",
    "IPFaceDiffPipeline",
    "IdentityGuidanceMixin",
    "KeyframeEditMixin",
    "RunStats",
    "StepState",
    "WindowDenoiser",
    "cross_fade",
    "edit_windows",
    "extended_attention",
    "feature_hooks",
    "keyframe_batches",
    "local_blend_mask",
    "mask_reference_prompt",
    "nearest_neighbour_field",
    "one_cpu_thread",
    "plan_edit",
    "propagate_by_nearest_neighbour",
    "release_pages",
    "residual_injection_block",
    "select_keyframes",
    "smooth_over_time",
    "squared_distances",
    "token_similarity",
    "transfer_detail",
    "two_nearest",
    "window_plan",
    "window_progress",
]
