"""The inversion cache on disk: one folder per chunk of frames, model, steps and prompt, of
safetensors files written whole, least recently used evicted under a size limit."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ipfacediff.errors import NonFiniteError, UserError
from ipfacediff.files import check_writable_folder, short_detail, write_atomic


# Frames per inversion cache entry. Entries hold the frames whose index in the video falls in one
# multiple of this, so an edit of an overlapping time range finds the same entries.
CACHE_CHUNK = 16

# What an entry's files hold; raised when that changes (2: features in a per-chunk fitted basis,
# stored with it), so that entries written before are never read as the new kind.
CACHE_FORMAT = 2


def default_cache_dir() -> Path:
    """$IPFACEDIFF_CACHE, else ~/.cache/ipfacediff: shared by every run of the same user."""
    return Path(os.environ.get("IPFACEDIFF_CACHE", Path.home() / ".cache" / "ipfacediff"))


CACHE_FIX = "pass --cache-dir with a folder you can write (or set IPFACEDIFF_CACHE)"


class InversionCache:
    """One folder per (chunk of frames, model, resolution, steps, prompt) of named safetensors
    files: ``clean`` (the encoded frames) and ``step_XXXX`` (latents, and features where captured).

    Files are written whole (temporary name, then renamed), so a killed run leaves only whole steps.
    A file that cannot be read all the same (truncated by a full disk or a copy, overwritten) is
    removed with one warning line and computed again, so the cache heals itself. With
    ``max_bytes`` the entries used longest ago are removed to make room for a new file, never one
    this object has read or written (the running job's); a file that would not fit even then is
    not written, and the job goes on without caching it.

    The folder is created and tried at once: a cache that cannot be written is one line before
    any model is loaded (every front end makes its cache first), not a traceback mid-run.
    """

    def __init__(self, root: str | Path | None = None, *, max_bytes: int | None = None):
        self.root = Path(root) if root is not None else default_cache_dir() / "inversion"
        check_writable_folder(self.root, "the inversion cache", CACHE_FIX, create=True)
        self.max_bytes = max_bytes
        self.in_use: set[str] = set()
        self._size: int | None = None  # bytes on disk, counted once and then kept up to date

    @staticmethod
    def key(**parts: object) -> str:
        text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def folder(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str, name: str) -> dict[str, torch.Tensor] | None:
        path = self.folder(key) / f"{name}.safetensors"
        if not path.is_file():
            return None
        try:
            # Cloned: memory-mapped tensors can be unaligned, and CPU kernels then round differently.
            tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
        except FileNotFoundError:  # evicted by another process sharing the cache
            return None
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            self.drop_damaged(path, error)
            return None
        self.mark_used(key)
        return tensors

    def drop_damaged(self, path: Path, error: BaseException) -> None:
        """Remove a cache file that cannot be read, saying so in one line; its caller computes it again."""
        detail = error.strerror if isinstance(error, OSError) and error.strerror else short_detail(error)
        print(
            f"warning: the inversion cache file {path} is damaged ({detail}); it is removed and computed again",
            file=sys.stderr,
        )
        try:
            path.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: the new copy replaces it
            pass
        self._size = None  # counted again when next asked

    def save(self, key: str, name: str, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None) -> None:
        """Write ``tensors`` as ``name`` of entry ``key``. Latents that are not finite are refused
        (:class:`NonFiniteError`, worded for the model's ``dtype`` when given): kept, they would
        spoil every later edit of the clip."""
        if "latents" in tensors:
            NonFiniteError.check(tensors["latents"], stage_of(name), dtype)
        data = save({k: v.contiguous() for k, v in tensors.items()})
        self.in_use.add(key)
        if not self.make_room(len(data)):
            return
        folder = self.folder(key)
        try:
            for attempt in range(2):  # another process sharing the cache may evict the folder meanwhile
                folder.mkdir(parents=True, exist_ok=True)
                try:
                    write_atomic(folder / f"{name}.safetensors", data)
                    break
                except FileNotFoundError:
                    if attempt:
                        raise
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(
                    f"the disk of the inversion cache {self.root} is full; what was cached is kept: "
                    "free space, pass --cache-max-gb or choose another --cache-dir"
                ) from None
            raise UserError(
                f"the inversion cache {self.root} cannot be written ({error.strerror or error}); {CACHE_FIX}"
            ) from None
        self._size = self.size_bytes() + len(data)
        self.mark_used(key)

    def mark_used(self, key: str) -> None:
        """Record the entry's last use (its folder's time) and protect it from this job's evictions."""
        self.in_use.add(key)
        try:
            os.utime(self.folder(key))
        except OSError:  # evicted meanwhile, or another user's entry: its age only guides eviction
            pass

    def entries(self) -> list[tuple[float, str, int]]:
        """(last use, key, bytes) of every entry, least recently used first."""
        found = []
        for folder in self.root.iterdir() if self.root.is_dir() else ():
            if folder.is_dir():
                try:
                    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                    found.append((folder.stat().st_mtime, folder.name, size))
                except FileNotFoundError:  # removed meanwhile by another process
                    continue
        return sorted(found)

    def size_bytes(self) -> int:
        """Bytes the cache takes on disk."""
        if self._size is None:
            self._size = sum(size for _, _, size in self.entries())
        return self._size

    def make_room(self, incoming: int) -> bool:
        """Evict least recently used entries until ``incoming`` more bytes fit under ``max_bytes``;
        False when they cannot (what is left is in use by this job)."""
        if self.max_bytes is None or self.size_bytes() + incoming <= self.max_bytes:
            return True
        import shutil

        entries = self.entries()
        total = sum(size for _, _, size in entries)
        for _, key, size in entries:
            if total + incoming <= self.max_bytes:
                break
            if key in self.in_use:
                continue
            shutil.rmtree(self.folder(key), ignore_errors=True)
            total -= size
        self._size = total
        return total + incoming <= self.max_bytes


def stage_of(name: str) -> str:
    """The stage that made the cache file ``name``, as an error line names it."""
    if name == "clean":
        return "encoding the frames (the VAE encoder)"
    if name.startswith("step_"):
        return f"the DDIM inversion (the latents of step {int(name.removeprefix('step_'))})"
    return f"the inversion cache's {name}"


def chunk_bounds(frame_indices: Sequence[int], size: int = CACHE_CHUNK) -> list[tuple[int, int]]:
    """(start, end) positions of runs of ``frame_indices`` (ascending video frame numbers) that
    fall in the same multiple of ``size``: the frames of one cache entry."""
    bounds, start = [], 0
    for position in range(1, len(frame_indices) + 1):
        if position == len(frame_indices) or frame_indices[position] // size != frame_indices[start] // size:
            bounds.append((start, position))
            start = position
    return bounds


def frames_digest(frames: np.ndarray) -> str:
    """Content hash of the exact pixels that get inverted."""
    frames = np.ascontiguousarray(frames)
    digest = hashlib.sha256(str(frames.shape).encode())
    digest.update(frames.tobytes())
    return digest.hexdigest()[:24]
