"""The shipped toy-world model: its files match the release manifest, it is the default, and the demo and a small
ground-truth benchmark run on it end to end (CPU, few steps)."""

import json
import shutil

import numpy as np
import pytest

from jinbetween import cli
from jinbetween.errors import CorruptWeightsError
from jinbetween.pipeline import Pipeline
from jinbetween.weights import release


def test_shipped_weights_match_their_manifest_hashes():
    manifest = release.verify_release()
    assert "unet/diffusion_pytorch_model.safetensors" in manifest["files"]
    assert any(name.startswith("gi_backward/") for name in manifest["files"])
    total = sum(f.stat().st_size for f in release.weight_files(release.WEIGHTS))
    assert total < 50e6, f"shipped weights take {total / 1e6:.1f} MB"


def test_a_changed_weight_file_is_refused(tmp_path):
    copy = shutil.copytree(release.WEIGHTS, tmp_path / "weights")
    weights = copy / "vae" / "config.json"
    config = json.loads(weights.read_text())
    weights.write_text(json.dumps({**config, "scaling_factor": config["scaling_factor"] + 1e-5}))
    with pytest.raises(CorruptWeightsError, match="changed \\['vae/config.json'\\]"):
        release.verify_release(copy)


@pytest.fixture(scope="module")
def toy_pipeline():
    return Pipeline.from_pretrained()


def test_default_pipeline_is_the_shipped_toy_model_with_its_gi_delta(toy_pipeline):
    assert toy_pipeline.default_size == (128, 128)
    assert toy_pipeline.unet.config.num_frames == 14 and toy_pipeline.backward_delta is not None
    trained = release.verify_release()["training"]["vae"]["final"]["scaling_factor"]
    assert toy_pipeline.vae.config.scaling_factor == pytest.approx(trained)


def test_demo_writes_videos_a_contact_sheet_and_finite_image_metrics(tmp_path):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out-dir", str(out), "--steps", "1", "--methods", "gi", "trf"]) == 0
    names = {p.name for p in out.iterdir()}
    seed = json.loads((out / "metrics.json").read_text())["pairs"][0]
    for name in ("ground_truth", "crossfade", "gi", "trf"):
        assert f"{seed}_{name}.gif" in names
    assert f"{seed}_sheet.png" in names and "metrics.md" in names
    record = json.loads((out / "metrics.json").read_text())
    scores = record["scores"]
    assert set(scores) == {"crossfade", "gi", "trf"}
    for method, s in scores.items():
        assert np.isfinite(s["psnr"]) and 0 < s["ssim"] <= 1, f"{method}: {s}"
        assert 0 <= s["missing"] <= 1 and (np.isfinite(s["path_error"]) or s["missing"] == 1), f"{method}: {s}"
        assert 0 <= s["track_3px"] <= s["track_6px"] <= 1 and np.isfinite(s["keyframe_psnr"]), f"{method}: {s}"
    assert record["fps"] == {"gi": 7.0, "trf": 7.0}, f"conditioning fps {record['fps']}, expected the world's 7"
    assert set(record["versus_crossfade"]) == {"gi", "trf"}, f"compared: {set(record['versus_crossfade'])}"
    scores_table, differences = (out / "metrics.md").read_text().split("Difference to the cross-fade")
    assert "track ≤ 3 px" in scores_table, f"metrics.md has no track accuracy column:\n{scores_table}"
    assert "[n/a]" in differences and "nan" not in differences.lower(), f"one pair has no interval:\n{differences}"


def test_small_toybench_scores_every_method_and_the_crossfade(tmp_path):
    out = tmp_path / "bench.json"
    # One pair at a time: the programs of notebook 02's ViBiD at 1 step, which the run's compilation cache serves.
    assert cli.main(["toybench", "--pairs", "2", "--steps", "1", "--batch-size", "1", "--methods", "vibid",
                     "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["pairs"] == 2 and set(record["scores"]) == {"crossfade", "vae round trip", "vibid"}
    assert set(record["per_pair"]) == set(record["scores"])
    for method, scores in record["per_pair"].items():
        assert all(len(values) == 2 for values in scores.values()), f"{method}: {scores}"
        assert np.isclose(np.nanmean(scores["psnr"]), record["scores"][method]["psnr"])
    for method, s in record["scores"].items():
        assert np.isfinite(s["psnr"]) and np.isfinite(s["ssim"]), f"{method}: {s}"
    assert record["fps"] == {"vibid": 7.0}, f"conditioning fps {record['fps']}, expected the world's 7"
    versus = record["versus_crossfade"]
    assert set(versus) == {"vae round trip", "vibid"}, f"compared with the cross-fade: {set(versus)}"
    for method, compared in versus.items():
        d, pairs = compared["track_3px"], record["per_pair"]
        expected = np.mean(np.subtract(pairs[method]["track_3px"], pairs["crossfade"]["track_3px"]))
        assert d["pairs"] == 2 and np.isclose(d["mean"], expected) and d["low"] <= d["mean"] <= d["high"], (
            f"{method}: track_3px difference {d}, expected mean {expected} over 2 pairs")
