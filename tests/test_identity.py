"""The identity encoder: dlib's face net ported to torch, and the canonical-crop interface on top.

dlib itself is the reference: its descriptors on its own chips must be reproduced to float
rounding, and the canonical-crop path must tell the two people of the shared clips apart on dlib's
distance scale.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip(
        "face_recognition_models is not installed: the identity encoder's weights come from it",
        allow_module_level=True,
    )

from ipfacediff.errors import UserError
from ipfacediff.face import CANONICAL_FIVE_POINTS, similarity_transform
from ipfacediff.identity import (
    ARCFACE_TEMPLATE_112,
    DLIB_SAME_PERSON_THRESHOLD,
    DlibFaceNet,
    IdentityEncoder,
    IResNet,
    canonical_alignment_weights,
    canonical_to_arcface_chip_matrix,
    canonical_to_dlib_chip_matrix,
    dlib_model_path,
    load_dlib_face_net,
    parse_dlib_face_net,
)

try:
    import dlib
except ImportError:  # the reference checks need dlib; the interface checks below do not
    dlib = None

NO_DLIB = "dlib is not installed (pip install dlib-bin): it is the reference"
needs_dlib = pytest.mark.skipif(dlib is None, reason=NO_DLIB)

CROP = 256  # canonical crop side used with the real clips


@pytest.fixture(scope="module")
def encoder() -> IdentityEncoder:
    torch.manual_seed(0)
    return IdentityEncoder.from_pretrained(None)


# ----------------------------------------------------------------------------------------------
# Real faces from the shared clips, prepared with dlib's own tools
# ----------------------------------------------------------------------------------------------


class DlibTools:
    def __init__(self) -> None:
        self.detector = dlib.get_frontal_face_detector()
        self.sp5 = dlib.shape_predictor(str(dlib_model_path("shape_predictor_5_face_landmarks.dat")))
        self.sp68 = dlib.shape_predictor(str(dlib_model_path("shape_predictor_68_face_landmarks.dat")))
        self.rec = dlib.face_recognition_model_v1(str(dlib_model_path()))


class Face:
    """One detected face: the frame, dlib's landmarks and chip, dlib's descriptor, our crop."""

    def __init__(self, tools: DlibTools, frame: np.ndarray, rect) -> None:
        import cv2

        self.frame = frame
        self.shape5 = tools.sp5(frame, rect)
        self.landmarks68 = np.array([[p.x, p.y] for p in tools.sp68(frame, rect).parts()], dtype=np.float64)
        self.chip = dlib.get_face_chip(frame, self.shape5, size=150, padding=0.25)
        self.dlib_descriptor = np.array(tools.rec.compute_face_descriptor(self.chip, num_jitters=0))
        # Canonical crop as the project makes it: the weighted similarity from our five points (as
        # dlib's 68-point model sees them) to CANONICAL_FIVE_POINTS; crop pixel i has its centre at
        # unit coordinate (i + 1/2) / CROP.
        self.frame_to_canonical = similarity_transform(
            canonical_points(self.landmarks68), CANONICAL_FIVE_POINTS, canonical_alignment_weights()
        )
        to_pixels = np.array([[CROP, 0.0, -0.5], [0.0, CROP, -0.5]])
        matrix = compose(to_pixels, self.frame_to_canonical)
        self.crop = cv2.warpAffine(frame, matrix, (CROP, CROP), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def crop_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.crop).permute(2, 0, 1).float().div(127.5).sub(1.0)


def canonical_points(p68: np.ndarray) -> np.ndarray:
    """Eye centres (midpoint of each eye's corners), nose tip, mouth corners, from 68 landmarks."""
    return np.array([(p68[36] + p68[39]) / 2, (p68[42] + p68[45]) / 2, p68[30], p68[48], p68[54]])


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    return np.concatenate([outer[:, :2] @ inner[:, :2], outer[:, :2] @ inner[:, 2:] + outer[:, 2:]], axis=1)


def invert(m: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(m[:, :2])
    return np.concatenate([inv, -inv @ m[:, 2:]], axis=1)


def decode_frames(path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def faces_in(tools: DlibTools, frames: list[np.ndarray], wanted: list[int], count: int = 2) -> list[Face]:
    """The first ``count`` frames of ``wanted`` (in that order) where dlib finds exactly one face."""

    def candidates() -> Iterator[int]:
        yield from wanted
        yield from (i for i in range(len(frames)) if i not in wanted)

    faces = []
    for index in candidates():
        rects = tools.detector(frames[index], 1)
        if len(rects) == 1:
            faces.append(Face(tools, frames[index], rects[0]))
            if len(faces) == count:
                return faces
    pytest.skip(f"dlib found a face in fewer than {count} frames")


@pytest.fixture(scope="module")
def tools() -> DlibTools:
    if dlib is None:
        pytest.skip(NO_DLIB)
    return DlibTools()


@pytest.fixture(scope="module")
def closeup(tools: DlibTools, shared_clip) -> list[Face]:
    return faces_in(tools, decode_frames(shared_clip("closeup.mp4")), [0, 20])


@pytest.fixture(scope="module")
def jogger(tools: DlibTools, shared_clip) -> list[Face]:
    # The jogger's face is small and turns: take the first frames dlib finds it in.
    return faces_in(tools, decode_frames(shared_clip("jogger.mp4")), [0, 20, 10, 30])


# ----------------------------------------------------------------------------------------------
# The port against dlib
# ----------------------------------------------------------------------------------------------


def test_parser_reads_dlib_anet_type() -> None:
    spec = parse_dlib_face_net(dlib_model_path())
    kinds = [layer.kind for layer in spec.layers]
    assert kinds.count("con") == 29 and kinds.count("affine") == 29 and kinds.count("fc") == 1
    assert kinds.count("add_prev") == 14 and kinds.count("skip") == 4
    np.testing.assert_allclose(spec.input_mean_rgb, (122.782, 117.001, 104.298), atol=1e-4)
    assert spec.input_size == (150, 150)
    assert spec.loss.startswith("loss_metric")
    assert load_dlib_face_net() is load_dlib_face_net()  # parsed once per process


@needs_dlib
def test_port_matches_dlib_on_any_chip(tools: DlibTools) -> None:
    """Needs no clip: any 150x150 image exercises every weight and the input normalisation."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(150, 150, 3), dtype=np.uint8)
    gradient = np.broadcast_to(np.linspace(0, 255, 150, dtype=np.float64)[None, :, None], (150, 150, 3))
    chips = [noise, np.ascontiguousarray(gradient.astype(np.uint8))]
    reference = np.array([np.array(tools.rec.compute_face_descriptor(chip)) for chip in chips])
    with torch.no_grad():
        ours = load_dlib_face_net()(torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()).numpy()
    assert np.abs(ours - reference).max() < 1e-3


def test_port_matches_dlib_on_real_faces(closeup: list[Face], jogger: list[Face]) -> None:
    faces = closeup + jogger
    chips = torch.from_numpy(np.stack([face.chip for face in faces])).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        ours = load_dlib_face_net()(chips).numpy()
    reference = np.stack([face.dlib_descriptor for face in faces])
    max_abs = np.abs(ours - reference).max()
    print(f"max abs difference to dlib over {len(faces)} real chips: {max_abs:.2e}")
    assert max_abs < 1e-3


# ----------------------------------------------------------------------------------------------
# Canonical crops through IdentityEncoder
# ----------------------------------------------------------------------------------------------


def test_same_person_close_different_people_far(
    encoder: IdentityEncoder, closeup: list[Face], jogger: list[Face]
) -> None:
    crops = torch.stack([face.crop_tensor() for face in closeup + jogger])
    with torch.no_grad():
        d = encoder.descriptor(crops)
    same_closeup = encoder.distance(d[0], d[1]).item()
    same_jogger = encoder.distance(d[2], d[3]).item()
    different = [encoder.distance(d[i], d[j]).item() for i in (0, 1) for j in (2, 3)]
    print(f"same closeup {same_closeup:.3f}, same jogger {same_jogger:.3f}")
    print("different people", np.round(different, 3))
    assert same_closeup < 0.5
    assert same_jogger < 0.5
    assert min(different) > DLIB_SAME_PERSON_THRESHOLD
    # The normalised embeddings order the pairs the same way.
    e = F.normalize(d, dim=-1)
    cross = max(encoder.similarity(e[i], e[j]) for i in (0, 1) for j in (2, 3))
    assert encoder.similarity(e[0], e[1]) > cross


def test_canonical_crops_agree_with_dlib_chips(
    encoder: IdentityEncoder, closeup: list[Face], jogger: list[Face]
) -> None:
    """Our crop -> chip warp stands in for dlib's own alignment (which differs per face a little)."""
    faces = closeup + jogger
    with torch.no_grad():
        ours = encoder.descriptor(torch.stack([face.crop_tensor() for face in faces])).numpy()
    distances = np.linalg.norm(ours - np.stack([face.dlib_descriptor for face in faces]), axis=1)
    print(f"canonical crop vs dlib chip descriptor distances: {np.round(distances, 3)}")
    assert distances.max() < 0.2


def dlib_chip_mapping(chip_details) -> np.ndarray:
    """Frame pixels -> chip pixels for a dlib chip_details (rect rotated by angle around its centre)."""
    r = chip_details.rect
    centre = np.array([(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2])
    c, s = math.cos(chip_details.angle), math.sin(chip_details.angle)
    corners = np.array([[r.left(), r.top()], [r.right(), r.top()], [r.right(), r.bottom()]])
    corners = (corners - centre) @ np.array([[c, -s], [s, c]]).T + centre
    last = chip_details.cols - 1
    targets = np.array([[0, 0], [last, 0], [last, last]], dtype=np.float64)
    frame_h = np.concatenate([corners, np.ones((3, 1))], axis=1)
    return np.linalg.solve(frame_h, targets).T


def test_fixed_warp_matches_dlib_alignment_per_face(closeup: list[Face], jogger: list[Face]) -> None:
    """The fixed canonical -> chip similarity is within a few chip pixels of dlib's per-face one."""
    fixed = canonical_to_dlib_chip_matrix() * 150.0
    fixed[:, 2] -= 0.5  # unit coordinates -> chip pixel indices
    for face in closeup + jogger:
        details = dlib.get_face_chip_details(face.shape5, size=150, padding=0.25)
        per_face = compose(dlib_chip_mapping(details), invert(face.frame_to_canonical))
        points = CANONICAL_FIVE_POINTS
        in_chip = points @ per_face[:, :2].T + per_face[:, 2]
        deviation = np.abs(in_chip - (points @ fixed[:, :2].T + fixed[:, 2]))
        assert deviation.max() < 8.0, deviation


# ----------------------------------------------------------------------------------------------
# The interface (no dlib, no clips needed)
# ----------------------------------------------------------------------------------------------


def smooth_faces(batch: int, side: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1]: something with structure at every crop size."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 12, 12, generator=generator) * 2 - 1
    return F.interpolate(low, size=(side, side), mode="bicubic", align_corners=False).clamp(-1, 1)


def test_gradient_flows_to_crops(encoder: IdentityEncoder) -> None:
    target = encoder(smooth_faces(1, 256, seed=1)).detach()
    crops = smooth_faces(2, 256, seed=2).requires_grad_()
    loss = (1 - encoder.similarity(encoder(crops), target)).mean()
    loss.backward()
    assert crops.grad is not None
    assert torch.isfinite(crops.grad).all()
    assert (crops.grad.abs().flatten(1).amax(1) > 0).all()
    assert all(p.grad is None for p in encoder.parameters())


@pytest.mark.parametrize("side", [64, 256, 512])
def test_embeddings_normalised_and_batch_independent(encoder: IdentityEncoder, side: int) -> None:
    crops = smooth_faces(3, side)
    with torch.no_grad():
        batch = encoder(crops)
        single = torch.cat([encoder(crops[i : i + 1]) for i in range(3)])
    assert batch.shape == (3, encoder.embedding_dim) == (3, 128)
    torch.testing.assert_close(batch.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)


def test_distance_and_similarity_scales(encoder: IdentityEncoder) -> None:
    with torch.no_grad():
        d = encoder.descriptor(smooth_faces(2, 128))
    assert encoder.distance(d[0], d[0]).item() == 0.0
    assert encoder.distance(d, d.flip(0)).shape == (2,)
    torch.testing.assert_close(encoder.similarity(d[0], d[0]), torch.tensor(1.0))


def test_from_pretrained_errors(tmp_path) -> None:
    with pytest.raises(UserError):
        IdentityEncoder.from_pretrained(tmp_path / "missing.dat")
    for name, content in [("arcface.onnx", b""), ("broken.dat", b"\x01\x01junk"), ("broken.pth", b"junk")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError):
            IdentityEncoder.from_pretrained(tmp_path / name)
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(UserError):
        IdentityEncoder.from_pretrained(tmp_path / "other.pth")


def test_arcface_state_dict_round_trip(tmp_path) -> None:
    """Plumbing only (no real ArcFace weights here): depth read from the keys, weights restored,
    the canonical -> 112 warp lands our five points near insightface's template."""
    torch.manual_seed(0)
    net = IResNet((1, 2, 1, 1), embedding_dim=32).eval()
    for module in net.modules():  # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "r_tiny.pth")
    encoder = IdentityEncoder.from_pretrained(tmp_path / "r_tiny.pth")
    assert isinstance(encoder.net, IResNet) and encoder.embedding_dim == 32
    assert [len(getattr(encoder.net, f"layer{i}")) for i in range(1, 5)] == [1, 2, 1, 1]
    crops = smooth_faces(2, 160).requires_grad_()
    with torch.no_grad():
        expected = F.normalize(net(encoder.to_chip(crops)), dim=-1)
    embeddings = encoder(crops)
    torch.testing.assert_close(embeddings, expected)
    embeddings[:, 0].sum().backward()
    assert torch.isfinite(crops.grad).all() and crops.grad.abs().max() > 0
    m = canonical_to_arcface_chip_matrix()
    landed = (CANONICAL_FIVE_POINTS @ m[:, :2].T + m[:, 2]) * 112 - 0.5
    assert np.abs(landed - ARCFACE_TEMPLATE_112).max() < 3.0  # the two templates differ a little


def test_encoders_do_not_share_the_cached_module() -> None:
    a, b = IdentityEncoder(), IdentityEncoder()
    assert a.net is not b.net and a.net is not load_dlib_face_net()
    assert isinstance(a.net, DlibFaceNet)
