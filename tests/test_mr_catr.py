"""MR-CATR's algebra and identities: the projection, the motion axis, the consensus, the blend, its program and
UNet calls, and its reduction to ViBiD. (Parity with the official loop is in test_mr_catr_oracle.py.)

Algebra tests run on random videos `[B, F, h, w, C]` in float32; their tolerances are float32 rounding of sums of
up to ~10³ terms, relative to the values' scale. Sampler tests use a tiny random UNet, as test_samplers.py.
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

from jinbetween import config
from jinbetween.models import UNet
from jinbetween.models.state import ModelState
from jinbetween.samplers import (METHODS, MRCATRConfig, ViBiDConfig, draws_from_keys, sample_mr_catr, sample_vibid,
                                 unet_calls)
from jinbetween.samplers.mr_catr import (CONFLICT_AWARE, PLAIN, conflict_aware_update, consensus_axis, cosine, dot,
                                         motion_axis, noise_weight, normalize, project)
from tests.helpers import assert_close
from tests.test_samplers import (EVALUATIONS, LATENT, ROUNDING, conditioning, counting_unet, keys,  # noqa: F401
                                 stack)

F = 5
SHAPE = (2, 4, 3, 3, 2)  # [B, F, h, w, C]
values = st.floats(-100, 100, allow_nan=False, allow_subnormal=False, width=32)  # XLA flushes subnormals
videos = hnp.arrays(np.float32, SHAPE, elements=values)
# Rounding of a float32 dot product over the 72 elements of a video, relative to the inputs' scale.
RTOL = 1e-5


def scale_of(*arrays) -> float:
    return float(max(np.abs(a).max() for a in arrays)) + 1.0


def unit(seed: int) -> jax.Array:
    """A random unit axis per video, `SHAPE`."""
    return normalize(jax.random.normal(jax.random.key(seed), SHAPE))


# --------------------------------------------------------------------------------------------------
# The projection.


@given(videos, st.integers(0, 2**16))
def test_projection_is_idempotent(d, seed):
    m = unit(seed)
    once = project(d, m)
    np.testing.assert_allclose(project(once, m), once, atol=RTOL * scale_of(d))


def test_projection_on_an_axis_that_is_not_unit_is_not_idempotent():
    """Negative control of the test above: with m scaled by 2 (forgetting `normalize`) projecting twice differs."""
    d, m = jax.random.normal(jax.random.key(0), SHAPE), 2 * unit(1)
    once = project(d, m)
    assert float(jnp.abs(project(once, m) - once).max()) > 0.1 * float(jnp.abs(once).max())


@given(hnp.arrays(np.float32, (2,), elements=values), st.integers(0, 2**16))
def test_projection_leaves_motion_along_the_axis_unchanged(coefficients, seed):
    m = unit(seed)
    d = coefficients[:, None, None, None, None] * m
    np.testing.assert_allclose(project(d, m), d, atol=RTOL * scale_of(coefficients))


@given(videos, st.integers(0, 2**16))
def test_projection_removes_what_is_orthogonal_to_the_axis(d, seed):
    """The projection keeps the axis' component only: d − P d is orthogonal to m (so P is not the identity)."""
    m = unit(seed)
    rest = d - project(d, m)
    np.testing.assert_allclose(dot(rest, m), 0, atol=RTOL * scale_of(d))


def test_projection_is_per_video():
    d, m = jax.random.normal(jax.random.key(2), SHAPE), unit(3)
    for b in range(SHAPE[0]):
        chex.assert_trees_all_close(project(d, m)[b:b + 1], project(d[b:b + 1], m[b:b + 1]), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The motion axis and the consensus.


@given(hnp.arrays(np.float32, SHAPE, elements=st.floats(-10, 10, allow_subnormal=False, width=32)))
def test_motion_axis_is_the_normalized_endpoint_difference(x0):
    """The mean of the frame residuals telescopes: (x0[F−1] − x0[0]) / (F − 1), in every frame, normalized.

    Tolerance: float32 computes each residual element within δ = F·2⁻²³·max|x0| (F − 1 differences and their mean),
    and normalizing v moves v/‖v‖ by at most 2‖Δv‖/‖v‖, with ‖Δv‖ ≤ δ·√n over the video's n elements; so nearly
    still videos (‖v‖ near δ, which hypothesis finds) get a looser bound, and moving ones ~1e-5.
    """
    x0 = x0.astype(np.float64)
    frames, elements = x0.shape[1], x0[0].size
    endpoint = np.broadcast_to(((x0[:, -1] - x0[:, 0]) / (frames - 1))[:, None], x0.shape)
    norms = np.sqrt((endpoint**2).sum(axis=(1, 2, 3, 4), keepdims=True) + 1e-8)
    delta = frames * 2.0**-23 * np.abs(x0).max(axis=(1, 2, 3, 4), keepdims=True)
    bound = 1e-6 + 2 * delta * np.sqrt(elements) / norms
    error = np.abs(np.asarray(motion_axis(jnp.asarray(x0, jnp.float32)), np.float64) - endpoint / (norms + 1e-8))
    assert np.all(error <= bound), f"largest error over its bound: {np.max(error / bound):.3g}"


def test_motion_axis_is_a_unit_vector_the_same_in_every_frame():
    m = motion_axis(jax.random.normal(jax.random.key(4), SHAPE))
    np.testing.assert_allclose(dot(m, m), 1, rtol=1e-5)
    np.testing.assert_array_equal(m[:, 1:], jnp.broadcast_to(m[:, :1], m[:, 1:].shape))


def test_a_video_that_does_not_move_has_no_axis_and_no_projection():
    still = jnp.broadcast_to(jax.random.normal(jax.random.key(5), (2, 1, 3, 3, 2)), SHAPE)
    m = motion_axis(still)
    np.testing.assert_array_equal(m, 0)
    d = jax.random.normal(jax.random.key(6), SHAPE)
    np.testing.assert_array_equal(project(d, m), 0)
    np.testing.assert_array_equal(conflict_aware_update(d, m, jnp.float32(1)), d)


def test_consensus_blends_axes_that_agree_and_keeps_the_forward_one_otherwise():
    m_start, other = unit(7), unit(8)
    agreeing = normalize(m_start + 0.5 * other)
    assert float(cosine(m_start, agreeing).min()) > 0
    np.testing.assert_allclose(consensus_axis(m_start, agreeing, 0.2),
                               normalize(0.8 * m_start + 0.2 * agreeing), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(consensus_axis(m_start, -agreeing, 0.2), m_start)
    np.testing.assert_array_equal(consensus_axis(m_start, agreeing, 0.0), normalize(m_start))


def test_consensus_decides_per_video():
    m_start, m_end = unit(9), unit(10)
    m_end = m_end.at[1].set(-m_start[1])  # video 1 disagrees; video 0 gets an agreeing one
    m_end = m_end.at[0].set(normalize(m_start[:1] + 0.1 * m_end[:1])[0])
    m = consensus_axis(m_start, m_end, 0.2)
    np.testing.assert_array_equal(m[1], m_start[1])
    assert float(jnp.abs(m[0] - m_start[0]).max()) > 1e-4


# --------------------------------------------------------------------------------------------------
# The blend and its weight.


@given(videos, st.integers(0, 2**16))
def test_agreement_with_the_projection_is_never_negative(d, seed):
    """The official s = cos(d, P d) is |d·m|/‖d‖ for a unit m: the clamp at 0 never acts. (Where |d·m| is near
    √ε = 1e-4 the ε inside ‖P d‖ = √((d·m)² + ε) shows, so the identity is checked where |d·m| > 1e-2.)"""
    m = unit(seed)
    s = np.asarray(cosine(d, project(d, m)))
    along = np.asarray(dot(d, m))
    assert s.min() >= 0, f"cos(d, P d) = {s.ravel()}"
    shown = np.abs(along) > 1e-2
    expected = np.abs(along) / np.sqrt(np.asarray(dot(d, d)) + 1e-8)
    np.testing.assert_allclose(s[shown], expected[shown], rtol=1e-4, atol=1e-6)


@given(videos, st.integers(0, 2**16))
def test_blend_with_rho_zero_is_the_backward_update_exactly(d, seed):
    np.testing.assert_array_equal(conflict_aware_update(d, unit(seed), jnp.float32(0)), d)


@given(st.floats(0.05, 1), st.integers(0, 2**16))
def test_blend_moves_an_update_toward_its_projection_by_beta(rho, seed):
    """(1 − β)·d + β·P d with β = ρ·|cos(d, m)|: checked against that formula, and ≠ d off the axis."""
    d = jax.random.normal(jax.random.key(seed), SHAPE)
    m = normalize(d + 2 * unit(seed + 1))  # cos(d, m) well away from 0 and 1
    aligned = project(d, m)
    beta = rho * np.abs(np.asarray(cosine(d, m)))
    blended = conflict_aware_update(d, m, jnp.float32(rho))
    np.testing.assert_allclose(blended, (1 - beta) * d + beta * aligned, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(blended - d).max()) > 1e-3


def test_noise_weight_is_zero_at_the_first_step_and_grows():
    sigmas = MRCATRConfig().sigmas()
    rho = np.asarray(noise_weight(jnp.asarray(sigmas[:-1]), jnp.float32(sigmas[0]), 2.0))
    assert rho[0] == 0 and rho[1] > 0.3 and np.all(np.diff(rho) >= 0) and rho.max() <= 1
    np.testing.assert_allclose(rho, 1 - (sigmas[:-1] / sigmas[0]) ** 2, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Program, calls, and the sampler.


def test_program_blends_the_first_fifth_of_the_steps():
    """Official test `i < 0.2·num_steps`: steps 0–4 of 25; 1 step of 5; 2 of 6 (1.2)."""
    assert list(MRCATRConfig().program().kind) == [CONFLICT_AWARE] * 5 + [PLAIN] * 20
    assert list(MRCATRConfig(num_steps=5).program().kind) == [CONFLICT_AWARE] + [PLAIN] * 4
    assert list(MRCATRConfig(num_steps=6).program().kind) == [CONFLICT_AWARE] * 2 + [PLAIN] * 4


def test_method_conditions_on_fps_id_10_with_one_augmentation_draw_per_keyframe():
    spec = METHODS["mr-catr"]
    assert spec.fps == 11 and not spec.shared_aug_noise and not spec.uses_delta


@pytest.fixture(scope="module")
def unet() -> ModelState[UNet]:
    return ModelState.of(UNet(config.tiny(), rngs=nnx.Rngs(0)))


def test_unet_evaluations_at_defaults_are_vibids_50(counting_unet):
    cfg = MRCATRConfig(num_frames=3)
    assert unet_calls("mr-catr", cfg) == unet_calls("vibid", ViBiDConfig(num_frames=3)) == 50
    EVALUATIONS.clear()
    jax.block_until_ready(sample_mr_catr(counting_unet, conditioning(1), conditioning(2), keys(0), cfg))
    jax.effects_barrier()
    ran = EVALUATIONS.count("ran")
    assert ran == 50, f"mr-catr: {ran} UNet calls executed, the official loop makes 50"


STEPS = 4
THREE_OF_FOUR = MRCATRConfig(num_frames=F, num_steps=STEPS, conflict_fraction=0.75)  # blends steps 0–2


@pytest.fixture(scope="module")
def runs(unet):
    """{name: latents}: MR-CATR with its blend on no step (γ = 0), on every step at ρ = 0, on steps 0–2 of 4, and
    ViBiD, on one set of draws."""
    draws = draws_from_keys(keys(3), STEPS, (F, *LATENT))
    args = (unet, conditioning(1), conditioning(2), keys(3))
    mr_catr = lambda cfg: sample_mr_catr(*args, cfg, draws=draws).latents  # noqa: E731
    config = lambda **kw: MRCATRConfig(num_frames=F, num_steps=STEPS, **kw)  # noqa: E731
    return {"gamma_0": mr_catr(config(conflict_fraction=0.0)),
            "rho_0": mr_catr(config(conflict_fraction=1.0, rho_power=0.0)), "three_of_four": mr_catr(THREE_OF_FOUR),
            "vibid": sample_vibid(*args, ViBiDConfig(num_frames=F, num_steps=STEPS), draws=draws).latents}


def test_without_blended_steps_the_sampler_is_vibid_exactly(runs):
    """γ = 0: every step is ViBiD's S(x) by the same operations, so the result is bit for bit ViBiD's."""
    np.testing.assert_array_equal(runs["gamma_0"], runs["vibid"])


def test_with_beta_zero_the_sampler_is_vibid(runs):
    """ρ = 0 (p = 0) makes β = 0 on every blended step: x_b + (S_b(x_b) − x_b), ViBiD up to that one rounding
    per step (~ulp of latents of size ~σ·3, i.e. ~1e-7 relative); with the blend on, ≫ ROUNDING away."""
    assert_close(runs["rho_0"], runs["vibid"], ROUNDING, "MR-CATR with β = 0 against ViBiD")
    err = float(jnp.abs(runs["three_of_four"] - runs["vibid"]).max() / jnp.abs(runs["vibid"]).max())
    assert err > 10 * ROUNDING, f"MR-CATR blending steps 0–2 is only {err:.3g} away from ViBiD"


def test_video_ends_exactly_on_the_start_keyframe(runs):
    """The last step is plain ViBiD: its backward half pins video frame 0 to z_start, unchanged at σ' = 0."""
    np.testing.assert_array_equal(runs["three_of_four"][:, 0], conditioning(1).clean_latent)
    assert not np.allclose(runs["three_of_four"][:, 1], conditioning(1).clean_latent, atol=1e-2)


def test_batch_equals_separate_runs(unet, runs):
    """The projection reduces per video: a pair's video does not depend on the other pairs in its batch. (Each pair
    alone takes its keys' draws injected, the program `runs` compiled.)"""
    starts, ends = stack(conditioning(1), conditioning(3)), stack(conditioning(2), conditioning(4))
    batch = sample_mr_catr(unet, starts, ends, keys(10, 11), THREE_OF_FOUR).latents
    for i, (s, e) in enumerate([(1, 2), (3, 4)]):
        draws = draws_from_keys(keys(10 + i), STEPS, (F, *LATENT))
        alone = sample_mr_catr(unet, conditioning(s), conditioning(e), keys(10 + i), THREE_OF_FOUR, draws=draws).latents
        assert_close(batch[i:i + 1], alone, ROUNDING, f"mr-catr: pair {i} in a batch of 2 against alone")


# --------------------------------------------------------------------------------------------------
# Reach: the CLI's commands and the toy-world benchmark.


@pytest.mark.parametrize("argv", [
    ["interpolate", "a.png", "b.png", "--out", "v.mp4", "--method", "mr-catr"],
    ["batch", "pairs.jsonl", "--out-dir", "videos", "--method", "mr-catr"],
    ["demo", "--methods", "mr-catr"],
    ["toybench", "--methods", "mr-catr"],
])
def test_every_command_offers_the_method(argv):
    from jinbetween import cli

    args = cli.build_parser().parse_args(argv)
    assert getattr(args, "method", None) == "mr-catr" or args.methods == ["mr-catr"]


def test_toybench_scores_it_on_its_own_frame_rate(tmp_path):
    """End to end on the shipped toy model (1 pair, 1 step: the programs notebook 02 compiles, so the run's
    compilation cache serves them): `--method-fps` conditions it on fps 11 (fps_id 10)."""
    import json

    from jinbetween import cli

    out = tmp_path / "bench.json"
    argv = ["toybench", "--pairs", "1", "--steps", "1", "--methods", "mr-catr", "--method-fps", "--out", str(out)]
    assert cli.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["fps"] == {"mr-catr": 11.0}, f"conditioning fps {record['fps']}"
    assert np.isfinite(record["scores"]["mr-catr"]["psnr"]), record["scores"]
