"""The embedded FaceWorld model refuses real faces, in one line, before any model work."""

from __future__ import annotations

import json

from ipfacediff.job import SHIPPED_MODELS, load_pipeline, model_card

from test_cli import run

REFUSAL = "error: the embedded model edits FaceWorld's drawn faces, and face 0 of closeup.mp4 is not one"


def test_the_embedded_model_refuses_a_real_face_with_one_line_and_no_output(shared_clip, tmp_path, capsys):
    clip = shared_clip("closeup.mp4")
    out = tmp_path / "out.mp4"
    code, _, stderr = run(["edit", str(clip), "-o", str(out), "-p", "a face with eyeglasses", "--steps", "2"], capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(REFUSAL), stderr
    assert "--model stable-diffusion-v1-5/stable-diffusion-v1-5" in lines[0]
    assert list(tmp_path.iterdir()) == []
    code, _, stderr = run(["invert", str(clip), "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 2 and stderr.strip().startswith(REFUSAL)


def test_the_override_edits_and_says_so_in_the_run_and_the_report(shared_clip, tmp_path, capsys):
    clip = shared_clip("closeup.mp4")
    out = tmp_path / "out.mp4"
    code, _, stderr = run(["edit", str(clip), "-o", str(out), "-p", "a face with eyeglasses", "--steps", "2",
                           "--end", "frame:4", "--allow-out-of-domain", "--evaluate"], capsys)
    assert code == 0, stderr
    report = json.loads((tmp_path / "out.run.json").read_text())
    assert report["settings"]["allow_out_of_domain"] is True
    assert report["domain"]["overridden"] is True and report["domain"]["faces"]["0"]["passed"] is False
    assert "Out of domain" in (tmp_path / "out.report.html").read_text()


def test_only_a_model_with_a_card_is_checked(tiny_dir):
    assert model_card(load_pipeline(str(tiny_dir), device="cpu")) is None
    card = model_card(load_pipeline(str(SHIPPED_MODELS), device="cpu"))
    assert card is not None and card.domain == "faceworld"
