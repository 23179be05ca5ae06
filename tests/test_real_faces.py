"""The embedded FaceWorld model refuses real faces, in one line, before any model work."""

from __future__ import annotations

import json

from ipfacediff.edit import model_card
from ipfacediff.models.defaults import SHIPPED_MODELS
from ipfacediff.service import load_pipeline

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
    code, _, stderr = run(
        [
            "edit",
            str(clip),
            "-o",
            str(out),
            "-p",
            "a face with eyeglasses",
            "--steps",
            "2",
            "--end",
            "frame:4",
            "--allow-out-of-domain",
            "--evaluate",
        ],
        capsys,
    )
    assert code == 0, stderr
    report = json.loads((tmp_path / "out.run.json").read_text())
    assert report["settings"]["allow_out_of_domain"] is True
    assert report["domain"]["overridden"] is True and report["domain"]["faces"]["0"]["passed"] is False
    assert "Out of domain" in (tmp_path / "out.report.html").read_text()


def test_only_a_model_with_a_card_is_checked(tiny_dir):
    assert model_card(load_pipeline(str(tiny_dir), device="cpu")) is None
    card = model_card(load_pipeline(str(SHIPPED_MODELS), device="cpu"))
    assert card is not None and card.domain == "faceworld"


def test_a_batch_row_with_a_real_face_fails_with_the_line_and_the_others_go_on(shared_clip, tmp_path):
    import os

    import pytest
    from rich.console import Console

    pytest.importorskip("ray")
    from ipfacediff.batch import run_batch
    from ipfacediff.demo import sample_clip

    clips = tmp_path / "clips"
    clips.mkdir()
    sample_clip(clips / "drawn.mp4", frames=6).save(clips / "drawn.tracks.json")
    os.symlink(shared_clip("closeup.mp4"), clips / "closeup.mp4")
    manifest = clips / "manifest.csv"
    manifest.write_text(
        "input,prompts,steps,end,allow_out_of_domain\n"
        "drawn.mp4,a face with eyeglasses,2,,\n"
        "closeup.mp4,a face with eyeglasses,2,frame:3,\n"
        "closeup.mp4,a smiling face,2,frame:3,true\n"
    )
    out = tmp_path / "out"
    summary = run_batch(
        manifest, out, model=None, num_workers=1, console=Console(file=open(os.devnull, "w"), width=120)
    )
    rows = {(r["input"].rsplit("/", 1)[-1], r["prompt"]): r for r in summary.rows}
    assert (summary.done, summary.failed) == (2, 1), summary.rows
    refused = rows[("closeup.mp4", "a face with eyeglasses")]
    assert refused["status"] == "failed" and refused["error"].startswith(REFUSAL.removeprefix("error: ")), refused
    assert not os.path.exists(refused["output"])
    assert rows[("drawn.mp4", "a face with eyeglasses")]["status"] == "done"
    overridden = rows[("closeup.mp4", "a smiling face")]
    assert overridden["status"] == "done"
    run_json = json.loads(open(overridden["output"].removesuffix(".mp4") + ".run.json").read())
    assert run_json["domain"]["overridden"] is True
