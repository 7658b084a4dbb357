"""Samplers: pure functions of (models, keyframe conditioning, PRNG keys, static config) under jax.jit.

`METHODS` lists the inbetweening samplers by their CLI name with the conventions of each method's
official code: its config class, the frame rate it conditions on, and whether the two keyframes
share one noise-augmentation draw.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jinbetween.samplers import gi, mpd, mr_catr, trf, vibid
from jinbetween.samplers.core import Draws, Progress, Sampled, StepProgram, draws_from_keys, per_frame_guidance
from jinbetween.samplers.gi import GIConfig, sample_gi
from jinbetween.samplers.i2v import I2VConfig, sample_i2v
from jinbetween.samplers.mpd import MPDConfig, sample_mpd
from jinbetween.samplers.mr_catr import MRCATRConfig, sample_mr_catr
from jinbetween.samplers.trf import TRFConfig, sample_trf
from jinbetween.samplers.vibid import ViBiDConfig, sample_vibid


@dataclasses.dataclass(frozen=True)
class Method:
    """An inbetweening method: how to configure and call its sampler, and its conditioning conventions."""

    name: str
    config: Callable[..., Any]  # keyword overrides → the sampler's frozen config
    sample: Callable[..., Any]  # (unet, start, end, keys, cfg, *, delta=None, draws=None, progress=None) → Sampled
    fps: float  # frame rate the UNet is conditioned on (fps − 1 is the micro-condition)
    shared_aug_noise: bool  # one noise-augmentation draw for both keyframes (diffusers-based code)
    calls_per_move: dict[int, int]  # UNet calls per move kind
    uses_delta: bool = False


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("gi", GIConfig, sample_gi, fps=7, shared_aug_noise=True, calls_per_move=gi.UNET_CALLS, uses_delta=True),
    Method("trf", TRFConfig, sample_trf, fps=7, shared_aug_noise=True, calls_per_move=trf.UNET_CALLS),
    Method("mpd", MPDConfig, sample_mpd, fps=9, shared_aug_noise=False, calls_per_move=mpd.UNET_CALLS),
    Method("mpd-seq", MPDConfig.sequential, sample_mpd, fps=9, shared_aug_noise=False,
           calls_per_move=mpd.UNET_CALLS),
    Method("vibid", ViBiDConfig, sample_vibid, fps=7, shared_aug_noise=False, calls_per_move=vibid.UNET_CALLS),
    Method("mr-catr", MRCATRConfig, sample_mr_catr, fps=11, shared_aug_noise=False,
           calls_per_move=mr_catr.UNET_CALLS),
)}


def unet_calls(method: str, cfg: Any) -> int:
    """Returns how many UNet evaluations (each on a `[uncond; cond]` batch) `method` makes with `cfg`."""
    program = cfg.program()
    return sum(program.count(kind) * calls for kind, calls in METHODS[method].calls_per_move.items())


__all__ = ["METHODS", "Draws", "GIConfig", "I2VConfig", "MPDConfig", "MRCATRConfig", "Method", "Progress", "Sampled",
           "StepProgram",
           "TRFConfig", "ViBiDConfig", "draws_from_keys", "per_frame_guidance", "sample_gi", "sample_i2v",
           "sample_mpd", "sample_mr_catr", "sample_trf", "sample_vibid", "unet_calls"]
