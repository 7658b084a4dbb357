"""The denoiser layer: the guided batch is the two single evaluations, GI's pair is a capture then an injection of
the rotated maps, and the EDM loss is its formula. A tiny random UNet stands in for SVD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jinbetween import config, denoiser
from jinbetween.conditioning import Conditioning
from jinbetween.models import UNet
from jinbetween.models.attention import AttnControl, rot180
from jinbetween.models.state import ModelState
from tests.helpers import assert_close

F, LATENT = 4, (8, 8, 4)
TOL = 1e-5


@pytest.fixture(scope="module")
def unet() -> ModelState[UNet]:
    return ModelState.of(UNet(config.tiny(), rngs=nnx.Rngs(0)))


def conditioning(seed: int) -> Conditioning:
    rng = np.random.default_rng(seed)
    return Conditioning(
        image_embeds=jnp.asarray(rng.standard_normal((1, 1, config.tiny().cross_attention_dim[0])), jnp.float32),
        image_latent=jnp.asarray(rng.standard_normal((1, *LATENT)), jnp.float32),
        clean_latent=jnp.asarray(rng.standard_normal((1, *LATENT)), jnp.float32),
        added_time_ids=jnp.asarray([[6.0, 127.0, 0.02]], jnp.float32))


def latents(seed: int) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (1, F, *LATENT)) * 3


def test_guided_evaluation_is_the_unconditional_then_the_conditional_one(unet):
    cond, x, sigma = conditioning(1), latents(2), jnp.float32(3.0)
    unconditional = Conditioning(jnp.zeros_like(cond.image_embeds), jnp.zeros_like(cond.image_latent),
                                 cond.clean_latent, cond.added_time_ids)
    both, maps = jax.jit(lambda x: denoiser.velocity(unet, x, sigma, cond, guided=True))(x)
    assert maps == {}
    alone = [jax.jit(lambda x, c=c: denoiser.velocity(unet, x, sigma, c)[0])(x) for c in (unconditional, cond)]
    assert_close(both, jnp.concatenate(alone), TOL, "[uncond; cond] batch against two single evaluations")


def test_paired_evaluation_injects_the_forward_maps_rotated(unet):
    start, end, x, sigma = conditioning(1), conditioning(2), latents(3), jnp.float32(3.0)
    pair = jax.jit(lambda x: denoiser.paired_velocity(unet, unet, x, sigma, start, end))(x)

    def by_hand(x):
        v_forward, maps = denoiser.velocity(unet, x, sigma, start, attn=AttnControl.capture())
        v_backward, _ = denoiser.velocity(unet, denoiser.flip_time(x), sigma, end,
                                          attn=AttnControl.inject(rot180(maps)))
        return v_forward, v_backward

    for ours, expected, what in zip(pair, jax.jit(by_hand)(x), ("forward", "backward")):
        assert_close(ours, expected, TOL, f"{what} v of the pair")


def test_edm_loss_is_the_weighted_mean_of_the_clip_errors():
    rng = np.random.default_rng(0)
    x0, target = (rng.standard_normal((3, F, *LATENT)).astype(np.float32) for _ in range(2))
    sigma = np.asarray([0.1, 1.0, 20.0], np.float32)
    loss, error = denoiser.edm_loss(jnp.asarray(x0), jnp.asarray(target), jnp.asarray(sigma))
    expected_error = ((x0.astype(np.float64) - target) ** 2).mean(axis=(1, 2, 3, 4))
    np.testing.assert_allclose(error, expected_error, rtol=1e-6)
    np.testing.assert_allclose(loss, np.mean((1 + sigma.astype(np.float64) ** 2) / sigma**2 * expected_error),
                               rtol=1e-6)
