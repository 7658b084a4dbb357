"""FP8 (e4m3) inference of the UNet: per-tensor scaled matmuls and convolutions, for Hopper GPUs.

`quantize_unet(unet, input_amax)` returns a copy of a UNet whose large linear layers and convolutions take e4m3
operands, each with one float32 scale: a weight's from its own max |w|, an input's from the max |x| that
`calibrate` recorded on UNet calls in the model's own dtype. Every product is written as
`dequantize(quantize(x)) · dequantize(w)`, the pattern that XLA's GPU compiler turns into one FP8 cuBLASLt GEMM
(or cuDNN FP8 convolution) with the scales folded in, on compute capability 9.0 or newer. On any other backend
the same arithmetic runs in the model's dtype: the values are those of FP8, which is how the CPU tests measure
its error, but nothing is faster (the CLI's `--precision fp8` refuses to run there).

Which layers stay in the model's dtype is a list of path rules (`RULES`), and every linear layer and convolution
of the UNet must match exactly one rule: the first and last convolutions, the embeddings of time and
conditioning (a few rows each), cross-attention (SVD's context is one token: its query projection is skipped and
the others see one row per video), and the temporal
attn1 W_v / W_o that GI's backward delta adds to (`jinbetween.models.delta`).
"""

from __future__ import annotations

import fnmatch
import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jinbetween.errors import ConfigError
from jinbetween.models.layers import TemporalConv
from jinbetween.models.naming import torch_key

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(E4M3).max)
# cuBLASLt's FP8 GEMMs need every matrix dimension to be a multiple of 16; XLA keeps other shapes in bf16.
FP8_DIM_MULTIPLE = 16

# (pattern on the layer's diffusers name, quantized?) — the first pattern that matches decides.
RULES: tuple[tuple[str, bool], ...] = (
    ("conv_in", False),
    ("conv_out", False),
    ("time_embedding.*", False),
    ("add_embedding.*", False),
    ("*.time_pos_embed.*", False),
    ("*time_emb_proj", False),
    ("*.attn2.*", False),
    ("*temporal_transformer_blocks.*.attn1.to_v", False),
    ("*temporal_transformer_blocks.*.attn1.to_out.0", False),
    ("*", True),
)

Layer = nnx.Linear | nnx.Conv | TemporalConv


def tensor_scale(amax: jax.Array | float) -> jax.Array:
    """Returns the float32 scale that maps max |x| = `amax` onto e4m3's largest value (1 when amax is 0)."""
    amax = jnp.asarray(amax, jnp.float32)
    return jnp.where(amax > 0, amax / E4M3_MAX, 1.0)


def quantize(x: jax.Array, scale: jax.Array) -> jax.Array:
    """Returns x / scale in e4m3, saturated at ±448 (round to nearest even)."""
    return jnp.clip(x.astype(jnp.float32) / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """Returns e4m3 `q` times its scale, in `dtype`."""
    return q.astype(dtype) * scale.astype(dtype)


def fake_quantize(x: jax.Array, scale: jax.Array) -> jax.Array:
    """Returns x rounded through e4m3 at `scale`, in x's dtype: an FP8 GEMM's view of its input."""
    return dequantize(quantize(x, scale), scale, x.dtype)


class Fp8Linear(nnx.Module):
    """A linear layer with an e4m3 kernel and e4m3 inputs, one scale each; bias and output in the input dtype."""

    def __init__(self, linear: nnx.Linear, input_amax: jax.Array | float):
        kernel = linear.kernel[...]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel_scale = nnx.Param(tensor_scale(jnp.max(jnp.abs(kernel.astype(jnp.float32)))))
        self.kernel = nnx.Param(quantize(kernel, self.kernel_scale[...]))
        self.input_scale = nnx.Param(tensor_scale(input_amax))
        self.bias = None if linear.bias is None else nnx.Param(linear.bias[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.dot_general(fake_quantize(x, self.input_scale[...]),
                                dequantize(self.kernel[...], self.kernel_scale[...], x.dtype),
                                (((x.ndim - 1,), (0,)), ((), ())))
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class Fp8Conv(nnx.Module):
    """A channels-last convolution (nnx.Conv's 2-D case, or TemporalConv's frames-as-height one) with an e4m3
    kernel and e4m3 inputs, one scale each."""

    def __init__(self, conv: nnx.Conv | TemporalConv, input_amax: jax.Array | float):
        kernel = conv.kernel[...]
        self.temporal = isinstance(conv, TemporalConv)
        if self.temporal:
            kernel = kernel[:, 0]  # (3, 1, in, out): frames as the height of a 2-D convolution
            self.strides, self.padding = (1, 1), ((1, 1), (0, 0))
        else:
            strides = conv.strides
            self.strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
            self.padding = tuple(tuple(p) for p in conv.padding)
        self.kernel_scale = nnx.Param(tensor_scale(jnp.max(jnp.abs(kernel.astype(jnp.float32)))))
        self.kernel = nnx.Param(quantize(kernel, self.kernel_scale[...]))
        self.input_scale = nnx.Param(tensor_scale(input_amax))
        self.bias = nnx.Param(conv.bias[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        if self.temporal:  # [B, F, H, W, C] -> [B, F, H·W, C]
            x = x.reshape(shape[0], shape[1], shape[2] * shape[3], shape[4])
        out = jax.lax.conv_general_dilated(
            fake_quantize(x, self.input_scale[...]), dequantize(self.kernel[...], self.kernel_scale[...], x.dtype),
            window_strides=self.strides, padding=self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        out = out + self.bias[...].astype(x.dtype)
        return out.reshape(*shape[:-1], -1) if self.temporal else out


def layer_name(path: tuple) -> str:
    """Returns a layer's diffusers name from its NNX path (`down_blocks.0.attentions.0.proj_in`)."""
    return torch_key((*path, "bias")).removesuffix(".bias")


def rule_for(name: str) -> bool:
    """Returns whether the layer named `name` is quantized (the first matching rule of `RULES`)."""
    return next(quantized for pattern, quantized in RULES if fnmatch.fnmatchcase(name, pattern))


def _fits_fp8(layer: Layer) -> bool:
    kernel = layer.kernel
    return kernel.shape[-1] % FP8_DIM_MULTIPLE == 0 and kernel.shape[-2] % FP8_DIM_MULTIPLE == 0


def layers(unet: nnx.Module) -> dict[str, Layer]:
    """Returns {diffusers name: layer} of every linear layer and convolution of `unet`."""
    return {layer_name(path): module for path, module in nnx.iter_modules(unet)
            if isinstance(module, (nnx.Linear, nnx.Conv, TemporalConv))}


def quantized_layers(unet: nnx.Module) -> dict[str, Layer]:
    """Returns {name: layer} of the layers that `quantize_unet` turns into FP8 (the rules, and shapes cuBLASLt
    takes)."""
    return {name: layer for name, layer in layers(unet).items() if rule_for(name) and _fits_fp8(layer)}


class _AmaxProbe(nnx.Module):
    """Runs `layer` and sends max |input| to `sink(name, value)` on the host (calibration only). A host callback,
    not a Variable, so that the maxima come back from inside `jax.jit` and `lax.scan` too (a sampler's loop)."""

    def __init__(self, layer: Layer, name: str, sink: Callable[[str, np.ndarray], None]):
        self.layer, self.name, self.sink = layer, name, sink

    def __call__(self, x: jax.Array) -> jax.Array:
        jax.debug.callback(functools.partial(self.sink, self.name), jnp.max(jnp.abs(x.astype(jnp.float32))))
        return self.layer(x)


def _replace(root: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = root
    for step in path[:-1]:
        parent = parent[step] if isinstance(step, int) else getattr(parent, step)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def _paths(unet: nnx.Module, names: set[str]) -> dict[str, tuple]:
    return {layer_name(path): path for path, module in nnx.iter_modules(unet)
            if isinstance(module, (nnx.Linear, nnx.Conv, TemporalConv)) and layer_name(path) in names}


def calibrate(unet: nnx.Module, run: Callable[[nnx.Module], object]) -> dict[str, float]:
    """Returns {layer name: max |input|} of the layers `quantize_unet` quantizes, over every UNet call that
    `run(model)` makes with a probed copy of `unet` (eagerly, or jitted: a short sampling run in the model's dtype
    is the intended calibration). `unet` is left unchanged."""
    maxima: dict[str, float] = {}

    def sink(name: str, value: np.ndarray) -> None:
        maxima[name] = max(maxima.get(name, 0.0), float(value))

    probed = nnx.clone(unet)
    targets = quantized_layers(probed)
    for name, path in _paths(probed, set(targets)).items():
        _replace(probed, path, _AmaxProbe(targets[name], name, sink))
    run(probed)
    jax.effects_barrier()
    missing = sorted(set(targets) - set(maxima))
    if missing:
        raise ConfigError(f"calibration made no UNet call through {len(missing)} FP8 layers ({missing[:3]}...): "
                          "run the UNet it is given at least once.")
    return maxima


def quantize_unet(unet: nnx.Module, input_amax: Mapping[str, float]) -> nnx.Module:
    """Returns a copy of `unet` with every layer of `quantized_layers` in FP8 at the calibrated input maxima."""
    if getattr(unet.config, "feedforward_impl", "xla") == "pallas":
        raise ConfigError("precision='fp8' runs the feed-forward projections as FP8 GEMMs, which the fused Pallas "
                          "GEGLU kernel does not take: use feedforward_impl='xla' with fp8.")
    quantized = nnx.clone(unet)
    targets = quantized_layers(quantized)
    missing = sorted(set(targets) - set(input_amax))
    if missing:
        raise ConfigError(f"FP8 scales are missing for {len(missing)} layers ({missing[:3]}...): calibrate this "
                          "UNet (jinbetween.models.fp8.calibrate) rather than reusing another model's scales.")
    for name, path in _paths(quantized, set(targets)).items():
        layer = targets[name]
        new = Fp8Linear(layer, input_amax[name]) if isinstance(layer, nnx.Linear) else Fp8Conv(layer, input_amax[name])
        _replace(quantized, path, new)
    return quantized


__all__ = ["E4M3", "E4M3_MAX", "RULES", "Fp8Conv", "Fp8Linear", "calibrate", "dequantize", "fake_quantize",
           "layer_name", "layers", "quantize", "quantize_unet", "quantized_layers",
           "rule_for", "tensor_scale"]
