"""Samplers: pure functions of (models, keyframe conditioning, PRNG keys, static config) under jax.jit."""

from jinbetween.samplers.core import denoise, guided_velocity, per_frame_guidance, sampling_progress
from jinbetween.samplers.i2v import I2VConfig, sample_i2v

__all__ = ["I2VConfig", "denoise", "guided_velocity", "per_frame_guidance", "sample_i2v", "sampling_progress"]
