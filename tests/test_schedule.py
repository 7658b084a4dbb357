"""The EDM schedule and Euler step against diffusers' EulerDiscreteScheduler with SVD's config."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from jinbetween import denoiser, schedule

from tests.torch_reference import SVD_SCHEDULER


def svd_scheduler(num_steps: int):
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(SVD_SCHEDULER)
    scheduler.set_timesteps(num_steps)
    return scheduler


@pytest.mark.parametrize("num_steps", [2, 7, 25, 50])
def test_sigmas_and_timesteps_equal_diffusers(num_steps):
    scheduler = svd_scheduler(num_steps)
    sigmas = schedule.karras_sigmas(num_steps)
    np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())
    np.testing.assert_allclose(schedule.timesteps(sigmas), scheduler.timesteps.numpy(), rtol=1e-6, atol=0)
    assert np.float32(schedule.init_noise_sigma()) == np.float32(scheduler.init_noise_sigma)


def test_published_values():
    sigmas = schedule.karras_sigmas(25)
    np.testing.assert_allclose(sigmas[:3], [700.0, 545.73, 421.57], rtol=1e-4)
    assert sigmas[-2] == np.float32(0.002) and sigmas[-1] == 0
    np.testing.assert_allclose(schedule.timesteps(sigmas)[[0, -1]], [1.63777, -1.55365], rtol=1e-5)


@pytest.mark.parametrize("step_index", [0, 3, 6])
def test_euler_step_equals_scheduler_step(step_index):
    scheduler = svd_scheduler(7)
    scheduler._step_index = step_index
    rng = np.random.default_rng(step_index)
    x, v = (rng.standard_normal((2, 3, 4, 5)).astype(np.float32) * 50 for _ in range(2))
    expected = scheduler.step(torch.from_numpy(v), scheduler.timesteps[step_index], torch.from_numpy(x)).prev_sample
    sigma, sigma_next = scheduler.sigmas[step_index].item(), scheduler.sigmas[step_index + 1].item()
    x0 = denoiser.denoised(jnp.asarray(x), jnp.asarray(v), jnp.float32(sigma))
    out = schedule.euler_step(jnp.asarray(x), x0, jnp.float32(sigma), jnp.float32(sigma_next))
    np.testing.assert_allclose(np.asarray(out), expected.numpy(), rtol=1e-5, atol=1e-5 * np.abs(x).max())


def test_last_step_lands_on_the_denoised_estimate():
    x, x0 = jnp.arange(6.0), jnp.linspace(-1, 1, 6)
    np.testing.assert_allclose(schedule.euler_step(x, x0, jnp.float32(0.002), jnp.float32(0)), x0, atol=1e-6)


@given(st.floats(0.01, 100), st.floats(1.0, 10.0))
def test_renoise_adds_exactly_the_missing_variance(sigma, factor):
    sigma_up = sigma * factor
    noise = jnp.ones(())
    added = schedule.renoise(jnp.zeros(()), jnp.float32(sigma), jnp.float32(sigma_up), noise)
    np.testing.assert_allclose(float(added) ** 2 + sigma**2, sigma_up**2, rtol=1e-4)
