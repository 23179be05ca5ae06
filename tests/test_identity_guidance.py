"""Identity guidance while sampling: the gradient of an identity net's similarity, through the VAE
decoder at the predicted clean latent, pulls each keyframe towards its source face."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ipfacediff.diffusion import InversionCache, encode_frames
from ipfacediff.identity import IdentityEncoder
from ipfacediff.job import load_pipeline
from ipfacediff.settings import EditSettings

from conftest import moving_texture
from test_cli import run

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a face with eyeglasses"


def decoded_similarity(pipe, x0: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        image = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
        return F.cosine_similarity(pipe.identity_net()(image), targets, dim=-1)


def test_a_guided_step_moves_the_predicted_face_towards_the_source_identity(tiny_pipe):
    frames = moving_texture(2)
    targets = tiny_pipe.source_identities(frames)
    # A latent of other pictures, at a noise level of the late steps.
    other = encode_frames(tiny_pipe.vae, moving_texture(2, seed=5))
    alpha = 0.8
    noise = torch.randn(other.shape, generator=torch.Generator().manual_seed(0))
    x_t = alpha**0.5 * other + (1 - alpha) ** 0.5 * noise
    before = decoded_similarity(tiny_pipe, other, targets)
    eps = tiny_pipe.guide_identity(x_t, noise, alpha, targets, scale=0.05)
    x0 = (x_t - (1 - alpha) ** 0.5 * eps) / alpha**0.5
    after = decoded_similarity(tiny_pipe, x0, targets)
    assert (after > before).all(), (before, after)
    # scale 0 leaves the prediction as it was
    torch.testing.assert_close(tiny_pipe.guide_identity(x_t, noise, alpha, targets, scale=0.0), noise)


def test_guidance_acts_only_in_its_step_range(tiny_pipe, tmp_path):
    frames = moving_texture(6)
    cache = InversionCache(tmp_path / "cache")

    def edit(**settings):
        return tiny_pipe(frames, EditSettings(prompt=PROMPT, steps=4, seed=1, **settings), cache=cache)

    off = edit(identity_gradient=0.0)
    assert off.timings["identity_gradient"] == 0
    # Four steps run at timesteps 751, 501, 251 and 1: from 0 no step is guided, from 300 the last
    # two, from 1000 all four.
    never = edit(identity_gradient=2.0, identity_gradient_from=0)
    assert np.array_equal(never.frames, off.frames)
    late = edit(identity_gradient=2.0, identity_gradient_from=300)
    every = edit(identity_gradient=2.0, identity_gradient_from=1000)
    assert not np.array_equal(late.frames, off.frames)
    assert not np.array_equal(every.frames, late.frames)
    assert every.timings["identity_gradient"] > 0


def test_whole_frame_edits_are_not_guided(tiny_pipe, tmp_path):
    frames = moving_texture(4)
    cache = InversionCache(tmp_path / "cache")
    guided = tiny_pipe(
        frames,
        EditSettings(prompt=PROMPT, steps=4, whole_frame=True, identity_gradient=2.0, identity_gradient_from=1000),
        cache=cache,
    )
    plain = tiny_pipe(
        frames, EditSettings(prompt=PROMPT, steps=4, whole_frame=True, identity_gradient=0.0), cache=cache
    )
    assert np.array_equal(guided.frames, plain.frames)
    assert guided.timings["identity_gradient"] == 0


def test_the_embedded_model_guides_with_its_trainers_net_not_the_report_oracle():
    pipe = load_pipeline()
    card_net = pipe.config.model_card["identity_net"]
    assert card_net.endswith("identity_net")
    assert "oracles" not in card_net
    net = pipe.identity_net()
    assert type(net).__name__ == "FaceWorldIdentity"


def test_a_model_without_a_card_guides_with_dlibs_net(tiny_dir):
    pipe = load_pipeline(str(tiny_dir))
    assert pipe.config.model_card is None
    assert isinstance(pipe.identity_net(), IdentityEncoder)
    own = IdentityEncoder()
    pipe.set_identity_net(own)
    assert pipe.identity_net() is own


def test_cli_refuses_a_bad_scale_or_range(tmp_path, capsys):
    clip = tmp_path / "in.mp4"
    clip.write_bytes(b"")  # never read: the settings are checked first
    for option, value, message in (
        ("--identity-gradient", "-1", "--identity-gradient must be in [0, 10], got -1"),
        ("--identity-gradient-from", "2000", "--identity-gradient-from must be in [0, 1000], got 2000"),
    ):
        code, out, err = run(["edit", str(clip), "-o", str(tmp_path / "out.mp4"), "-p", PROMPT, option, value], capsys)
        assert code == 2 and message in out + err


def test_the_plan_takes_the_lowest_tuned_scale_of_the_picked_adapters_unless_one_is_given():
    from ipfacediff.adapters import AdapterEntry, AdapterLibrary
    from ipfacediff.editing import plan_edit
    from ipfacediff.settings import DEFAULT_IDENTITY_GRADIENT

    library = AdapterLibrary(
        None,
        (
            AdapterEntry("beard", words=("beard",), identity_gradient=0.3),
            AdapterEntry("smile", words=("smiling",), identity_gradient=2.0),
            AdapterEntry("eyeglasses", words=("eyeglasses",)),
        ),
    )

    def plan(prompt: str, **settings):
        return plan_edit(EditSettings(prompt=prompt, **settings), library)

    assert plan("a smiling face").identity_gradient == 2.0
    assert plan("a smiling face with a beard").identity_gradient == 0.3  # pulls back neither attribute
    assert plan("a face with eyeglasses").identity_gradient == DEFAULT_IDENTITY_GRADIENT  # untuned
    assert plan("a smiling face", identity_gradient=0.0).identity_gradient == 0.0
    assert plan("a face", adapters="none").identity_gradient == DEFAULT_IDENTITY_GRADIENT


def test_a_library_entry_carries_its_tuned_scale_and_refuses_a_bad_one(tmp_path):
    import json

    from ipfacediff.errors import UserError
    from ipfacediff.models import AdapterLibrary

    (tmp_path / "beard").mkdir()
    (tmp_path / "beard" / "a.safetensors").write_bytes(b"")
    entry = {"path": "beard/a.safetensors", "words": ["beard"], "identity_gradient": 0.5}
    (tmp_path / "adapters.json").write_text(json.dumps({"edits": {"beard": entry}}))
    assert AdapterLibrary.read_dir(tmp_path).identity_gradients() == {"beard": 0.5}
    (tmp_path / "adapters.json").write_text(json.dumps({"edits": {"beard": entry | {"identity_gradient": -1}}}))
    with pytest.raises(UserError, match="identity_gradient"):
        AdapterLibrary.read_dir(tmp_path)


def test_an_adapter_library_names_the_net_its_e1_was_trained_against(tiny_dir, tmp_path):
    import json
    import shutil

    from ipfacediff.job import SHIPPED_MODELS
    from ipfacediff.adapters.build import _copy_identity_net, _library

    library = tmp_path / "lib"
    library.mkdir()
    copied = _copy_identity_net(SHIPPED_MODELS / "identity_net", library)
    assert (library / copied / "config.json").is_file()
    written = _library({"identity_net_copy": copied}, {}, set())
    assert written["identity_net"] == copied
    (library / "adapters.json").write_text(json.dumps(written))
    pipe = load_pipeline(str(tiny_dir), adapters_dir=library)
    assert type(pipe.identity_net()).__name__ == "FaceWorldIdentity"
    # moved elsewhere, the library still finds it: the path is relative to the library
    moved = shutil.move(str(library), str(tmp_path / "moved"))
    assert type(load_pipeline(str(tiny_dir), adapters_dir=moved).identity_net()).__name__ == "FaceWorldIdentity"
