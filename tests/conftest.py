from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite runs in pytest-xdist workers (the Makefile's -n): each gets its share of the cores for
# its OpenMP/BLAS threads, and so do the commands it starts. Threads beyond the share fight the
# other worker's for the same cores, which made the UNet tests several times slower.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_name, str(max(1, (os.cpu_count() or 1) // _WORKERS)))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_clip():
    """Path to a real face clip in ../shared/data/clips, or skip when this clone has none."""

    def get(name: str) -> Path:
        path = SHARED_DATA / "clips" / name
        if not path.is_file():
            pytest.skip(f"{path} is absent: real test clips live in ../shared/data beside the repo")
        return path

    return get


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep the inversion cache and the default model set of the tests out of the user's home."""
    folder = tmp_path_factory.mktemp("ipfacediff-cache")
    old = os.environ.get("IPFACEDIFF_CACHE")
    os.environ["IPFACEDIFF_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("IPFACEDIFF_CACHE", None)
    else:
        os.environ["IPFACEDIFF_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random SD-1.x model set written with save_pretrained, as `build-tiny-models` does."""
    from ipfacediff.models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny") / "models", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Two busy cores: OpenMP threads fighting over them make the tiny UNet many times slower."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    from ipfacediff.job import load_pipeline

    return load_pipeline(str(tiny_dir), device="cpu", dtype="float32")


def moving_texture(count: int, size: int = 64, shift: tuple[int, int] = (1, 0), seed: int = 0):
    """Frames of one smooth random texture translated by ``shift`` pixels per frame."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    pad = size + abs(shift[0]) * count + abs(shift[1]) * count
    base = cv2.GaussianBlur(rng.integers(0, 256, (pad + size, pad + size, 3)).astype(np.uint8), (0, 0), 2.0)
    frames = []
    for i in range(count):
        y, x = pad // 2 + shift[1] * i, pad // 2 + shift[0] * i
        frames.append(base[y : y + size, x : x + size])
    return np.stack(frames)
