"""The persistent compilation cache: where it goes, how it is turned off, and that a second process reuses it."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from PIL import Image

from jinbetween import compile_cache
from jinbetween.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# Compiles one program with the cache in the folder that $JINBETWEEN_COMPILE_CACHE names; prints the folder, the
# result, and the cache's hits and misses (JAX's monitoring events).
PROGRAM = """
import jax, jax.monitoring, jax.numpy as jnp
from jinbetween import compile_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
folder = compile_cache.enable()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
value = float(jax.jit(lambda x: jnp.sin(x) @ x)(jnp.arange(16.0).reshape(4, 4)).sum())
print(folder, value, events.count("/jax/compilation_cache/cache_hits"),
      events.count("/jax/compilation_cache/cache_misses"))
"""


def run_program(folder: Path) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JINBETWEEN_COMPILE_CACHE": str(folder), "PYTHONPATH": str(ROOT)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    folder = tmp_path / "cache"
    where, value, hits, misses = run_program(folder)
    assert where == str(folder) and any(folder.iterdir()), "the first process wrote no cache entry"
    assert int(hits) == 0 and int(misses) > 0
    where, value_again, hits, misses = run_program(folder)
    assert value_again == value
    assert int(hits) > 0 and int(misses) == 0, "the second process compiled anew"


def test_off_leaves_jax_alone(monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    assert compile_cache.enable("off") is None
    monkeypatch.setenv(compile_cache.ENV, "OFF")
    assert compile_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir == before


def test_an_unwritable_folder_is_refused_with_the_fix(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="--compile-cache off"):
        compile_cache.enable(blocker / "cache")


def test_the_cli_enables_it_before_running_a_command(tmp_path):
    """Once the arguments pass their checks (a bad one writes nothing, not even the cache folder)."""
    folder = tmp_path / "cli-cache"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "jinbetween.cli", "--compile-cache", str(folder), *args],
                              env=env, capture_output=True, text=True, timeout=300)

    refused = cli("interpolate", str(tmp_path / "missing_a.png"), str(tmp_path / "missing_b.png"), "--out",
                  str(tmp_path / "x.mp4"))
    assert refused.returncode == 2 and "does not exist" in refused.stderr and not folder.exists()
    Image.new("RGB", (128, 128)).save(tmp_path / "a.png")
    (tmp_path / "pairs.jsonl").write_text('{"start": "a.png", "end": "a.png"}\n')
    done = cli("batch", str(tmp_path / "pairs.jsonl"), "--out-dir", str(tmp_path / "out"), "--coordinator-address",
               "nowhere", "--num-processes", "2", "--process-id", "0")  # checked, then refused when it runs
    assert done.returncode == 2 and "HOST:PORT" in done.stderr, done.stderr
    assert folder.is_dir()
