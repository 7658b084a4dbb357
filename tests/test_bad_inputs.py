"""Bad arguments to every command: each is refused before any model loads, with exit status 2, one `error:` line
that names the argument and the fix, no traceback, and nothing written.

The cases run `cli.main` in-process with model loading and conversion replaced by a tripwire: a case that slipped
past the checks would trip it instead of running (`test_a_good_command_gets_past_the_checks` shows the tripwire is
reached). A few cases run the real console script to check what a user sees.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jinbetween import cli, weights
from jinbetween.pipeline import Pipeline
from jinbetween.weights import release

TOY = str(release.WEIGHTS)
# A message names a fix: one of these verbs (argparse's own errors point to --help with "see").
FIX = re.compile(r"\b(pass|choose|check|give|use|write|convert|remove|reinstall|try|lower|see)\b", re.IGNORECASE)

I2V = ["i2v", "{T}/a.png", "--out", "{T}/out/video.mp4"]
INTERPOLATE = ["interpolate", "{T}/a.png", "{T}/b.png", "--out", "{T}/out/video.mp4"]
BATCH = ["batch", "{T}/pairs.jsonl", "--out-dir", "{T}/out"]
FINETUNE = ["finetune", "--weights", TOY, "--videos", "{T}/videos", "--out", "{T}/run", "--steps", "2",
            "--frames", "3", "--height", "64", "--width", "64"]
CONVERT = ["convert", "--local-dir", "{T}/diffusers", "--out", "{T}/out"]
DEMO = ["demo", "--out-dir", "{T}/out"]
TOYBENCH = ["toybench", "--out", "{T}/out/bench.json"]

# (case id, argv, fragments the message must hold)
CASES = [
    # i2v
    ("i2v-out-txt", [*I2V[:2], "--out", "{T}/video.txt"], ["--out", ".mp4 or .gif"]),
    ("i2v-fps-negative", [*I2V, "--fps", "-5"], ["--fps -5", "out of range"]),
    ("i2v-fps-zero", [*I2V, "--fps", "0"], ["--fps 0", "frame rate"]),
    ("i2v-steps-zero", [*I2V, "--steps", "0"], ["--steps 0", "denoising steps"]),
    ("i2v-frames-zero", [*I2V, "--num-frames", "0"], ["--num-frames 0", "≥ 2"]),
    ("i2v-frames-one", [*I2V, "--num-frames", "1"], ["--num-frames 1"]),
    ("i2v-seed-negative", [*I2V, "--seed", "-1"], ["--seed -1", "≥ 0"]),
    ("i2v-seed-too-large", [*I2V, "--seed", str(2**32)], ["--seed 4294967296", "≤ 4294967295"]),
    ("i2v-height-not-multiple", [*I2V, "--height", "100"], ["100×128", "multiple of 32"]),
    ("i2v-width-zero", [*I2V, "--width", "0"], ["--width 0"]),
    ("i2v-decode-chunk-zero", [*I2V, "--decode-chunk-size", "0"], ["--decode-chunk-size 0"]),
    ("i2v-motion-negative", [*I2V, "--motion-bucket-id", "-1"], ["--motion-bucket-id -1"]),
    ("i2v-noise-aug-nan", [*I2V, "--noise-aug-strength", "nan"], ["--noise-aug-strength nan", "finite"]),
    ("i2v-guidance-inf", [*I2V, "--max-guidance", "inf"], ["--max-guidance inf", "finite"]),
    ("i2v-sheet-gif", [*I2V, "--sheet", "{T}/sheet.gif"], ["--sheet", ".png"]),
    ("i2v-out-under-a-file", [*I2V[:2], "--out", "{T}/file/video.mp4"], ["is a file"]),
    ("i2v-out-is-a-folder", [*I2V[:2], "--out", "{T}/folder.mp4"], ["is a folder"]),
    ("i2v-image-missing", ["i2v", "{T}/missing.png", "--out", "{T}/out/v.mp4"], ["missing.png does not exist"]),
    ("i2v-image-not-an-image", ["i2v", "{T}/notes.png", "--out", "{T}/out/v.mp4"], ["notes.png as an image"]),
    ("i2v-weights-missing", [*I2V, "--weights", "{T}/nowhere"], ["nowhere does not exist"]),
    ("i2v-steps-not-a-number", [*I2V, "--steps", "many"], ["--steps", "invalid int value"]),
    ("i2v-resize-unknown", [*I2V, "--resize", "squash"], ["--resize", "invalid choice"]),
    # interpolate
    ("interpolate-frames-one", [*INTERPOLATE, "--num-frames", "1"], ["--num-frames 1", "keyframes included", "≥ 3"]),
    ("interpolate-frames-two", [*INTERPOLATE, "--num-frames", "2"], ["--num-frames 2"]),
    ("interpolate-injections-negative", [*INTERPOLATE, "--set", "noise_injection_steps=-3"],
     ["noise_injection_steps=-3", "≥ 0"]),
    ("interpolate-injection-ratio", [*INTERPOLATE, "--set", "noise_injection_ratio=1.5"],
     ["noise_injection_ratio=1.5", "≤ 1"]),
    ("interpolate-fusion-weight", [*INTERPOLATE, "--set", "fusion_weight=2"], ["fusion_weight=2"]),
    ("interpolate-trf-jump-zero", [*INTERPOLATE, "--method", "trf", "--set", "jump_length=0"], ["jump_length=0"]),
    ("interpolate-trf-faithful-yes", [*INTERPOLATE, "--method", "trf", "--set", "faithful=yes"],
     ["faithful='yes'", "true or false"]),
    ("interpolate-mpd-fraction", [*INTERPOLATE, "--method", "mpd", "--set", "distill_fraction=-0.1"],
     ["distill_fraction=-0.1"]),
    ("interpolate-mpd-base", [*INTERPOLATE, "--method", "mpd", "--set", "base='tree'"], ["base='tree'", "parallel"]),
    ("interpolate-set-num-frames", [*INTERPOLATE, "--set", "num_frames=5"], ["num_frames", "--num-frames"]),
    ("interpolate-option-of-another-method", [*INTERPOLATE, "--method", "trf", "--set", "noise_injection_steps=2"],
     ["trf has no option", "noise_injection_steps"]),
    ("interpolate-set-syntax", [*INTERPOLATE, "--set", "oops"], ["--set 'oops'", "NAME=VALUE"]),
    ("interpolate-delta-missing", [*INTERPOLATE, "--backward-delta", "{T}/nodelta-missing"],
     ["--backward-delta", "does not exist"]),
    ("interpolate-delta-empty", [*INTERPOLATE, "--backward-delta", "{T}/nodelta"], ["holds no delta.json"]),
    ("interpolate-out-avi", [*INTERPOLATE[:3], "--out", "{T}/video.avi"], ["--out", ".mp4 or .gif"]),
    ("interpolate-end-missing", ["interpolate", "{T}/a.png", "{T}/missing.png", "--out", "{T}/out/v.gif"],
     ["missing.png does not exist"]),
    ("interpolate-steps-zero", [*INTERPOLATE, "--method", "vibid", "--steps", "0"], ["--steps 0"]),
    ("interpolate-fps-too-high", [*INTERPOLATE, "--fps", "1000"], ["--fps 1000", "≤ 240"]),
    ("interpolate-method-unknown", [*INTERPOLATE, "--method", "fancy"], ["--method", "invalid choice"]),
    ("interpolate-one-keyframe", ["interpolate", "{T}/a.png", "--out", "{T}/out/v.gif"], ["KEYFRAME", "at least two"]),
    ("interpolate-third-keyframe-missing", [*INTERPOLATE[:3], "{T}/missing.png", *INTERPOLATE[3:]],
     ["missing.png does not exist"]),
    ("interpolate-durations-too-long", [*INTERPOLATE, "--durations", "5"], ["--durations[0] 5.0", "35 frame(s)"]),
    ("interpolate-durations-count", [*INTERPOLATE, "--durations", "1", "1"], ["2 duration(s) for 1 keyframe gap"]),
    ("interpolate-durations-zero", [*INTERPOLATE, "--durations", "0"], ["--durations[0] 0.0", "> 0"]),
    ("interpolate-seam-unknown", [*INTERPOLATE, "--seam", "glue"], ["--seam", "invalid choice"]),
    # batch
    ("batch-size-zero", [*BATCH, "--batch-size", "0"], ["--batch-size 0"]),
    ("batch-out-dir-is-a-file", ["batch", "{T}/pairs.jsonl", "--out-dir", "{T}/file"], ["--out-dir", "is a file"]),
    ("batch-pairs-missing", ["batch", "{T}/nopairs.jsonl", "--out-dir", "{T}/out"], ["nopairs.jsonl does not exist"]),
    ("batch-pairs-not-json", ["batch", "{T}/broken.jsonl", "--out-dir", "{T}/out"], ["line 2: not JSON"]),
    ("batch-pairs-out-txt", ["batch", "{T}/badout.jsonl", "--out-dir", "{T}/out"], ["'ab.txt'", ".mp4 or .gif"]),
    ("batch-frames-two", [*BATCH, "--num-frames", "2"], ["--num-frames 2"]),
    ("batch-devices-zero", [*BATCH, "--devices", "0"], ["--devices 0"]),
    ("batch-one-keyframe", ["batch", "{T}/onekey.jsonl", "--out-dir", "{T}/out"],
     ['line 1: "keyframes" is not a list of two or more']),
    ("batch-options", [*BATCH, "--method", "trf", "--set", "repeat_step_ratio=2"], ["repeat_step_ratio=2"]),
    # finetune
    ("finetune-steps-zero", [*FINETUNE, "--steps", "0"], ["--steps 0", "optimizer steps"]),
    ("finetune-lr-zero", [*FINETUNE, "--lr", "0"], ["--lr 0", "> 0"]),
    ("finetune-lr-nan", [*FINETUNE, "--lr", "nan"], ["--lr nan", "finite"]),
    ("finetune-frames-one", [*FINETUNE, "--frames", "1"], ["--frames 1"]),
    ("finetune-size-not-multiple", [*FINETUNE, "--height", "100"], ["100×64", "multiple of 32"]),
    ("finetune-videos-missing", [*FINETUNE, "--videos", "{T}/novideos"], ["--videos", "does not exist"]),
    ("finetune-save-every-zero", [*FINETUNE, "--save-every", "0"], ["--save-every 0"]),
    ("finetune-batch-zero", [*FINETUNE, "--batch-size", "0"], ["--batch-size 0"]),
    ("finetune-existing-run", [*FINETUNE, "--out", "{T}/oldrun"], ["checkpoints up to step 2", "--resume"]),
    ("finetune-weights-missing", [*FINETUNE, "--weights", "{T}/nowhere"], ["nowhere does not exist"]),
    ("finetune-remat-unknown", [*FINETUNE, "--remat", "some"], ["--remat", "invalid choice"]),
    # convert
    ("convert-nothing", ["convert", "--out", "{T}/out"], ["nothing to convert"]),
    ("convert-gi-unet-alone", ["convert", "--gi-unet", "{T}/diffusers", "--out", "{T}/out"], ["needs --gi-base"]),
    ("convert-local-dir-missing", ["convert", "--local-dir", "{T}/nowhere", "--out", "{T}/out"],
     ["--local-dir", "does not exist"]),
    ("convert-out-is-a-file", [*CONVERT[:3], "--out", "{T}/file"], ["--out", "is a file"]),
    ("convert-out-occupied", [*CONVERT[:3], "--out", "{T}/occupied"], ["not a converted dir"]),
    ("convert-atol-negative", [*CONVERT, "--gi-unet", "{T}/diffusers", "--gi-base", "{T}/diffusers", "--gi-atol",
                               "-1"], ["--gi-atol -1"]),
    ("convert-repo-not-an-id", ["convert", "--repo", "not a repo", "--out", "{T}/out"], ["repo id"]),
    ("convert-dtype-unknown", [*CONVERT, "--dtype", "int8"], ["--dtype", "invalid choice"]),
    # demo and toybench
    ("demo-steps-zero", [*DEMO, "--steps", "0"], ["--steps 0"]),
    ("demo-pairs-zero", [*DEMO, "--pairs", "0"], ["--pairs 0"]),
    ("demo-out-dir-is-a-file", ["demo", "--out-dir", "{T}/file"], ["--out-dir", "is a file"]),
    ("demo-seed-negative", [*DEMO, "--seed", "-5"], ["--seed -5"]),
    ("demo-weights-missing", [*DEMO, "--weights", "{T}/nowhere"], ["nowhere does not exist"]),
    ("demo-method-unknown", [*DEMO, "--methods", "gi", "fancy"], ["--methods", "invalid choice"]),
    ("toybench-out-txt", ["toybench", "--out", "{T}/bench.txt"], ["--out", ".json"]),
    ("toybench-batch-zero", [*TOYBENCH, "--batch-size", "0"], ["--batch-size 0"]),
    ("toybench-pairs-too-many", [*TOYBENCH, "--pairs", "20000"], ["--pairs 20000", "≤ 10000"]),
    ("toybench-set-unknown-field", [*TOYBENCH, "--set", "no_such_field=1"], ["no_such_field", "choose among"]),
    ("demo-set-field-one-method-lacks", [*DEMO, "--methods", "trf", "gi", "--set", "faithful=true"],
     ["gi has no option", "faithful"]),
    ("toybench-set-not-name-value", [*TOYBENCH, "--set", "max_guidance_scale"], ["NAME=VALUE"]),
    # verify
    ("verify-missing", ["verify", "{T}/nowhere"], ["does not exist"]),
    ("verify-no-hashes", ["verify", "{T}/occupied"], ["records no file hashes"]),
]


@pytest.fixture
def inputs(tmp_path):
    """Every input the cases name, in `tmp_path`: keyframes, a non-image, a file and a folder where outputs go,
    pairs files, a frame folder to train on, a run with a checkpoint, a tiny diffusers folder's config."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "file").write_text("a file where a folder is expected")
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "nodelta").mkdir()
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "thesis.tex").write_text("someone's work")
    (tmp_path / "oldrun" / "checkpoints" / "2").mkdir(parents=True)
    (tmp_path / "diffusers" / "unet").mkdir(parents=True)
    (tmp_path / "diffusers" / "unet" / "config.json").write_text("{}")
    pair = {"start": "a.png", "end": "b.png"}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    (tmp_path / "broken.jsonl").write_text(json.dumps(pair) + "\n{start: a.png}\n")
    (tmp_path / "onekey.jsonl").write_text(json.dumps({"keyframes": ["a.png"]}) + "\n")
    (tmp_path / "badout.jsonl").write_text(json.dumps({**pair, "out": "ab.txt"}) + "\n")
    frames = tmp_path / "videos" / "clip0"
    frames.mkdir(parents=True)
    for t in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(frames / f"{t}.png")
    return tmp_path


@pytest.fixture
def tripwire(monkeypatch):
    """Makes loading a pipeline and converting weights fail loudly: the checks must stop a bad command first."""

    class Tripped(AssertionError):
        pass

    def trip(*args, **kwargs):
        raise Tripped("the command got past its argument checks and started work")

    monkeypatch.setattr(Pipeline, "from_pretrained", trip)
    for name in ("convert_pipeline", "convert_gi_delta", "download_pipeline", "download_unet"):
        monkeypatch.setattr(weights, name, trip)
    return Tripped


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.is_dir(), p.stat().st_size) for p in folder.rglob("*"))


def test_the_table_covers_every_command_with_at_least_40_cases():
    commands = {argv[0] for _, argv, _ in CASES}
    assert {"convert", "i2v", "interpolate", "batch", "finetune", "demo", "toybench", "verify"} <= commands
    assert len(CASES) >= 40 and len({case for case, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_argument_exits_2_with_one_line_naming_it_and_the_fix(inputs, tripwire, capsys, argv, fragments):
    before = listing(inputs)
    status = cli.main([arg.replace("{T}", str(inputs)) for arg in argv])
    out, err = capsys.readouterr()
    assert status == 2, f"exit status {status}; stderr: {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {err!r}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} missing from {lines[0]!r}"
    assert FIX.search(lines[0]), f"no fix named in {lines[0]!r}"
    assert "Traceback" not in err + out
    assert listing(inputs) == before, "the command wrote something"


def test_a_good_command_gets_past_the_checks(inputs, tripwire):
    """The negative control of the table: valid arguments reach the model load (the tripwire)."""
    with pytest.raises(tripwire):
        cli.main([arg.replace("{T}", str(inputs)) for arg in [*INTERPOLATE, "--num-frames", "3", "--steps", "1"]])
    with pytest.raises(tripwire):
        cli.main([arg.replace("{T}", str(inputs)) for arg in FINETUNE])


@pytest.mark.parametrize("argv, fragment", [
    (["i2v", "{T}/a.png", "--steps", "0", "--out", "{T}/v.mp4"], "--steps 0"),
    (["interpolate", "{T}/a.png", "{T}/b.png", "--fps", "-5", "--out", "{T}/v.gif"], "--fps -5"),
    (["i2v", "{T}/a.png", "--steps", "several"], "invalid int value"),
], ids=["i2v-steps-zero", "interpolate-fps-negative", "argparse-type-error"])
def test_the_console_script_prints_one_line_and_exits_2(inputs, argv, fragment):
    before = listing(inputs)
    result = subprocess.run([sys.executable, "-m", "jinbetween.cli", *[a.replace("{T}", str(inputs)) for a in argv]],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert listing(inputs) == before
