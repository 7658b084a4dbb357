"""What the accelerator can do: bf16 tensor cores and cuDNN flash attention need an NVIDIA GPU of compute
capability 8.0 or newer (Ampere); older GPUs (T4, V100) run fp16 parameters and XLA attention instead."""

from __future__ import annotations

import functools
import logging

import jax

log = logging.getLogger(__name__)

AMPERE = (8, 0)
HOPPER = (9, 0)


def gpu_compute_capability() -> tuple[int, int] | None:
    """Returns the first local GPU's compute capability `(major, minor)`, or None off GPU (or if unreported)."""
    if jax.default_backend() != "gpu":
        return None
    reported = getattr(jax.local_devices()[0], "compute_capability", None)
    try:
        major, minor = str(reported).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def modern_gpu() -> bool:
    """Whether the backend is a GPU with bf16 tensor cores and cuDNN flash attention (Ampere or newer); a GPU that
    does not report its capability counts as modern, as JAX's own defaults assume."""
    if jax.default_backend() != "gpu":
        return False
    capability = gpu_compute_capability()
    return capability is None or capability >= AMPERE


def hopper_gpu() -> bool:
    """Whether the backend is a GPU of compute capability 9.0 or newer (H100, H200), where jinbetween's own Pallas
    kernels were measured faster than XLA; a GPU that does not report its capability does not count."""
    capability = gpu_compute_capability()
    return capability is not None and capability >= HOPPER


def require_triton_gpu(switch: str) -> None:
    """Raises ConfigError unless a Pallas (Triton) kernel can run here: `switch` is the config field that asked
    for one, named in the message with its XLA alternative."""
    if not modern_gpu():
        from jinbetween.errors import ConfigError

        raise ConfigError(f"{switch}='pallas' compiles a Triton kernel for NVIDIA GPUs (Ampere or newer); the "
                          f"backend here is {jax.default_backend()}: use {switch}='xla'.")


@functools.cache
def note_old_gpu(what: str) -> None:
    """Logs once per `what` that a pre-Ampere GPU made jinbetween fall back."""
    log.info("GPU of compute capability %s (before Ampere): %s", gpu_compute_capability(), what)
