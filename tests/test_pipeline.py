"""Image-to-video end to end: parity with diffusers' StableVideoDiffusionPipeline, PRNG and batch properties,
input errors, and the `jinbetween i2v` command.

The reference pipeline is built from tiny random components and saved with save_pretrained; both
random draws (augmentation noise, initial latents) are injected into both implementations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from jinbetween import Pipeline
from jinbetween.cli import main as cli_main
from jinbetween.errors import ImageError, InputShapeError, WeightsNotFoundError
from jinbetween.samplers import sample_i2v
from jinbetween.video import read_video
from tests.torch_reference import diffusers_svd_pipeline

H, W, F, STEPS = 16, 24, 4, 5


@pytest.fixture(scope="module")
def reference_pipeline(tmp_path_factory):
    """(diffusers pipeline, its saved folder)."""
    pipe = diffusers_svd_pipeline(seed=1)
    folder = tmp_path_factory.mktemp("svd-tiny")
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def pipeline(reference_pipeline):
    return Pipeline.from_pretrained(reference_pipeline[1])


def keyframe(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def diffusers_run(pipe, image: np.ndarray, aug_noise: torch.Tensor, latents: torch.Tensor, output_type: str,
                  monkeypatch, **kwargs):
    """Runs the diffusers pipeline with its augmentation noise (its first random draw) replaced by `aug_noise`."""
    import diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion as svd

    monkeypatch.setattr(svd, "randn_tensor", lambda shape, **_: aug_noise.clone().reshape(shape))
    out = pipe(Image.fromarray(image), height=H, width=W, num_frames=F, num_inference_steps=STEPS,
               latents=latents.clone(), output_type=output_type, **kwargs).frames
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("guidance", [(1.0, 3.0), (1.0, 1.0)], ids=["cfg", "no_cfg"])
def test_frames_match_diffusers(reference_pipeline, pipeline, monkeypatch, guidance):
    reference, _ = reference_pipeline
    image = keyframe(0)
    aug_noise = torch.randn((1, 3, H, W), generator=torch.Generator().manual_seed(1))
    latents = torch.randn((1, F, 4, H // 2, W // 2), generator=torch.Generator().manual_seed(2))
    kwargs = dict(min_guidance_scale=guidance[0], max_guidance_scale=guidance[1], fps=9, motion_bucket_id=60,
                  noise_aug_strength=0.05)
    expected = diffusers_run(reference, image, aug_noise, latents, "np", monkeypatch, **kwargs)[0]
    expected_latents = diffusers_run(reference, image, aug_noise, latents, "latent", monkeypatch, **kwargs)[0]
    ours_kwargs = dict(num_frames=F, num_inference_steps=STEPS, latents=latents[0].permute(0, 2, 3, 1).numpy(),
                       aug_noise=aug_noise[0].permute(1, 2, 0).numpy(), **kwargs)
    frames = pipeline.image_to_video(image, output="float", **ours_kwargs)
    assert 0.3 < np.mean((expected > 0) & (expected < 1)), "reference frames are saturated: the test is too weak"
    np.testing.assert_allclose(frames, expected, rtol=0, atol=1e-4)  # [0, 1] units
    ours_latents = pipeline.image_to_video(image, output="latent", **ours_kwargs)
    reference_latents = expected_latents.permute(0, 2, 3, 1).numpy()
    assert np.abs(ours_latents - reference_latents).max() <= 1e-5 * np.abs(reference_latents).max()


def test_converted_dir_gives_the_same_video(reference_pipeline, pipeline, tmp_path):
    assert cli_main(["convert", "--local-dir", str(reference_pipeline[1]), "--out", str(tmp_path / "w")]) == 0
    converted = Pipeline.from_pretrained(tmp_path / "w")
    assert converted.clip_mean == pipeline.clip_mean and converted.sigma_max == pipeline.sigma_max
    kwargs = dict(key=jax.random.key(3), num_frames=F, num_inference_steps=3)
    np.testing.assert_array_equal(converted.image_to_video(keyframe(1), **kwargs),
                                  pipeline.image_to_video(keyframe(1), **kwargs))


def test_same_key_same_video_and_other_key_other_video(pipeline):
    kwargs = dict(num_frames=F, num_inference_steps=3, output="float")
    a = pipeline.image_to_video(keyframe(2), key=jax.random.key(7), **kwargs)
    b = pipeline.image_to_video(keyframe(2), key=jax.random.key(7), **kwargs)
    c = pipeline.image_to_video(keyframe(2), key=jax.random.key(8), **kwargs)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_a_batch_equals_separate_runs(pipeline):
    key = jax.random.key(11)
    kwargs = dict(num_frames=F, num_inference_steps=3, output="latent")
    images = [keyframe(3), keyframe(4), keyframe(5)]
    batch = pipeline.image_to_video(images, key=key, **kwargs)
    for i, image in enumerate(images):  # image i of a batch uses fold_in(key, i)
        alone = pipeline.image_to_video(image, key=key, first_index=i, **kwargs)
        assert np.abs(batch[i] - alone).max() <= 1e-5 * np.abs(alone).max(), f"image {i} of the batch differs"
    tail = pipeline.image_to_video(images[1:], key=key, first_index=1, **kwargs)
    assert np.abs(batch[1:] - tail).max() <= 1e-5 * np.abs(tail).max(), "a split batch differs"


def test_repeated_calls_do_not_retrace(pipeline):
    kwargs = dict(num_frames=F, num_inference_steps=3, output="latent")  # the program the tests above compiled
    pipeline.image_to_video(keyframe(6), key=jax.random.key(0), **kwargs)
    traced = sample_i2v._cache_size()
    for seed in range(3):
        pipeline.image_to_video(keyframe(seed), key=jax.random.key(seed), **kwargs)
    assert sample_i2v._cache_size() == traced


def test_bad_inputs_raise_specific_errors(pipeline, reference_pipeline, tmp_path):
    with pytest.raises(InputShapeError, match="not a multiple of 4"):
        pipeline.image_to_video(np.zeros((18, 24, 3), np.uint8), num_frames=F, num_inference_steps=1)
    with pytest.raises(ImageError, match="uint8 arrays"):
        pipeline.image_to_video(np.zeros((16, 24), np.uint8))
    with pytest.raises(InputShapeError, match="share a size"):
        pipeline.image_to_video([keyframe(0), np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        Pipeline.from_pretrained(tmp_path / "nowhere")


def test_cli_i2v_writes_a_video(reference_pipeline, tmp_path, capsys):
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "k.png")
    args = ["i2v", str(tmp_path / "k.png"), "--weights", str(reference_pipeline[1]), "--height", str(H), "--width",
            str(W), "--num-frames", str(F), "--steps", "3", "--out", str(tmp_path / "v.mp4"), "--sheet",
            str(tmp_path / "s.png")]
    assert cli_main(args) == 0
    assert read_video(tmp_path / "v.mp4").shape == (F, H, W, 3)
    assert (tmp_path / "s.png").exists()
    capsys.readouterr()
    assert cli_main([*args[:5], "18", *args[6:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Video size 18×24") and "Traceback" not in err
    (tmp_path / "bad.png").write_text("no")
    assert cli_main(["i2v", str(tmp_path / "bad.png"), "--weights", str(reference_pipeline[1])]) == 2
    assert "Cannot read" in capsys.readouterr().err


def test_frames_are_converted_on_the_device_as_numpy_would():
    from jinbetween.pipeline import _device_output

    # Every uint8 level's half-way point (round half to even decides those), and values outside [-1, 1].
    halves = ((np.arange(256, dtype=np.float32) + 0.5) / 255 - 0.5) * 2
    raw = np.concatenate([np.linspace(-1.3, 1.3, 20001, dtype=np.float32), halves])
    unit = np.clip(raw / 2 + 0.5, 0, 1)
    np.testing.assert_array_equal(np.asarray(_device_output(jnp.asarray(raw), "float")[0]), unit)
    np.testing.assert_array_equal(np.asarray(_device_output(jnp.asarray(raw), "uint8")[0]),
                                  np.round(unit * 255).astype(np.uint8))
