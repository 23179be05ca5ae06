"""Batch editing on a local Ray instance with the tiny models."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ipfacediff.batch import BatchWorker, job_state, read_manifest, run_batch
from ipfacediff.errors import UserError

pytest.importorskip("ray")

STEPS = 3


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from ipfacediff.demo import sample_clip

    folder = tmp_path_factory.mktemp("clips")
    sample_clip(folder / "a.mp4", frames=10).save(folder / "a.tracks.json")
    sample_clip(folder / "b.mp4", frames=8).save(folder / "b.tracks.json")  # other pixels: its own inversion
    (folder / "broken.mp4").write_bytes(b"this is not a video")
    return folder


def quiet_console():
    from rich.console import Console

    return Console(file=open(os.devnull, "w"), width=120)


def test_batch_edits_shares_inversion_records_failure_and_resumes(clips, tiny_dir, tmp_path):
    manifest = clips / "manifest.csv"
    manifest.write_text(
        "input,prompts,output,steps,whole_frame,seed\n"
        f'a.mp4,"a face with eyeglasses|a smiling face",,{STEPS},true,0\n'
        f"b.mp4,a face with blonde hair,b-edit.mp4,{STEPS},yes,1\n"
        f"broken.mp4,a face,,{STEPS},true,\n"
    )
    out = tmp_path / "out"
    seen: list[tuple[str, int, int]] = []
    summary = run_batch(
        manifest,
        out,
        model=str(tiny_dir),
        num_workers=2,
        console=quiet_console(),
        progress=lambda stage, done, total: seen.append((stage, done, total)),
    )
    assert (summary.done, summary.failed, summary.skipped) == (3, 1, 0)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows == summary.rows
    by_prompt = {r["prompt"]: r for r in rows}
    glasses, smile = by_prompt["a face with eyeglasses"], by_prompt["a smiling face"]
    # invert once, edit many: the second prompt of clip a found every inversion step cached
    assert glasses["inversion_reused"] is False and smile["inversion_reused"] is True
    assert by_prompt["a face with blonde hair"]["inversion_reused"] is False
    assert glasses["worker"] == smile["worker"]
    entries = [p for p in (out / ".cache" / "inversion").iterdir() if p.is_dir()]
    inversions = [p for p in entries if any(p.glob("step_*.safetensors"))]
    assert len(inversions) == 2  # clips a and b; beside them, what a re-edit reads: ε1's keyframe features of each, ...
    beside = [p for p in entries if p not in inversions]
    assert sum(any(p.glob("features_*.safetensors")) for p in beside) == 2
    kept = {f.name.split("_")[0] for p in beside for f in p.iterdir()}
    assert kept <= {
        "features",
        "nearest",
        "reference",
        "source",
    }  # ... the nearest tokens, the blend's reference, identities
    broken = by_prompt["a face"]
    assert broken["status"] == "failed" and "\n" not in broken["error"] and broken["error"]
    assert not Path(broken["output"]).exists()
    for row in rows:
        if row["status"] == "done":
            output = Path(row["output"])
            assert output.is_file() and output.with_name(output.stem + ".run.json").is_file()
    assert (out / "b-edit.mp4").is_file()
    assert ("outputs", 4, 4) in seen and ("clips", 3, 3) in seen

    # the same command again: nothing to do, and the finished videos are not rewritten
    written = {p: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    again = run_batch(manifest, out, model=str(tiny_dir), console=quiet_console())
    assert (again.done, again.failed, again.skipped) == (0, 1, 3)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == written
    assert {r["status"] for r in again.rows if r["prompt"] != "a face"} == {"skipped"}


def test_killed_worker_is_replaced_and_every_clip_completes(clips, tiny_dir, tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    rows = [
        {
            "input": str(clips / "a.mp4"),
            "prompts": ["a face with eyeglasses", "a smiling face"],
            "tracks": str(clips / "a.tracks.json"),
            "steps": STEPS,
            "faces": "all",
        },
        {"input": str(clips / "b.mp4"), "prompt": "blonde hair", "whole_frame": True, "steps": STEPS},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    running = out / ".cache" / "running"
    killed: list[dict] = []
    stop = threading.Event()

    def assassin():  # kill the first worker that starts a clip, once, mid-clip
        while not stop.is_set() and not killed:
            for marker in running.glob("*.json") if running.is_dir() else []:
                info = json.loads(marker.read_text())
                os.kill(info["pid"], signal.SIGKILL)
                killed.append(info)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=assassin, daemon=True)
    thread.start()
    try:
        summary = run_batch(manifest, out, model=str(tiny_dir), num_workers=2, evaluate=True, console=quiet_console())
    finally:
        stop.set()
        thread.join()
    assert killed, "no worker was killed"
    assert (summary.done, summary.failed) == (3, 0), summary.rows
    retried = [r for r in summary.rows if r["input"] == killed[0]["input"]]
    assert retried and all(r["attempts"] == 2 for r in retried)
    assert all(str(killed[0]["pid"]) not in r["worker"] for r in retried)
    for row in summary.rows:
        output = Path(row["output"])
        assert output.is_file() and output.with_name(output.stem + ".metrics.json").is_file()
        assert row["metrics"] and "id_sim" in row["metrics"]
    assert "id_sim" in summary.mean_metrics


def test_manifest_mistakes_are_one_line_user_errors(tmp_path):
    cases = {
        "m.csv": "input,prompt\n,a face\n",
        "n.csv": "input,prompt\nx.mp4,\n",
        "o.csv": "input,prompt,colour\nx.mp4,a face,red\n",
        "p.csv": "input,prompt,steps\nx.mp4,a face,many\n",
        "q.jsonl": '{"input": "x.mp4", "prompt": "a face"}\n[1, 2]\n',
        "r.jsonl": "{not json\n",
        "s.txt": "input,prompt\n",
        "t.csv": "input,prompts,output\nx.mp4,a|b|c,one.mp4|two.mp4\n",
        "u.csv": "input,prompt,output\nx.mp4,a,../escape.mp4\n",
        "v.csv": "input,prompt,strength\nx.mp4,a,2\n",
        "w.csv": "input,prompt,output\nx.mp4,a,same.mp4\ny.mp4,b,same.mp4\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError) as caught:
            read_manifest(tmp_path / name, tmp_path / "out")
        assert "\n" not in str(caught.value), name
    with pytest.raises(UserError):
        read_manifest(tmp_path / "missing.csv", tmp_path / "out")


@pytest.mark.parametrize(
    "rows, words",
    [
        ('a.mp4,"a face with eyeglasses\nb.mp4,a smiling face\n', "m.csv line 2: a quoted cell is not closed"),
        ('a.mp4,a smile\nb.mp4,"a face\nwith eyeglasses"\n', "m.csv line 3: a quoted cell is not closed"),
        ('a.mp4,"a face"with eyeglasses\n', "m.csv line 2: not valid CSV"),
    ],
)
def test_a_csv_row_is_one_line_and_an_open_quote_is_refused_with_its_line(tmp_path, rows, words):
    """An open quote would take the rest of the manifest into one prompt and run it."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("input,prompt\n" + rows)
    with pytest.raises(UserError, match=words) as caught:
        read_manifest(manifest, tmp_path / "out")
    assert "\n" not in str(caught.value)
    manifest.write_text('input,prompt\na.mp4,"a face, with ""quotes"""\n')  # closed quotes are still read
    assert [job.prompt for job in read_manifest(manifest, tmp_path / "out")] == ['a face, with "quotes"']


def test_batch_numbers_and_output_folder_are_checked_before_any_work(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"input": "a.mp4", "prompt": "a face"}) + "\n")
    (tmp_path / "file").write_text("")
    for output, options, words in [
        (tmp_path / "file" / "out", {}, r"output folder .* cannot be made \(.*file is a file, not a folder\)"),
        (Path("/proc/ipfacediff-out"), {}, "output folder /proc/ipfacediff-out cannot be written"),
        (tmp_path / "out", {"gpus_per_task": float("nan")}, "--gpus-per-task must be a finite number"),
        (tmp_path / "out", {"retries": -1}, "--retries must be at least 0"),
    ]:
        with pytest.raises(UserError, match=words):
            run_batch(manifest, output, console=quiet_console(), **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m.jsonl"]


def test_manifest_paths_names_and_settings(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = tmp_path / "sub" / "m.csv"
    manifest.write_text(
        "input,prompts,output,edit_lora,keyframes,whole_frame,faces,blend_threshold\n"
        'clip.mp4,"Eye glasses!|smile",,g.safetensors:0.5;s.safetensors,2,1,"0,2",0.4\n'
        "clip.mp4,smile,,,,no,,\n"
    )
    jobs = read_manifest(manifest, tmp_path / "out")
    assert [j.prompt for j in jobs] == ["Eye glasses!", "smile", "smile"]
    assert jobs[0].input == str((tmp_path / "sub" / "clip.mp4").resolve())
    assert Path(jobs[0].output).name == "clip-eye-glasses.mp4"
    assert Path(jobs[1].output).name == "clip-smile-line2.mp4" and Path(jobs[2].output).name == "clip-smile-line3.mp4"
    assert jobs[0].edit_loras == [
        (str((tmp_path / "sub" / "g.safetensors").resolve()), 0.5),
        (str((tmp_path / "sub" / "s.safetensors").resolve()), 1.0),
    ]
    assert jobs[0].settings["keyframes"] == 2 and jobs[0].settings["whole_frame"] is True
    assert jobs[0].settings["faces"] == "0,2" and jobs[2].settings["whole_frame"] is False
    assert jobs[0].settings["blend_threshold"] == 0.4 and jobs[2].settings.get("blend_threshold") is None
    assert job_state(jobs[0], evaluate=False) == "todo"


def test_worker_loads_models_once_and_records_failures(clips, tmp_path, tiny_dir):
    """Outside Ray: one worker, two clips, one model load; a failing output is a row, not an exception."""
    from ipfacediff.batch import BatchJob

    worker = BatchWorker(str(tiny_dir), "cpu", "float32", str(tmp_path / "inv"), str(tmp_path / "run"), False)
    settings = {"steps": 2, "whole_frame": True}
    missing = BatchJob(
        line=2,
        index=0,
        input=str(tmp_path / "nope.mp4"),
        output=str(tmp_path / "o.mp4"),
        settings={"prompt": "a face", **settings},
    )
    [row] = worker.run_clip("c", [missing], 1)
    assert row["status"] == "failed" and row["error"] and "\n" not in row["error"]
    for index, prompt in enumerate(["glasses", "smile"]):
        job = BatchJob(
            line=3,
            index=index,
            input=str(clips / "b.mp4"),
            output=str(tmp_path / f"{prompt}.mp4"),
            settings={"prompt": prompt, **settings},
        )
        [row] = worker.run_clip(f"b{index}", [job], 1)
        assert row["status"] == "done" and row["inversion_reused"] is (index == 1)
    stray = BatchJob(
        line=4,
        index=0,
        input=str(clips / "b.mp4"),
        output=str(tmp_path / "stray.mp4"),
        settings={"prompt": "glasses", "face_prompts": ["7=a face with a beard"], **settings},
    )
    [row] = worker.run_clip("b-stray", [stray], 1)  # a prompt for a face the clip lacks fails its row
    assert row["status"] == "failed" and "no face track 7" in row["error"] and "\n" not in row["error"]
    assert not (tmp_path / "stray.mp4").exists()
    assert worker.info()["loads"] == 1
    assert not list((tmp_path / "run").iterdir())
