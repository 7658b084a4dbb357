"""Test settings: float32 matmuls at full precision (parity), hypothesis without deadlines (jit compiles)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JINBETWEEN_COMPILE_CACHE", "off")  # the CLI's cache: tests leave nothing in the user's home
os.environ.setdefault("JINBETWEEN_HASH_CACHE", "off")  # nor hashes of their temporary weights (tests opt in)

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

settings.register_profile("jinbetween", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("jinbetween")
