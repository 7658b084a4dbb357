"""`jinbetween.flops.count_flops`: exact counts of small programs, loops and branches, and agreement with PyTorch's
FlopCounterMode on the tiny UNet and VAE decoder (the rule bench/perf.py relies on to compare TFLOP/s)."""

import functools

import jax
import jax.numpy as jnp
import pytest
import torch
from flax import nnx
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from jinbetween import config
from jinbetween.flops import count_flops
from jinbetween.models import abstract_unet, abstract_vae, unet_apply
from jinbetween.models.vae import _decode_video
from tests.torch_reference import diffusers_unet, diffusers_vae

S = jax.ShapeDtypeStruct


def test_matmul_and_batched_matmul():
    assert count_flops(jnp.matmul, S((3, 4, 5), jnp.float32), S((5, 6), jnp.float32)).total == 2 * 3 * 4 * 6 * 5
    einsum = functools.partial(jnp.einsum, "bqd,bkd->bqk")
    assert count_flops(einsum, S((2, 7, 8), jnp.float32), S((2, 9, 8), jnp.float32)).total == 2 * 2 * 7 * 9 * 8


def test_grouped_convolution():
    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=2)

    count = count_flops(conv, S((1, 8, 10, 6), jnp.float32), S((3, 3, 3, 4), jnp.float32))
    assert count.by_primitive == {"conv_general_dilated": 2 * (1 * 4 * 5 * 4) * (3 * 3 * 3)}


def test_loops_multiply_and_branches_take_the_larger():
    w = S((16, 16), jnp.float32)
    one = 2 * 16 * 16 * 16

    def scanned(w):
        return jax.lax.scan(lambda x, _: (x @ w, None), jnp.ones((16, 16)), None, length=7)[0]

    assert count_flops(scanned, w).total == 7 * one
    assert count_flops(lambda w: jax.lax.map(lambda x: x @ w, jnp.ones((5, 16, 16))), w).total == 5 * one
    assert count_flops(lambda w: jax.lax.fori_loop(0, 3, lambda i, x: x @ w, jnp.ones((16, 16))), w).total == 3 * one

    def branch(p, w):
        return jax.lax.cond(p, lambda: w @ w @ w, lambda: w @ w)

    branched = count_flops(branch, S((), jnp.bool_), w)
    assert (branched.total, branched.conds, branched.exact) == (2 * one, 1, False)
    assert count_flops(scanned, w).exact
    unknown = count_flops(lambda w, n: jax.lax.while_loop(lambda c: c[1] < n, lambda c: (c[0] @ w, c[1] + 1),
                                                          (w, 0))[0], w, S((), jnp.int32))
    assert (unknown.total, unknown.while_loops) == (one, 1)


def _torch_flops(fn) -> dict[str, int]:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # CPU attention counted as bmm
        with torch.no_grad():
            fn()
    return {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("batch", [1, 2])
def test_unet_count_equals_torch_flop_counter(batch):
    cfg = config.tiny().replace(cross_attention_shortcut=False, attention_impl="xla")
    f, h, w = 3, 8, 12
    graphdef, state = nnx.split(abstract_unet(cfg))
    ours = count_flops(functools.partial(unet_apply, graphdef), state, S((batch, f, h, w, 8), jnp.float32),
                       S((batch,), jnp.float32), S((batch, 1, 32), jnp.float32), S((batch, 3), jnp.float32))

    unet = diffusers_unet(cfg)
    theirs = _torch_flops(lambda: unet(torch.randn(batch, f, 8, h, w), torch.ones(batch), torch.randn(batch, 1, 32),
                                       torch.ones(batch, 3)))
    assert ours.by_primitive["conv_general_dilated"] == theirs["aten.convolution"]
    # diffusers embeds the frame index once per (video, frame) row, jinbetween once per frame and broadcasts:
    # TimestepEmbedding(c, 4c, c) costs 16·c² per row in each TransformerSpatioTemporalModel.
    transformer_channels = [32, 32, 32, 64]  # down_blocks.0, up_blocks.1 (two), mid_block
    redundant = sum((batch - 1) * f * 16 * c * c for c in transformer_channels)
    torch_matmuls = sum(v for k, v in theirs.items() if k != "aten.convolution")
    assert ours.by_primitive["dot_general"] + redundant == torch_matmuls


def test_unet_shortcut_saves_the_single_token_cross_attention():
    args = (S((2, 3, 8, 12, 8), jnp.float32), S((2,), jnp.float32), S((2, 1, 32), jnp.float32),
            S((2, 3), jnp.float32))
    counts = {}
    for shortcut in (False, True):
        graphdef, state = nnx.split(abstract_unet(config.tiny().replace(cross_attention_shortcut=shortcut,
                                                                        attention_impl="xla")))
        counts[shortcut] = count_flops(functools.partial(unet_apply, graphdef), state, *args).total
    assert counts[True] < counts[False]


def test_vae_decode_count_equals_torch_flop_counter():
    frames, h, w = 3, 8, 12
    cfg = config.tiny_vae().replace(attention_impl="xla")
    vae = diffusers_vae(cfg)
    theirs = sum(_torch_flops(lambda: vae.decode(torch.randn(frames, 4, h, w), num_frames=frames)).values())
    latents = S((frames, h, w, 4), jnp.float32)
    counts = {}
    for lean in (False, True):
        graphdef, state = nnx.split(abstract_vae(cfg.replace(lean_decode=lean)))
        counts[lean] = count_flops(lambda s, z: _decode_video(graphdef, s, z, frames), state, latents).total
    assert counts[False] == theirs
    # The lean decode computes each temporal resblock's first conv twice (statistics, then output).
    assert counts[True] > theirs
