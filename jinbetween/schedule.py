"""EDM/Karras noise schedule of SVD (diffusers' EulerDiscreteScheduler); the preconditioning is `denoiser`.

The schedule is host-side numpy (computed in float64 like diffusers, then float32); the per-step math
is jnp in float32 and matches the scheduler's operation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_MIN = 0.002
SIGMA_MAX = 700.0
RHO = 7.0


def karras_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> np.ndarray:
    """Returns `[num_steps + 1]` float32 noise levels from sigma_max down to sigma_min, then a final 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}; sampling needs at least one step.")
    ramp = np.linspace(0, 1, num_steps)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return np.append(sigmas.astype(np.float32), np.float32(0))


def timesteps(sigmas: np.ndarray) -> np.ndarray:
    """Returns c_noise of every step (all sigmas but the final 0), float32."""
    return (np.float32(0.25) * np.log(sigmas[:-1].astype(np.float32))).astype(np.float32)


def init_noise_sigma(sigma_max: float = SIGMA_MAX) -> float:
    """Returns √(σmax² + 1): the initial-latent scale for diffusers' "leading" timestep spacing."""
    return float(np.sqrt(np.float32(sigma_max) ** 2 + np.float32(1)))


def euler_step(x: jax.Array, x0: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """Returns x at σ_next by one Euler step of the probability-flow ODE; σ_next = 0 gives x0."""
    return x + (x - x0) * ((sigma_next - sigma) / sigma)


def renoise(x: jax.Array, sigma: jax.Array, sigma_up: jax.Array, noise: jax.Array) -> jax.Array:
    """Returns x moved from noise level σ up to σ_up > σ by adding √(σ_up² − σ²)·noise."""
    return x + jnp.sqrt(sigma_up**2 - sigma**2) * noise
