"""The pre-Ampere fallbacks (DESIGN, "Precision"): fp16 parameters and XLA attention on GPUs without bf16 tensor
cores or cuDNN flash attention, with a fake GPU so that the choice is tested on CPU."""

import types

import jax
import jax.numpy as jnp
import pytest

from jinbetween import hardware, pipeline
from jinbetween.errors import ConfigError
from jinbetween.models.attention import resolve_attention_impl


@pytest.fixture
def fake_gpu(monkeypatch):
    """Makes jax report one GPU of the given compute capability (a string, as jax's devices give it)."""
    def use(capability: str | None) -> None:
        device = types.SimpleNamespace(compute_capability=capability)
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        monkeypatch.setattr(jax, "local_devices", lambda: [device])
    return use


@pytest.mark.parametrize("capability, expected", [("7.5", (7, 5)), ("9.0", (9, 0)), ("12.0", (12, 0)),
                                                  (None, None)])
def test_compute_capability_is_parsed(fake_gpu, capability, expected):
    fake_gpu(capability)
    assert hardware.gpu_compute_capability() == expected


def test_cpu_is_not_a_modern_gpu():
    assert jax.default_backend() == "cpu" and not hardware.modern_gpu() and not hardware.hopper_gpu()
    assert resolve_attention_impl("auto", jnp.bfloat16, 64) == "xla_chunked"
    assert pipeline.default_dtype() == jnp.float32


@pytest.mark.parametrize("capability, attention, dtype, hopper", [("7.5", "xla_chunked", jnp.float16, False),
                                                                  ("7.0", "xla_chunked", jnp.float16, False),
                                                                  ("8.0", "cudnn", jnp.bfloat16, False),
                                                                  ("9.0", "cudnn", jnp.bfloat16, True),
                                                                  ("12.0", "cudnn", jnp.bfloat16, True),
                                                                  (None, "cudnn", jnp.bfloat16, False)])
def test_auto_choices_follow_the_gpu_generation(fake_gpu, capability, attention, dtype, hopper):
    fake_gpu(capability)
    assert resolve_attention_impl("auto", jnp.bfloat16, 64) == attention
    assert pipeline.default_dtype() == dtype
    assert hardware.hopper_gpu() == hopper  # the temporal-attention kernel's "auto"


def test_cudnn_on_an_old_gpu_is_refused_with_the_fix(fake_gpu):
    fake_gpu("7.5")
    with pytest.raises(ConfigError, match="Ampere or newer.*attention_impl='auto'"):
        resolve_attention_impl("cudnn", jnp.float16, 64)
    assert resolve_attention_impl("xla", jnp.float16, 64) == "xla"
