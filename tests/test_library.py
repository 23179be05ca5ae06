"""`ipfacediff train library`: ε1 and one ε2 per edit for any SD-1.x model, written as an adapter
library that `edit --adapters-dir LIB` (and the loader, the batch manifest, the Python API) use.

Tiny random models, a few optimizer steps: what is checked is the library's files, words, flags,
resume and errors, not what the adapters learned."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from ipfacediff.cli import main
from ipfacediff.errors import UserError
from ipfacediff.adapters import derive_words, parse_edits, split_edits
from ipfacediff.adapters.build import build_library
from ipfacediff.adapters.edits import (
    ADAPTER_GUIDANCES,
    ADAPTER_WEIGHTS,
    BLEND_THRESHOLDS,
    EDIT_TARGETS,
    FACEWORLD_DEFAULTS,
)
from ipfacediff.models import AdapterLibrary
from ipfacediff.settings import DEFAULT_BLEND_THRESHOLD
from ipfacediff.training import ADAPTER_FILE

from test_cli import run

FAST = ["--max-steps", "2", "--max-images", "8", "--inversion-steps", "4", "--generation-steps", "2"]
EDITS = 'eyeglasses,blonde_hair,ink="a face with a cheek tattoo",red_hair="a face with red hair"'


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos(shared_clip, tmp_path_factory):
    """A folder with one photo: a frame of the real clip (its face is found, not assumed)."""
    from ipfacediff.video import iter_frames

    folder = tmp_path_factory.mktemp("photos")
    frame = next(iter(iter_frames(shared_clip("closeup.mp4"))))
    cv2.imwrite(str(folder / "frame.jpg"), frame[..., ::-1])
    return folder


@pytest.fixture(scope="module")
def library(shared_clip, photos, tiny_dir, tmp_path_factory):
    """A library built by the command from a real clip and a photo: ε1, two built-in and two custom edits."""
    lib = tmp_path_factory.mktemp("library") / "lib"
    argv = [
        "train",
        "library",
        "--model",
        str(tiny_dir),
        "--data",
        str(shared_clip("closeup.mp4")),
        "--data",
        str(photos),
        "--edits",
        EDITS,
        "--output",
        str(lib),
        *FAST,
    ]
    try:
        main(argv)
    except SystemExit as done:
        pytest.fail(f"train library exited with {done.code}")
    return lib


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from ipfacediff.demo import sample_clip

    folder = tmp_path_factory.mktemp("sample")
    sample_clip(folder / "clip.mp4", frames=6, size=128).save(folder / "clip.tracks.json")
    return folder / "clip.mp4", folder / "clip.tracks.json"


@pytest.fixture(scope="module")
def aligned_faces(tmp_path_factory):
    from conftest import moving_texture

    folder = tmp_path_factory.mktemp("aligned")
    for index, image in enumerate(moving_texture(6, seed=3)):
        cv2.imwrite(str(folder / f"{index}.png"), image[..., ::-1])
    return folder


def test_train_library_writes_adapters_json_identity_and_every_edit(library, shared_clip, photos):
    spec = json.loads((library / "adapters.json").read_text())
    assert spec["identity"] == f"identity/{ADAPTER_FILE}"
    assert list(spec["edits"]) == ["eyeglasses", "blonde_hair", "ink", "red_hair"]
    loaded = AdapterLibrary.read_dir(library)
    assert loaded.identity.is_file() and all(e.path.is_file() for e in loaded.edits)
    assert {e.name: e.target for e in loaded.edits} == {
        "eyeglasses": "a face with eyeglasses",
        "blonde_hair": "a face with blonde hair",
        "ink": "a face with a cheek tattoo",
        "red_hair": "a face with red hair",
    }
    # Only adapters and reports stay: no checkpoints, caches or staged faces.
    assert not (library / "train_data").exists() and not list(library.rglob("checkpoints"))
    report = json.loads((library / "training.json").read_text())
    assert set(report["steps"]) == {"identity", "eyeglasses", "blonde_hair", "ink", "red_hair"}
    assert all(step["steps"] == 2 for step in report["steps"].values())
    assert report["resolution"] == 64
    assert report["data"]["identity"] == {
        "sources": [str(shared_clip("closeup.mp4").resolve()), str(photos.resolve())],
        "faces": 8,
    }


def test_a_library_for_another_model_has_neutral_values_and_says_so(library):
    """FaceWorld's table is FaceWorld's: the tiny model's built-in edits get no tuned value."""
    spec = json.loads((library / "adapters.json").read_text())["edits"]
    assert ADAPTER_WEIGHTS and ADAPTER_GUIDANCES and BLEND_THRESHOLDS  # the table has values to leave out
    for entry in spec.values():
        assert not {"weight", "guidance", "blend_threshold", "identity_gradient"} & set(entry), entry
        assert entry["values_from"] == "neutral"
    loaded = {e.name: e for e in AdapterLibrary.read_dir(library).edits}
    assert {e.values_from for e in loaded.values()} == {"neutral"} and not loaded["eyeglasses"].has_tuned_values()
    assert loaded["blonde_hair"].words == ("blonde", "blond") and loaded["blonde_hair"].hair


def test_a_custom_edit_gets_words_from_its_prompt_and_a_hair_edit_the_hair_flag(library):
    spec = json.loads((library / "adapters.json").read_text())["edits"]
    assert spec["ink"]["words"] == ["ink", "tattoo"]  # "tattoo" only from the prompt; "cheek" names a part
    assert spec["ink"]["hair"] is False
    assert spec["red_hair"]["words"] == ["red"] and spec["red_hair"]["hair"] is True
    assert spec["blonde_hair"]["hair"] is True and spec["eyeglasses"]["hair"] is False


def test_edit_with_adapters_dir_picks_adapters_by_the_prompts_words(library, sample, tiny_dir, tmp_path, capsys):
    clip, tracks = sample
    common = ["--model", str(tiny_dir), "--steps", "2", "--tracks", str(tracks), "--adapters-dir", str(library)]
    code, _, stderr = run(
        ["edit", str(clip), "-o", str(tmp_path / "a.mp4"), "-p", "a face with a tattoo and glasses", *common], capsys
    )
    assert code == 0, stderr
    faces = json.loads((tmp_path / "a.run.json").read_text())["faces"]
    assert faces and all(face["edit_adapters"] == {"eyeglasses": 1.0, "ink": 1.0} for face in faces)
    code, _, stderr = run(
        ["edit", str(clip), "-o", str(tmp_path / "b.mp4"), "-p", "a face with red hair", *common], capsys
    )
    assert code == 0, stderr
    assert json.loads((tmp_path / "b.run.json").read_text())["faces"][0]["edit_adapters"] == {"red_hair": 1.0}
    code, stdout, stderr = run(
        [
            "invert",
            str(clip),
            "--model",
            str(tiny_dir),
            "--steps",
            "2",
            "--tracks",
            str(tracks),
            "--adapters-dir",
            str(library),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capsys,
    )
    assert code == 0 and "UNet calls" in stdout, stderr


def test_the_python_api_loads_a_library_from_outside_the_model_folder(library, tiny_dir):
    from ipfacediff.job import load_pipeline
    from ipfacediff.settings import EditSettings

    pipe = load_pipeline(str(tiny_dir), adapters_dir=library, device="cpu", dtype="float32")
    assert set(pipe.unet.peft_config) == {
        "identity",
        "edit:eyeglasses",
        "edit:blonde_hair",
        "edit:ink",
        "edit:red_hair",
    }
    plan = pipe.plan_edit(EditSettings(prompt="a face with red hair"))
    assert plan.edit_weights == {"edit:red_hair": 1.0} and plan.hair
    blonde = pipe.plan_edit(EditSettings(prompt="a blond face"))
    assert blonde.blend_threshold == DEFAULT_BLEND_THRESHOLD and blonde.hair
    # The file itself is accepted as well as its folder.
    assert AdapterLibrary.read_dir(library / "adapters.json") == AdapterLibrary.read_dir(library)


def test_a_bad_library_is_one_line(library, sample, tiny_dir, tmp_path, capsys):
    clip, tracks = sample
    missing_adapter = tmp_path / "missing-adapter"
    shutil.copytree(library, missing_adapter)
    (missing_adapter / "ink" / ADAPTER_FILE).unlink()
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "adapters.json").write_text('{"edits": [1')
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong_type = tmp_path / "wrong-type"
    shutil.copytree(library, wrong_type)
    spec = json.loads((wrong_type / "adapters.json").read_text())
    (wrong_type / "adapters.json").write_text(json.dumps({**spec, "identity_net": 5}))
    cases = [
        (tmp_path / "nowhere", "does not exist"),
        (empty, "has no adapters.json"),
        (bad_json, "is not JSON"),
        (missing_adapter, str(missing_adapter / "ink" / ADAPTER_FILE)),
        (wrong_type, f"{wrong_type / 'adapters.json'} is not a valid adapter library (identity_net: "),
    ]
    for command in ("edit", "invert"):
        for folder, expected in cases:
            argv = [
                command,
                str(clip),
                "--model",
                str(tiny_dir),
                "--tracks",
                str(tracks),
                "--adapters-dir",
                str(folder),
            ]
            argv += ["-o", str(tmp_path / "o.mp4"), "-p", "a face with glasses"] if command == "edit" else []
            code, stdout, stderr = run(argv, capsys)
            lines = [line for line in stderr.splitlines() if line.strip()]
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (command, folder, stderr)
            assert expected in lines[0], (command, lines[0])
    assert not (tmp_path / "o.mp4").exists()
    code, _, stderr = run(
        [
            "edit",
            str(clip),
            "-o",
            str(tmp_path / "o.mp4"),
            "-p",
            "x",
            "--model",
            str(tiny_dir),
            "--adapters-dir",
            str(library),
            "--no-adapter-library",
        ],
        capsys,
    )
    assert code == 2 and "--no-adapter-library" in stderr


def test_a_batch_manifest_carries_adapters_dir_to_the_workers_pipeline(library, sample, tiny_dir, tmp_path):
    from ipfacediff.batch import BatchWorker, read_manifest

    clip, _ = sample
    shutil.copytree(library, tmp_path / "lib")
    manifest = tmp_path / "clips.csv"
    manifest.write_text(f"input,prompt,adapters_dir\n{clip},a face with glasses,lib\n{clip},a smiling face,\n")
    jobs = read_manifest(manifest, tmp_path / "out")
    assert [job.adapters_dir for job in jobs] == [str((tmp_path / "lib").resolve()), None]
    worker = BatchWorker(str(tiny_dir), "cpu", "float32", str(tmp_path / "cache"), str(tmp_path / "running"), False)

    def pipeline(job):  # the pipeline the worker edits the row with
        return worker.service.pipeline(job.model_spec(worker.model, worker.device, worker.dtype))

    assert set(pipeline(jobs[0]).adapter_library.words()) == {
        "eyeglasses",
        "blonde_hair",
        "ink",
        "red_hair",
    }
    assert pipeline(jobs[1]).adapter_library is None
    (tmp_path / "lib" / "adapters.json").unlink()
    with pytest.raises(UserError, match=r"clips.csv line 2: adapter library folder .* has no adapters.json"):
        read_manifest(manifest, tmp_path / "out")


def test_a_killed_build_resumes_without_retraining_finished_adapters(tiny_dir, aligned_faces, tmp_path, capsys):
    lib = tmp_path / "lib"
    stages: list[str] = []

    class Killed(Exception):
        pass

    def progress(stage: str, done: int, total: int) -> None:
        stages.append(stage)
        if stage == "smile train" and done == 2:
            raise Killed  # after step 1's checkpoint, in the middle of the last adapter

    options = dict(max_steps=3, rank=4, learning_rate=1e-4, mixed_precision="no")
    with pytest.raises(Killed):
        build_library(
            str(tiny_dir),
            [aligned_faces],
            "eyeglasses,smile",
            lib,
            aligned=True,
            identity_options=options,
            progress=progress,
            edit_options=dict(options, inversion_steps=4, generation_steps=2, checkpoint_every=1),
        )
    assert {
        "faces " + aligned_faces.name,
        "adapters",
        "identity train",
        "eyeglasses invert",
        "eyeglasses train",
    } <= set(stages)
    assert not (lib / "adapters.json").exists()  # a killed run leaves no library naming missing files
    assert (lib / "identity" / ADAPTER_FILE).is_file() and (lib / "eyeglasses" / ADAPTER_FILE).is_file()
    assert not (lib / "smile" / ADAPTER_FILE).exists()
    stamps = {name: (lib / name / ADAPTER_FILE).stat().st_mtime_ns for name in ("identity", "eyeglasses")}
    before = json.loads((lib / "training.json").read_text())["steps"]
    capsys.readouterr()  # the libraries' own loading bars (the CLI quiets them, the Python API does not)

    argv = [
        "train",
        "library",
        "--model",
        str(tiny_dir),
        "--data",
        str(aligned_faces),
        "--aligned",
        "--edits",
        "eyeglasses,smile",
        "--output",
        str(lib),
        "--max-steps",
        "3",
        "--inversion-steps",
        "4",
        "--generation-steps",
        "2",
    ]
    code, _, stderr = run(argv, capsys)
    assert code == 2 and stderr.strip().count("\n") == 0 and "--resume" in stderr
    code, stdout, stderr = run([*argv, "--resume"], capsys)
    assert code == 0, stderr
    assert "adapters.json" in stdout
    assert {name: (lib / name / ADAPTER_FILE).stat().st_mtime_ns for name in stamps} == stamps
    steps = json.loads((lib / "training.json").read_text())["steps"]
    assert steps["identity"] == before["identity"] and steps["eyeglasses"] == before["eyeglasses"]
    assert steps["smile"]["resumed_from"] == 1 and steps["smile"]["steps"] == 3
    assert list(json.loads((lib / "adapters.json").read_text())["edits"]) == ["eyeglasses", "smile"]
    assert not list(lib.rglob("checkpoints"))

    # A lost adapter is trained again, an added edit joins the library, the rest stays as it is.
    (lib / "eyeglasses" / ADAPTER_FILE).unlink()
    smile = (lib / "smile" / ADAPTER_FILE).stat().st_mtime_ns
    argv[argv.index("eyeglasses,smile")] = "eyeglasses,smile,beard"
    code, _, stderr = run([*argv, "--resume"], capsys)
    assert code == 0, stderr
    assert (lib / "identity" / ADAPTER_FILE).stat().st_mtime_ns == stamps["identity"]
    assert (lib / "smile" / ADAPTER_FILE).stat().st_mtime_ns == smile
    library = AdapterLibrary.read_dir(lib)
    assert [e.name for e in library.edits] == ["eyeglasses", "smile", "beard"]
    assert all(e.path.is_file() for e in library.edits)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    from ipfacediff.video import write_video

    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty").mkdir()
    (folder / "junk").mkdir()
    (folder / "junk" / "a.png").write_text("not an image")
    (folder / "faceless").mkdir()
    cv2.imwrite(str(folder / "faceless" / "grey.png"), np.full((128, 128, 3), 120, np.uint8))
    write_video(folder / "noface.mp4", [np.full((64, 64, 3), 100, np.uint8)] * 4, 4.0)
    (folder / "notes.txt").write_text("hi")
    (folder / "pipe").mkdir()
    cv2.imwrite(str(folder / "pipe" / "a.png"), np.full((64, 64, 3), 120, np.uint8))
    os.mkfifo(folder / "pipe" / "b.png")  # reading it would hang: it is named, not skipped
    (folder / "link").mkdir()
    cv2.imwrite(str(folder / "link" / "a.png"), np.full((64, 64, 3), 120, np.uint8))
    (folder / "link" / "b.png").symlink_to(folder / "gone.png")
    return folder


@pytest.mark.parametrize(
    "case",
    [
        (["{bad}/nowhere"], [], "--data: training data", "does not exist"),
        (["{faces}", "{bad}/empty"], ["--aligned"], "--data: training data folder", "holds no images"),
        (["{faces}", "{bad}/junk"], ["--aligned"], "--data: cannot read the image", "a.png"),
        (["{bad}/faceless"], [], "--data: no usable faces", "no face found in 1 image(s)"),
        (["{faces}", "{bad}/noface.mp4"], ["--aligned"], "--data: no usable faces", "no face found in 1 video(s)"),
        (["{bad}/notes.txt"], [], "--data: training data notes.txt", "is not one of"),
        (["{bad}/pipe"], ["--aligned"], "--data: training data", "b.png is not a regular file (it is a pipe)"),
        (["{bad}/link"], ["--aligned"], "--data: training data", "b.png does not exist"),
    ],
)
def test_bad_data_is_one_line_before_any_training(case, bad_data, aligned_faces, tiny_dir, tmp_path, capsys):
    data, extra, start, detail = case
    argv = [
        "train",
        "library",
        "--model",
        str(tiny_dir),
        "--edits",
        "smile",
        "--output",
        str(tmp_path / "lib"),
        *extra,
        *FAST,
    ]
    for item in data:
        argv += ["--data", item.format(bad=bad_data, faces=aligned_faces)]
    code, stdout, stderr = run(argv, capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith(f"error: {start}") and detail in lines[0], lines[0]
    assert not (tmp_path / "lib").exists()  # nothing written, nothing trained


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--rank", "0"], "--rank must be at least 1, got 0"),
        (["--inversion-steps", "600"], "--inversion-steps and --generation-steps must be between 1 and --t0 (500)"),
        (["--mixed-precision", "fp8"], "--mixed-precision must be one of no, fp16, bf16"),
    ],
)
def test_bad_training_settings_are_one_line_before_any_face_is_found(options, expected, tiny_dir, tmp_path, capsys):
    """The trainers' settings objects check the library's options, before its data is even read."""
    code, _, stderr = run(
        [
            "train",
            "library",
            "--model",
            str(tiny_dir),
            "--data",
            str(tmp_path / "nowhere"),
            "--edits",
            "smile",
            "--output",
            str(tmp_path / "lib"),
            *options,
        ],
        capsys,
    )
    assert code == 2 and stderr.startswith(f"error: {expected}") and stderr.count("\n") == 1, stderr
    with pytest.raises(UserError, match="--full is not for `train library`"):
        build_library(str(tiny_dir), [tmp_path / "nowhere"], "smile", tmp_path / "lib", identity_options={"full": True})
    assert not (tmp_path / "lib").exists()


@pytest.mark.parametrize(
    "edits, expected",
    [
        ("hat", "unknown edit 'hat'"),
        ("Tattoo=a face with a tattoo", "cannot name an edit"),
        ("identity=a face with a tattoo", "cannot name an edit"),
        ("smile,smile", "names smile twice"),
        ('tattoo=""', "has no target prompt"),
        ("plain=a face", "is the source prompt"),
    ],
)
def test_bad_edits_are_one_line(edits, expected, aligned_faces, tiny_dir, tmp_path, capsys):
    code, _, stderr = run(
        [
            "train",
            "library",
            "--model",
            str(tiny_dir),
            "--data",
            str(aligned_faces),
            "--edits",
            edits,
            "--output",
            str(tmp_path / "lib"),
            *FAST,
        ],
        capsys,
    )
    assert code == 2 and stderr.strip().count("\n") == 0 and expected in stderr, stderr
    assert not (tmp_path / "lib").exists()


def test_edits_are_parsed_with_their_prompts_words_and_flags():
    assert split_edits('eyeglasses,tattoo="a face, with a tattoo",smile') == [
        "eyeglasses",
        'tattoo="a face, with a tattoo"',
        "smile",
    ]
    # The shell took the quotes: a piece that cannot be a name continues the prompt before it.
    assert split_edits("tattoo=a face with a tattoo, on the cheek,smile") == [
        "tattoo=a face with a tattoo, on the cheek",
        "smile",
    ]
    edits = {e.name: e for e in parse_edits(["eyeglasses,beard", 'bald="a bald man"', "smile=a face with a big grin"])}
    assert edits["eyeglasses"].target == "a face with eyeglasses" and edits["eyeglasses"].weight == 0.3
    assert edits["beard"].words == ("beard", "bearded") and not edits["beard"].hair
    assert edits["bald"].words == ("bald",) and edits["bald"].hair
    assert edits["smile"].target == "a face with a big grin" and "grin" in edits["smile"].words
    assert "big" not in edits["smile"].words and edits["smile"].guidance == ADAPTER_GUIDANCES["smile"]
    assert derive_words("red_hair", "a face with red hair") == ["red"]
    assert derive_words("hair", "a face with more hair") == ["hair"]  # nothing else left: the part word stays


def test_built_in_targets_are_faceworlds_captions():
    from ipfacediff.faceworld.adapters import edit_target

    assert EDIT_TARGETS == {name: edit_target(name) for name in EDIT_TARGETS}


def test_photos_go_through_face_detection(photos):
    from ipfacediff.training import load_training_faces

    faces = load_training_faces(photos, 64, detect_images=True)
    assert faces.shape == (1, 64, 64, 3)
    # The aligned crop of the face, not the whole photo taken as a crop (what aligned images get).
    whole = load_training_faces(photos, 64)
    assert np.abs(faces.astype(int) - whole.astype(int)).mean() > 10


def test_the_reader_keeps_unknown_keys_harmless_and_reads_a_version_1_mark(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / ADAPTER_FILE).write_bytes(b"")
    (tmp_path / "adapters.json").write_text(
        json.dumps(
            {
                "identity": None,
                "future": 1,
                "edits": {
                    "x": {"path": f"x/{ADAPTER_FILE}", "words": ["X"], "defaults_from": "faceworld tuning", "new": 2}
                },
            }
        )
    )
    library = AdapterLibrary.read_dir(Path(tmp_path))
    assert library.identity is None and library.edits[0].words == ("x",)
    assert library.edits[0].values_from == FACEWORLD_DEFAULTS == "faceworld"  # version 1's "faceworld tuning"


@pytest.mark.parametrize(
    "change, words",
    [
        ({"identity_net": 5}, "identity_net: input should be a valid string, got 5"),
        ({"identity": ["a", "b"]}, "identity: input should be a valid string"),
        ({"edits": ["x"]}, "edits must be a JSON object, got ['x']"),
        ({"edits": {"x": 5}}, "edits.x must be a JSON object, got 5"),
        ({"edits": {"x": {"path": "x/a"}}}, "edits.x.words is missing"),
        ({"edits": {"x": {"path": "x/a", "words": "x"}}}, "edits.x.words: input should be a valid list"),
        ({"edits": {"x": {"path": "x/a", "words": ["x"], "hair": "yes"}}}, "edits.x.hair: input should be a valid"),
        ({"edits": {"x": {"path": "x/a", "words": ["x"], "weight": "0.5"}}}, "edits.x.weight: input should be a"),
        ({"edits": {"x": {"path": "x/a", "words": ["x"], "weight": 1e308 * 10}}}, "edits.x.weight: input should be"),
        ({"edits": {"x": {"path": "x/a", "words": ["x"], "guidance": 99}}}, "edits.x.guidance: input should be less"),
        (
            {"edits": {"x": {"path": 3, "words": [1]}}},
            "edits.x.path: input should be a valid string, got 3 (and 1 more)",
        ),
    ],
)
def test_the_library_file_is_checked_against_its_schema_naming_the_key_and_the_file(tmp_path, change, words):
    """adapters.json is one declarative schema (adapters/record.py, from AdapterEntry): a wrong type or value anywhere
    is one line naming the file and the key, never a TypeError from deep inside."""
    (tmp_path / "adapters.json").write_text(json.dumps({"identity": None, "edits": {}, **change}))
    with pytest.raises(UserError) as caught:
        AdapterLibrary.read_dir(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'adapters.json'} is not a valid adapter library")
    assert words in message, message


def test_an_unwritable_output_is_one_line_before_any_face_is_found(aligned_faces, tiny_dir, tmp_path, capsys):
    """Root writes through permission bits, so the check makes a file there: a path under a regular
    file and one in /proc are refused even for root."""
    (tmp_path / "file").write_text("")
    for output, words in [
        (tmp_path / "file" / "lib", "cannot be made (" + str(tmp_path / "file") + " is a file, not a folder)"),
        (Path("/proc/ipfacediff-lib"), "cannot be written"),
    ]:
        argv = ["train", "library", "--model", str(tiny_dir), "--data", str(aligned_faces), "--aligned"]
        code, _, stderr = run([*argv, "--edits", "smile", "--output", str(output), *FAST], capsys)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: --output {output} {words}"), stderr
        stages: list[str] = []
        with pytest.raises(UserError, match="--output"):
            build_library(str(tiny_dir), [aligned_faces], "smile", output, progress=lambda *a: stages.append(a[0]))
        assert stages == []  # before any face was looked for


def test_resume_with_nothing_to_resume_says_so_and_refuses_a_folder_that_is_no_library(tmp_path):
    said: list[str] = []
    with pytest.raises(UserError, match="--data"):  # the note comes first, then the run goes on to its data
        build_library("m", [tmp_path / "nowhere"], "smile", tmp_path / "new", resume=True, log=said.append)
    assert said == [f"--resume: nothing to resume in {tmp_path / 'new'} yet: training the library from the start"]
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="holds no library to resume .*holiday.jpg") as caught:
        build_library("m", [tmp_path / "nowhere"], "smile", tmp_path / "photos", resume=True)
    assert "\n" not in str(caught.value)


def test_train_library_has_help(capsys):
    code, stdout, _ = run(["train", "library", "--help"], capsys)
    assert code == 0 and "--adapters-dir" in stdout and "--resume" in stdout and "--edits" in stdout


def test_the_shipped_library_reads_and_writes_back_byte_for_byte():
    """One record, one reader and one writer: the FaceWorld library as `ipfacediff faceworld adapters`
    wrote it comes back unchanged (the shipped file also ends in a newline, which write_json does not write)."""
    from ipfacediff.job import SHIPPED_MODELS

    folder = SHIPPED_MODELS / "adapters"
    library = AdapterLibrary.read(SHIPPED_MODELS)
    assert json.dumps(library.to_json(folder), indent=2) == (folder / "adapters.json").read_text().rstrip("\n")
    assert {e.name: e.to_json(folder) for e in library.edits} == json.loads((folder / "adapters.json").read_text())[
        "edits"
    ]


def test_the_schema_and_the_plan_are_built_from_the_records_fields():
    """Each AdapterEntry field is a key of adapters.json, checked with the limits written beside the
    field; each tuned field says how several adapters combine, and the plan follows it."""
    from dataclasses import fields

    from ipfacediff.adapters import AdapterEntry, combine_tuned, tuned_fields
    from ipfacediff.adapters.record import entry_schema
    from ipfacediff.settings import DEFAULT_GUIDANCE, EditSettings

    assert list(entry_schema().model_fields) == [f.name for f in fields(AdapterEntry)[1:]]
    assert {"hair", "blend_threshold", "weight", "guidance", "identity_gradient"} <= set(tuned_fields())
    entries = [AdapterEntry("a", guidance=5.0, blend_threshold=0.6), AdapterEntry("b", hair=True, blend_threshold=0.3)]
    combined = combine_tuned(entries, EditSettings(prompt="x"))
    # The highest guidance (b counts as untuned: the default), the lowest threshold, any hair.
    assert combined["guidance"] == DEFAULT_GUIDANCE and combined["blend_threshold"] == 0.3 and combined["hair"]
    assert combine_tuned(entries, EditSettings(prompt="x", guidance=2.0, blend_threshold=0.9))["guidance"] == 2.0
    assert combine_tuned([], EditSettings(prompt="x", hair=True))["hair"] is True


def test_a_tuned_strength_in_adapters_json_is_used_and_recorded(library, sample, tiny_dir, tmp_path, capsys):
    clip, tracks = sample
    shutil.copytree(library, tmp_path / "lib")
    spec = json.loads((tmp_path / "lib" / "adapters.json").read_text())
    spec["edits"]["ink"]["strength"] = 0.5
    (tmp_path / "lib" / "adapters.json").write_text(json.dumps(spec))
    common = [
        "--model",
        str(tiny_dir),
        "--steps",
        "2",
        "--tracks",
        str(tracks),
        "--adapters-dir",
        str(tmp_path / "lib"),
    ]
    for name, prompt in (("ink", "a face with a tattoo"), ("plain", "a face with red hair")):
        code, _, stderr = run(["edit", str(clip), "-o", str(tmp_path / f"{name}.mp4"), "-p", prompt, *common], capsys)
        assert code == 0, stderr
    assert {face["strength"] for face in json.loads((tmp_path / "ink.run.json").read_text())["faces"]} == {0.5}
    assert {face["strength"] for face in json.loads((tmp_path / "plain.run.json").read_text())["faces"]} == {1.0}
