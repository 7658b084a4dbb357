"""The fine-tune loop and `jinbetween finetune` on a tiny random SVD pipeline and a folder of synthetic clips:
outputs, exact resumption after an interruption, refusals, remat, bf16 base with float32 master delta."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jinbetween import Pipeline, conditioning, data
from jinbetween.cli import main as cli_main
from jinbetween.errors import ConfigError
from jinbetween.finetune import (CHECKPOINTS, LOG_FILE, LOSS_PLOT, RunConfig, TrainConfig, backward_loss, clip_batch,
                                 draw_noise, finetune, init_train_state, train_step)
from jinbetween.models.state import ModelState
from jinbetween.models.unet import high_res_blocks
from jinbetween.video import read_video
from jinbetween.weights.delta import load_delta

from tests.helpers import assert_close
from tests.torch_reference import diffusers_svd_pipeline

H, W, F = 16, 24, 3
TRAIN = TrainConfig(learning_rate=1e-3)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("svd-tiny")
    diffusers_svd_pipeline(seed=2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline(weights):
    return Pipeline.from_pretrained(weights)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three frame folders of 6 frames each: a square moving over a gradient (frames differ, time has a direction)."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for v in range(3):
        folder = root / f"clip{v}"
        folder.mkdir()
        background = np.linspace(0, 255, W)[None, :, None] * rng.uniform(0.3, 1, (1, 1, 3))
        for t in range(6):
            frame = np.broadcast_to(background, (H, W, 3)).copy()
            frame[4:10, 2 + 3 * t:8 + 3 * t] = 255 * rng.uniform(0, 1, 3)
            Image.fromarray(frame.astype(np.uint8)).save(folder / f"frame{t}.png")
    return root


@pytest.fixture(scope="module")
def dataset(videos):
    return data.VideoDataset.scan(videos, data.ClipSpec(num_frames=F, stride=2, height=H, width=W))


def run_config(steps: int) -> RunConfig:
    return RunConfig(steps=steps, batch_size=2, seed=3, save_every=2, prefetch=1)


def losses(out_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / LOG_FILE).read_text().splitlines()]


def test_a_run_stopped_after_a_checkpoint_and_resumed_equals_an_uninterrupted_run(pipeline, dataset, tmp_path):
    whole = finetune(pipeline, dataset, tmp_path / "whole", run_config(5), TRAIN)

    class Interrupt(Exception):
        pass

    def stop_at_step_3(step, metrics):  # checkpoints are at 2 and 4: step 3 is logged, then lost
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        finetune(pipeline, dataset, tmp_path / "parts", run_config(5), TRAIN, on_step=stop_at_step_3)
    assert len(losses(tmp_path / "parts")) == 3
    resumed = finetune(pipeline, dataset, tmp_path / "parts", run_config(5), TRAIN, resume=True)
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole"), "the resumed loss trajectory differs"
    cfg = pipeline.unet.config
    a, b = load_delta(whole, cfg), load_delta(resumed, cfg)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=f"{key} differs after resume")
    assert any(np.abs(np.asarray(v)).max() > 0 for v in a.values())
    clips = [json.loads(line)["clips"] for line in (tmp_path / "whole" / LOG_FILE).read_text().splitlines()]
    assert all(len(c) == 2 for c in clips) and len({tuple(map(tuple, c)) for c in clips}) > 1, clips
    assert (tmp_path / "whole" / LOSS_PLOT).exists()
    assert sorted(p.name for p in (tmp_path / "whole" / CHECKPOINTS).iterdir() if p.name.isdigit()) == ["2", "4", "5"]


def test_an_existing_run_is_not_overwritten_and_a_changed_run_is_not_resumed(pipeline, dataset, tmp_path):
    finetune(pipeline, dataset, tmp_path, run_config(2), TRAIN)
    with pytest.raises(ConfigError, match="--resume"):
        finetune(pipeline, dataset, tmp_path, run_config(3), TRAIN)
    with pytest.raises(ConfigError, match="seed"):
        finetune(pipeline, dataset, tmp_path, RunConfig(steps=3, batch_size=2, seed=4, save_every=2), TRAIN,
                 resume=True)


def test_cli_finetune_writes_a_delta_that_interpolate_uses(weights, videos, tmp_path, capsys):
    out = tmp_path / "run"
    # The clips and settings of run_config and TRAIN: the training step compiled for the tests above serves.
    args = ["finetune", "--weights", str(weights), "--videos", str(videos), "--out", str(out), "--steps", "2",
            "--frames", str(F), "--height", str(H), "--width", str(W), "--save-every", "1", "--lr", "1e-3",
            "--batch-size", "2"]
    assert cli_main(args) == 0
    assert "gi_backward" in capsys.readouterr().out
    assert len(losses(out)) == 2 and (out / LOSS_PLOT).exists()
    assert cli_main(["interpolate", str(videos / "clip0" / "frame0.png"), str(videos / "clip0" / "frame5.png"),
                     "--weights", str(weights), "--backward-delta", str(out / "gi_backward"), "--num-frames", str(F),
                     "--steps", "2", "--height", str(H), "--width", str(W), "--set", "noise_injection_steps=0",
                     "--out", str(tmp_path / "gi.gif")]) == 0
    assert read_video(tmp_path / "gi.gif").shape == (F, H, W, 3)


@pytest.mark.parametrize("problem,message", [("missing", "does not exist"), ("empty", "holds no videos"),
                                             ("short", "too short")])
def test_cli_finetune_explains_a_bad_video_folder(weights, tmp_path, capsys, problem, message):
    videos = tmp_path / "videos"
    if problem != "missing":
        videos.mkdir()
    if problem == "short":
        (videos / "clip").mkdir()
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(videos / "clip" / "frame0.png")
    args = ["finetune", "--weights", str(weights), "--videos", str(videos), "--out", str(tmp_path / "run"),
            "--steps", "1", "--frames", str(F), "--height", str(H), "--width", str(W)]
    assert cli_main(args) == 2
    assert message in capsys.readouterr().err.lower()


def test_remat_gives_the_same_loss_and_gradients(pipeline, dataset):
    unet = ModelState.of(pipeline.unet)
    batch = _batch(pipeline, dataset)
    sigma, eps = draw_noise(jax.random.key(0), batch.latents.shape, TRAIN)
    delta = init_train_state(unet, TRAIN).delta
    grad = jax.jit(jax.value_and_grad(backward_loss), static_argnums=5)
    plain, g_plain = grad(delta, unet, batch, sigma, eps, False)
    for remat in (True, high_res_blocks(pipeline.unet.config)):
        loss, g_remat = grad(delta, unet, batch, sigma, eps, remat)
        np.testing.assert_allclose(float(loss), float(plain), rtol=1e-6)
        # Recomputation fuses differently: float32 summation order only, ~1e-7 of each tensor's largest entry.
        for key in delta:
            assert_close(g_remat[key], g_plain[key], 1e-5, f"remat={remat} gradient of {key}")


def test_bf16_base_keeps_float32_master_updates_that_bf16_would_round_away(pipeline, dataset):
    """With a bf16 UNet, one AdamW step of lr 1e-6 moves W by ~1e-6, far below bf16's resolution of W (~|W|/128):
    the float32 delta holds it."""
    base = ModelState.of(pipeline.unet)
    unet = ModelState(base.graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), base.state))
    train = TrainConfig(learning_rate=1e-6, weight_decay=0.0)
    state, _ = train_step(unet, init_train_state(unet, train), _batch(pipeline, dataset), jax.random.key(1), train)
    for key, value in state.delta.items():
        assert value.dtype == jnp.float32, key
        moved = np.abs(np.asarray(value))
        assert 0 < moved.max() < 2e-6, f"{key}: delta moved by {moved.max():.2g}"


def _batch(pipeline, dataset):
    frames = np.stack([dataset.read_clip(0, 0), dataset.read_clip(1, 1)])
    return clip_batch(pipeline, frames, conditioning.added_time_ids(7, 127, 0.02), jax.random.key(2), 0.02)
