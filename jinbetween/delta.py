"""GI's backward model as a weight delta: the base UNet plus Δ on its temporal self-attention W_v and W_o.

The backward UNet of Generative Inbetweening differs from SVD only in the `to_v.weight` and
`to_out.0.weight` of the 16 temporal `attn1` layers. A delta maps those diffusers keys
(`down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_v.weight`, ...) to arrays in the
NNX layout (`[in, out]`, float32); `with_delta` adds it to a UNet's parameters inside a jitted program,
so a second full UNet never exists. The GI conversion (`convert_weights.py --gi-unet`) and the
fine-tune both write this format with `save_delta`; `Pipeline` reads it with `load_delta`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jinbetween import atomic, integrity
from jinbetween.checkpoint import restore_tree, save_tree
from jinbetween.config import UNetConfig
from jinbetween.errors import (CorruptWeightsError, KeyMismatchError, NonFiniteWeightsError, ShapeMismatchError,
                               WeightsNotFoundError)
from jinbetween.models.state import ModelState
from jinbetween.models.unet import UNet, temporal_attention_layers

BACKWARD_DELTA = "gi_backward"
DELTA_FORMAT_VERSION = 1
_META = "delta.json"
_TRAINED = ("to_v.weight", "to_out.0.weight")

Delta = Mapping[str, jax.Array]


def delta_keys(cfg: UNetConfig) -> tuple[str, ...]:
    """Diffusers keys of the tensors a backward delta changes: W_v and W_o of every temporal attn1 (32 for SVD)."""
    return tuple(f"{layer}.{leaf}" for layer in temporal_attention_layers(cfg) for leaf in _TRAINED)


def delta_shapes(cfg: UNetConfig) -> dict[str, tuple[int, int]]:
    """{key: NNX kernel shape [in, out]} of a delta for this config (the layers are square: C → C)."""
    channels = {f"down_blocks.{i}": c for i, c in enumerate(cfg.block_out_channels)}
    channels["mid_block"] = cfg.block_out_channels[-1]
    channels.update({f"up_blocks.{i}": c for i, c in enumerate(reversed(cfg.block_out_channels))})
    return {key: (channels[key.split(".attentions")[0]],) * 2 for key in delta_keys(cfg)}


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


def _nnx_paths(unet: ModelState[UNet]) -> dict[str, tuple]:
    from jinbetween.conversion import torch_key

    return {torch_key(path): path for path, _ in nnx.to_flat_state(unet.state)}


def with_delta(unet: ModelState[UNet], delta: Delta | None) -> ModelState[UNet]:
    """Returns the UNet with `delta` added to its W_v/W_o (computed in float32, stored in the parameter dtype).

    Only the delta's tensors are new arrays; every other parameter is shared with `unet`. None returns `unet`.
    """
    if delta is None:
        return unet
    paths = _nnx_paths(unet)
    updates = {paths[key]: value for key, value in delta.items()}
    flat = []
    for path, var in nnx.to_flat_state(unet.state):
        if path in updates:
            base = var.get_value()
            var = var.replace(value=(base.astype(jnp.float32) + updates[path].astype(jnp.float32)).astype(base.dtype))
        flat.append((path, var))
    return ModelState(unet.graphdef, nnx.from_flat_state(flat))


def delta_between(finetuned: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                  cfg: UNetConfig) -> dict[str, np.ndarray]:
    """Returns Δ = finetuned − base (float32, NNX layout) for the delta keys of `cfg`, given NNX-layout dicts."""
    return {key: np.asarray(finetuned[key], np.float32) - np.asarray(base[key], np.float32) for key in delta_keys(cfg)}


def _nonfinite(delta: Mapping[str, np.ndarray]) -> list[str]:
    return sorted(key for key, value in delta.items() if not np.isfinite(np.asarray(value)).all())


def _refuse_nonfinite(tensors: list[str], where: str, fix: str) -> None:
    shown = ", ".join(tensors[:3]) + (f" and {len(tensors) - 3} more" if len(tensors) > 3 else "")
    raise NonFiniteWeightsError(f"The backward delta {where} holds NaN or Inf in {len(tensors)} tensor(s): {shown}; "
                                f"{fix}.", tensors)


def save_delta(path: str | os.PathLike, delta: Mapping[str, np.ndarray], cfg: UNetConfig, **meta) -> Path:
    """Writes a delta checkpoint (orbax tree + delta.json with the UNet config, `meta` and the sha256 of the tree's
    files) atomically, replacing `path`; returns `path`. A delta holding NaN or Inf is refused."""
    path = Path(path)
    check_delta(delta, cfg, str(path))
    delta = {key: np.asarray(value, np.float32) for key, value in delta.items()}
    nonfinite = _nonfinite(delta)
    if nonfinite:
        _refuse_nonfinite(nonfinite, f"for {path}", "it was not written: the training diverged, lower the learning "
                          "rate or resume from an earlier checkpoint")
    with atomic.replacing_dir(path) as staging:
        save_tree(staging / "tree", delta)
        record = {"format_version": DELTA_FORMAT_VERSION, "keys": sorted(delta), "unet_config": cfg.to_diffusers(),
                  **meta, "sha256": integrity.hash_files(staging, integrity.files_under(staging))}
        atomic.write_json(staging / _META, record)
    return path


def load_delta(path: str | os.PathLike, cfg: UNetConfig, *, verify: bool = True) -> dict[str, jax.Array]:
    """Returns the delta saved at `path` (float32), checked against the UNet config it will be added to, against the
    sha256 of its files when delta.json records them (deltas written since they do; `verify=False` skips that) and
    for NaN or Inf."""
    path = Path(path)
    if not (path / _META).exists():
        raise WeightsNotFoundError(
            f"{path} holds no backward delta ({_META} missing). Convert GI's released UNet with "
            "`python convert_weights.py --gi-unet PATH/unet --gi-base stabilityai/stable-video-diffusion-img2vid "
            "--out weights/NAME`, or train one with `jinbetween finetune`.")
    try:
        record = json.loads((path / _META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptWeightsError(f"{path / _META} is unreadable ({err}); write the delta again.") from err
    if record.get("format_version") != DELTA_FORMAT_VERSION:
        raise CorruptWeightsError(f"{path} has delta format {record.get('format_version')}, this jinbetween reads "
                                  f"{DELTA_FORMAT_VERSION}; write the delta again.")
    shapes = delta_shapes(cfg)
    if sorted(record.get("keys", [])) != sorted(shapes):
        check_delta({k: np.zeros(0) for k in record.get("keys", [])}, cfg, str(path))
    if verify and "sha256" in record:
        integrity.verify_files(path, record["sha256"], what="the backward delta's files",
                               fix="write or convert the delta again, or skip this check with --no-verify "
                                   "(verify=False)")
    abstract = {key: jax.ShapeDtypeStruct(shape, jnp.float32) for key, shape in shapes.items()}
    try:
        delta = restore_tree(path / "tree", abstract)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise CorruptWeightsError(f"Cannot restore the delta at {path} ({err}); write it again.") from err
    nonfinite = _nonfinite(delta)
    if nonfinite:
        _refuse_nonfinite(nonfinite, f"at {path}", "write, convert or train it again")
    return delta
