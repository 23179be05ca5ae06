"""The web page (`ipfacediff ui`), driven end to end in headless Chromium.

Skipped when gradio, playwright (the Python client) or /usr/bin/chromium is missing.
"""

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import moving_texture

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

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


def test_range_and_face_prompt_fields():
    from ipfacediff.settings import EditSettings
    from ipfacediff.ui import face_prompt_items, face_summary, seconds_text

    # start 0 and an end at the clip's end are the clip's own edges: no fade there
    assert seconds_text(None) == seconds_text(0.0) == seconds_text(2.0, clip_seconds=2.0, end=True) == ""
    assert seconds_text(0.5) == "0.5" and seconds_text(-1.0) == "-1"
    assert seconds_text(1.5, clip_seconds=2.0, end=True) == "1.5"
    # filled boxes of ticked faces only (slot i is face ids[i])
    assert face_prompt_items([0, 3, 5], [0, 5], ["a beard", " x ", ""]) == ["0=a beard"]
    settings = EditSettings.from_mapping({"prompt": "a smile", "face_prompts": ["0=a beard"]})
    lines = face_summary(
        [
            {"id": 0, "prompt": "a beard", "frames": 12, "edit_adapters": []},
            {"id": 3, "prompt": "a smile", "frames": 0},
            {"id": 5, "prompt": None, "frames": 0},
        ],
        settings,
    )
    assert lines == [
        "face 0: \u201ca beard\u201d (its own prompt)",
        "face 3: \u201ca smile\u201d (the main prompt), no frame in the range",
        "face 5: not edited",
    ]


def test_the_overall_progress_runs_once_from_0_to_1_through_every_stage():
    from ipfacediff.progress import OverallProgress, Stage, duration_words
    from ipfacediff.settings import EditSettings
    from ipfacediff.ui import PER_FACE_STAGES, run_phases

    settings = EditSettings.from_mapping({"prompt": "a smile", "steps": 4})
    phases = run_phases(settings, frames=10, clip_frames=20, megapixels=0.25, load_models=True)
    now = [0.0]
    overall = OverallProgress(phases, per_face=PER_FACE_STAGES, faces=2, clock=lambda: now[0])
    # two faces, the second a long clip's two windows; the stages start again at 0 each time
    reports = [("loading models", 0, 1)]
    for windows in ([(0, 1)], [(0, 2), (1, 2)]):
        for window in windows:
            reports += [(Stage("invert", *window), d, 4) for d in range(1, 5)]
            reports += [(Stage("edit region", *window), d, 3) for d in range(1, 4)]
            reports += [(Stage("edit", *window), d, 4) for d in range(1, 5)]
    reports += [(stage, d, 20) for stage in ("write", "faces (edited)", "evaluate") for d in (1, 10, 20)]
    reports += [("report", 0, 1), ("report", 1, 1)]
    fractions, texts = [], []
    for stage, done, total in reports:
        now[0] += 1.0
        fractions.append(overall.update(stage, done, total))
        texts.append(overall.text())
    assert fractions == sorted(fractions) and fractions[0] < 0.1 and fractions[-1] == 1.0, fractions
    assert len(set(fractions)) > len(fractions) * 0.8  # it moves all along, not only at the stage changes
    assert 0.1 < fractions[11] < 0.5, fractions  # the first face done (reports 1-11)
    assert "drawing the edit, face 1 of 2" in texts[11]
    assert "preparing the faces (inversion), face 2 of 2, part 2 of 2" in texts[23]
    assert "scoring identity and flicker" in texts[-3] and texts[-3].endswith(" left")
    # the time left is the time so far at the pace so far; none before there is a pace
    assert "left" not in texts[0]
    half = OverallProgress([("evaluate", 1.0)], clock=lambda: 30.0)
    half.started = 0.0
    half.update("evaluate", 1, 2)
    assert half.seconds_left() == 30.0 and half.text() == "scoring identity and flicker · about 30 s left"
    assert duration_words(2) == "about 5 s" and duration_words(95) == "about 1 min 40 s"
    assert duration_words(120) == "about 2 min"


def test_range_fields_are_checked_against_the_clip():
    from ipfacediff.errors import UserError
    from ipfacediff.ui import check_range, minutes_words

    check_range(0, 4, 4.0)
    check_range(None, None, 4.0)
    check_range(1.5, 3.9999, 4.0)
    for start, end, says in [
        (0, 10, "End 10 s is past the end of the clip (4 s)"),
        (5, None, "Start 5 s is at or past the end of the clip (4 s)"),
        (1.5, 0.5, "End 0.5 s is not after Start 1.5 s"),
        (-1, None, "Start (s) must be a number of seconds"),
        (0, float("inf"), "End (s) must be a number of seconds"),
    ]:
        with pytest.raises(UserError, match=re.escape(says)):
            check_range(start, end, 4.0)
    from ipfacediff.ui import optional_number

    assert optional_number(" ", "Identity guidance", "identity_gradient") is None  # empty: the tuned default
    assert optional_number("0", "Identity guidance", "identity_gradient") == 0.0  # 0: off
    for text, says in [("abc", "must be a number, or empty"), ("11", "Identity guidance must be in [0, 10]")]:
        with pytest.raises(UserError, match=re.escape(says)):
            optional_number(text, "Identity guidance", "identity_gradient")
    assert minutes_words(1) == "1 minute" and minutes_words(0.5) == "0.5 minutes" and minutes_words(60) == "60 minutes"


def test_the_page_controls_are_made_from_the_settings():
    """Each control the page shows for a setting is made from its field: kind, label, first value
    and range; no label or help on the page names a flag."""
    import gradio as gr

    from ipfacediff.settings import EditSettings, default_of, flag_of
    from ipfacediff.ui import DEFAULT_PROMPT, PAGE_SETTINGS, control_info, layout, setting_label, shown_settings

    page = layout(gr, lambda value: None)
    shown = shown_settings()
    assert list(page.settings) == shown and len(set(shown)) == len(shown)
    assert len(shown) >= 20  # more than the 14 the page once filled by hand, with the page's own fields
    fields = {f.name: f for f in dataclasses.fields(EditSettings)}
    for control in (c for rows in PAGE_SETTINGS.values() for row in rows for c in row):
        component, meta = page.settings[control.setting], fields[control.setting].metadata
        assert component.label.startswith(setting_label(control.setting)), component.label
        assert component.elem_id == control.id
        for text in (component.label, control_info(control)):
            assert "--" not in text and flag_of(control.setting, meta) not in text, text
        default = default_of(EditSettings, control.setting)
        if isinstance(component, gr.Slider):
            low = meta["low"] + (control.step if meta["low_open"] else 0)
            high = meta["high"] - (control.step if meta["high_open"] else 0)
            assert (component.minimum, component.maximum, component.value) == (low, high, default), control
        elif isinstance(component, gr.Number):
            assert component.value == default and component.precision == (0 if isinstance(default, int) else None)
        elif isinstance(component, gr.Checkbox):
            assert component.value is default
        elif default is None:  # a number that may be unset: empty text, not Gradio's 0
            assert isinstance(component, gr.Textbox) and component.value == "" and "empty =" in component.label
        else:
            assert component.value == (DEFAULT_PROMPT if control.setting == "prompt" else default), control
    assert isinstance(page.settings["strength"], gr.Slider) and page.settings["strength"].minimum == 0.05
    assert isinstance(page.settings["identity_gradient"], gr.Textbox)
    assert page.settings["fade"].label == "Fade (frames)" and page.settings["fade"].elem_id == "range-fade"


def test_the_page_reads_its_controls_into_one_settings_object(tmp_path):
    """The Edit button's one mapping of controls becomes the settings: untouched, the command
    line's defaults; a bad value is one line in the page's words."""
    import gradio as gr

    from ipfacediff.errors import SettingError, UserError
    from ipfacediff.settings import EditSettings
    from ipfacediff.ui import DEFAULT_PROMPT, Loaded, Server, _message, edit_settings, layout

    page = layout(gr, lambda value: None)
    loaded = Loaded("v.mp4", "t.json", 24, [0, 3], 12.0, 64, 64)
    values = {component: component.value for component in page.run_inputs}
    values |= {page.state: {"loaded": loaded.__dict__}, page.faces: [0, 3], page.start: 0, page.end: 2.0}
    _, settings, chosen = edit_settings(page, values)
    assert chosen == [0, 3]
    assert settings == EditSettings(prompt=DEFAULT_PROMPT), settings.to_dict()

    values |= {page.faces: [3], page.face_prompts[1]: "a beard", page.end: 1.5}
    values |= {page.settings[k]: v for k, v in [("seed", None), ("steps", 7), ("keyframes", " 3 ")]}
    values |= {page.settings["identity_gradient"]: "0", page.settings["local_blend"]: False}
    values |= {page.settings["adapters"]: " "}  # emptied: the default, "auto"
    _, settings, _ = edit_settings(page, values)
    assert settings.adapters == "auto"
    assert (settings.faces, settings.face_prompts, settings.end, settings.seed) == ("3", ("3=a beard",), "1.5", 0)
    assert (settings.steps, settings.keyframes, settings.identity_gradient, settings.local_blend) == (7, 3, 0.0, False)

    for name, value, says in [
        ("steps", 0, "Steps must be in [1, 1000], got 0"),
        ("keyframes", "2.5", "Keyframes must be an integer, got 2.5"),
        ("fade", -1, "Fade (frames) must be in [0, 10000], got -1"),
        ("guidance", "x", "Guidance scale must be a number, or empty for the default"),
        ("inject_feature_until", 1001, "Inject features until timestep must be in [0, 1000]"),
    ]:
        with pytest.raises(UserError, match=re.escape(says)) as refused:
            edit_settings(page, values | {page.settings[name]: value})
        assert "--" not in str(refused.value)
    # an empty prompt is taken from the faces' own when each ticked face has one, else refused
    values[page.settings["prompt"]] = " "
    assert edit_settings(page, values)[1].prompt == "a beard"
    with pytest.raises(UserError, match="the prompt is empty: say what the faces should show") as refused:
        edit_settings(page, values | {page.faces: [0, 3]})
    assert "--" not in str(refused.value)
    server = Server(model=None, work_dir=tmp_path, max_upload_mb=10, max_seconds=60)
    for setting, said in [
        ("fade", "Fade (frames)"),
        ("start", "Start (s)"),
        ("identity_gradient", "Identity guidance"),
    ]:
        error = SettingError(setting, f"{{setting}} is wrong in {tmp_path}/sessions/abc/v.mp4")
        assert str(error).startswith("--") and _message(server, error) == f"{said} is wrong in v.mp4"


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
    page.wait_for_function(
        "t => (document.querySelector('#status')?.innerText || '').includes(t)", arg=text, timeout=timeout
    )
    return page.inner_text("#status")


def take_sample(page) -> None:
    page.click("#sample-button")
    status_shows(page, "built-in sample:")  # not the page's opening line, "…take the built-in sample"
    page.wait_for_selector("#faces-image img")
    page.wait_for_selector("#faces-choice input:checked")
    time.sleep(0.5)  # let the page commit the event's outputs before the next one reads them


# Records, while an event runs, which components show a progress display and what it says.
WATCH_PROGRESS = """() => {
  window.progressOn = new Set(); window.progressText = [];
  const look = () => {
    for (const tracker of document.querySelectorAll('[data-testid=status-tracker]')) {
      const text = (tracker.innerText || '').trim();
      if (!text || tracker.classList.contains('hide') || tracker.offsetParent === null) continue;
      window.progressOn.add(tracker.closest('[id]')?.id || '?');
      if (!window.progressText.includes(text)) window.progressText.push(text);
    }
  };
  new MutationObserver(look).observe(document.body, {subtree: true, childList: true, characterData: true,
                                                     attributes: true});
}"""


def clear_input(page) -> None:
    """Press × on the input player (dispatched: the player's own icon can lie over the button)."""
    page.locator("#input-video button[aria-label='Clear']").first.dispatch_event("click")


def no_toast(page, wait_ms: int = 1500) -> None:
    page.wait_for_timeout(wait_ms)  # pop-ups come a moment after the event's outputs
    toasts = [t.inner_text() for t in page.locator("[data-testid=toast-body]").all()]
    assert not toasts, toasts


def fill_number(page, selector: str, value: str) -> None:
    page.fill(f"{selector} input[type=number]", value)
    page.keyboard.press("Tab")


def fill_text(page, selector: str, value: str) -> None:
    """Types into a text field and waits until the field still shows it a moment later, so that a
    busy browser has committed it (on blur) before the next click reads the page's values."""
    field = f"{selector} :is(input, textarea)"
    page.fill(field, value)
    page.keyboard.press("Tab")  # the field commits its value when it loses focus
    page.wait_for_function("([s, v]) => document.querySelector(s)?.value === v", arg=[field, value], timeout=10_000)
    time.sleep(0.5)
    assert page.input_value(field) == value, f"{selector} lost the value typed into it"


def test_edit_sample_end_to_end(server, browser, tmp_path):
    import json

    from ipfacediff.video import probe_video

    url, work = server
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page.goto(url)
    take_sample(page)
    # the range fields show the clip (24 frames at 12 fps: 2 s); one prompt box per detected face
    assert float(page.input_value("#range-start input[type=number]")) == 0
    assert float(page.input_value("#range-end input[type=number]")) == 2
    assert page.locator("#face-prompt-0 textarea").is_visible()
    assert page.locator("#face-prompt-1 textarea").count() == 0 or not page.locator("#face-prompt-1").is_visible()
    # an End past the clip's end is one line, in the field's name, not quietly the clip's end
    fill_number(page, "#range-end", "10")
    page.click("#run-button")
    text = status_shows(page, "past the end")
    assert "error: End 10 s is past the end of the clip (2 s)" in text and "--" not in text, text
    # identity guidance: empty (the tuned default), and the field says so
    page.click("text=Identity")
    assert page.input_value("#identity-gradient :is(input, textarea)") == ""
    assert "empty = the tuned default" in page.inner_text("#identity-gradient")
    fill_number(page, "#steps", "3")
    fill_number(page, "#range-start", "0.5")
    fill_number(page, "#range-end", "1.5")
    page.fill("#face-prompt-0 textarea", "a face with a beard")
    page.keyboard.press("Tab")
    page.evaluate(WATCH_PROGRESS)
    page.click("#run-button")
    text = status_shows(page, "edited 1 face(s) in frames 6-17 of 24", timeout=240_000)
    assert page.query_selector("#status-ok") is not None, text
    page.wait_for_selector("#result-video video")

    # the run's metadata has the range and the face's own prompt; the page says which prompt it got
    [run_json] = (work / "sessions").glob("*/runs/*/edited.run.json")
    run = json.loads(run_json.read_text())
    assert (run["settings"]["start"], run["settings"]["end"], run["settings"]["fade"]) == ("0.5", "1.5", 4), run
    assert run["settings"]["face_prompts"] == ["0=a face with a beard"], run["settings"]
    assert [(f["id"], f["prompt"], f["frames"]) for f in run["faces"]] == [(0, "a face with a beard", 12)], run
    faces_line = page.inner_text("#result-line")
    assert "face 0: \u201ca face with a beard\u201d (its own prompt)" in faces_line, faces_line
    assert "identity guidance 0.3 (the tuned default)" in faces_line, faces_line  # what the empty field stood for

    # one progress display, on the status line: one bar over the whole run that never goes back,
    # the stages in words, and the time left
    shown_on = page.evaluate("[...window.progressOn]")
    texts = page.evaluate("window.progressText")
    stages = " | ".join(texts)
    assert shown_on == ["status"], (shown_on, stages)
    for stage in ("loading the model", "preparing the faces", "drawing the edit", "scoring identity and flicker"):
        assert stage in stages, stages
    assert " left" in stages, stages
    percents = [float(m) for m in re.findall(r"(\d+(?:\.\d+)?)%", stages)]
    assert len(percents) >= 4 and percents == sorted(percents) and percents[-1] > 50, stages

    # the scores in words, without claiming that the edit itself was judged (no CLIP model here)
    line = page.inner_text("#result-line")
    assert "same person: identity similarity" in line and "(1 = unchanged" in line, line
    assert "flicker: warp error ratio" in line and "1 = as steady as the input" in line, line
    assert "the edit itself was not judged" in line and "id_sim" not in line, line

    # the downloads are buttons: nothing on the page takes one away (a file list's × did)
    saved = {}
    for button, name in (("#edited-file", "edited.mp4"), ("#report-file", "report.html"), ("#metrics-file", "m.json")):
        with page.expect_download() as download:
            page.click(button)
        saved[name] = tmp_path / name
        download.value.save_as(saved[name])
    assert page.locator("[aria-label='Remove this file']").count() == 0
    info = probe_video(saved["edited.mp4"])
    assert info.frame_count == 24 and (info.width, info.height) == (256, 256)
    # the report and the metrics name the videos, not the server's folders
    report, metrics = saved["report.html"].read_text(), json.loads(saved["m.json"].read_text())
    assert "sample.mp4" in report and str(work) not in report and "sessions" not in report
    assert (metrics["original"], metrics["edited"]) == ("sample.mp4", "edited.mp4")
    assert str(work) not in saved["m.json"].read_text()

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
    runs = [p for p in (work / "sessions").glob("*/runs/*") if p.is_dir()]
    assert len(runs) == 1, runs  # the first result left the page, and the disk, with the second

    # a new input clears the result: player, downloads and result line (and the run's files)
    take_sample(page)
    assert page.locator("#result-video video").count() == 0
    assert page.locator("#edited-file").is_disabled() and not page.inner_text("#result-line").strip()
    assert not list((work / "sessions").glob("*/runs/*"))

    # × on the input clears what was loaded: Edit then has no video, it does not edit the old one
    clear_input(page)
    status_shows(page, "upload a video or take the built-in sample")
    page.wait_for_selector("#faces-image img", state="detached")
    assert page.locator("#faces-choice input").count() == 0
    assert not page.locator("#face-prompt-0").is_visible() and not page.input_value("#range-end input[type=number]")
    page.click("#run-button")
    assert "no video yet" in status_shows(page, "no video yet")
    assert not list((work / "sessions").glob("*/videos/*"))
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
    no_toast(page)  # the error is said once, in the status line: no pop-up beside it
    assert page.locator("#faces-choice input").count() == 0

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
    no_toast(page, 500)

    page.click("#run-button")  # nothing loaded: a one-line error, not a crash
    assert "no video yet" in status_shows(page, "no video yet")

    take_sample(page)  # the server still serves
    assert page.query_selector("#status-info") is not None

    # adapters are uploaded files (no server paths), with one weight per edit adapter
    adapter = tmp_path / "random.safetensors"
    adapter.write_bytes(os.urandom(256))
    page.click("text=Adapters (LoRA)")
    page.wait_for_selector("#identity-lora input[type=file]", state="attached")
    assert page.locator("#identity-lora input[type=text], #edit-loras input[type=text]").count() == 0
    page.set_input_files("#edit-loras input[type=file]", str(adapter))
    # the file's row (its name is split into stem and extension, which text= matching can miss)
    page.wait_for_selector("#edit-loras [aria-label='random.safetensors']", state="attached")
    page.fill("#edit-lora-weights textarea", "0.5, 2")
    page.click("#run-button")
    assert "2 weight(s) for 1 edit adapter(s)" in status_shows(page, "weight(s)")
    page.fill("#edit-lora-weights textarea", "0.5")
    page.click("#run-button")
    text = status_shows(page, "random.safetensors")
    assert "error:" in text and "not a safetensors file" in text and "uploads" not in text, text
    no_toast(page, 500)

    # a reversed range is one line in the status, before any model loads
    fill_number(page, "#range-start", "1.5")
    fill_number(page, "#range-end", "0.5")
    page.click("#run-button")
    text = status_shows(page, "reversed")
    assert "error: End 0.5 s is not after Start 1.5 s" in text and "\n" not in text.strip(), text
    no_toast(page, 500)
    page.close()


def test_session_files_removed_when_the_tab_closes(server, browser):
    url, work = server
    sessions_before = set((work / "sessions").iterdir()) if (work / "sessions").is_dir() else set()
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    take_sample(page)
    session = set((work / "sessions").iterdir()) - sessions_before
    assert len(session) == 1 and list(session.pop().glob("videos/*/sample.mp4")), session
    # Gradio's copies of the files the page shows sit in its cache, inside the work folder
    shown = {"sample.mp4", "faces.png"}
    assert shown <= {p.name for p in work.glob("uploads/*/*")}, sorted(work.glob("uploads/*/*"))

    page.close()  # the tab goes: its folder and the cache copies of its files go at once (earlier

    # tests' tabs are closed too, so no copy of the sample stays)
    def left() -> list:
        return sorted(set((work / "sessions").iterdir()) - sessions_before) + [
            p for p in work.glob("uploads/*/*") if p.name in shown
        ]

    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not left()


class Request:  # what the page's callbacks read of gr.Request
    def __init__(self, session_hash: str):
        self.session_hash = session_hash


def test_idle_sessions_are_swept(tmp_path):
    from ipfacediff.ui import Server

    server = Server(model=None, work_dir=tmp_path, max_upload_mb=10, max_seconds=60, keep_minutes=0.01)
    idle, active, running = Request("idle"), Request("active"), Request("running")
    upload = tmp_path / "uploads" / "abc123" / "person.mp4"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"a video")
    (server.session_dir(idle) / "videos").mkdir()
    (server.session_dir(idle) / "videos" / "person.mp4").write_bytes(b"a video")
    server.claim(idle, "input", [upload])
    orphan = tmp_path / "uploads" / "def456"  # an upload no session took up
    orphan.mkdir()
    (orphan / "other.mp4").write_bytes(b"another video")
    time.sleep(1.0)  # keep_minutes=0.01: 0.6 s
    with server.busy(running):
        time.sleep(0.7)
        server.session_dir(active)
        assert server.sweep() == ["idle"]
        assert not (tmp_path / "sessions" / "idle").exists() and not upload.parent.exists() and not orphan.exists()
        assert (tmp_path / "sessions" / "active").is_dir() and (tmp_path / "sessions" / "running").is_dir()
    assert server.sweep(now=time.time() + 3600) == ["active", "running"]
    assert not any((tmp_path / "sessions").iterdir())

    # a tab closed while its edit runs is removed when the edit is done
    with server.busy(running) as folder:
        server.end_session("running")
        assert folder.is_dir()
    assert not folder.exists()


@pytest.mark.parametrize(
    "signum, work_exists",
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGTERM-own-folder", "SIGINT-given-folder"],
)
def test_stopping_the_server_removes_its_files(tmp_path, signum, work_exists):
    work = tmp_path / "work"
    if work_exists:  # a folder the user gave: only what the server keeps there goes
        work.mkdir()
        (work / "mine.txt").write_text("not the server's")
    port = free_port()
    code = f"from ipfacediff.ui import launch; launch('127.0.0.1', {port}, work_dir={str(work)!r}, keep_minutes=0.05)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        # an idle session (3 s = keep_minutes) goes by the background sweep
        stale = work / "sessions" / "stale" / "videos" / "person.mp4"
        stale.parent.mkdir(parents=True)
        stale.write_bytes(b"a person's video")
        os.utime(stale.parents[2] / "stale", (time.time() - 600, time.time() - 600))
        deadline = time.monotonic() + 30
        while (work / "sessions" / "stale").exists() and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not (work / "sessions" / "stale").exists(), "the idle session was not swept"

        # a live session's video and its upload cache copy go when the server stops
        for path in (
            work / "sessions" / "live" / "videos" / "1" / "person.mp4",
            work / "uploads" / "0123abcd" / "person.mp4",
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"a person's video")
        proc.send_signal(signum)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (-signum, 128 + signum), out
    assert "stopped" in out, out
    if work_exists:
        assert sorted(p.name for p in work.iterdir()) == ["mine.txt"]
    else:
        assert not work.exists(), sorted(work.rglob("*"))


def test_the_embedded_model_refuses_a_real_face_on_the_page_until_overridden(browser, shared_clip, tmp_path):
    """The page words the model card's refusal itself (no flags) and shows the override box it
    points to; an overridden edit is said to be out of domain as loudly as the report says it, and
    the scores get no verdict; the next video finds the box unticked, and is told so."""
    import json

    from ipfacediff.ui import OVERRIDE_LABEL, launch

    clip = shared_clip("closeup.mp4")
    port = free_port()
    work = tmp_path / "work"
    demo = launch("127.0.0.1", port, model=None, work_dir=work, block=False, max_seconds=30)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}/")
        page.set_input_files("#input-video input[type=file]", clip)
        status_shows(page, "face(s) found", timeout=240_000)
        page.wait_for_selector("#faces-choice input:checked")
        time.sleep(0.5)
        override = page.locator("#allow-out-of-domain")
        assert not override.is_visible()  # nothing to override yet
        fill_number(page, "#steps", "2")
        fill_number(page, "#range-end", "0.2")
        page.click("text=Identity")
        fill_text(page, "#identity-gradient", "0.5")  # set before the refusal, which must keep it
        page.click("#run-button")
        text = status_shows(page, "error:")
        assert "the embedded model edits FaceWorld's drawn faces only, and face 0 of closeup.mp4 is not one" in text
        assert f"tick \u201c{OVERRIDE_LABEL}\u201d below the Edit faces button" in text, text
        assert "--" not in text and "ipfacediff demo" not in text, text  # the page has no flags
        assert page.locator("#result-video video").count() == 0
        assert not list(work.glob("sessions/*/runs/*/*.mp4"))

        # the box the refusal points to is there, under the button, with the words it quotes
        override.wait_for(state="visible", timeout=10_000)  # it comes with the status, or a moment after
        assert OVERRIDE_LABEL in override.inner_text()
        page.check("#allow-out-of-domain input[type=checkbox]")
        assert page.input_value("#identity-gradient :is(input, textarea)") == "0.5"
        page.click("#run-button")
        text = status_shows(page, "done", timeout=240_000)
        assert "out of the model's domain" in text and "Expect nonsense" in text, text
        assert page.query_selector("#status-ok") is None and page.query_selector("#status-warn") is not None
        warning = page.inner_text("#result-warning")
        assert "Out of domain" in warning and "does not mean the face was drawn correctly" in warning, warning
        scores = page.inner_text("#result-text")
        assert "no verdict: out of the model's domain" in scores and "; the same person)" not in scores, scores
        assert "does not judge whether the face was drawn correctly" in scores, scores
        assert "identity guidance 0.5" in page.inner_text("#result-faces")
        [run_json] = work.glob("sessions/*/runs/*/edited.run.json")
        run = json.loads(run_json.read_text())
        assert run["domain"]["overridden"] is True and run["settings"]["allow_out_of_domain"] is True
        assert run["settings"]["identity_gradient"] == 0.5

        # the next video: the override does not carry over, and the page says so
        take_sample(page)
        assert "is unticked again" in page.inner_text("#status")
        assert not override.is_visible()
        clear_input(page)
        status_shows(page, "upload a video")
        page.wait_for_selector("#input-video input[type=file]", state="attached")
        page.set_input_files("#input-video input[type=file]", clip)  # the real face again: refused again
        status_shows(page, "face(s) found", timeout=240_000)
        time.sleep(0.5)
        fill_number(page, "#range-end", "0.2")
        page.click("#run-button")
        assert "is not one" in status_shows(page, "error:")
        override.wait_for(state="visible", timeout=10_000)
        assert not page.is_checked("#allow-out-of-domain input[type=checkbox]")
        page.close()
    finally:
        demo.close()
