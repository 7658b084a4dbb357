"""Sampler algebra and bookkeeping: flips, fusion, MPD's closed form, step programs, UNet call counts,
time symmetry of TRF, GI's reduction to forward sampling, PRNG determinism, batch invariance, retracing.

A tiny randomly initialized UNet and random Conditionings stand in for SVD: every property here holds
for any weights. (Parity with PyTorch oracles is in test_sampler_oracles.py.)
"""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from jinbetween import config, schedule
from jinbetween.conditioning import Conditioning
from jinbetween.denoiser import flip_time, fuse
from jinbetween.errors import ConfigError
from jinbetween.models import UNet
from jinbetween.models.delta import delta_shapes
from jinbetween.models.state import ModelState
from jinbetween.samplers import (METHODS, Draws, GIConfig, I2VConfig, MPDConfig, TRFConfig, ViBiDConfig,
                                 draws_from_keys, sample_gi, sample_i2v, sample_mpd, sample_trf, sample_vibid,
                                 unet_calls)
from jinbetween.samplers.mpd import distilled_estimate
from jinbetween.samplers.trf import jump_schedule

from tests.helpers import assert_close

F, LATENT = 5, (8, 8, 4)
# Sampling starts at σ = 700: float32 rounding of the initial latent alone is ~700·6e-8 ≈ 4e-5 per element,
# against final values of order 1. Results of differently compiled programs agree to this order.
ROUNDING = 1e-4
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
videos = hnp.arrays(np.float32, hnp.array_shapes(min_dims=3, max_dims=5, min_side=1, max_side=6), elements=finite)


@pytest.fixture(scope="module")
def unet() -> ModelState[UNet]:
    return ModelState.of(UNet(config.tiny(), rngs=nnx.Rngs(0)))


EVALUATIONS: list[str] = []  # one entry per UNet evaluation of a CountingUNet: "traced" when traced, "ran" when run


class CountingUNet(UNet):
    """The UNet, noting each evaluation: once when a program is traced, and, through a host callback compiled into
    the program, each time it runs."""

    def __call__(self, *args, **kwargs):
        EVALUATIONS.append("traced")
        jax.debug.callback(lambda: EVALUATIONS.append("ran"), ordered=True)
        return super().__call__(*args, **kwargs)


@pytest.fixture(scope="module")
def counting_unet() -> ModelState[UNet]:
    return ModelState.of(CountingUNet(config.tiny(), rngs=nnx.Rngs(0)))


def conditioning(seed: int, batch: int = 1) -> Conditioning:
    rng = np.random.default_rng(seed)
    return Conditioning(
        image_embeds=jnp.asarray(rng.standard_normal((batch, 1, config.tiny().cross_attention_dim[0])), jnp.float32),
        image_latent=jnp.asarray(rng.standard_normal((batch, *LATENT)), jnp.float32),
        clean_latent=jnp.asarray(rng.standard_normal((batch, *LATENT)), jnp.float32),
        added_time_ids=jnp.tile(jnp.asarray([[6.0, 127.0, 0.02]], jnp.float32), (batch, 1)))


def keys(*seeds: int) -> jax.Array:
    return jnp.stack([jax.random.key(s) for s in seeds])


def stack(*conds: Conditioning) -> Conditioning:
    return jax.tree.map(lambda *a: jnp.concatenate(a), *conds)


def flipped(draws: Draws) -> Draws:
    return Draws(jnp.flip(draws.initial, 1), jnp.flip(draws.moves, 2))


# --------------------------------------------------------------------------------------------------
# Flips and fusion.


@given(videos)
def test_flip_time_is_an_involution(x):
    x = x.reshape(1, *x.shape)
    chex.assert_trees_all_equal(flip_time(flip_time(x)), x)


@given(videos)
def test_flip_time_reverses_frames(x):
    x = x.reshape(1, *x.shape)
    np.testing.assert_array_equal(np.asarray(flip_time(x))[:, 0], x[:, -1])


@given(videos, st.floats(0, 1))
def test_fusing_two_identical_paths_returns_that_path(x, w):
    """The forward path and its time-reversed copy, fused with weights summing to one, give the path back."""
    x = x.reshape(1, *x.shape)
    frames = x.shape[1]
    for forward_weights in (np.full(frames, w, np.float32), np.linspace(1, 0, frames, dtype=np.float32)):
        fused = fuse(x, flip_time(x), forward_weights, 1 - forward_weights)
        np.testing.assert_allclose(fused, x, rtol=2e-7, atol=1e-30)


@given(hnp.arrays(np.float32, (1, 6, 2, 3), elements=finite), hnp.arrays(np.float32, (1, 6, 2, 3), elements=finite),
       hnp.arrays(np.float32, (1, 2, 2, 3), elements=finite), st.floats(0.01, 700))
def test_mpd_distilled_estimate_is_the_forward_one_shifted_to_end_at_z_end(x, x0, pins, sigma):
    """§5.2: the cumulative sum telescopes to x̂0_fwd + (z_end − x̂0_fwd[-1]), then frame 0 := z_start."""
    z_start, z_end = pins[:, 0], pins[:, 1]
    distilled = np.asarray(distilled_estimate(x, x0, jnp.float32(sigma), z_start, z_end), np.float64)
    closed = x0.astype(np.float64) + (z_end - x0[:, -1])[:, None]
    closed[:, 0] = z_start
    np.testing.assert_array_equal(distilled[:, 0], z_start)
    scale = np.abs(x).max() + np.abs(x0).max() + np.abs(pins).max() + 1
    np.testing.assert_allclose(distilled[:, -1], z_end, atol=2e-5 * scale)
    np.testing.assert_allclose(distilled, closed, atol=2e-5 * scale)


# --------------------------------------------------------------------------------------------------
# Step programs and UNet call counts.


def test_trf_jump_schedule_of_the_reference():
    """algorithms.md §4.2: 0..9, back down to 4, then 5..49 (60 visits, 5 of them undos)."""
    assert jump_schedule(50, 0.8, 5, 2) == list(range(10)) + [8, 7, 6, 5, 4] + list(range(5, 50))
    assert jump_schedule(50, 0.5, 5, 1) == list(range(50))


def test_trf_program_folds_undos_into_one_renoise():
    program = TRFConfig().program()
    sigmas = schedule.karras_sigmas(50).astype(np.float64)
    assert list(program.step[:12]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 5, 6]
    renoised = np.flatnonzero(program.noise_before)
    assert list(renoised) == [10]
    np.testing.assert_allclose(program.noise_before[10], np.sqrt(sigmas[5] ** 2 - sigmas[10] ** 2), rtol=1e-6)
    np.testing.assert_array_equal(program.sigma_in, program.sigma)
    faithful = TRFConfig(faithful=True).program()
    assert faithful.sigma_in[10] == np.float32(sigmas[10]) and faithful.sigma[10] == np.float32(sigmas[5])
    np.testing.assert_array_equal(np.delete(faithful.sigma_in, 10), np.delete(faithful.sigma, 10))


def test_gi_program_repeats_the_first_half_with_reinjected_noise():
    program = GIConfig().program()
    assert len(program) == 25 * 6 + 25
    sigmas = schedule.karras_sigmas(50).astype(np.float64)
    repeats = program.noise_before > 0
    assert list(program.step[:7]) == [0] * 6 + [1] and program.step[repeats].max() == 24
    np.testing.assert_allclose(program.noise_before[1], np.sqrt(sigmas[0] ** 2 - sigmas[1] ** 2), rtol=1e-6)


@pytest.mark.parametrize("method, expected", [("gi", 350), ("trf", 110), ("mpd", 185), ("mpd-seq", 65),
                                              ("vibid", 50), ("mr-catr", 50)])
def test_unet_evaluations_at_defaults_equal_the_reference_table(counting_unet, method, expected):
    """algorithms.md §2: counted at run time (one callback per UNet call), at the default schedules.
    Two runs with one key also give the same video."""
    spec = METHODS[method]
    cfg = spec.config(num_frames=3)
    assert unet_calls(method, cfg) == expected
    args = (counting_unet, conditioning(1), conditioning(2), keys(0), cfg)
    EVALUATIONS.clear()
    first = jax.block_until_ready(spec.sample(*args))
    jax.effects_barrier()
    ran = EVALUATIONS.count("ran")
    assert ran == expected, f"{method}: {ran} UNet calls executed, the reference makes {expected}"
    chex.assert_trees_all_equal(spec.sample(*args), first)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_sampling_program_compiles_two_unet_evaluations(counting_unet, method):
    """Whatever the mix of move kinds in its program (MPD: distillation, ViBiD steps and parallel moves), a sampler
    traces the UNet twice: its moves share the start- and the end-conditioned evaluation."""
    spec = METHODS[method]
    cfg = spec.config(num_frames=3, num_steps=4)
    EVALUATIONS.clear()
    spec.sample.lower(counting_unet, conditioning(1), conditioning(2), keys(0), cfg)
    assert EVALUATIONS.count("traced") == 2, f"{method}: the program traces {EVALUATIONS.count('traced')} UNet calls"


# --------------------------------------------------------------------------------------------------
# Method identities.


def test_trf_is_time_symmetric(unet):
    """Swapping the keyframes and reversing every noise draw in time yields the time-reversed video."""
    cfg = TRFConfig(num_frames=F, num_steps=6, repeat_step_ratio=0.5, jump_length=2)
    assert cfg.program().noise_before.any(), "the schedule should contain a jump"
    start, end = conditioning(1), conditioning(2)
    draws = draws_from_keys(keys(3), len(cfg.program()), (F, *LATENT))
    video = sample_trf(unet, start, end, keys(3), cfg, draws=draws).latents
    swapped = sample_trf(unet, end, start, keys(3), cfg, draws=flipped(draws)).latents
    assert_close(flip_time(swapped), video, ROUNDING, "TRF with swapped keyframes, reversed in time")


def test_gi_with_fusion_weight_one_is_forward_guided_sampling(unet):
    """w = 1 drops the backward path: GI reduces to image-to-video with GI's constant guidance (2.0)."""
    start, end = conditioning(1), conditioning(2)
    cfg = GIConfig(num_frames=F, num_steps=4, fusion_weight=1.0, noise_injection_steps=0)
    draws = draws_from_keys(keys(0), len(cfg.program()), (F, *LATENT))
    gi = sample_gi(unet, start, end, keys(0), cfg, draws=draws).latents
    i2v = sample_i2v(unet, start, keys(0), I2VConfig(num_frames=F, num_steps=4, min_guidance_scale=2.0,
                                                     max_guidance_scale=2.0), draws.initial).latents
    assert_close(gi, i2v, ROUNDING, "GI (w = 1) against forward-only sampling")


def test_gi_backward_path_uses_the_delta(unet):
    cfg = GIConfig(num_frames=F, num_steps=2, noise_injection_steps=0)
    rng = np.random.default_rng(0)
    delta = {k: jnp.asarray(0.1 * rng.standard_normal(s), jnp.float32) for k, s in delta_shapes(config.tiny()).items()}
    zero = {k: jnp.zeros_like(v) for k, v in delta.items()}
    args = (unet, conditioning(1), conditioning(2), keys(0), cfg)
    base = sample_gi(*args).latents
    chex.assert_trees_all_close(sample_gi(*args, delta=zero).latents, base, atol=1e-6)
    assert float(jnp.abs(sample_gi(*args, delta=delta).latents - base).max()) > 1e-3


def test_injected_draws_equal_the_keys_own(unet):
    cfg = MPDConfig.sequential(num_frames=F, num_steps=3)
    args = (unet, conditioning(1), conditioning(2), keys(4), cfg)
    draws = draws_from_keys(keys(4), len(cfg.program()), (F, *LATENT))
    # Equal up to rounding: the two programs are compiled separately, so XLA may fuse the arithmetic differently.
    assert_close(sample_mpd(*args, draws=draws).latents, sample_mpd(*args).latents, ROUNDING,
                 "MPD-seq with the keys' draws injected")


@pytest.mark.parametrize("sampler, cfg", [
    (sample_vibid, ViBiDConfig(num_frames=F, num_steps=3)),
    (sample_mpd, MPDConfig.sequential(num_frames=F, num_steps=3)),
], ids=["vibid", "mpd-seq"])
def test_sequential_samplers_end_exactly_on_the_start_keyframe(unet, sampler, cfg):
    """Their last move's backward half pins its last frame (video frame 0) to z_start, and at σ' = 0 the
    CFG++ step returns that pinned estimate unchanged."""
    start, end = conditioning(1), conditioning(2)
    video = sampler(unet, start, end, keys(0), cfg).latents
    np.testing.assert_array_equal(video[:, 0], start.clean_latent)
    assert not np.allclose(video[:, 1], start.clean_latent, atol=1e-2)


# --------------------------------------------------------------------------------------------------
# PRNG and batching.


@pytest.mark.parametrize("method", ["gi", "mpd"])  # GI's and the CFG++ samplers' code paths (TRF: symmetry test)
def test_same_key_same_video_and_batch_equals_separate_runs(unet, method):
    spec = METHODS[method]
    cfg = spec.config(num_frames=F, num_steps=2)
    starts, ends = stack(conditioning(1), conditioning(3)), stack(conditioning(2), conditioning(4))
    batch = spec.sample(unet, starts, ends, keys(10, 11), cfg).latents
    again = spec.sample(unet, starts, ends, keys(10, 11), cfg).latents
    chex.assert_trees_all_equal(batch, again)
    for i, (s, e) in enumerate([(1, 2), (3, 4)]):
        alone = spec.sample(unet, conditioning(s), conditioning(e), keys(10 + i), cfg).latents
        assert_close(batch[i:i + 1], alone, ROUNDING, f"{method}: pair {i} in a batch of 2 against alone")
    other = spec.sample(unet, starts, ends, keys(12, 13), cfg).latents
    for i in range(2):
        assert not np.allclose(other[i], batch[i], atol=1e-2), f"{method}: pair {i} ignores its key"


def test_repeated_calls_do_not_retrace(unet):
    cfg = TRFConfig(num_frames=F, num_steps=2)
    traced = chex.assert_max_traces(n=1)(sample_trf.__wrapped__)
    sampler = jax.jit(traced, static_argnames=("cfg",))
    for seed in range(3):
        jax.block_until_ready(sampler(unet, conditioning(seed), conditioning(seed + 1), keys(seed), cfg))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sampling_programs_make_no_host_round_trips_unless_progress_is_asked(unet, method):
    """The whole sampler is one device program: without a `progress` callback, its HLO holds no host callback (nor
    any other transfer to or from the host); with one, one callback per move reports the step."""
    spec = METHODS[method]
    host_ops = ("callback", "infeed", "outfeed", "send", "recv")
    cfg = spec.config(num_frames=3, num_steps=2)
    for progress in (None, print):
        hlo = spec.sample.lower(unet, conditioning(1), conditioning(2), keys(0), cfg, progress=progress).as_text()
        found = [op for op in host_ops if op in hlo]
        assert (found != []) == (progress is not None), f"{method}, progress={progress}: host operations {found}"


def test_progress_reports_every_move_in_order(unet):
    cfg = MPDConfig.sequential(num_frames=3, num_steps=2)
    reported = []
    jax.block_until_ready(sample_mpd(unet, conditioning(1), conditioning(2), keys(0), cfg, progress=reported.append))
    jax.effects_barrier()
    assert reported == list(range(len(cfg.program())))


@pytest.mark.parametrize("method", ["trf", "mpd", "vibid"])
def test_samplers_without_a_backward_model_refuse_a_delta(unet, method):
    spec = METHODS[method]
    delta = {k: jnp.zeros(s) for k, s in delta_shapes(config.tiny()).items()}
    with pytest.raises(ConfigError, match="no backward model"):
        spec.sample(unet, conditioning(1), conditioning(2), keys(0), spec.config(num_frames=3, num_steps=1),
                    delta=delta)
