"""The web page (`ipfacediff ui`), driven end to end in headless Chromium.

Skipped when gradio, playwright (the Python client) or /usr/bin/chromium is missing.
"""

import socket
import time
from pathlib import Path

import pytest

from conftest import moving_texture

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]

pytest.importorskip("gradio", reason="gradio is not installed: pip install gradio")


def test_limits_and_adapter_specs(tmp_path):
    from ipfacediff.demo import sample_clip
    from ipfacediff.errors import UserError
    from ipfacediff.models import parse_lora_spec as parse_adapter
    from ipfacediff.ui import Server

    clip = tmp_path / "clip.mp4"
    sample_clip(clip, frames=12)
    with pytest.raises(UserError, match=r"up to 0.01 MB"):
        Server(model=None, work_dir=tmp_path, max_upload_mb=0.01, max_seconds=60).check_video(clip)
    with pytest.raises(UserError, match=r"1 s long; this page takes videos up to 0.5 s"):
        Server(model=None, work_dir=tmp_path, max_upload_mb=10, max_seconds=0.5).check_video(clip)
    assert Server(model=None, work_dir=tmp_path, max_upload_mb=10, max_seconds=60).check_video(clip).frame_count == 12
    assert parse_adapter("a/b.safetensors:0.7") == ("a/b.safetensors", 0.7)
    assert parse_adapter("C:/x.safetensors") == ("C:/x.safetensors", 1.0)
    assert parse_adapter("x.safetensors") == ("x.safetensors", 1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    from ipfacediff.ui import launch

    port = free_port()
    work = tmp_path_factory.mktemp("ui-work")
    demo = launch("127.0.0.1", port, model=str(tiny_dir), work_dir=work, block=False, max_seconds=30)
    yield f"http://127.0.0.1:{port}/", work
    demo.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (never `playwright install`)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def status_shows(page, text: str, timeout: float = 120_000) -> str:
    page.wait_for_function("t => (document.querySelector('#status')?.innerText || '').includes(t)", arg=text,
                           timeout=timeout)
    return page.inner_text("#status")


def take_sample(page) -> None:
    page.click("#sample-button")
    status_shows(page, "built-in sample")
    page.wait_for_selector("#faces-image img")
    page.wait_for_selector("#faces-choice input:checked")
    time.sleep(0.5)  # let the page commit the event's outputs before the next one reads them


def test_edit_sample_end_to_end(server, browser, tmp_path):
    from ipfacediff.video import probe_video

    url, work = server
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page.goto(url)
    take_sample(page)
    page.fill("#steps input[type=number]", "3")
    page.keyboard.press("Tab")
    page.click("#run-button")
    text = status_shows(page, "edited 1 face(s) in 24 frames", timeout=240_000)
    assert page.query_selector("#status-ok") is not None, text
    page.wait_for_selector("#result-video video")

    with page.expect_download() as download:
        page.click("#edited-file a")
    edited = tmp_path / "edited.mp4"
    download.value.save_as(edited)
    info = probe_video(edited)
    assert info.frame_count == 24 and (info.width, info.height) == (256, 256)
    names = page.inner_text("#downloads").replace("\n", "")
    assert "edited.mp4" in names and "report.html" in names and "metrics.json" in names

    shot = tmp_path / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")

    # a second prompt on the same video reuses the cached inversion, and the page says so
    page.fill("#prompt textarea", "a smiling face")
    page.click("#run-button")
    assert "inversion reused" in status_shows(page, "inversion reused", timeout=240_000)

    # everything the session wrote is in its own folder under the working folder
    sessions = list((work / "sessions").iterdir())
    assert sessions and all(p.is_dir() for p in sessions)
    page.close()


def test_bad_uploads_show_errors_and_server_keeps_serving(server, browser, tmp_path):
    from ipfacediff.video import write_video

    url, _ = server
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("this is not a video\n")
    no_face = write_video(tmp_path / "texture.mp4", list(moving_texture(12, size=64)), 12.0)

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    page.set_input_files("#input-video input[type=file]", str(not_video))
    text = status_shows(page, "error:")
    assert "notes.mp4 is not a video" in text and "\n" not in text.strip() and "sessions" not in text

    # The rejected file stays in the player until cleared, and the player (with its Clear button)
    # may render a moment after the status: clear it whenever the button is there, until the
    # upload input is back. Dispatched, not clicked: the player's own icon can lie over the button.
    upload = page.locator("#input-video input[type=file]")
    clear = page.locator("#input-video button[aria-label='Clear']")
    for _ in range(120):
        if upload.count():
            break
        if clear.count():
            clear.first.dispatch_event("click")
        page.wait_for_timeout(250)
    page.set_input_files("#input-video input[type=file]", str(no_face))
    assert "no face found" in status_shows(page, "no face found")

    page.click("#run-button")  # nothing loaded: a one-line error, not a crash
    assert "no video yet" in status_shows(page, "no video yet")

    take_sample(page)  # the server still serves
    assert page.query_selector("#status-info") is not None
    page.close()
