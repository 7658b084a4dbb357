"""The toy world's training stages (tiny configs, a few steps, CPU) and saving a trained pipeline."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jinbetween import config
from jinbetween.models import VAE, ImageEncoder, UNet
from jinbetween.models.state import ModelState
from jinbetween.pipeline import Pipeline
from jinbetween.toyworld import WorldConfig, train, video

WORLD = WorldConfig(height=32, width=32, num_frames=4)


@pytest.fixture(scope="module")
def pool():
    return jnp.asarray(np.stack([video(seed, WORLD) for seed in range(3)]))


def tiny_trainables(seed=0) -> train.Trainables:
    rngs = nnx.Rngs(seed)
    return train.Trainables(UNet(config.tiny(), rngs=rngs), ImageEncoder(config.tiny_image_encoder(), rngs=rngs))


def params_of(module) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_vae_stage_learns_and_sets_unit_latent_scale(pool):
    records = []
    vae = train.train_vae(pool, train.VAETrainConfig(steps=40, batch_clips=2, warmup=5, learning_rate=2e-3), seed=0,
                          on_log=records.append, log_every=10, config=config.tiny_vae())
    l1 = [r["l1"] for r in records]
    assert l1[-1] < 0.7 * l1[0], f"reconstruction L1 went {l1[0]:.3f} → {l1[-1]:.3f} in 40 steps"
    scaled_std = float(vae.config.scaling_factor * train.latent_std(vae, pool, jax.random.key(1), clips=4))
    assert scaled_std == pytest.approx(1.0, rel=0.15), f"scaled latents have std {scaled_std:.3f}"


def test_unet_stage_trains_unet_and_encoder_only_and_fits_a_tiny_pool(pool):
    vae = VAE(config.tiny_vae(), rngs=nnx.Rngs(3))
    vae_before = params_of(vae)
    init = tiny_trainables()
    before = params_of(init)
    cfg = train.UNetTrainConfig(steps=60, batch_size=2, warmup=5, learning_rate=1e-3, p_mean=0.0, p_std=0.5)
    records = []
    trained = train.train_unet(vae, pool, cfg, seed=0, on_log=records.append, log_every=20, init=init)
    losses = [r["loss"] for r in records]
    assert losses[-1] < 0.8 * losses[0], f"UNet loss went {losses[0]:.3f} → {losses[-1]:.3f} in 60 steps"
    after = params_of(trained)
    changed = [p for p in before if not np.array_equal(before[p], after[p])]
    assert len(changed) > 0.9 * len(before), f"only {len(changed)} of {len(before)} tensors trained"
    assert any(p[0] == "image_encoder" for p in changed), "the image encoder did not train"
    for path, value in params_of(vae).items():
        np.testing.assert_array_equal(value, vae_before[path], err_msg=f"frozen VAE changed at {path}")


def test_conditioning_dropout_zeroes_image_latent_and_embedding_together(pool):
    """With dropout 1 every clip is unconditional: the loss no longer depends on the first frames."""
    vae = ModelState.of(VAE(config.tiny_vae(), rngs=nnx.Rngs(3)))
    graphdef, state = nnx.split(tiny_trainables())
    latents = jax.random.normal(jax.random.key(0), (2, 4, 16, 16, 4))
    frames = np.asarray(pool[:2, 0])
    jitted = jax.jit(train.unet_loss, static_argnums=(1, 6))
    loss = lambda first, dropout: jitted(state, graphdef, vae, latents, first, jax.random.key(1),  # noqa: E731
                                         train.UNetTrainConfig(cond_dropout=dropout))[0]
    other = frames[::-1].copy()
    assert float(loss(frames, 1.0)) == float(loss(other, 1.0))
    assert float(loss(frames, 0.0)) != float(loss(other, 0.0))


def test_clip_input_on_device_matches_the_host_preprocessing(pool):
    from jinbetween import conditioning

    frames = np.asarray(pool[:, 0])
    np.testing.assert_allclose(np.asarray(train.clip_input(jnp.asarray(frames), 28)),
                               conditioning.clip_pixels(frames, 28), atol=2e-5)


@pytest.fixture(scope="module")
def tiny_pipeline():
    rngs = nnx.Rngs(0)
    return Pipeline(UNet(config.tiny(), rngs=rngs), VAE(config.tiny_vae().replace(scaling_factor=0.5), rngs=rngs),
                    ImageEncoder(config.tiny_image_encoder(), rngs=rngs), default_size=(32, 48), sigma_max=80.0)


def test_save_pretrained_round_trips_through_from_pretrained(tiny_pipeline, tmp_path):
    folder = tiny_pipeline.save_pretrained(tmp_path / "pipe", dtype=jnp.bfloat16, max_shard_bytes=200_000)
    assert len(list((folder / "unet").glob("*.safetensors"))) > 1, "expected a sharded UNet"
    loaded = Pipeline.from_pretrained(folder, dtype=jnp.float32)
    assert loaded.default_size == (32, 48) and loaded.sigma_max == 80.0
    assert loaded.vae.config.scaling_factor == 0.5
    for name in ("unet", "vae", "image_encoder"):
        ours, back = params_of(getattr(tiny_pipeline, name)), params_of(getattr(loaded, name))
        assert ours.keys() == back.keys()
        for path in ours:
            np.testing.assert_array_equal(back[path], ours[path].astype(ml_dtypes.bfloat16).astype(np.float32),
                                          err_msg=f"{name} {path}")


def test_saved_pipeline_loads_in_diffusers_and_transformers_with_every_key(tiny_pipeline, tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionModelWithProjection

    from jinbetween.conversion import export_params

    folder = tiny_pipeline.save_pretrained(tmp_path / "pipe")
    for cls, name in ((UNetSpatioTemporalConditionModel, "unet"), (AutoencoderKLTemporalDecoder, "vae"),
                      (CLIPVisionModelWithProjection, "image_encoder")):
        model, info = cls.from_pretrained(folder / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], f"{name}: {info}"
        state = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        exported = export_params(getattr(tiny_pipeline, name))
        assert state.keys() == exported.keys()
        for key, value in exported.items():
            np.testing.assert_array_equal(state[key], value, err_msg=f"{name} {key}")
