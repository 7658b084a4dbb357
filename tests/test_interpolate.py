"""`Pipeline.interpolate` and `jinbetween interpolate` on a tiny random SVD pipeline: every method runs end to
end and writes a video and a contact sheet; user errors are specific and printed without a traceback."""

import numpy as np
import pytest
from PIL import Image

from jinbetween import Pipeline
from jinbetween.cli import main as cli_main
from jinbetween.errors import ConfigError, InputShapeError, WeightsNotFoundError
from jinbetween.models.delta import delta_shapes
from jinbetween.samplers import METHODS
from jinbetween.video import read_video
from jinbetween.weights.delta import save_delta

from tests.torch_reference import diffusers_svd_pipeline

H, W, F = 16, 24, 3


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("svd-tiny")
    diffusers_svd_pipeline(seed=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline(weights):
    return Pipeline.from_pretrained(weights)


@pytest.fixture(scope="module")
def keyframes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keyframes")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder / "a.png", folder / "b.png"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cli_interpolate_runs_every_method(weights, keyframes, tmp_path, method, capsys):
    extra = ["--allow-untrained-backward", "--set", "noise_injection_steps=1"] if method == "gi" else []
    args = ["interpolate", *map(str, keyframes), "--weights", str(weights), "--method", method, "--num-frames",
            str(F), "--steps", "2", "--height", str(H), "--width", str(W), "--out", str(tmp_path / "v.gif"), *extra]
    assert cli_main(args) == 0
    frames = read_video(tmp_path / "v.gif")
    assert frames.shape == (F, H, W, 3)
    assert (tmp_path / "v_sheet.png").exists()
    assert "wrote" in capsys.readouterr().out


def test_gi_uses_a_saved_backward_delta(pipeline, weights, keyframes, tmp_path):
    """GI as test_cli_interpolate_runs_every_method[gi] runs it, whose program the run without a delta reuses."""
    rng = np.random.default_rng(1)
    save_delta(tmp_path / "gi", {k: 0.5 * rng.standard_normal(s).astype(np.float32)
                                 for k, s in delta_shapes(pipeline.unet.config).items()}, pipeline.unet.config)
    base = ["interpolate", *map(str, keyframes), "--weights", str(weights), "--num-frames", str(F), "--steps", "2",
            "--height", str(H), "--width", str(W), "--set", "noise_injection_steps=1"]
    assert cli_main([*base, "--backward-delta", str(tmp_path / "gi"), "--out", str(tmp_path / "delta.mp4")]) == 0
    assert cli_main([*base, "--allow-untrained-backward", "--out", str(tmp_path / "base.mp4")]) == 0
    with_delta, without = (read_video(tmp_path / f"{n}.mp4").astype(int) for n in ("delta", "base"))
    assert np.abs(with_delta - without).max() > 10, "the backward delta did not change the video"


def test_gi_without_a_backward_delta_says_how_to_get_one(pipeline, keyframes, capsys, weights):
    start = np.asarray(Image.open(keyframes[0]))
    with pytest.raises(WeightsNotFoundError, match="--gi-unet.*finetune.*allow_untrained_backward"):
        pipeline.interpolate(start, start, method="gi")
    assert cli_main(["interpolate", *map(str, keyframes), "--weights", str(weights), "--height", str(H), "--width",
                     str(W)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: GI needs its backward model") and "Traceback" not in err


def test_bad_interpolation_requests_raise_specific_errors(pipeline, keyframes, capsys):
    start = np.asarray(Image.open(keyframes[0]))
    with pytest.raises(ConfigError, match="Unknown method 'fancy'"):
        pipeline.interpolate(start, start, method="fancy")
    with pytest.raises(ConfigError, match="trf has no option.*'noise_injection_steps'.*jump_length"):
        pipeline.interpolate(start, start, method="trf", noise_injection_steps=2)
    with pytest.raises(InputShapeError, match="differ"):
        pipeline.interpolate(start, start[:8], method="trf")
    assert cli_main(["interpolate", *map(str, keyframes), "--weights", "x", "--set", "oops"]) == 2
    assert "write NAME=VALUE" in capsys.readouterr().err
