"""Identity encoder: a face -> a descriptor whose distances say "same person or not".

The project uses it twice: as a differentiable identity loss while training/editing (the edited
face must keep the subject's identity) and as the identity metric in evaluation.

The default network is dlib's ResNet face-recognition model
(``dlib_face_recognition_resnet_model_v1.dat`` from the ``face_recognition_models`` package),
re-implemented here in PyTorch with every weight read from dlib's own serialized file. dlib itself
is not needed at run time; it is only the reference the port is tested against. Doing it in torch
gives us gradients w.r.t. the input pixels, batching and GPU execution, none of which dlib's Python
binding offers. An insightface ArcFace IResNet ``.pth`` can be used instead (optional, untested
against real ArcFace weights in this repository).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ipfacediff.errors import UserError
from ipfacediff.face import CANONICAL_FIVE_POINTS, similarity_transform

__all__ = [
    "DLIB_CHIP_SIZE",
    "DLIB_CHIP_PADDING",
    "DLIB_SAME_PERSON_THRESHOLD",
    "ARCFACE_TEMPLATE_112",
    "DlibFaceNet",
    "IResNet",
    "IdentityEncoder",
    "canonical_alignment_weights",
    "canonical_to_arcface_chip_matrix",
    "canonical_to_dlib_chip_matrix",
    "dlib_model_path",
    "load_arcface_iresnet",
    "load_dlib_face_net",
    "parse_dlib_face_net",
]

DLIB_CHIP_SIZE = 150
DLIB_CHIP_PADDING = 0.25
# dlib: "if the distance between two descriptors is below 0.6 they are probably the same person".
DLIB_SAME_PERSON_THRESHOLD = 0.6
DLIB_FACE_NET_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def dlib_model_path(name: str = DLIB_FACE_NET_FILE) -> Path:
    """Path of one of the model files shipped by the ``face_recognition_models`` package.

    The package is located with ``find_spec`` rather than imported: its ``__init__`` needs
    ``pkg_resources``, which modern environments no longer have.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the identity encoder needs the face_recognition_models package: pip install face_recognition_models==0.3.0"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "models" / name
        if path.is_file():
            return path
    raise UserError(f"{name} is missing from the face_recognition_models package: reinstall it")


# ----------------------------------------------------------------------------------------------
# dlib's binary serialization
# ----------------------------------------------------------------------------------------------


class _DlibReader:
    """Reads the primitives of dlib's portable serialization format from a byte string.

    * integers: one control byte (low nibble = number of value bytes, bit 0x80 = negative) then the
      magnitude, little endian; so ``2`` is ``01 02``.
    * floats/doubles: an int64 mantissa and an int16 exponent, value = mantissa * 2**exponent (three
      reserved exponents mean inf, -inf and nan).
    * bool: the ASCII character ``'0'`` or ``'1'``.
    * std::string: an unsigned integer length, then the bytes.
    * dnn tensors: int version 2, four int64 dimensions (n, k, nr, nc), then raw little-endian
      float32 values (not the portable float format).
    """

    _INF, _NINF, _NAN = 32000, 32001, 32002

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"not a dlib face-recognition net: {what} (at byte {self.pos})")

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail("unexpected end of file")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def int(self) -> int:
        control = self.byte()
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            raise self.fail(f"bad integer control byte {control:#04x}")
        raw = self.data[self.pos : self.pos + size]
        if len(raw) != size:
            raise self.fail("unexpected end of file")
        self.pos += size
        value = int.from_bytes(raw, "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa = self.int()
        exponent = self.int()
        if exponent == self._INF:
            return math.inf
        if exponent == self._NINF:
            return -math.inf
        if exponent == self._NAN:
            return math.nan
        return math.ldexp(mantissa, exponent)

    def bool(self) -> bool:
        char = self.byte()
        if char not in (ord("0"), ord("1")):
            raise self.fail(f"bad bool byte {char:#04x}")
        return char == ord("1")

    def str(self) -> str:
        size = self.int()
        raw = self.data[self.pos : self.pos + size]
        if len(raw) != size:
            raise self.fail("unexpected end of file")
        self.pos += size
        return raw.decode("latin-1")

    def tensor(self) -> np.ndarray:
        if (version := self.int()) != 2:
            raise self.fail(f"tensor version {version}")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        raw = self.data[self.pos : self.pos + 4 * count]
        if len(raw) != 4 * count:
            raise self.fail("unexpected end of file in a tensor")
        self.pos += 4 * count
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias(self) -> tuple[int, int, int, int]:
        if (version := self.int()) != 1:
            raise self.fail(f"alias_tensor version {version}")
        return tuple(self.int() for _ in range(4))  # type: ignore[return-value]

    def expect(self, value: int, allowed: tuple[int, ...], what: str) -> None:
        if value not in allowed:
            raise self.fail(f"{what} is {value}, expected one of {allowed}")


# ----------------------------------------------------------------------------------------------
# The architecture (dlib's examples/dnn_face_recognition_ex.cpp, ``anet_type``)
# ----------------------------------------------------------------------------------------------
#
# dlib builds networks from nested templates; each layer's template wraps the one below it. We
# spell the same nesting out as a list of layers from the output (outermost) to the input
# (innermost), because that is the order in which dlib writes the layer *headers*: every layer
# serializes its version, then its whole sub-network, then its own parameters. The file therefore
# reads: loss header+details, all layer version numbers outermost-first, the input layer, and then
# each layer's parameters innermost-first. The file cannot describe the topology by itself (tag,
# skip and add_prev ids are template arguments, never serialized), so it is checked against this
# list instead.
#
#   residual<N>      = add_prev1<block<N,stride 1,tag1<SUB>>>
#   residual_down<N> = add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,stride 2,tag1<SUB>>>>>>
#   block<N,s>       = affine<con<N,3,3,1,1,relu<affine<con<N,3,3,s,s,SUB>>>>>
#   ares<N>          = relu<residual<N>>,   ares_down<N> = relu<residual_down<N>>
#   anet = loss_metric<fc_no_bias<128,avg_pool_everything<
#            ares_down<256>  ares<256> ares<256> ares_down<256>  ares<128> ares<128> ares_down<128>
#            ares<64> ares<64> ares<64> ares_down<64>  ares<32> ares<32> ares<32>
#            max_pool<3,3,2,2,relu<affine<con<32,7,7,2,2,input_rgb_image_sized<150>>>>>>>>


@dataclass
class _Layer:
    kind: str  # con, affine, relu, max_pool, avg_pool, fc, tag, skip, add_prev
    arg: tuple[int, ...] = ()
    params: dict[str, np.ndarray] = field(default_factory=dict)
    config: dict[str, object] = field(default_factory=dict)


def _block(n: int, stride: int) -> list[_Layer]:
    return [
        _Layer("affine"),
        _Layer("con", (n, 3, 1)),
        _Layer("relu"),
        _Layer("affine"),
        _Layer("con", (n, 3, stride)),
    ]


def _ares(n: int) -> list[_Layer]:
    return [_Layer("relu"), _Layer("add_prev", (1,)), *_block(n, 1), _Layer("tag", (1,))]


def _ares_down(n: int) -> list[_Layer]:
    return [
        _Layer("relu"),
        _Layer("add_prev", (2,)),
        _Layer("avg_pool", (2, 2)),
        _Layer("skip", (1,)),
        _Layer("tag", (2,)),
        *_block(n, 2),
        _Layer("tag", (1,)),
    ]


def _anet_outer_to_inner() -> list[_Layer]:
    layers = [_Layer("fc", (128,)), _Layer("avg_pool", (0, 1))]
    layers += _ares_down(256)
    layers += _ares(256) + _ares(256) + _ares_down(256)
    layers += _ares(128) + _ares(128) + _ares_down(128)
    layers += _ares(64) + _ares(64) + _ares(64) + _ares_down(64)
    layers += _ares(32) + _ares(32) + _ares(32)
    layers += [_Layer("max_pool", (3, 2)), _Layer("relu"), _Layer("affine"), _Layer("con", (32, 7, 2))]
    return layers


@dataclass
class DlibNetSpec:
    """What :func:`parse_dlib_face_net` read: the layers input-first, with their weights."""

    layers: list[_Layer]  # innermost (next to the input) first
    input_mean_rgb: tuple[float, float, float]
    input_size: tuple[int, int]
    loss: str
    loss_margin: float
    loss_dist_thresh: float


def _read_con(r: _DlibReader, layer: _Layer) -> None:
    version = r.str()
    if version not in ("con_4", "con_5", "con_6"):
        raise r.fail(f"expected a con_ layer, found {version!r}")
    params = r.tensor().reshape(-1)
    num_filters = r.int()
    nr, nc = r.int(), r.int()
    stride_y, stride_x = r.int(), r.int()
    pad_y, pad_x = r.int(), r.int()
    filters = r.alias()
    biases = r.alias()
    for _ in range(4):  # learning-rate / weight-decay multipliers
        r.float()
    use_bias = r.bool() if version in ("con_5", "con_6") else True
    use_relu = r.bool() if version == "con_6" else False
    n, k, stride = layer.arg
    if (num_filters, nr, nc, stride_y, stride_x) != (n, k, k, stride, stride):
        raise r.fail(f"con layer is {num_filters} {nr}x{nc}/{stride_y}, expected {n} {k}x{k}/{stride}")
    # dlib's default padding: k//2 for stride 1, none at all for strided convolutions.
    expected_pad = k // 2 if stride == 1 else 0
    if (pad_y, pad_x) != (expected_pad, expected_pad):
        raise r.fail(f"con padding {pad_y},{pad_x}, expected {expected_pad}")
    n_weights = int(np.prod(filters))
    if filters[0] != n or filters[2:] != (k, k):
        raise r.fail(f"con filter shape {filters}")
    layer.params["weight"] = params[:n_weights].reshape(filters).copy()
    if use_bias and int(np.prod(biases)) > 0:
        layer.params["bias"] = params[n_weights : n_weights + n].copy()
    elif params.size != n_weights:
        raise r.fail("con parameter size")
    layer.config.update(padding=pad_y, stride=stride, relu=use_relu)


def _read_affine(r: _DlibReader, layer: _Layer) -> None:
    version = r.str()
    if version not in ("affine_", "affine_2"):
        raise r.fail(f"expected an affine_ layer, found {version!r}")
    params = r.tensor().reshape(-1)
    gamma_shape = r.alias()
    r.alias()  # beta has gamma's shape
    mode = r.int()
    disabled = r.bool() if version == "affine_2" else False
    if mode != 0:  # CONV_MODE: one scale/shift per channel
        raise r.fail(f"affine mode {mode}, expected CONV_MODE")
    channels = int(np.prod(gamma_shape))
    if params.size != 2 * channels:
        raise r.fail("affine parameter size")
    layer.params["gamma"] = params[:channels].copy()
    layer.params["beta"] = params[channels:].copy()
    layer.config["disabled"] = disabled


def _read_relu(r: _DlibReader, layer: _Layer) -> None:
    version = r.str()
    if version not in ("relu_", "relu_2"):
        raise r.fail(f"expected a relu_ layer, found {version!r}")
    layer.config["disabled"] = r.bool() if version == "relu_2" else False


def _read_pool(r: _DlibReader, layer: _Layer) -> None:
    version = r.str()
    expected = "max_pool_2" if layer.kind == "max_pool" else "avg_pool_2"
    if version != expected:
        raise r.fail(f"expected {expected}, found {version!r}")
    nr, nc = r.int(), r.int()
    stride_y, stride_x = r.int(), r.int()
    pad_y, pad_x = r.int(), r.int()
    k, stride = layer.arg
    if (nr, nc, stride_y, stride_x, pad_y, pad_x) != (k, k, stride, stride, 0, 0):
        raise r.fail(f"{layer.kind} is {nr}x{nc}/{stride_y} pad {pad_y}, expected {k}x{k}/{stride}")


def _read_fc(r: _DlibReader, layer: _Layer) -> None:
    version = r.str()
    if version not in ("fc_2", "fc_3"):
        raise r.fail(f"expected an fc_ layer, found {version!r}")
    num_outputs, num_inputs = r.int(), r.int()
    params = r.tensor().reshape(-1)
    r.alias()  # weights: (num_inputs, num_outputs)
    r.alias()  # biases
    bias_mode = r.int()
    for _ in range(4):
        r.float()
    if version == "fc_3":
        r.bool()  # use_bias
    if num_outputs != layer.arg[0] or bias_mode != 1:  # FC_NO_BIAS == 1
        raise r.fail(f"fc layer has {num_outputs} outputs / bias mode {bias_mode}")
    if params.size != num_inputs * num_outputs:
        raise r.fail("fc parameter size")
    # dlib computes out = x @ W with W stored row-major as (num_inputs, num_outputs).
    layer.params["weight"] = params.reshape(num_inputs, num_outputs).T.copy()


_DETAIL_READERS = {
    "con": _read_con,
    "affine": _read_affine,
    "relu": _read_relu,
    "max_pool": _read_pool,
    "avg_pool": _read_pool,
    "fc": _read_fc,
}


def parse_dlib_face_net(path: str | Path) -> DlibNetSpec:
    """Read dlib's ``anet_type`` face-recognition network from its serialized ``.dat`` file."""
    r = _DlibReader(Path(path).read_bytes())
    r.expect(r.int(), (1,), "add_loss_layer version")
    loss = r.str()
    if loss == "loss_metric_2":
        margin, dist_thresh = r.float(), r.float()
    elif loss == "loss_metric_":
        margin, dist_thresh = 0.1, 0.75
    else:
        raise r.fail(f"expected loss_metric, found {loss!r}")

    outer_to_inner = _anet_outer_to_inner()
    versions = []
    for layer in outer_to_inner:
        versions.append(r.int())
        if layer.kind in ("tag", "skip"):
            r.expect(versions[-1], (1,), f"{layer.kind} layer version")
        elif layer is outer_to_inner[-1]:  # add_layer directly on the input layer
            r.expect(versions[-1], (2, 3), "input add_layer version")
        else:
            r.expect(versions[-1], (1, 2), "add_layer version")

    if (name := r.str()) != "input_rgb_image_sized":
        raise r.fail(f"expected input_rgb_image_sized, found {name!r}")
    mean_rgb = (r.float(), r.float(), r.float())
    size = (r.int(), r.int())

    inner_to_outer = outer_to_inner[::-1]
    for index, (layer, version) in enumerate(zip(inner_to_outer, versions[::-1])):
        if layer.kind in ("tag", "skip"):
            continue  # no payload of their own
        if layer.kind == "add_prev":
            if (name := r.str()) != "add_prev_":
                raise r.fail(f"expected add_prev_, found {name!r}")
        else:
            _DETAIL_READERS[layer.kind](r, layer)
        # add_layer bookkeeping: three bools, then x_grad and cached_output (empty in saved nets)
        for _ in range(3):
            r.bool()
        r.tensor()
        r.tensor()
        if index == 0:
            r.tensor()  # grad_final
            if version >= 3:
                r.int()  # sample expansion factor
        elif version >= 2:
            r.tensor()  # params_grad
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} trailing bytes")
    return DlibNetSpec(inner_to_outer, mean_rgb, size, loss, margin, dist_thresh)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# The network in torch
# ----------------------------------------------------------------------------------------------


class _Affine(nn.Module):
    """dlib's ``affine_`` layer: a batch norm frozen into a per-channel scale and shift."""

    def __init__(self, gamma: np.ndarray, beta: np.ndarray) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(gamma).view(1, -1, 1, 1))
        self.bias = nn.Parameter(torch.from_numpy(beta).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: sum two tensors whose shapes may differ, missing elements being 0.

    Downsampling blocks add a 64-channel branch to a 32-channel shortcut (channels padded with
    zeros), and where a stride-2 unpadded 3x3 convolution and a 2x2 average pool disagree on the
    output size (8 -> 3 vs 4, 4 -> 1 vs 2) the result is the larger size, the missing bottom/right
    rows and columns of the smaller tensor counting as zeros.
    """
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class DlibFaceNet(nn.Module):
    """dlib's ResNet-29 face-recognition network (``anet_type``), weights from dlib's file.

    Input: ``(B, 3, 150, 150)`` RGB chips aligned the way ``dlib.get_face_chip(..., size=150,
    padding=0.25)`` aligns them, as floats on the 0..255 scale (not rounded: fractional values
    are fine and keep the network differentiable). Output: the raw 128-d descriptor, identical to
    ``dlib.face_recognition_model_v1.compute_face_descriptor`` up to float rounding.
    """

    def __init__(self, spec: DlibNetSpec) -> None:
        super().__init__()
        self.input_size = spec.input_size
        # dlib's input layer: (pixel - mean) / 256 per channel.
        mean = torch.tensor(spec.input_mean_rgb, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean)
        self.layers = nn.ModuleList()
        self.plan: list[tuple[str, object]] = []
        for layer in spec.layers:
            if layer.kind == "con":
                weight = torch.from_numpy(layer.params["weight"])
                conv = nn.Conv2d(
                    weight.shape[1],
                    weight.shape[0],
                    weight.shape[2],
                    stride=int(layer.config["stride"]),  # type: ignore[arg-type]
                    padding=int(layer.config["padding"]),  # type: ignore[arg-type]
                    bias="bias" in layer.params,
                )
                conv.weight.data.copy_(weight)
                if "bias" in layer.params:
                    conv.bias.data.copy_(torch.from_numpy(layer.params["bias"]))
                self.plan.append(("module", len(self.layers)))
                self.layers.append(conv)
                if layer.config["relu"]:
                    self.plan.append(("relu", None))
            elif layer.kind == "affine":
                if not layer.config["disabled"]:
                    self.plan.append(("module", len(self.layers)))
                    self.layers.append(_Affine(layer.params["gamma"], layer.params["beta"]))
            elif layer.kind == "relu":
                if not layer.config["disabled"]:
                    self.plan.append(("relu", None))
            elif layer.kind == "fc":
                weight = torch.from_numpy(layer.params["weight"])
                fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                fc.weight.data.copy_(weight)
                self.plan.append(("fc", len(self.layers)))
                self.layers.append(fc)
            else:  # max_pool, avg_pool, tag, skip, add_prev
                self.plan.append((layer.kind, layer.arg))

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        """``chips``: (B, 3, 150, 150) RGB on the 0..255 scale -> (B, 128) raw descriptors."""
        if tuple(chips.shape[-2:]) != tuple(self.input_size) or chips.shape[1] != 3:
            rows, cols = self.input_size
            raise ValueError(f"DlibFaceNet wants (B, 3, {rows}, {cols}) chips, got {tuple(chips.shape)}")
        x = (chips - self.mean) / 256.0
        tags: dict[int, torch.Tensor] = {}
        for kind, arg in self.plan:
            if kind == "module":
                x = self.layers[arg](x)  # type: ignore[index]
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "max_pool":
                k, s = arg  # type: ignore[misc]
                x = F.max_pool2d(x, k, s)
            elif kind == "avg_pool":
                k, s = arg  # type: ignore[misc]
                x = x.mean(dim=(2, 3), keepdim=True) if k == 0 else F.avg_pool2d(x, k, s)
            elif kind == "tag":
                tags[arg[0]] = x  # type: ignore[index]
            elif kind == "skip":
                x = tags[arg[0]]  # type: ignore[index]
            elif kind == "add_prev":
                x = _add_zero_padded(x, tags[arg[0]])  # type: ignore[index]
            elif kind == "fc":
                x = self.layers[arg](x.flatten(1))  # type: ignore[index]
        return x


@functools.lru_cache(maxsize=4)
def _load_dlib_face_net_cached(path: str) -> DlibFaceNet:
    net = DlibFaceNet(parse_dlib_face_net(path))
    net.eval().requires_grad_(False)
    return net


def load_dlib_face_net(path: str | Path | None = None) -> DlibFaceNet:
    """dlib's face net (default: the one in face_recognition_models), parsed once per process.

    Every caller gets the same frozen module; :class:`IdentityEncoder` wraps a copy of it, so
    moving one encoder to a GPU never moves another's network.
    """
    resolved = Path(path) if path is not None else dlib_model_path()
    if not resolved.is_file():
        raise UserError(f"identity model {resolved} does not exist: pass an existing .dat file")
    return _load_dlib_face_net_cached(str(resolved.resolve()))


# ----------------------------------------------------------------------------------------------
# Canonical crop -> dlib chip
# ----------------------------------------------------------------------------------------------
#
# dlib aligns a face for its net with ``get_face_chip(img, shape5, size=150, padding=0.25)``: a
# least-squares similarity that puts the 5-point landmarks (both corners of each eye and the base
# of the nose, i.e. point 33 of the 68-point scheme) on dlib's mean face shape, expressed in a unit
# "mean face" frame and mapped into the chip as chip = size * (padding + u) / (1 + 2 padding).
# (dlib's chip pixel j sits at mean-frame chip coordinate j + 1/2 up to a sub-0.5-pixel stretch at
# the border, see get_mapping_to_chip / centered_drect, so the chip obeys the same "pixel centres
# at (i + 1/2) / size" convention as our canonical crops and ``align_corners=False``.)
#
# Our canonical crop puts eye centres, nose tip and mouth corners on CANONICAL_FIVE_POINTS (a fit
# weighted towards the eyes, ipfacediff.face.ALIGNMENT_WEIGHTS). To relate the two we write the
# canonical points in dlib's mean-face frame - eye centres as the midpoints of the mean eye
# corners, nose tip = 68-point mean point 30, mouth corners = points 48 and 54 (dlib's 68-point
# mean shape in get_face_chip_details uses the same frame: its eye corners agree with the 5-point
# ones to 0.003) - and fit the same weighted similarity mean frame -> canonical crop. The
# composition is the fixed canonical -> chip similarity. It was checked numerically on the real
# test clips: running dlib's detector + 5-point predictor + get_face_chip_details, and the
# 68-point predictor for our five points, the per-frame canonical -> chip transform differs from
# this fixed one only by the face's own deviation from the mean shape: 1.4-3.4 chip pixels at
# the five canonical points on the closeup, 0.9-2.3 on the jogger (ten frames each), in different
# directions, so there is no common offset to calibrate away. Descriptors of 256-px canonical
# crops land 0.06-0.13 from dlib's own (dlib scale); with the per-face transform instead of the
# fixed one it is about 0.03, so what remains is mostly that per-face alignment difference.

# dlib's 5-point mean shape (get_face_chip_details): image-right eye outer/inner corner, image-left
# eye outer/inner corner, nose base.
_DLIB_MEAN_SHAPE_5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)
# dlib's 68-point mean shape, the three points the 5-point model lacks: nose tip (30), mouth
# corners (48 image-left, 54 image-right).
_DLIB_MEAN_NOSE_TIP = (0.490127, 0.515625)
_DLIB_MEAN_MOUTH_LEFT = (0.254149, 0.780233)
_DLIB_MEAN_MOUTH_RIGHT = (0.726104, 0.780233)


def canonical_alignment_weights() -> np.ndarray:
    """The per-point weights ipfacediff.face uses when fitting five points to the canonical ones.

    The crops this encoder sees are made with that weighted fit (eyes count most), so the mean
    face is placed into the canonical crop the same way. Read lazily, with equal weights if the
    face module does not define them.
    """
    from ipfacediff import face

    weights = getattr(face, "ALIGNMENT_WEIGHTS", np.ones(len(CANONICAL_FIVE_POINTS)))
    return np.asarray(weights, dtype=np.float64)


def _dlib_mean_frame_canonical_points() -> np.ndarray:
    m = _DLIB_MEAN_SHAPE_5
    return np.array(
        [
            (m[2] + m[3]) / 2,  # image-left eye centre
            (m[0] + m[1]) / 2,  # image-right eye centre
            _DLIB_MEAN_NOSE_TIP,
            _DLIB_MEAN_MOUTH_LEFT,
            _DLIB_MEAN_MOUTH_RIGHT,
        ]
    )


def canonical_to_dlib_chip_matrix(padding: float = DLIB_CHIP_PADDING) -> np.ndarray:
    """2x3 similarity from canonical-crop unit coordinates to dlib-chip unit coordinates.

    Both sides are resolution free (a point at ``(x, y)`` in a crop of side 1.0); multiply by the
    chip size (150) for dlib chip pixels with pixel centres at ``i + 1/2``.
    """
    mean_to_canonical = similarity_transform(
        _dlib_mean_frame_canonical_points(), CANONICAL_FIVE_POINTS, canonical_alignment_weights()
    )
    canonical_to_mean = _invert_affine(mean_to_canonical)
    mean_to_chip = np.array([[1.0, 0.0, padding], [0.0, 1.0, padding]]) / (1.0 + 2.0 * padding)
    return _compose_affine(mean_to_chip, canonical_to_mean)


def _invert_affine(m: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(m[:, :2])
    return np.concatenate([inv, -inv @ m[:, 2:]], axis=1)


def _compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """``outer(inner(x))`` for 2x3 affine matrices."""
    linear = outer[:, :2] @ inner[:, :2]
    return np.concatenate([linear, outer[:, :2] @ inner[:, 2:] + outer[:, 2:]], axis=1)


# ----------------------------------------------------------------------------------------------
# Optional: insightface ArcFace IResNet (state dicts from insightface's arcface_torch)
# ----------------------------------------------------------------------------------------------

# insightface's 112x112 ArcFace template, in pixel coordinates with pixel centres at integers (the
# cv2.warpAffine convention insightface aligns with); same point order as CANONICAL_FIVE_POINTS.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)


class _IBasicBlock(nn.Module):
    """IResNet's pre-activation-style block: BN-conv-BN-PReLU-conv(stride)-BN, plus shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, eps: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=eps)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """insightface's ArcFace IResNet (r18/34/50/100/200 by ``blocks``), parameter names as theirs.

    Input ``(B, 3, 112, 112)`` RGB in [-1, 1] aligned to ARCFACE_TEMPLATE_112; output the raw
    embedding (512-d for insightface's models).
    """

    widths = (64, 128, 256, 512)

    def __init__(self, blocks: tuple[int, ...], embedding_dim: int = 512, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=eps)
        self.prelu = nn.PReLU(64)
        cin = 64
        for index, (count, width) in enumerate(zip(blocks, self.widths), start=1):
            layer = [_IBasicBlock(cin, width, 2, eps)]
            layer += [_IBasicBlock(width, width, 1, eps) for _ in range(count - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
            cin = width
        self.bn2 = nn.BatchNorm2d(cin, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(cin * 7 * 7, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim, eps=eps)
        self.input_size = (112, 112)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x).flatten(1))
        return self.features(self.fc(x))


def load_arcface_iresnet(path: str | Path) -> IResNet:
    """An insightface IResNet from a ``.pth`` state dict; depth and width read from the keys."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise UserError(f"identity model {path} is not a readable torch state dict: {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "fc.weight" not in {k.removeprefix("module.") for k in state}:
        raise UserError(f"identity model {path} is not an insightface IResNet state dict (no fc.weight)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    blocks = tuple(len({key.split(".")[1] for key in state if key.startswith(f"layer{i}.")}) for i in range(1, 5))
    net = IResNet(blocks, embedding_dim=state["fc.weight"].shape[0])
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(f"identity model {path} does not fit an insightface IResNet: {error}") from error
    return net.eval().requires_grad_(False)


def canonical_to_arcface_chip_matrix() -> np.ndarray:
    """2x3 similarity from canonical-crop unit coordinates to ArcFace-chip unit coordinates.

    Both templates name the same five points, so this is a direct least-squares fit.
    """
    return similarity_transform(
        CANONICAL_FIVE_POINTS, (ARCFACE_TEMPLATE_112 + 0.5) / 112.0, canonical_alignment_weights()
    )


# ----------------------------------------------------------------------------------------------
# The encoder the project uses
# ----------------------------------------------------------------------------------------------


class IdentityNet(Protocol):
    """What the trainers, the evaluation and identity guidance need of an identity network: crops
    in, unit embeddings out, differentiably. :class:`IdentityEncoder` (dlib's net, ArcFace) is one;
    a synthetic world brings its own through :func:`register_identity_net_kind`."""

    embedding_dim: int

    def __call__(self, crops: torch.Tensor) -> torch.Tensor: ...

    def descriptor(self, crops: torch.Tensor) -> torch.Tensor: ...


IDENTITY_NET_ENTRY_POINTS = "ipfacediff.identity_nets"
_IDENTITY_NET_KINDS: dict[str, Callable[[Path], IdentityNet]] = {}


def register_identity_net_kind(kind: str, loader: Callable[[Path], IdentityNet]) -> None:
    """Let :meth:`IdentityEncoder.from_pretrained` read a folder whose ``config.json`` says
    ``"kind": kind``. Installed packages register through the ``ipfacediff.identity_nets`` entry
    point group instead (FaceWorld does), so the core never imports them."""
    _IDENTITY_NET_KINDS[kind] = loader


def identity_net_kinds() -> dict[str, Callable[[Path], IdentityNet]]:
    """Folder kinds an identity net can be read from: those registered here and those the
    installed packages declare as entry points (``kind = "module:Class"``, read with the class's
    ``from_pretrained``)."""
    from importlib.metadata import entry_points

    kinds: dict[str, Callable[[Path], IdentityNet]] = {}
    for point in entry_points(group=IDENTITY_NET_ENTRY_POINTS):
        kinds[point.name] = lambda path, point=point: point.load().from_pretrained(path)
    return {**kinds, **_IDENTITY_NET_KINDS}


class IdentityEncoder(nn.Module):
    """Identity embedding of canonical face crops; differentiable, so usable as a loss.

    ``forward(crops)`` takes ``(B, 3, H, H)`` RGB crops in [-1, 1] aligned to
    CANONICAL_FIVE_POINTS (any H) and returns ``(B, D)`` L2-normalised embeddings (D = 128 for
    dlib's net); compare them with :meth:`similarity` (cosine). :meth:`descriptor` returns the
    network's raw output; for dlib's net its Euclidean :meth:`distance` is on dlib's scale, below
    0.6 meaning "same person" in dlib's evaluations.

    The crop is resampled into the network's chip (dlib: 150x150, ArcFace: 112x112) with one fixed
    affine warp (``affine_grid`` + ``grid_sample``), after an anti-aliased resize when the crop is
    much larger than the chip so that big crops do not alias (dlib itself extracts its chips
    through an image pyramid for the same reason). The weights are frozen; gradients flow to the
    crops only.
    """

    def __init__(self, net: DlibFaceNet | IResNet | None = None) -> None:
        """``net``: used as is; default: a copy of the process-wide cached dlib net."""
        super().__init__()
        self.net = net if net is not None else copy.deepcopy(load_dlib_face_net())
        self.net.eval().requires_grad_(False)
        if isinstance(self.net, DlibFaceNet):
            m = canonical_to_dlib_chip_matrix()
            self.embedding_dim = int(self.net.layers[-1].weight.shape[0])
        elif isinstance(self.net, IResNet):
            m = canonical_to_arcface_chip_matrix()
            self.embedding_dim = int(self.net.fc.weight.shape[0])
        else:
            raise TypeError(f"IdentityEncoder needs a DlibFaceNet or an IResNet, got {type(net).__name__}")
        self.chip_size = int(self.net.input_size[0])
        # affine_grid wants output (chip) -> input (crop) in [-1, 1] coordinates, where a unit
        # coordinate t becomes 2t - 1 on both sides (align_corners=False).
        chip_to_canonical = _invert_affine(m)
        lin = chip_to_canonical[:, :2]
        offset = 2.0 * chip_to_canonical[:, 2:] - 1.0 + lin.sum(1, keepdims=True)
        theta = np.concatenate([lin, offset], axis=1)
        self.register_buffer("theta", torch.tensor(theta, dtype=torch.float32), persistent=False)
        # A chip pixel spans sqrt|det lin| * H / chip crop pixels: resize crops bigger than
        # one-crop-pixel-per-chip-pixel down to that before sampling.
        self._crop_side_at_unit_scale = int(math.ceil(self.chip_size / math.sqrt(abs(np.linalg.det(lin)))))

    def train(self, mode: bool = True) -> "IdentityEncoder":
        """The network always runs in inference mode (frozen batch-norm statistics)."""
        super().train(mode)
        self.net.eval()
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "IdentityEncoder":
        """``None``: dlib's net from face_recognition_models; a ``.dat``: another dlib ``anet_type``
        file; a ``.pth``/``.pt``: an insightface ArcFace IResNet state dict; a FaceWorld identity
        net's folder: that net (a :class:`~ipfacediff.faceworld.oracles.FaceWorldIdentity`). ``.onnx`` is refused
        (no ONNX tooling in the environment)."""
        if path is None:
            return cls()
        path = Path(path)
        if path.is_dir() and (path / "config.json").is_file():
            kind = json.loads((path / "config.json").read_text()).get("kind")
            loader = identity_net_kinds().get(kind)
            if loader is None:
                known = ", ".join(identity_net_kinds()) or "none registered"
                raise UserError(
                    f"identity model {path} is of kind {kind!r}, which no installed package provides (known: {known})"
                )
            return loader(path)  # same interface, for faces of another world (FaceWorld's cartoons)
        if not path.is_file():
            raise UserError(f"identity model {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".dat":
            try:
                return cls(copy.deepcopy(load_dlib_face_net(path)))
            except ValueError as error:
                raise UserError(f"identity model {path}: {error}") from error
        if suffix in (".pth", ".pt"):
            return cls(load_arcface_iresnet(path))
        if suffix == ".onnx":
            raise UserError(
                f"identity model {path}: ONNX models are not supported (onnx is not installed); "
                "use the .pth state dict of the same ArcFace model, or leave it unset for dlib's net"
            )
        raise UserError(f"identity model {path}: expected a dlib .dat or an ArcFace .pth file")

    def to_chip(self, crops: torch.Tensor) -> torch.Tensor:
        """Canonical crops in [-1, 1] -> the network's input chips, on the network's pixel scale
        (dlib: 0..255, ArcFace: [-1, 1])."""
        if crops.ndim != 4 or crops.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) crops, got {tuple(crops.shape)}")
        crops = crops.float()
        side = self._crop_side_at_unit_scale
        if max(crops.shape[-2:]) > side:
            crops = F.interpolate(crops, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        theta = self.theta.to(crops.device).expand(crops.shape[0], 2, 3)
        grid = F.affine_grid(theta, [crops.shape[0], 3, self.chip_size, self.chip_size], align_corners=False)
        chips = F.grid_sample(crops, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if isinstance(self.net, DlibFaceNet):
            return (chips + 1.0) * 127.5
        return chips

    def descriptor(self, crops: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) descriptors of canonical crops: what :meth:`distance` compares."""
        return self.net(self.to_chip(crops))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``(B, D)`` identity embeddings of canonical crops in [-1, 1]."""
        return F.normalize(self.descriptor(crops), dim=-1)

    @staticmethod
    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Euclidean distance of raw descriptors (from :meth:`descriptor`).

        For dlib's net this is dlib's scale: < 0.6 (DLIB_SAME_PERSON_THRESHOLD) = same person.
        """
        return torch.linalg.vector_norm(a - b, dim=-1)

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of embeddings or descriptors (1 = same direction)."""
        return F.cosine_similarity(a, b, dim=-1)
