"""Faults of the inversion cache and of killed writes: one line before the model, or a self-healing run.

A cache folder that cannot be written is refused in one line before any model is looked at (the
commands are given a model folder that does not exist: the cache line must come first). The
read-only case is a real read-only mount (``unshare``), which stops root too; a damaged entry is
one a real edit wrote, then truncated.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ipfacediff.diffusion import InversionCache
from ipfacediff.errors import UserError
from ipfacediff.video import read_frames, write_video

from conftest import moving_texture
from test_cli import run
from test_settings import ENTRY_POINT

# Bind-mount a folder onto itself read-only in a mount namespace of its own, then run the command.
READ_ONLY = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'


@pytest.fixture
def clip(tmp_path) -> Path:
    return write_video(tmp_path / "in.mp4", moving_texture(6), 5)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def read_only_runner(folder: Path):
    """A runner of the installed command that sees ``folder`` read-only, or skip."""
    if not ENTRY_POINT.is_file():
        pytest.skip(f"{ENTRY_POINT} is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if os.geteuid() != 0:  # permission bits stop an ordinary user
        folder.chmod(0o555)
        return lambda *args, env=env: subprocess.run([str(ENTRY_POINT), *args], capture_output=True, text=True, env=env)
    cannot_touch = ["sh", "-c", '! touch "$1" 2>/dev/null', "sh", str(folder / "x")]
    try:
        trial = subprocess.run(["unshare", "--mount", "sh", "-c", READ_ONLY, str(folder), *cannot_touch])
    except FileNotFoundError:
        trial = None
    if trial is None or trial.returncode != 0 or (folder / "x").exists():
        pytest.skip("no read-only bind mount here (unshare --mount not permitted) and root ignores permission bits")

    def run_read_only(*args: str, env: dict = env) -> subprocess.CompletedProcess:
        command = ["unshare", "--mount", "sh", "-c", READ_ONLY, str(folder), str(ENTRY_POINT), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)

    return run_read_only


def test_a_read_only_cache_folder_is_one_line_before_the_model(clip, tmp_path):
    cache = tmp_path / "cache"
    (cache / "inversion").mkdir(parents=True)
    runner = read_only_runner(cache)
    out = tmp_path / "out.mp4"
    done = runner(
        "edit", str(clip), "-o", str(out), "-p", "x", "--model", str(tmp_path / "no-model"), "--cache-dir", str(cache)
    )
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert f"the inversion cache {cache / 'inversion'} cannot be written" in line and "--cache-dir" in line
    assert "Read-only file system" in line or "Permission denied" in line
    assert not out.exists() and not list(cache.rglob("*.probe"))


def test_an_unwritable_home_is_one_line_that_names_cache_dir(clip, tmp_path):
    """A service account's $HOME that it cannot write: the default cache there is refused at once."""
    home = tmp_path / "home"
    home.mkdir()
    runner = read_only_runner(home)
    env = {k: v for k, v in os.environ.items() if k != "IPFACEDIFF_CACHE"} | {"HOME": str(home), "HF_HUB_OFFLINE": "1"}
    done = runner("invert", str(clip), "--model", str(tmp_path / "no-model"), env=env)
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert str(home / ".cache" / "ipfacediff" / "inversion") in line and "--cache-dir" in line
    assert not (home / ".cache").exists()


@pytest.mark.parametrize("case", ["cache-dir is a file", "cache-dir inside a file", "HOME is a file", "invert"])
def test_a_cache_path_that_cannot_be_a_folder_is_one_line_before_the_model(case, clip, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    out = tmp_path / "out.mp4"
    edit = ["edit", str(clip), "-o", str(out), "-p", "x", "--model", str(tmp_path / "no-model")]
    argv = {
        "cache-dir is a file": [*edit, "--cache-dir", str(blocker)],
        "cache-dir inside a file": [*edit, "--cache-dir", str(blocker / "cache")],
        "HOME is a file": edit,
        "invert": ["invert", str(clip), "--model", str(tmp_path / "no-model"), "--cache-dir", str(blocker)],
    }[case]
    if case == "HOME is a file":
        monkeypatch.delenv("IPFACEDIFF_CACHE")
        monkeypatch.setenv("HOME", str(blocker))
    code, _, stderr = run(argv, capsys)
    assert code == 2
    line = one_error_line(stderr)
    assert f"({blocker} is a file, not a folder)" in line and "--cache-dir" in line
    assert not out.exists() and blocker.read_text() == "a file, not a folder"


def test_the_api_checks_the_cache_folder_where_it_is_made(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UserError, match="is a file, not a folder") as caught:
        InversionCache(tmp_path / "file")
    assert "\n" not in str(caught.value)
    cache = InversionCache(tmp_path / "new" / "inversion")  # created when missing, nothing left in it
    assert cache.root.is_dir() and not list(cache.root.iterdir())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_truncated_cache_entry_is_dropped_with_one_warning_and_the_edit_is_the_same(clip, tiny_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["-p", "x", "--model", str(tiny_dir), "--whole-frame", "--steps", "3", "--cache-dir", str(cache)]
    code, _, stderr = run(["edit", str(clip), "-o", str(tmp_path / "a.mp4"), *args], capsys)
    assert code == 0, stderr
    steps = sorted((cache / "inversion").glob("*/step_*.safetensors"))
    assert steps, list(cache.rglob("*"))
    damaged = steps[len(steps) // 2]
    whole = damaged.read_bytes()
    damaged.write_bytes(whole[: len(whole) // 2])  # as a full disk or a killed copy leaves it

    code, _, stderr = run(["edit", str(clip), "-o", str(tmp_path / "b.mp4"), *args], capsys)
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and str(damaged) in warnings[0], stderr
    assert "Traceback" not in stderr
    assert damaged.read_bytes() == whole  # computed again, bit for bit
    np.testing.assert_array_equal(read_frames(tmp_path / "b.mp4"), read_frames(tmp_path / "a.mp4"))

    code, _, stderr = run(["edit", str(clip), "-o", str(tmp_path / "c.mp4"), *args], capsys)
    assert code == 0 and "warning" not in stderr.lower() and "inversion reused" in stderr


@pytest.mark.parametrize("damage", [b"", b"not a safetensors file at all", b"\x10\x00\x00\x00\x00\x00\x00\x00{"])
def test_an_unreadable_cache_file_is_removed_and_reported_once(tmp_path, capsys, damage):
    import torch

    cache = InversionCache(tmp_path)
    cache.save("k", "clean", {"latents": torch.ones(4)})
    path = cache.folder("k") / "clean.safetensors"
    path.write_bytes(damage)
    assert cache.load("k", "clean") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: the inversion cache file {path} is damaged"), err
    assert not path.exists() and cache.size_bytes() == 0
    cache.save("k", "clean", {"latents": torch.ones(4)})
    assert torch.equal(cache.load("k", "clean")["latents"], torch.ones(4))


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from ipfacediff.video import write_video

    def frames():
        for i in range(10_000):
            if i == 50:
                open(sys.argv[2], "w").close()  # encoding is under way: kill me now
                time.sleep(600)
            yield np.full((48, 64, 3), i % 256, np.uint8)

    write_video(sys.argv[1], frames(), 10)
    """
)


def test_a_write_killed_while_encoding_leaves_a_temp_file_the_next_write_removes(tmp_path):
    out, started = tmp_path / "edited.mp4", tmp_path / "started"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out), str(started)])
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started.exists(), "the writer never got to encoding"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    left = list(tmp_path.glob(".edited.mp4.tmp-*.mp4"))
    assert len(left) == 1 and not out.exists()
    # Not ours to remove: another output's temp file, a look-alike name, and the temp file of a write
    # of the same output still going on elsewhere (written after this write started).
    others = [tmp_path / ".other.mp4.tmp-0123abcd.mp4", tmp_path / ".edited.mp4.tmp-notes.txt"]
    running = tmp_path / ".edited.mp4.tmp-89abcdef.mp4"
    for path in [*others, running]:
        path.write_bytes(b"x")
    future = time.time() + 60
    os.utime(running, (future, future))

    write_video(out, [np.full((48, 64, 3), 9, np.uint8)] * 3, 10)
    assert not left[0].exists() and out.is_file()
    assert all(path.exists() for path in [*others, running])


def test_a_cache_file_write_removes_what_a_killed_write_of_it_left(tmp_path):
    import torch

    cache = InversionCache(tmp_path)
    cache.save("k", "step_0000", {"latents": torch.ones(2)})
    stale = cache.folder("k") / ".step_0000.safetensors.0badc0de.tmp"
    stale.write_bytes(b"half a file")
    os.utime(stale, (time.time() - 5, time.time() - 5))
    other = cache.folder("k") / ".step_0001.safetensors.0badc0de.tmp"
    other.write_bytes(b"another file's")
    os.utime(other, (time.time() - 5, time.time() - 5))
    cache.save("k", "step_0000", {"latents": torch.zeros(2)})
    assert not stale.exists() and other.exists()
    assert digest(cache.folder("k") / "step_0000.safetensors")
