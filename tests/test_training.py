"""Training ε1 (identity) and ε2 (edit) on the tiny random model set, on CPU.

The models are random, so the faces need not be real: a few drawn 64x64 faces are the fixed
training set. The runs are shared per module (20 steps of each trainer) to keep the file fast.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ipfacediff.errors import UserError
from ipfacediff.settings import EditSettings
from ipfacediff.training import load_training_faces, load_training_pairs, train_edit, train_identity
from ipfacediff.training_settings import EditTrainingSettings, IdentityTrainingSettings

EDIT = dict(source="a face", target="a face with eyeglasses")
TINY_EDIT = dict(inversion_steps=4, generation_steps=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def identity():
    from ipfacediff.identity import IdentityEncoder

    return IdentityEncoder.from_pretrained(None)


def drawn_faces(count: int = 4, size: int = 64, seed: int = 0) -> np.ndarray:
    """Simple faces (skin ellipse, eyes, nose, mouth near the canonical points) on textured ground."""
    rng = np.random.default_rng(seed)
    faces = []
    for i in range(count):
        ground = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3)).astype(np.uint8), (0, 0), 3)
        image = (ground * 0.5 + 50).astype(np.uint8)
        skin = tuple(int(c) for c in rng.integers(120, 230, 3))
        s = size / 64
        cv2.ellipse(image, (round(32 * s), round(38 * s)), (round(17 * s), round(22 * s)), 0, 0, 360, skin, -1)
        for x in (24, 40):
            cv2.circle(image, (round(x * s), round(30 * s)), round(3 * s), (40, 30, 20), -1)
        cv2.line(image, (round(32 * s), round(33 * s)), (round(32 * s), round(39 * s)), (90, 60, 50), 1)
        cv2.ellipse(image, (round(32 * s), round(46 * s)), (round(7 * s), 2 + i % 3), 0, 0, 180, (150, 50, 60), -1)
        faces.append(image)
    return np.stack(faces)


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    for index, face in enumerate(drawn_faces()):
        cv2.imwrite(str(folder / f"face_{index}.png"), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    return folder


@pytest.fixture(scope="module")
def frames(faces_dir):
    return load_training_faces(faces_dir, 64)


@pytest.fixture(scope="module")
def base_output(tiny_dir, frames):
    from ipfacediff.editing import IPFaceDiffPipeline
    from ipfacediff.models import load_model_set

    return IPFaceDiffPipeline.from_model_set(load_model_set(str(tiny_dir)))(
        frames, EditSettings(prompt=EDIT["target"], steps=3)
    ).frames


@pytest.fixture(scope="module")
def identity_run(tiny_dir, faces_dir, identity, tmp_path_factory):
    calls = []
    result = train_identity(
        str(tiny_dir),
        faces_dir,
        tmp_path_factory.mktemp("identity") / "out",
        max_steps=20,
        batch_size=4,
        learning_rate=2e-3,
        checkpoint_every=10,
        identity=identity,
        progress=lambda *args: calls.append(args),
    )
    return result, calls


@pytest.fixture(scope="module")
def edit_run(tiny_dir, faces_dir, identity, tmp_path_factory):
    calls = []
    result = train_edit(
        str(tiny_dir),
        EDIT["source"],
        EDIT["target"],
        faces_dir,
        str(tiny_dir / "clip"),
        tmp_path_factory.mktemp("edit") / "out",
        max_steps=20,
        batch_size=2,
        learning_rate=2e-3,
        checkpoint_every=10,
        identity=identity,
        progress=lambda *args: calls.append(args),
        **TINY_EDIT,
    )
    return result, calls


def check_lowered(result) -> None:
    assert result.steps == len(result.losses) == 20
    assert all(np.isfinite(result.losses))
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    assert result.validation_after < result.validation_before


def check_adapter_file(result) -> dict[str, torch.Tensor]:
    assert result.adapter == result.output / "pytorch_lora_weights.safetensors"
    state = load_file(str(result.adapter))
    assert state and all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    assert any(".attn1.to_q." in k for k in state) and any(".attn2.to_out.0." in k for k in state)
    report = json.loads((result.output / "training.json").read_text())
    assert report["steps"] == 20 and len(report["losses"]) == 20 and report["settings"]["rank"] == 4
    assert {"torch", "diffusers", "peft", "accelerate"} <= set(report["versions"])
    assert sorted(p.name for p in (result.output / "checkpoints").iterdir()) == ["step_000010", "step_000020"]
    written = [p for p in result.output.rglob("*") if p.is_file()]
    assert written and all(p.suffix in (".safetensors", ".json") for p in written)  # nothing to unpickle
    return state


def check_loaded(unet, result, adapter_name: str) -> None:
    """The reloaded UNet holds exactly the trained LoRA weights (final checkpoint)."""
    trained = load_file(str(result.output / "checkpoints" / "step_000020" / "trainable.safetensors"))
    loaded = {n.replace(f".{adapter_name}.", ".default."): p for n, p in unet.named_parameters() if "lora_" in n}
    assert set(loaded) == set(trained)
    for name, value in trained.items():
        torch.testing.assert_close(loaded[name], value)


def check_progress(calls) -> None:
    train = [c for c in calls if c[0] == "train"]
    assert [c[1] for c in train] == list(range(1, 21)) and all(c[2] == 20 for c in train)
    assert all(isinstance(c[3], float) for c in train)
    assert any(c[0] == "faces" for c in calls)


# --- ε1 ---------------------------------------------------------------------------------------


def test_identity_training_lowers_its_loss(identity_run):
    result, calls = identity_run
    check_lowered(result)
    check_adapter_file(result)
    check_progress(calls)


def test_identity_adapter_reloads_and_changes_the_edit(identity_run, tiny_dir, frames, base_output):
    from ipfacediff.editing import IPFaceDiffPipeline
    from ipfacediff.models import load_model_set

    result, _ = identity_run
    models = load_model_set(str(tiny_dir), identity_lora=str(result.adapter))
    check_loaded(models.unet, result, "identity")
    edited = IPFaceDiffPipeline.from_model_set(models)(frames, EditSettings(prompt=EDIT["target"], steps=3)).frames
    assert edited.shape == base_output.shape
    assert not np.array_equal(edited, base_output)


# Each trainer's LoRA B matrices (sum, sum of magnitudes) and its losses after the fixture's 20
# steps, as the trainers gave them before they shared one Trainer and diffusion.py's DDIM: the
# refactoring kept every number.
BEFORE_THE_SHARED_TRAINER = {
    "identity": (3.973138647626911, 197.1621757497851, [1.0842230319976807, 1.012108325958252]),
    "edit": (0.8716001642969786, 229.52396951689298, [0.8635269403457642, 0.7781370878219604]),
}


@pytest.mark.parametrize("trainer", ["identity", "edit"])
def test_trainers_train_what_they_trained_before_sharing_one_trainer(trainer, identity_run, edit_run):
    result, _ = identity_run if trainer == "identity" else edit_run
    b_sum, b_magnitude, (first_loss, last_loss) = BEFORE_THE_SHARED_TRAINER[trainer]
    b = [v.double() for k, v in load_file(str(result.adapter)).items() if "lora_B" in k]
    # Recorded on one CPU; another's BLAS kernels move the weights by about 1e-4 of their magnitude
    # while the losses agree to 1e-5. The signed sum cancels (0.87 of 230): its tolerance is the
    # magnitude's.
    assert float(sum(v.sum() for v in b)) == pytest.approx(b_sum, abs=1e-4 * b_magnitude)
    assert float(sum(v.abs().sum() for v in b)) == pytest.approx(b_magnitude, rel=1e-3)
    assert [result.losses[0], result.losses[-1]] == pytest.approx([first_loss, last_loss], rel=1e-5)


# --- ε2 ---------------------------------------------------------------------------------------


def test_edit_training_lowers_its_loss(edit_run):
    result, calls = edit_run
    check_lowered(result)
    check_adapter_file(result)
    check_progress(calls)
    assert any(c[0] == "invert" for c in calls)
    assert len(list((result.output / "cache").glob("*/inverted.safetensors"))) == 1


def test_edit_adapter_reloads_and_changes_the_edit(edit_run, tiny_dir, frames, base_output):
    from ipfacediff.editing import IPFaceDiffPipeline
    from ipfacediff.models import load_model_set

    result, _ = edit_run
    models = load_model_set(str(tiny_dir), edit_loras=[(str(result.adapter), 1.0)])
    check_loaded(models.unet, result, "edit_0")
    edited = IPFaceDiffPipeline.from_model_set(models)(frames, EditSettings(prompt=EDIT["target"], steps=3)).frames
    assert not np.array_equal(edited, base_output)


def test_image_direction_keeps_the_attribute_and_cancels_the_people():
    from ipfacediff.training import image_direction

    generator = torch.Generator().manual_seed(0)
    people = torch.randn(64, 32, generator=generator)
    attribute = torch.zeros(32)
    attribute[3] = 1.0
    reference = F.normalize(people[:32] + 2.0, dim=-1)  # two sets of different people who share a look
    examples = F.normalize(people[32:] + 2.0 + attribute, dim=-1)
    direction = image_direction(reference, examples)
    assert direction.shape == (1, 32) and torch.linalg.vector_norm(direction) == pytest.approx(1.0)
    assert F.cosine_similarity(direction[0], attribute, dim=0) > 0.5
    assert F.cosine_similarity(direction[0], attribute, dim=0) > F.cosine_similarity(
        F.normalize(examples[:1] - reference[:1], dim=-1)[0], attribute, dim=0
    )  # one pair alone: mostly people


def test_edit_training_towards_example_images(edit_run, tiny_dir, faces_dir, identity, tmp_path):
    """--target-images: the loss follows the examples' direction (another loss than the text
    direction's on the same faces and steps), and the run records which examples it used."""
    examples = tmp_path / "examples"
    examples.mkdir()
    for index, face in enumerate(drawn_faces(count=3, seed=5)):
        face[26:34, 18:46] = (20, 20, 20)  # a dark band over the eyes
        cv2.imwrite(str(examples / f"{index}.png"), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    result = train_edit(
        str(tiny_dir),
        EDIT["source"],
        EDIT["target"],
        faces_dir,
        str(tiny_dir / "clip"),
        tmp_path / "out",
        max_steps=2,
        batch_size=2,
        learning_rate=2e-3,
        checkpoint_every=10,
        identity=identity,
        target_images=examples,
        **TINY_EDIT,
    )
    assert result.steps == 2 and all(np.isfinite(result.losses))
    text_run, _ = edit_run
    assert abs(result.validation_before - text_run.validation_before) > 1e-4
    settings = json.loads((result.output / "training.json").read_text())["settings"]
    assert settings["target_images"] == str(examples.resolve()) and len(settings["target_images_digest"]) > 8
    assert "target_images" not in json.loads((text_run.output / "training.json").read_text())["settings"]
    with pytest.raises(UserError, match="^--target-images: .* does not exist"):
        train_edit(
            str(tiny_dir),
            EDIT["source"],
            EDIT["target"],
            faces_dir,
            str(tiny_dir / "clip"),
            tmp_path / "out2",
            max_steps=2,
            target_images=tmp_path / "missing",
            **TINY_EDIT,
        )


def with_band(face: np.ndarray) -> np.ndarray:
    """The face 'edited': a dark band over the eyes."""
    edited = face.copy()
    edited[26:34, 18:46] = (20, 20, 20)
    return edited


@pytest.fixture(scope="module")
def edited_dir(tmp_path_factory, faces_dir):
    """faces_dir's images edited, under the same names (before/after pairs)."""
    folder = tmp_path_factory.mktemp("edited")
    for path in sorted(faces_dir.glob("*.png")):
        cv2.imwrite(str(folder / path.name), with_band(cv2.imread(str(path))))
    return folder


def test_training_pairs_are_matched_by_file_name(faces_dir, edited_dir, tmp_path):
    before, after = load_training_pairs(faces_dir, edited_dir, 64)
    assert before.shape == after.shape == (4, 64, 64, 3)
    assert np.array_equal(before, load_training_faces(faces_dir, 64))
    for face, edited in zip(before, after):  # each partner is its own face edited, not another's
        assert np.abs(with_band(face).astype(int) - edited).mean() < 1.0
    kept = load_training_pairs(faces_dir, edited_dir, 64, max_images=2)
    assert len(kept[0]) == 2 and all(np.abs(with_band(f).astype(int) - e).mean() < 1.0 for f, e in zip(*kept))
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in sorted(edited_dir.glob("*.png"))[:3]:
        (partial / path.name).write_bytes(path.read_bytes())
    with pytest.raises(UserError, match=r"^--paired-targets: 1 training image\(s\) have no edited partner"):
        load_training_pairs(faces_dir, partial, 64)
    (partial / "face_3.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read the pair face_3.png"):
        load_training_pairs(faces_dir, partial, 64)


def test_edit_training_towards_paired_targets(edit_run, tiny_dir, faces_dir, edited_dir, identity, tmp_path):
    """--paired-targets: with only the L1 term, training pulls the results towards the edited
    faces (the validation loss is the mean distance to them); the run records the pairs."""
    result = train_edit(
        str(tiny_dir),
        EDIT["source"],
        EDIT["target"],
        faces_dir,
        str(tiny_dir / "clip"),
        tmp_path / "out",
        max_steps=6,
        batch_size=4,
        learning_rate=5e-3,
        checkpoint_every=10,
        lambda_dir=0.0,
        lambda_id=0.0,
        lambda_l1=1.0,
        paired_targets=edited_dir,
        **TINY_EDIT,
    )
    assert result.steps == 6 and all(np.isfinite(result.losses))
    assert result.validation_after < result.validation_before
    settings = json.loads((result.output / "training.json").read_text())["settings"]
    assert settings["paired_targets"] == str(edited_dir.resolve()) and len(settings["paired_targets_digest"]) > 8
    text_run, _ = edit_run
    assert "paired_targets" not in json.loads((text_run.output / "training.json").read_text())["settings"]
    paired = train_edit(
        str(tiny_dir),
        EDIT["source"],
        EDIT["target"],
        faces_dir,
        str(tiny_dir / "clip"),
        tmp_path / "full",
        max_steps=1,
        batch_size=2,
        checkpoint_every=10,
        identity=identity,
        paired_targets=edited_dir,
        **TINY_EDIT,
    )  # all three terms, each pair its own direction
    assert np.isfinite(paired.validation_before) and abs(paired.validation_before - text_run.validation_before) > 1e-4
    with pytest.raises(UserError, match="give one"):
        train_edit(
            str(tiny_dir),
            EDIT["source"],
            EDIT["target"],
            faces_dir,
            str(tiny_dir / "clip"),
            tmp_path / "both",
            max_steps=1,
            paired_targets=edited_dir,
            target_images=edited_dir,
            **TINY_EDIT,
        )


# --- checkpoints and resume -------------------------------------------------------------------


class Stop(Exception):
    pass


def test_resume_continues_from_the_last_checkpoint(tiny_dir, faces_dir, identity, tmp_path):
    settings = dict(max_steps=6, batch_size=2, learning_rate=2e-3, checkpoint_every=3, identity=identity)
    whole = train_identity(str(tiny_dir), faces_dir, tmp_path / "whole", **settings)

    def stop_at_5(stage, done, total, loss):
        if stage == "train" and done == 5:
            raise Stop

    with pytest.raises(Stop):
        train_identity(str(tiny_dir), faces_dir, tmp_path / "cut", progress=stop_at_5, **settings)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step_000003"]
    assert not (tmp_path / "cut" / "training.json").exists()

    with pytest.raises(UserError, match="already holds a training run") as error:
        train_identity(str(tiny_dir), faces_dir, tmp_path / "cut", **settings)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="rank=4, now 8"):
        train_identity(str(tiny_dir), faces_dir, tmp_path / "cut", resume=True, **{**settings, "rank": 8})

    steps = []
    resumed = train_identity(
        str(tiny_dir),
        faces_dir,
        tmp_path / "cut",  # the same settings, as one object
        IdentityTrainingSettings(max_steps=6, batch_size=2, learning_rate=2e-3, checkpoint_every=3),
        resume=True,
        identity=identity,
        progress=lambda stage, done, total, loss: steps.append(done) if stage == "train" else None,
    )
    assert resumed.resumed_from == 3 and resumed.steps == 6 and steps == [4, 5, 6]
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=1e-5)
    assert resumed.validation_before == pytest.approx(whole.validation_before)
    a, b = load_file(str(resumed.adapter)), load_file(str(whole.adapter))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)

    (tmp_path / "cut" / "checkpoints" / "step_000006" / "optimizer.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="^cannot resume from .*step_000006: the checkpoint is incomplete") as error:
        train_identity(str(tiny_dir), faces_dir, tmp_path / "cut", resume=True, **settings)
    assert "\n" not in str(error.value)


def test_full_fine_tuning_saves_a_unet_folder(tiny_dir, faces_dir, identity, tmp_path):
    from ipfacediff.models import load_model_set, module_fingerprint

    result = train_identity(
        str(tiny_dir),
        faces_dir,
        tmp_path / "full",
        full=True,
        max_steps=2,
        batch_size=2,
        gradient_accumulation=2,
        learning_rate=1e-4,
        identity=identity,
    )
    assert result.adapter == tmp_path / "full" / "unet" and len(result.losses) == 2
    models = load_model_set(str(tiny_dir), identity_model=str(result.output))
    assert module_fingerprint(models.identity_unet) != module_fingerprint(models.unet)


# --- training faces and mistakes --------------------------------------------------------------


def test_settings_are_checked_before_anything_loads(tmp_path):
    """A bad number is one line from the settings object, whether it comes as an option or in it."""
    with pytest.raises(UserError, match="^--max-steps must be at least 1, got 0$"):
        train_identity("no-such-model", tmp_path / "nowhere", tmp_path / "out", max_steps=0)
    with pytest.raises(UserError, match=r"^--inversion-steps and --generation-steps must be between 1 and --t0 \(8\)"):
        train_edit(
            "no-such-model",
            "a face",
            "a face with eyeglasses",
            tmp_path / "nowhere",
            "no-clip",
            tmp_path / "out",
            EditTrainingSettings(t0=8, inversion_steps=4),
            generation_steps=9,
        )
    with pytest.raises(UserError, match="^--mixed-precision must be one of no, fp16, bf16"):
        IdentityTrainingSettings(mixed_precision="fp8")
    with pytest.raises(TypeError):
        train_identity("no-such-model", tmp_path / "nowhere", tmp_path / "out", lambda_dir=1.0)  # ε2's setting
    assert EditTrainingSettings().max_steps == 200 and IdentityTrainingSettings().max_steps == 500
    assert not (tmp_path / "out").exists()


def test_training_faces_from_an_image_folder(tmp_path):
    faces = drawn_faces(3, size=96)
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(faces[0], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "b.jpg"), cv2.cvtColor(np.concatenate([faces[1], faces[1][:20]]), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(faces[2][:48, :48], cv2.COLOR_RGB2BGR))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    loaded = load_training_faces(tmp_path, 64)
    assert loaded.shape == (3, 64, 64, 3) and loaded.dtype == np.uint8
    expected = cv2.resize(faces[0], (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(loaded[0].astype(int) - expected).mean() < 1
    assert len(load_training_faces(tmp_path, 32, max_images=2)) == 2


def test_training_faces_from_a_real_clip(shared_clip):
    faces = load_training_faces(shared_clip("closeup.mp4"), 64, max_images=4)
    assert faces.shape == (4, 64, 64, 3) and faces.dtype == np.uint8
    assert faces.std() > 10  # real crops, not padding


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing data", "does not exist"),
        ("empty folder", "holds no images"),
        ("unreadable images", "no usable faces"),
        ("bad resolution", "multiple of 8"),
        ("missing clip", "CLIP model .* does not exist"),
        ("clip folder without a model", "has no config.json"),
        ("uncached clip hub id", "cannot load the CLIP model"),
        ("same prompts", "are the same text"),
    ],
)
def test_mistakes_are_one_line_user_errors(case, expected, tiny_dir, faces_dir, tmp_path, monkeypatch):
    data, clip, kwargs = faces_dir, str(tiny_dir / "clip"), {}
    if case == "missing data":
        data = tmp_path / "nowhere"
    elif case == "empty folder":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "unreadable images":
        data = tmp_path / "broken"
        data.mkdir()
        (data / "a.png").write_bytes(b"not a png")
    elif case == "bad resolution":
        kwargs = dict(resolution=60)
    elif case == "missing clip":
        clip = str(tmp_path / "no-clip")
    elif case == "clip folder without a model":
        clip = str(tmp_path)
    elif case == "uncached clip hub id":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        clip = "someone/not-a-cached-clip"
    elif case == "same prompts":
        kwargs = dict(target=EDIT["source"])
    output = tmp_path / "out"
    with pytest.raises(UserError, match=expected) as error:
        train_edit(
            str(tiny_dir),
            EDIT["source"],
            kwargs.pop("target", EDIT["target"]),
            data,
            clip,
            output,
            max_steps=1,
            **kwargs,
            **TINY_EDIT,
        )
    assert "\n" not in str(error.value)
    assert not output.exists()
    if case in ("missing data", "empty folder", "unreadable images"):
        with pytest.raises(UserError, match=expected):
            train_identity(str(tiny_dir), data, output, max_steps=1)
