"""GI's backward model as a weight delta: the base UNet plus Δ on its temporal self-attention W_v and W_o.

The backward UNet of Generative Inbetweening differs from SVD only in the `to_v.weight` and `to_out.0.weight` of
the temporal `attn1` layers. A delta maps those diffusers keys
(`down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_v.weight`, ...) to arrays in the NNX layout
(`[in, out]`, float32); `with_delta` adds it to a UNet's parameters inside a jitted program, so a second full UNet
never exists. The keys and shapes come from the module graph (`unet.temporal_attention_channels`); storage is
`jinbetween.weights.delta`.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jinbetween.config import UNetConfig
from jinbetween.errors import KeyMismatchError, ShapeMismatchError
from jinbetween.models.naming import torch_key
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet, temporal_attention_channels

TRAINED_LEAVES = ("to_v.weight", "to_out.0.weight")

Delta = Mapping[str, jax.Array]


def delta_keys(cfg: UNetConfig) -> tuple[str, ...]:
    """Returns the diffusers keys a backward delta changes: W_v and W_o of every temporal attn1 (32 for SVD)."""
    return tuple(f"{layer}.{leaf}" for layer in temporal_attention_channels(cfg) for leaf in TRAINED_LEAVES)


def delta_shapes(cfg: UNetConfig) -> dict[str, tuple[int, int]]:
    """Returns {key: NNX kernel shape [in, out]} of a delta for this config (the layers are square: C → C)."""
    return {f"{layer}.{leaf}": (channels, channels) for layer, channels in temporal_attention_channels(cfg).items()
            for leaf in TRAINED_LEAVES}


def check_delta(delta: Mapping[str, np.ndarray], cfg: UNetConfig, source: str) -> None:
    """Raises KeyMismatchError / ShapeMismatchError unless `delta` has exactly this config's keys and shapes."""
    expected = delta_shapes(cfg)
    missing = sorted(set(expected) - set(delta))
    unexpected = sorted(set(delta) - set(expected))
    if missing or unexpected:
        raise KeyMismatchError(
            f"{source} is not a backward delta for this UNet: missing {missing or 'none'}, unexpected "
            f"{unexpected or 'none'}. A delta holds exactly the {len(expected)} temporal attn1 to_v/to_out.0 "
            "weights of the UNet it was made for.", missing, unexpected)
    wrong = [(k, tuple(np.shape(delta[k])), expected[k]) for k in expected if tuple(np.shape(delta[k])) != expected[k]]
    if wrong:
        raise ShapeMismatchError(f"{source}: delta shapes do not fit this UNet: {wrong}; it was made for "
                                 "another UNet config.", wrong)


def with_delta(unet: ModelState[UNet], delta: Delta | None) -> ModelState[UNet]:
    """Returns the UNet with `delta` added to its W_v/W_o (computed in float32, stored in the parameter dtype).

    Only the delta's tensors are new arrays; every other parameter is shared with `unet`. None returns `unet`.
    """
    if delta is None:
        return unet
    flat = []
    for path, var in nnx.to_flat_state(unet.state):
        key = torch_key(path)
        if key in delta:
            base = var.get_value()
            var = var.replace(value=(base.astype(jnp.float32) + delta[key].astype(jnp.float32)).astype(base.dtype))
        flat.append((path, var))
    return ModelState(unet.graphdef, nnx.from_flat_state(flat))


def delta_between(finetuned: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                  cfg: UNetConfig) -> dict[str, np.ndarray]:
    """Returns Δ = finetuned − base (float32, NNX layout) for the delta keys of `cfg`, given NNX-layout dicts."""
    return {key: np.asarray(finetuned[key], np.float32) - np.asarray(base[key], np.float32) for key in delta_keys(cfg)}
