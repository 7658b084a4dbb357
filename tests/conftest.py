"""Test settings: float32 matmuls at full precision (parity), hypothesis without deadlines (jit compiles), the
`slow` marker on end-to-end modules (the unit loop deselects them), one compilation cache for every process of a run,
and the order in which xdist hands out the modules (pyproject.toml's `--dist loadfile`: a module's tests run in one
worker, so its module-scoped fixtures, models and compiled programs are built once, not once per worker)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JINBETWEEN_COMPILE_CACHE", "off")  # the CLI's cache: tests leave nothing in the user's home
os.environ.setdefault("JINBETWEEN_HASH_CACHE", "off")  # nor hashes of their temporary weights (tests opt in)
# Through the environment, so that the subprocesses that tests start (the CLI, workers, notebook kernels) compile the
# same programs as the test processes and find them in the run's compilation cache.
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

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
    "test_finetune_oracle", "test_fp8", "test_gi_delta", "test_interpolate", "test_kernel_benchmarks",
    "test_mr_catr_oracle", "test_notebooks", "test_perf_harness", "test_pipeline", "test_sampler_oracles",
    "test_sequence_pipeline", "test_toyworld_release", "test_toyworld_train", "test_unet_parity",
    "test_vae_clip_parity",
}
CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


@pytest.hookimpl(trylast=True)  # after pytest's own tmpdir plugin has set up the run's base temp
def pytest_configure(config):
    """Points every process of the run at one persistent cache of compiled programs: xdist workers, notebook
    kernels and the CLI and worker subprocesses inherit it through the environment, so a program that several
    tests or processes compile (a sampler, a fine-tune step or the UNet forward on the same tiny model) is compiled
    once per run and loaded after that. It lives in the run's base temp, fresh for every run, never in the user's
    caches; test_compile_cache.py's processes use their own."""
    if not hasattr(config, "workerinput"):  # the controlling process: xdist starts its workers after this hook
        os.environ[CACHE_ENV] = str(config._tmp_path_factory.getbasetemp() / "jax-compilation-cache")
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_ENV])


def pytest_collection_modifyitems(config, items):
    """Marks the end-to-end modules slow and puts them first (stable otherwise), so that xdist, which hands out
    whole modules in this order (`--no-loadscope-reorder`), starts the long ones while the short ones remain to
    even out the workers' ends."""
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
