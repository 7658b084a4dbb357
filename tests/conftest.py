"""Test settings: float32 matmuls at full precision (parity), hypothesis without deadlines (jit compiles), and the
`slow` marker on end-to-end modules (the unit loop deselects them)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JINBETWEEN_COMPILE_CACHE", "off")  # the CLI's cache: tests leave nothing in the user's home
os.environ.setdefault("JINBETWEEN_HASH_CACHE", "off")  # nor hashes of their temporary weights (tests opt in)

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

settings.register_profile("jinbetween", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("jinbetween")

# Test modules that build, convert, train or run whole models end to end against their references, or run the
# notebooks, examples and CLI: marked `slow`. The rest is the unit loop of a few minutes:
# `python -m pytest -m "not slow" -n 2`.
SLOW_MODULES = {
    "test_batch", "test_compile_cache", "test_conversion", "test_examples", "test_faults", "test_finetune_loop",
    "test_finetune_oracle", "test_gi_delta", "test_interpolate", "test_kernel_benchmarks", "test_notebooks",
    "test_perf_harness", "test_pipeline", "test_sampler_oracles", "test_sequence_pipeline", "test_toyworld_release",
    "test_toyworld_train", "test_unet_parity", "test_vae_clip_parity",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
