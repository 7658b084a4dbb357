"""The toy world's training stages (tiny configs, a few steps, CPU) and saving a trained pipeline."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
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


def tiny_vae() -> VAE:
    return VAE(config.tiny_vae(), rngs=nnx.Rngs(3))


def tiny_pool(pool, draws=2, **aug) -> train.ClipPool:
    return train.encode_videos(ModelState.of(tiny_vae()), pool, jax.random.key(5), draws=draws,
                               aug_log_mean=aug.get("aug_log_mean", -3.0), aug_log_std=aug.get("aug_log_std", 0.5))


def tree_max_difference(a, b) -> float:
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_unet_stage_trains_unet_and_encoder_only_and_fits_a_tiny_pool(pool):
    vae = tiny_vae()
    vae_before = params_of(vae)
    init = tiny_trainables()
    before = params_of(init)
    cfg = train.UNetTrainConfig(steps=30, batch_size=2, warmup=5, learning_rate=1e-3, p_mean=0.0, p_std=0.5,
                                ema_decay=0.9, cond_draws=2)
    records = []
    trained, ema = train.train_unet(vae, pool, cfg, seed=0, on_log=records.append, log_every=10, init=init)
    losses = [r["loss"] for r in records]
    assert losses[-1] < 0.8 * losses[0], f"UNet loss went {losses[0]:.3f} → {losses[-1]:.3f} in {cfg.steps} steps"
    after = params_of(trained)
    changed = [p for p in before if not np.array_equal(before[p], after[p])]
    assert len(changed) > 0.9 * len(before), f"only {len(changed)} of {len(before)} tensors trained"
    assert any(p[0] == "image_encoder" for p in changed), "the image encoder did not train"
    for path, value in params_of(vae).items():
        np.testing.assert_array_equal(value, vae_before[path], err_msg=f"frozen VAE changed at {path}")
    averaged = params_of(ema)
    assert averaged.keys() == after.keys()
    moved = [p for p in before if not np.array_equal(before[p], averaged[p])]
    assert len(moved) == len(changed), "the EMA did not follow every trained tensor"


def test_pool_holds_scaled_latents_and_augmented_first_frames_that_round_trip_through_disk(pool, tmp_path):
    vae = tiny_vae()
    clips = tiny_pool(pool)  # the pool the other tests encode: compiled once
    assert clips.latents.shape[:2] == pool.shape[:2] and clips.cond_latents.shape[:2] == (len(pool), 2)
    assert clips.latents.dtype == jnp.bfloat16 and bool(jnp.all(clips.cond_aug > 0))
    first = train._pixels(pool[:, 0])
    expected = vae.config.scaling_factor * vae.encode(first)
    error = float(jnp.max(jnp.abs(clips.latents[:, 0].astype(jnp.float32) - expected)))
    assert error < 2e-2 * float(jnp.max(jnp.abs(expected))), f"clip latents off by {error} (bf16 rounding allows 1%)"
    # With a vanishing augmentation strength the conditioning latents are the first frame's unscaled encoding.
    clean = tiny_pool(pool, draws=2, aug_log_mean=-30.0, aug_log_std=0.0)
    error = float(jnp.max(jnp.abs(clean.cond_latents[:, 1].astype(jnp.float32) - vae.encode(first))))
    assert error < 2e-2 * float(jnp.max(jnp.abs(expected))), f"un-augmented conditioning off by {error}"
    noisy_gap = float(jnp.max(jnp.abs(clips.cond_latents[:, 0].astype(jnp.float32) - vae.encode(first))))
    assert noisy_gap > 10 * error, "augmented conditioning latents equal the clean ones: no noise was added"
    train.save_pool(clips, tmp_path / "pool")
    loaded = train.load_pool(tmp_path / "pool")
    for field in ("latents", "first_frames", "last_frames", "cond_latents", "cond_aug"):
        a, b = getattr(clips, field), getattr(loaded, field)
        assert a.dtype == b.dtype, f"{field}: {a.dtype} saved, {b.dtype} loaded"
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8), err_msg=field)


def test_build_pool_matches_encoding_the_rendered_videos_chunk_by_chunk(pool, monkeypatch):
    vae = tiny_vae()
    cfg = train.UNetTrainConfig(cond_draws=1)
    videos = {seed: np.asarray(pool[seed]) for seed in range(len(pool))}
    encoded_sizes = []
    encode = train.encode_videos
    monkeypatch.setattr(train, "encode_videos", lambda state, v, *a, **k: encoded_sizes.append(len(v)) or
                        encode(state, v, *a, **k))
    built = train.build_pool(vae, list(videos), jax.random.key(7), cfg, chunk=2, workers=0, videos=videos.__getitem__)
    # Three videos in chunks of 2: the last chunk is padded to 2 with a copy of its video (one compiled program for
    # every chunk), and the copy's encoding is cut off.
    assert encoded_sizes == [2, 2] and len(built.latents) == 3
    chunks = [pool[0:2], jnp.concatenate([pool[2:3], pool[2:3]])]
    direct = [encode(ModelState.of(vae), chunk, jax.random.fold_in(jax.random.key(7), i), draws=1,
                     aug_log_mean=cfg.aug_log_mean, aug_log_std=cfg.aug_log_std) for i, chunk in enumerate(chunks)]
    for field in ("latents", "cond_latents", "cond_aug", "first_frames", "last_frames"):
        expected = jnp.concatenate([getattr(d, field) for d in direct])[:3]
        np.testing.assert_array_equal(np.asarray(getattr(built, field)), np.asarray(expected), err_msg=field)


def test_learning_rate_schedule_warms_up_then_decays_to_its_floor():
    rate = lambda step, kind="cosine": train.learning_rate_at(step, 100, 10, 1e-3, kind)  # noqa: E731
    assert rate(0) == 0 and rate(5) == pytest.approx(5e-4) and rate(10) == pytest.approx(1e-3)
    assert rate(55) == pytest.approx(1e-3 * (train.FINAL_LR_FRACTION + (1 - train.FINAL_LR_FRACTION) / 2))
    assert rate(100) == pytest.approx(1e-3 * train.FINAL_LR_FRACTION) == rate(150)
    assert rate(70, "constant") == 1e-3
    rates = [rate(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(rates, rates[1:])), "the cosine part is not monotone"


def test_unit_rate_adamw_scaled_by_the_rate_equals_optax_adamw_at_that_rate():
    params = {"w": jax.random.normal(jax.random.key(0), (3, 4)), "b": jnp.ones(4)}
    grads = [jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(i), p.shape), params) for i in range(1, 4)]
    cfg = train.UNetTrainConfig(weight_decay=0.1, clip_norm=1e9)
    ours, reference = train.unet_optimizer(cfg), optax.chain(optax.clip_by_global_norm(1e9),
                                                              optax.adamw(3e-3, weight_decay=0.1))
    p_ours = p_ref = params
    s_ours, s_ref = ours.init(params), reference.init(params)
    for g in grads:
        u, s_ours = ours.update(g, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, jax.tree.map(lambda x: 3e-3 * x, u))
        u, s_ref = reference.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
    assert tree_max_difference(p_ours, p_ref) < 1e-7


def test_step_moves_the_ema_by_its_decay_and_a_zero_rate_leaves_the_parameters(pool):
    cfg = train.UNetTrainConfig(batch_size=2, p_mean=0.0, p_std=0.5)
    graphdef, state = train.init_train_state(tiny_trainables(), cfg)
    step = train.make_unet_step(graphdef, cfg)
    clips = tiny_pool(pool)
    start = jax.tree.map(jnp.copy, state.params)
    frozen, _ = step(jax.tree.map(jnp.copy, state), clips, jax.random.key(1), np.float32(0), np.float32(0.5))
    assert tree_max_difference(frozen.params, start) == 0, "a zero learning rate changed the parameters"
    moved, metrics = step(state, clips, jax.random.key(1), np.float32(1e-3), np.float32(0.5))
    assert tree_max_difference(moved.params, start) > 1e-4 and np.isfinite(float(metrics["loss"]))
    decay = float(train.ema_decay_at(jnp.asarray(0), jnp.asarray(0.5)))
    assert decay == pytest.approx(0.1), "at step 0 the warm-up decay (1 + 0)/(10 + 0) applies"
    expected = jax.tree.map(lambda e, p: e + (1 - decay) * (p - e), start, moved.params)
    assert tree_max_difference(moved.ema, expected) < 1e-6
    assert int(moved.step) == 1


def test_run_interrupted_and_restored_from_its_checkpoint_continues_bit_for_bit(pool, tmp_path):
    cfg = train.UNetTrainConfig(steps=6, batch_size=2, warmup=2, learning_rate=1e-3, p_mean=0.0, p_std=0.5,
                                ema_decay=0.5)
    clips = tiny_pool(pool)
    graphdef, fresh = train.init_train_state(tiny_trainables(), cfg)
    step = train.make_unet_step(graphdef, cfg)
    key = jax.random.key(3)
    straight = train.run_unet_steps(step, jax.tree.map(jnp.copy, fresh), clips, key, cfg)
    run = train.Run(tmp_path / "run")
    run.folder.mkdir()
    train.run_unet_steps(step, jax.tree.map(jnp.copy, fresh), clips, key, cfg, until=3, on_save=run.save_state)
    restored = run.restore_state(fresh)
    assert int(restored.step) == 3
    resumed = train.run_unet_steps(step, jax.tree.map(jnp.copy, restored), clips, key, cfg)
    for name in ("params", "opt_state", "ema", "step"):
        difference = tree_max_difference(getattr(resumed, name), getattr(straight, name))
        assert difference == 0, f"{name} differs by {difference} after the restart"
    # Negative control: restarting from the saved parameters with a fresh optimizer does not reproduce the run.
    fresh_optimizer = train.TrainState(params=restored.params, opt_state=train.unet_optimizer(cfg).init(
        restored.params), ema=restored.ema, step=restored.step)
    differs = train.run_unet_steps(step, jax.tree.map(jnp.copy, fresh_optimizer), clips, key, cfg)
    assert tree_max_difference(differs.params, straight.params) > 0


def test_batch_size_choice_and_learning_rate_and_ema_rules():
    measured = {64: {"clips_per_s": 1000.0}, 128: {"clips_per_s": 1850.0}, 256: {"clips_per_s": 2000.0},
                512: {"clips_per_s": 2050.0}}
    assert train.choose_batch_size(measured) == 128
    out_of_memory = {"clips_per_s": 0.0, "failed": "RESOURCE_EXHAUSTED: Out of memory"}
    assert train.choose_batch_size({**measured, 32: out_of_memory}) == 128, "a failed size is never chosen"
    with pytest.raises(SystemExit, match="no batch size ran .*256: RESOURCE_EXHAUSTED.*smaller --batch-sizes"):
        train.choose_batch_size({256: out_of_memory})
    assert train.scaled_learning_rate(128, 2e-4, 32) == pytest.approx(4e-4)
    decay = train.ema_decay_for(10000)
    assert decay ** 500 == pytest.approx(0.5), "the EMA half-life is 5% of the steps"


def test_measured_throughput_times_the_step_that_training_then_reuses(pool):
    cfg = train.UNetTrainConfig(p_mean=0.0, p_std=0.5)
    graphdef, state = train.init_train_state(tiny_trainables(), cfg)
    results = train.measure_throughput(graphdef, state, tiny_pool(pool), cfg, [2], steps=2)
    assert list(results) == [2]
    # The record rounds clips/s to 0.1 and the step time to 10 µs: on a slow CPU (2.3 clips/s) the first rounding is
    # 2% of the value, more than a relative tolerance alone allows.
    assert results[2]["clips_per_s"] == pytest.approx(2 / results[2]["step_s"], rel=1e-3, abs=0.05)
    assert results[2]["compile_s"] > 0
    # Traced on the pool's shapes alone (to compile while the pool is rendered), the step is the same program.
    clips = tiny_pool(pool)
    shapes = train.pool_shapes(tiny_vae(), len(pool), dataclasses.replace(cfg, cond_draws=2), WORLD)
    step = train.make_unet_step(graphdef, dataclasses.replace(cfg, batch_size=2))
    lowered = [step.lower(state, p, jax.random.key(0), np.float32(0), np.float32(0)).as_text() for p in (clips, shapes)]
    assert lowered[0] == lowered[1], "the step traced on the pool's shapes differs from the one traced on the pool"
    planned = dataclasses.replace(cfg, batch_size=2, steps=500, learning_rate=3e-4, ema_decay=0.99)
    assert train.make_unet_step(graphdef, planned) is train.make_unet_step(graphdef, dataclasses.replace(
        cfg, batch_size=2)), "a plan that differs only in host-side settings compiled a new step"


def test_backward_delta_trains_only_the_delta_keys_on_pool_clips(pool):
    from jinbetween.models.delta import delta_keys

    trainables = tiny_trainables()
    unet = train.with_config(trainables.unet, trainables.unet.config)
    before = params_of(unet)
    records = []
    settings = dict(steps=3, batch_size=2, seed=0, learning_rate=1e-3, log_every=1)
    state = train.train_backward_delta(unet, trainables.image_encoder, tiny_vae(), tiny_pool(pool),
                                       on_log=records.append, **settings)
    delta = state.delta
    assert int(state.step) == 3 and len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    assert sorted(delta) == sorted(delta_keys(unet.config))
    # Stopped by a deadline after step 1, then resumed from its state: the same delta as the run that never stopped.
    stopped = train.train_backward_delta(unet, trainables.image_encoder, tiny_vae(), tiny_pool(pool), deadline=0.0,
                                         **settings)
    resumed = train.train_backward_delta(unet, trainables.image_encoder, tiny_vae(), tiny_pool(pool), start=stopped,
                                         **settings)
    assert int(stopped.step) == 1 and int(resumed.step) == 3
    assert any(not np.array_equal(stopped.delta[k], delta[k]) for k in delta), "the stopped run already ended"
    for k in delta:
        np.testing.assert_array_equal(resumed.delta[k], delta[k], err_msg=f"resuming changed {k}")
    assert all(float(np.max(np.abs(value))) > 0 for value in delta.values()), "a delta tensor did not train"
    for path, value in params_of(unet).items():
        np.testing.assert_array_equal(value, before[path], err_msg=f"the frozen base changed at {path}")


def test_held_out_error_is_the_same_clip_for_clip_whatever_the_batch_and_tells_models_apart(pool):
    clips = tiny_pool(pool)
    sigmas = (0.5, 5.0)
    model = tiny_trainables(seed=0)
    whole = train.held_out_x0_error(model, clips, sigmas, jax.random.key(2), batch_size=3)
    single = train.held_out_x0_error(model, clips, sigmas, jax.random.key(2), batch_size=1)
    for sigma in sigmas:
        assert whole[sigma] == pytest.approx(single[sigma], rel=1e-5), f"σ={sigma}: {whole[sigma]} vs {single[sigma]}"
    other = train.held_out_x0_error(tiny_trainables(seed=1), clips, sigmas, jax.random.key(2))
    assert all(abs(other[s] - whole[s]) > 1e-4 * whole[s] for s in sigmas), "two different models scored alike"


def test_conditioning_dropout_zeroes_image_latent_and_embedding_together(pool):
    """With dropout 1 every clip is unconditional: the loss no longer depends on the first frame."""
    graphdef, state = nnx.split(tiny_trainables())
    latents = jax.random.normal(jax.random.key(0), (2, 4, 16, 16, 4))
    frames = np.asarray(pool[:2, 0])
    image_latent = jax.random.normal(jax.random.key(2), (2, 16, 16, 4))

    @jax.jit
    def jitted(state, batch, key, dropout):  # the rate traced: one program for both rates
        return train.unet_loss(state, graphdef, batch, key, train.UNetTrainConfig(cond_dropout=dropout))

    def loss(first, cond, dropout):
        batch = train.UNetBatch(latents=latents, first_frames=first, image_latent=cond, aug=jnp.full((2,), 0.05))
        return jitted(state, batch, jax.random.key(1), np.float32(dropout))[0]

    other_frames, other_latent = frames[::-1].copy(), image_latent[::-1]
    assert float(loss(frames, image_latent, 1.0)) == float(loss(other_frames, other_latent, 1.0))
    assert float(loss(frames, image_latent, 0.0)) != float(loss(other_frames, image_latent, 0.0))
    assert float(loss(frames, image_latent, 0.0)) != float(loss(frames, other_latent, 0.0))


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

    from jinbetween.weights.loading import export_params

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
