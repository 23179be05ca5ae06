"""The service under the front-ends: ModelSpec as one record of the model options, EditService's
one pipeline cache and one edit sequence, the feature_injection rename, and SettingError wording."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from ipfacediff.errors import SettingError, UserError
from ipfacediff.settings import EditSettings, ModelSpec

PROMPT = "a face with eyeglasses"


def test_a_model_spec_is_one_hashable_record_checked_when_made(tmp_path):
    typed = ModelSpec(model=tmp_path, edit_loras=("a.safetensors:0.5", "b.safetensors"), device="cpu")
    same = ModelSpec(model=str(tmp_path), edit_loras=(("a.safetensors", 0.5), ("b.safetensors", 1.0)), device="cpu")
    assert typed == same and hash(typed) == hash(same) and len({typed, same}) == 1
    assert typed.model == str(tmp_path) and typed.edit_loras == (("a.safetensors", 0.5), ("b.safetensors", 1.0))
    assert ModelSpec(adapter_library=False) != ModelSpec()

    with pytest.raises(SettingError) as both:
        ModelSpec(identity_model="unet", identity_lora="lora.safetensors")
    assert both.value.setting == "identity_lora" and str(both.value) == (
        "give either --identity-model or --identity-lora, not both"
    )
    with pytest.raises(SettingError, match=r"^--dtype must be one of auto, float32, float16, bfloat16; got half$"):
        ModelSpec(dtype="half")
    with pytest.raises(SettingError, match="--adapters-dir names an adapter library and --no-adapter-library"):
        ModelSpec(adapters_dir="lib", adapter_library=False)
    with pytest.raises(UserError, match="weight 'x' of a.safetensors is not a number"):
        ModelSpec(edit_loras=("a.safetensors:x",))


def test_setting_errors_name_the_flag_and_reword_for_other_front_ends():
    with pytest.raises(SettingError) as steps:
        EditSettings(prompt=PROMPT, steps=0)
    assert steps.value.setting == "steps" and str(steps.value) == "--steps must be in [1, 1000], got 0"
    assert steps.value.worded({"steps": "DDIM steps"}) == "DDIM steps must be in [1, 1000], got 0"
    with pytest.raises(SettingError) as face:  # a setting whose flag is not its field's name
        EditSettings(prompt=PROMPT, face_prompts=("x=a beard",))
    assert face.value.setting == "face_prompts" and str(face.value).startswith("--face-prompt must be ID=TEXT")
    with pytest.raises(SettingError) as typed:  # a person's text, read by from_mapping
        EditSettings.from_mapping({"prompt": PROMPT, "steps": "many"}, where="m.csv line 2")
    assert typed.value.worded({"steps": "steps"}) == "m.csv line 2: steps must be an integer, got 'many'"
    assert str(typed.value) == "m.csv line 2: --steps must be an integer, got 'many'"


def test_identity_guidance_is_read_as_feature_injection_with_a_deprecation():
    with pytest.warns(DeprecationWarning, match="'identity_guidance' is now called 'feature_injection'"):
        built = EditSettings(prompt=PROMPT, identity_guidance=False)
    with pytest.warns(DeprecationWarning):
        read = EditSettings.from_mapping({"prompt": PROMPT, "identity_guidance": "off"})
    assert built.feature_injection is False and read.feature_injection is False
    assert built.identity_guidance is False and EditSettings(prompt=PROMPT).identity_guidance is True
    assert "feature_injection" in built.to_dict() and "identity_guidance" not in built.to_dict()
    with warnings.catch_warnings(), pytest.raises(UserError, match="old name of feature_injection"):
        warnings.simplefilter("ignore")
        EditSettings.from_mapping({"prompt": PROMPT, "identity_guidance": "1", "feature_injection": "1"})
    table = EditSettings.options_table()
    assert "`--feature-injection/--no-feature-injection`" in table and "--identity-guidance/" not in table


def test_the_old_flag_still_works_and_says_its_new_name(tmp_path):
    from test_settings import run_entry_point

    missing = tmp_path / "missing.mp4"
    done = run_entry_point(
        "edit", str(missing), "-o", str(tmp_path / "out.mp4"), "-p", PROMPT, "--no-identity-guidance"
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[0] == "note: --no-identity-guidance is now --no-feature-injection", lines
    assert len(lines) == 2 and lines[1].startswith("error: ") and "missing.mp4" in lines[1], lines


def test_the_service_caches_pipelines_by_spec(tiny_dir, one_thread):
    from ipfacediff.service import EditService

    service = EditService(max_pipelines=1)
    base = ModelSpec(model=str(tiny_dir), device="cpu", dtype="float32")
    first = service.pipeline(base)
    assert service.pipeline(ModelSpec(model=str(tiny_dir), device="cpu", dtype="float32")) is first
    assert service.loads == 1 and service.has_pipeline(base)
    bare = ModelSpec(model=str(tiny_dir), device="cpu", dtype="float32", adapter_library=False)
    assert service.pipeline(bare) is not first and service.loads == 2
    assert not service.has_pipeline(base)  # one model set held: the other was let go


def test_the_service_edit_is_the_python_apis_edit_and_writes_its_scores(tiny_dir, tmp_path, one_thread):
    from ipfacediff.diffusion import InversionCache
    from ipfacediff.evaluation import METRIC_KEYS
    from ipfacediff.job import edit_video, load_pipeline
    from ipfacediff.service import EditService
    from ipfacediff.video import read_frames, write_video
    from test_long_video import drifting

    source = write_video(tmp_path / "clip.mp4", iter(drifting(8, size=48)), 8.0)
    settings = EditSettings(prompt=PROMPT, steps=2, whole_frame=True, resolution=32, seed=5)
    spec = ModelSpec(model=str(tiny_dir), device="cpu", dtype="float32")
    result = EditService().edit(
        source,
        tmp_path / "service.mp4",
        settings,
        spec,
        cache=InversionCache(tmp_path / "cache-a"),
        log=lambda _m: None,
        evaluate=True,
        metrics_path=tmp_path / "service.metrics.json",
    )
    by_hand = edit_video(  # the keyword form of loading, as the README's Python API writes it
        source,
        tmp_path / "api.mp4",
        settings,
        pipeline=load_pipeline(str(tiny_dir), device="cpu", dtype="float32"),
        cache=InversionCache(tmp_path / "cache-b"),
        log=lambda _m: None,
    )
    assert np.array_equal(read_frames(tmp_path / "service.mp4"), read_frames(tmp_path / "api.mp4"))
    assert result.report.faces == by_hand.faces and result.report.settings == by_hand.settings
    written = json.loads(Path(result.evaluation.metrics_path).read_text())
    assert set(METRIC_KEYS) <= set(written) and written == json.loads(json.dumps(result.evaluation.metrics))
    assert result.evaluation.report_path is None


def test_a_manifest_names_settings_by_column_and_reads_the_old_column(tmp_path):
    from ipfacediff.batch import SUMMARY_METRICS, read_manifest
    from ipfacediff.evaluation import METRIC_KEYS, SUMMARY_KEYS

    assert SUMMARY_METRICS == SUMMARY_KEYS and set(SUMMARY_KEYS) < set(METRIC_KEYS)
    manifest = tmp_path / "m.csv"
    manifest.write_text("input,prompt,steps\nclip.mp4,a face with eyeglasses,0\n")
    with pytest.raises(UserError) as bad:
        read_manifest(manifest, tmp_path / "out")
    assert str(bad.value) == "m.csv line 2: steps must be in [1, 1000], got 0"
    manifest.write_text("input,prompt,identity_guidance\nclip.mp4,a face with eyeglasses,false\n")
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        [job] = read_manifest(manifest, tmp_path / "out", log=notes.append)
    assert job.settings["feature_injection"] is False and "identity_guidance" not in job.settings
    assert notes == ["note: manifest column identity_guidance is now feature_injection"]
    spec = job.model_spec(None, "cpu", "auto")
    assert spec == ModelSpec(device="cpu") and spec.edit_loras == ()


def test_the_web_pages_server_edits_and_scores_through_the_service(tiny_dir, tmp_path, one_thread):
    pytest.importorskip("gradio")
    from ipfacediff.ui import Server

    server = Server(model=str(tiny_dir), work_dir=tmp_path, max_upload_mb=10, max_seconds=60, device="cpu")
    loaded = server.load_sample("session")
    settings = EditSettings(prompt=PROMPT, steps=2, resolution=32, faces="0")
    assert not server.has_pipeline()
    done = server.run(loaded, settings, "session", identity_lora=None, edit_loras=())
    assert server.has_pipeline() and server.service.loads == 1
    assert server.pipeline() is server.service.pipeline(server.model_spec())
    written = json.loads(Path(done["metrics_path"]).read_text())
    assert (written["original"], written["edited"], written["run_metadata"]) == (
        "sample.mp4",
        "edited.mp4",
        "edited.run.json",
    )
    named = ("original", "edited", "run_metadata")  # by file name in the download, not the server's path
    scores = {k: v for k, v in done["metrics"].items() if k not in named}
    assert {k: written[k] for k in scores} == json.loads(json.dumps(scores)) and "id_sim" in scores
    assert Path(done["report_path"]).is_file() and done["report"].settings["faces"] == "0"


def test_a_batch_output_made_before_the_rename_stays_complete(tmp_path):
    from ipfacediff.batch import job_state, read_manifest
    from ipfacediff.runs import run_metadata_path
    from ipfacediff.video import write_video
    from test_long_video import drifting

    write_video(tmp_path / "clip.mp4", iter(drifting(4, size=32)), 8.0)
    manifest = tmp_path / "m.csv"
    manifest.write_text("input,prompt,output\nclip.mp4,a face with eyeglasses,edited.mp4\n")
    [job] = read_manifest(manifest, tmp_path / "out")
    Path(job.output).parent.mkdir()
    write_video(Path(job.output), iter(drifting(4, size=32)), 8.0)
    old = {("identity_guidance" if k == "feature_injection" else k): v for k, v in job.settings.items()}
    record = {"input": job.input, "settings": old}
    run_metadata_path(Path(job.output)).write_text(json.dumps(record))
    assert job_state(job, evaluate=False) == "complete"
    record["settings"] = {**old, "identity_guidance": False}  # another edit than the job's
    run_metadata_path(Path(job.output)).write_text(json.dumps(record))
    assert job_state(job, evaluate=False) == "todo"
