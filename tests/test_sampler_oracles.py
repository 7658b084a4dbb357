"""GI and TRF samplers against PyTorch oracles built on diffusers' UNetSpatioTemporalConditionModel.

The oracles re-implement the official pipelines' loops (algorithms.md §3.3 for GI, §4.1 for TRF) in
this file on a randomly initialized tiny diffusers UNet, with diffusers' own `EulerDiscreteScheduler`
(SVD's scheduler config) for σ, c_noise, c_in and the Euler step, and the attention-map capture and
injection processors of `tests/torch_reference.py` for GI's rotated maps. Every random draw is
injected (`Draws`), so the jitted JAX samplers and the oracles see the same noise.

Each program is short (3 fused moves for GI, 8 for TRF; one UNet call per path and move) but runs a
whole mechanism end to end: fused guided v with rotated attention maps and the backward delta, the
Euler step, GI's re-noised repeat, TRF's jump (its undo noise folded into one draw) and its faithful
stale input scaling. Each comparison has a companion test showing that the oracle with the mechanism
switched off is ≫ TOL away, so the comparison can fail.

Tolerance 1e-4 relative (max|Δ|/max|ref|, fp32, highest matmul precision). One tiny-UNet call agrees
with diffusers to ~1e-6 (test_unet_parity); what dominates here is the Euler step from σ ≈ 700 down
to σ ≈ 2, which cancels latents of magnitude ~3·10³ to O(1): a 1e-6 difference in v flips the rounding
of that subtraction, worth up to ½ ulp(3·10³) ≈ 1.2e-4 absolute, ~4e-5 of results of size ~3. Measured:
GI 1.4e-5 (two such steps), TRF 1.3e-6; the faithful/delta/noise-ratio effects are 4e-2 to 1e-1.
"""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jinbetween import config
from jinbetween.conditioning import Conditioning
from jinbetween.models import abstract_unet
from jinbetween.models.delta import delta_shapes
from jinbetween.models.naming import flat_params, merge_params
from jinbetween.models.state import ModelState
from jinbetween.samplers.core import Draws, draws_from_keys
from jinbetween.samplers.gi import GIConfig, sample_gi
from jinbetween.samplers.trf import TRFConfig, jump_schedule, sample_trf
from jinbetween.weights.loading import convert_tensors
from jinbetween.weights.tensors import TensorSource

from tests.helpers import assert_close, relative_error, torch_single_thread  # noqa: F401 (autouse fixture)
from tests.torch_reference import (SVD_SCHEDULER, CaptureProcessor, InjectProcessor, diffusers_unet, state_dict_numpy,
                                   temporal_processors)

TOL = 1e-4
CFG = config.tiny()
BATCH, FRAMES, LATENT = 2, 4, (8, 8)
LATENT_CHANNELS = CFG.out_channels
DELTA_SCALE = 0.05


# --------------------------------------------------------------------------------------------------
# Models and keyframes.


@dataclasses.dataclass(frozen=True)
class Keyframes:
    """B keyframes' conditioning as numpy, channels-last (jinbetween's layout)."""

    image_embeds: np.ndarray  # [B, 1, D]
    image_latent: np.ndarray  # [B, h, w, C], unscaled
    added_time_ids: np.ndarray  # [B, 3]

    def conditioning(self) -> Conditioning:
        return Conditioning(image_embeds=jnp.asarray(self.image_embeds), image_latent=jnp.asarray(self.image_latent),
                            clean_latent=jnp.zeros_like(self.image_latent),
                            added_time_ids=jnp.asarray(self.added_time_ids))


def random_keyframes(seed: int) -> Keyframes:
    rng = np.random.default_rng(seed)
    return Keyframes(
        image_embeds=rng.standard_normal((BATCH, 1, CFG.cross_attention_dim[0])).astype(np.float32),
        image_latent=rng.standard_normal((BATCH, *LATENT, LATENT_CHANNELS)).astype(np.float32),
        added_time_ids=np.tile(np.array([6.0, 127.0, 0.02], np.float32), (BATCH, 1)))


@pytest.fixture(scope="module")
def models():
    """(torch forward UNet, torch backward UNet = base + Δ, jinbetween UNet state, Δ in NNX layout [in, out])."""
    forward = diffusers_unet(CFG, seed=11)
    abstract = abstract_unet(CFG)
    params = convert_tensors(TensorSource.from_arrays(state_dict_numpy(forward)), flat_params(abstract), model="UNet")
    unet = ModelState.of(merge_params(abstract, params))
    rng = np.random.default_rng(12)
    delta = {key: (DELTA_SCALE * rng.standard_normal(shape)).astype(np.float32)
             for key, shape in delta_shapes(CFG).items()}
    backward = copy.deepcopy(forward)
    weights = dict(backward.named_parameters())
    with torch.no_grad():
        for key, value in delta.items():
            weights[key].add_(torch.from_numpy(value.T.copy()))  # torch Linear weight is [out, in]
    return forward, backward, unet, delta


@pytest.fixture(scope="module")
def keyframes():
    """(start, end) keyframes of B videos."""
    return random_keyframes(21), random_keyframes(22)


def draws_for(num_moves: int):
    """Returns the injected `Draws` of a program with `num_moves` moves (and the keys they come from)."""
    keys = jax.random.split(jax.random.key(5), BATCH)
    return keys, draws_from_keys(keys, num_moves, (FRAMES, *LATENT, LATENT_CHANNELS))


# --------------------------------------------------------------------------------------------------
# The torch oracle: diffusers layout [B, F, C, h, w] throughout.


def to_torch(x) -> torch.Tensor:
    """`[..., h, w, C]` channels-last array → `[..., C, h, w]` float32 tensor."""
    x = torch.from_numpy(np.array(x, np.float32))
    return x.movedim(-1, -3)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.movedim(-3, -1).numpy()


def flip_t(x: torch.Tensor) -> torch.Tensor:
    """`x [B, F, ...]` with its frames in reverse order."""
    return x.flip(1)


def svd_scheduler(num_steps: int, sigma_min: float | None = None):
    """diffusers' EulerDiscreteScheduler with SVD's config (Karras σ, v-prediction, c_noise timesteps)."""
    from diffusers import EulerDiscreteScheduler

    overrides = {} if sigma_min is None else {"sigma_min": sigma_min}
    scheduler = EulerDiscreteScheduler.from_config({**SVD_SCHEDULER, **overrides})
    scheduler.set_timesteps(num_steps)
    return scheduler


def cfg_velocity(unet, scaled: torch.Tensor, timestep: torch.Tensor, keyframes: Keyframes,
                 guidance: torch.Tensor) -> torch.Tensor:
    """Returns `u + g_f·(c − u)` from one UNet call on the `[uncond, cond]` batch, as the SVD pipelines do.

    scaled: c_in·x `[B, F, C, h, w]`; guidance `[F]` in the frame order of `scaled`.
    """
    frames = scaled.shape[1]
    image = to_torch(keyframes.image_latent)
    image = torch.cat([torch.zeros_like(image), image])[:, None].repeat(1, frames, 1, 1, 1)
    embeds = torch.from_numpy(keyframes.image_embeds)
    embeds = torch.cat([torch.zeros_like(embeds), embeds])
    time_ids = torch.from_numpy(np.concatenate([keyframes.added_time_ids] * 2))
    with torch.no_grad():
        v = unet(torch.cat([torch.cat([scaled] * 2), image], dim=2), timestep, encoder_hidden_states=embeds,
                 added_time_ids=time_ids).sample
    uncond, cond = v.chunk(2)
    return uncond + guidance[None, :, None, None, None] * (cond - uncond)


def gi_oracle(forward, backward, start: Keyframes, end: Keyframes, draws, gi: GIConfig) -> np.ndarray:
    """GI's `keyframe_interpolation.py` loop (algorithms.md §3.3) with injected noise; returns `[B, F, h, w, C]`.

    Per evaluation the forward UNet captures its temporal attn1 probabilities, the backward UNet gets
    them rotated by 180° in place of its own; v = w·v_f + (1 − w)·flip_t(v_b); Euler step. Step i is
    re-run `noise_injection_steps` times (first `int(N·ratio)` steps), each after adding
    √(σ_i² − σ_{i+1}²)·n with n the draw of that move.
    """
    scheduler = svd_scheduler(gi.num_steps, gi.sigma_min)
    per_frame = torch.linspace(gi.min_guidance_scale, gi.max_guidance_scale, gi.num_frames)
    if gi.weighted_average:
        guidance, w = per_frame, torch.linspace(1, 0, gi.num_frames)
    else:
        guidance, w = (per_frame + per_frame.flip(0)) / 2, torch.full((gi.num_frames,), 0.5)
    w = w[None, :, None, None, None]

    def fused_v(x, i):
        scheduler._step_index = i
        t = scheduler.timesteps[i]
        scaled = scheduler.scale_model_input(x, t)
        maps: dict[str, np.ndarray] = {}
        with temporal_processors(forward, lambda name: CaptureProcessor(maps, name)):
            v_forward = cfg_velocity(forward, scaled, t, start, guidance)
        rotated = {name: np.flip(p, axis=(-2, -1)) for name, p in maps.items()}
        with temporal_processors(backward, lambda name: InjectProcessor(rotated[name])):
            v_backward = cfg_velocity(backward, flip_t(scaled), t, end, guidance)
        return w * v_forward + (1 - w) * flip_t(v_backward)

    x = to_torch(draws.initial) * scheduler.init_noise_sigma
    move = 0
    for i in range(gi.num_steps):
        repeats = gi.noise_injection_steps if i < int(gi.num_steps * gi.noise_injection_ratio) else 0
        for repeat in range(1 + repeats):
            if repeat:
                sigma, sigma_next = scheduler.sigmas[i].double(), scheduler.sigmas[i + 1].double()
                x = x + float((sigma**2 - sigma_next**2).sqrt()) * to_torch(draws.moves[move])
            v = fused_v(x, i)
            scheduler._step_index = i  # GI's scheduler does not advance by itself: repeats reuse σ_i
            x = scheduler.step(v, scheduler.timesteps[i], x).prev_sample
            move += 1
    assert move == draws.moves.shape[0], "oracle and sampler disagree on the number of moves"
    return to_numpy(x)


def trf_oracle(unet, start: Keyframes, end: Keyframes, draws, trf: TRFConfig) -> np.ndarray:
    """TRF's `pipeline_stable_video_diffusion_re.py` loop (algorithms.md §4.1); returns `[B, F, h, w, C]`.

    Each denoising visit k: one Euler step (CFG linspace(1, 3) per frame) of x on the start keyframe and
    one of flip_t(x) on the end keyframe, the UNet input scaled once per visit; fused
    w ⊙ x_f + flip_t(w ⊙ x_b), w = linspace(1, 0). Undo visits re-noise by ratio·√(σ_last² − σ_{last+1}²)
    each; consecutive undos are folded into one draw of the summed variance (the draw of the denoising
    move that follows them), as jinbetween draws them. faithful: the input is scaled at the scheduler's
    index as the previous step left it (stale after undos); otherwise at k.
    """
    scheduler = svd_scheduler(trf.num_steps, trf.sigma_min)
    sigmas = scheduler.sigmas.double()
    guidance = torch.linspace(trf.min_guidance_scale, trf.max_guidance_scale, trf.num_frames)
    w = torch.linspace(1, 0, trf.num_frames)[None, :, None, None, None]

    visits = jump_schedule(trf.num_steps, trf.repeat_step_ratio, trf.jump_length, trf.jump_n_sample)
    x = to_torch(draws.initial) * scheduler.init_noise_sigma
    last, undo_variance, move = visits[0] - 1, 0.0, 0
    for k in visits:
        if k <= last:
            undo_variance += float(sigmas[last] ** 2 - sigmas[last + 1] ** 2)
            last = k
            continue
        if undo_variance:
            x = x + trf.noise_scale_ratio * float(np.sqrt(undo_variance)) * to_torch(draws.moves[move])
            undo_variance = 0.0
        t = scheduler.timesteps[k]
        if not trf.faithful:
            scheduler._step_index = k
        scaled = scheduler.scale_model_input(x, t)
        paths = []
        for latent, model_input, keyframes in ((x, scaled, start), (flip_t(x), flip_t(scaled), end)):
            v = cfg_velocity(unet, model_input, t, keyframes, guidance)
            scheduler._step_index = k
            paths.append(scheduler.step(v, t, latent).prev_sample)
        x_forward, x_backward = paths
        x = w * x_forward + flip_t(w * x_backward)
        last, move = k, move + 1
    assert move == draws.moves.shape[0], "oracle and sampler disagree on the number of moves"
    return to_numpy(x)


# --------------------------------------------------------------------------------------------------
# GI.

# One program, 3 fused moves, σ 700 → 2 → 0: step 0, step 0 again after re-noising σ1 → σ0 with the injected
# draw of that move, then step 1 (σ_min = 2 so that every evaluation weighs O(1) in the result). Weighted
# averaging (per-frame guidance linspace(1, 3) in each path's own order, fusion w = linspace(1, 0)) rather
# than the symmetric defaults (constant 2.0, w = 0.5), so a wrong frame order anywhere shows; the defaults
# differ only in those two `[F]` arrays, checked against the reference's formulas below. One program
# per sampler keeps the file fast: each is a separate XLA compile (10–15 s on 2 cores).
GI = GIConfig(num_frames=FRAMES, num_steps=2, noise_injection_steps=1, noise_injection_ratio=0.5, sigma_min=2.0,
              weighted_average=True)


def test_gi_default_guidance_and_fusion_weights_are_the_references():
    """Without `--weighted_average` GI averages linspace(1, 3) with its reverse (2.0 everywhere) and fuses 0.5/0.5."""
    gi = GIConfig(num_frames=FRAMES)
    np.testing.assert_allclose(gi.guidance(), np.full(FRAMES, 2.0), rtol=1e-6)
    forward, backward = gi.fusion_weights()
    np.testing.assert_array_equal(forward, np.full(FRAMES, 0.5))
    np.testing.assert_array_equal(backward, np.full(FRAMES, 0.5))


def run_gi(models, keyframes) -> tuple[np.ndarray, Draws]:
    """Returns (jinbetween's GI latents `[B, F, h, w, C]` with the backward delta, the draws it was given)."""
    _, _, unet, delta = models
    start, end = keyframes
    keys, draws = draws_for(len(GI.program()))
    out = sample_gi(unet, start.conditioning(), end.conditioning(), keys, GI,
                    delta={k: jnp.asarray(v) for k, v in delta.items()}, draws=draws)
    return np.asarray(out.latents), draws


def test_gi_matches_torch_oracle(models, keyframes):
    forward, backward, _, _ = models
    actual, draws = run_gi(models, keyframes)
    expected = gi_oracle(forward, backward, *keyframes, draws, GI)
    assert_close(actual, expected, TOL, f"GI ({len(draws.moves)} moves, one re-noised) vs the torch oracle")


def test_gi_oracle_tells_an_ignored_delta_apart(models, keyframes):
    """The comparison above fails if the backward delta were dropped: the base-weights oracle differs ≫ TOL."""
    forward, _, _, _ = models
    actual, draws = run_gi(models, keyframes)
    without_delta = gi_oracle(forward, forward, *keyframes, draws, GI)
    err = relative_error(actual, without_delta)
    assert err > 100 * TOL, f"GI with its backward delta is only {err:.3g} away from the oracle without it"


# --------------------------------------------------------------------------------------------------
# TRF.

# 6 steps, jump point t = 2 (k = 3) jumped once by 2: visits 0 1 2 3 | 2 1 (undos σ4 → σ2) | 2 3 4 5, i.e.
# 8 denoising moves, the first after the undos at σ2 = 40 (faithful: input scaled with c_in(σ4 = 0.29)).
JUMP = dict(num_frames=FRAMES, num_steps=6, repeat_step_ratio=0.4, jump_length=2, jump_n_sample=2,
            noise_scale_ratio=0.95)
TRF_CASES = {
    "jump": TRFConfig(**JUMP),
    "jump_faithful": TRFConfig(**JUMP, faithful=True),
}


def test_trf_oracle_cases_jump_back_two_steps_once():
    visits = jump_schedule(JUMP["num_steps"], JUMP["repeat_step_ratio"], JUMP["jump_length"], JUMP["jump_n_sample"])
    assert visits == [0, 1, 2, 3, 2, 1, 2, 3, 4, 5], f"jump schedule {visits}"


def run_trf(models, keyframes, case: str) -> tuple[np.ndarray, Draws]:
    """Returns (jinbetween's TRF latents `[B, F, h, w, C]`, the draws it was given)."""
    _, _, unet, _ = models
    start, end = keyframes
    trf = TRF_CASES[case]
    keys, draws = draws_for(len(trf.program()))
    out = sample_trf(unet, start.conditioning(), end.conditioning(), keys, trf, draws=draws)
    return np.asarray(out.latents), draws


@pytest.mark.parametrize("case", TRF_CASES)
def test_trf_matches_torch_oracle(models, keyframes, case):
    forward, _, _, _ = models
    actual, draws = run_trf(models, keyframes, case)
    expected = trf_oracle(forward, *keyframes, draws, TRF_CASES[case])
    assert_close(actual, expected, TOL, f"TRF {case} ({len(draws.moves)} moves) vs the torch oracle")


@pytest.mark.parametrize("case, change", [
    pytest.param("jump_faithful", dict(faithful=False), id="stale_input_scaling"),
    pytest.param("jump", dict(noise_scale_ratio=1.0), id="undo_noise_ratio"),
])
def test_trf_oracle_tells_a_changed_setting_apart(models, keyframes, case, change):
    """The comparison above fails if the sampler ignored `change`: that oracle differs from its result ≫ TOL."""
    forward, _, _, _ = models
    actual, draws = run_trf(models, keyframes, case)
    changed = trf_oracle(forward, *keyframes, draws, dataclasses.replace(TRF_CASES[case], **change))
    err = relative_error(actual, changed)
    assert err > 100 * TOL, f"TRF {case} is only {err:.3g} away from the oracle with {change}"
