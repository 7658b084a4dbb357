"""Primitive layers against their PyTorch / diffusers counterparts (fp32, random weights).

Tolerance: 1e-5 relative (the issue's tiny-model target); fp32 reductions in a different order
differ by a few ulp (~1e-7 relative) per op, far below it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jinbetween.models import attention as attention_lib
from jinbetween.models.attention import Attention
from jinbetween.models.layers import Downsample2D, FeedForward, GroupNorm, LayerNorm, nearest_resize, sincos_embedding
from jinbetween.models.naming import flat_params, merge_params
from jinbetween.weights.loading import convert_tensors
from jinbetween.weights.tensors import TensorSource

from tests.helpers import assert_close
from tests.torch_reference import randomize_, state_dict_numpy

TOL = 1e-5


def port(torch_module, make_nnx):
    """Returns the NNX module built by `make_nnx` holding the torch module's weights (via conversion)."""
    abstract = nnx.eval_shape(lambda: make_nnx(nnx.Rngs(0)))
    params = convert_tensors(TensorSource.from_arrays(state_dict_numpy(torch_module)), flat_params(abstract),
                             model=type(torch_module).__name__)
    return merge_params(abstract, params)


def _torch_groupnorm(module, x: np.ndarray, dtype=torch.float32) -> np.ndarray:
    """Applies a torch GroupNorm to channels-last `x` ([N,H,W,C] or [B,F,H,W,C]) in `dtype`."""
    t = torch.from_numpy(x).to(dtype)
    perm = (0, 3, 1, 2) if x.ndim == 4 else (0, 4, 1, 2, 3)
    inverse = (0, 2, 3, 1) if x.ndim == 4 else (0, 2, 3, 4, 1)
    with torch.no_grad():
        return module.to(dtype)(t.permute(perm)).permute(inverse).numpy().astype(np.float32)


def test_groupnorm_per_frame_and_per_video_statistics():
    x = (0.5 + 2 * np.random.default_rng(0).standard_normal((2, 3, 4, 5, 64))).astype(np.float32)
    ref_gn = randomize_(torch.nn.GroupNorm(32, 64, eps=1e-5), 0)
    gn = port(ref_gn, lambda r: GroupNorm(64, eps=1e-5, rngs=r))
    frames = x.reshape(6, 4, 5, 64)
    assert_close(gn(jnp.asarray(x)), _torch_groupnorm(ref_gn, x), TOL,
                 "GroupNorm on [B,F,H,W,C] (statistics over all frames of a video)")
    assert_close(gn(jnp.asarray(frames)), _torch_groupnorm(ref_gn, frames), TOL,
                 "GroupNorm on [BF,H,W,C] (per-frame statistics)")


def test_groupnorm_variance_does_not_cancel_at_large_mean():
    # E[x²]−E[x]² loses every digit here (torch 2.13's own fp32 CPU kernel is off by ~57 on this input); the
    # shifted one-pass variance stays within the input's own quantization, ulp(300)/std ≈ 6e-4.
    x = (300 + 0.05 * np.random.default_rng(0).standard_normal((2, 3, 4, 5, 64))).astype(np.float32)
    ref_gn = randomize_(torch.nn.GroupNorm(32, 64, eps=1e-5), 0)
    gn = port(ref_gn, lambda r: GroupNorm(64, eps=1e-5, rngs=r))
    assert_close(gn(jnp.asarray(x)), _torch_groupnorm(ref_gn, x, torch.float64), 2e-3,
                 "GroupNorm at mean 300, std 0.05, against float64")


def test_groupnorm_shift_survives_an_outlier_first_element():
    """The one-pass variance is shifted by the mean of each group's first image row. Shifted by the first element
    alone, an outlier 1000 std away in a group of 262 k values would cost 22% of the variance (measured); the row
    of 256 values dilutes it to ~1e-5."""
    x = (300 + 0.05 * np.random.default_rng(0).standard_normal((1, 16, 64, 128, 64))).astype(np.float32)
    x[:, 0, 0, 0, :] = 350
    gn = GroupNorm(64, eps=1e-5, rngs=nnx.Rngs(0))
    _, var = gn.moments(jnp.asarray(x))
    grouped = x.astype(np.float64).reshape(1, 16, 64, 128, 32, 2)
    expected = grouped.var(axis=(1, 2, 3, 5))
    np.testing.assert_allclose(np.asarray(var).reshape(expected.shape), expected, rtol=1e-4)


def test_layernorm_matches_torch():
    x = np.random.default_rng(1).standard_normal((3, 7, 48)).astype(np.float32) * 4 + 2
    ref = randomize_(torch.nn.LayerNorm(48), 1)
    ln = port(ref, lambda r: LayerNorm(48, eps=1e-5, rngs=r))
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    assert_close(ln(jnp.asarray(x)), expected, TOL, "LayerNorm")


@pytest.mark.parametrize("dim", [8, 320, 33])
def test_sincos_embedding_matches_diffusers(dim):
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([-1.55, 0.0, 1.637, 6.0, 127.0, 0.02], np.float32)
    expected = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
    # exp() may differ by an ulp between XLA and torch; times t = 127 that moves the argument by up to
    # ulp(127) ≈ 7.6e-6, and sin/cos are 1-Lipschitz.
    np.testing.assert_allclose(np.asarray(sincos_embedding(jnp.asarray(t), dim)), expected, rtol=0, atol=1.5e-5)


def test_geglu_feedforward_matches_diffusers():
    from diffusers.models.attention import FeedForward as TorchFeedForward

    x = np.random.default_rng(2).standard_normal((2, 5, 32)).astype(np.float32)
    ref = randomize_(TorchFeedForward(32, dim_out=32, activation_fn="geglu"), 2)
    ff = port(ref, lambda r: FeedForward(32, rngs=r))
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    assert_close(ff(jnp.asarray(x)), expected, TOL, "GEGLU FeedForward")


@pytest.mark.parametrize("impl", ["xla", "xla_chunked"])
@pytest.mark.parametrize("context_dim", [None, 24])
def test_attention_matches_diffusers(impl, context_dim, monkeypatch):
    from diffusers.models.attention_processor import Attention as TorchAttention

    monkeypatch.setattr(attention_lib, "_LOGITS_BUDGET_BYTES", 4 * 2 * 4 * 23 * 5)  # forces 5-query chunks
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 23, 32)).astype(np.float32)
    ctx = rng.standard_normal((2, 6, context_dim)).astype(np.float32) if context_dim else None
    ref = randomize_(TorchAttention(32, cross_attention_dim=context_dim, heads=4, dim_head=8), 3)
    attn = port(ref, lambda r: Attention(32, heads=4, head_dim=8, context_dim=context_dim, impl=impl, rngs=r))
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), None if ctx is None else torch.from_numpy(ctx)).numpy()
    out = attn(jnp.asarray(x), None if ctx is None else jnp.asarray(ctx))
    assert_close(out, expected, TOL, f"Attention ({impl}, context {context_dim})")


def test_single_token_shortcut_equals_full_cross_attention():
    rng = np.random.default_rng(4)
    kwargs = dict(heads=2, head_dim=16, context_dim=24, rngs=nnx.Rngs(4))
    full = Attention(32, single_token_shortcut=False, **kwargs)
    fast = Attention(32, single_token_shortcut=True, **kwargs)
    nnx.update(fast, nnx.state(full))
    x = jnp.asarray(rng.standard_normal((3, 5, 7, 32)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((3, 1, 24)), jnp.float32)
    assert_close(fast.attend_per_video(x, ctx), full.attend_per_video(x, ctx), 1e-6, "cross-attention shortcut")
    zeros = jnp.zeros_like(ctx)  # the unconditional CFG half: the output is exactly to_out.0.bias
    np.testing.assert_array_equal(fast.attend_per_video(x, zeros)[1, 2, 3], full.to_out[0].bias[...])


@pytest.mark.parametrize("size_in,size_out", [((4, 6), (8, 12)), ((5, 3), (9, 6)), ((3, 5), (5, 9))])
def test_nearest_resize_matches_torch_interpolate(size_in, size_out):
    x = np.random.default_rng(5).standard_normal((2, *size_in, 3)).astype(np.float32)
    with torch.no_grad():
        expected = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size_out,
                                                   mode="nearest").permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.asarray(nearest_resize(jnp.asarray(x), size_out)), expected)


@pytest.mark.parametrize("hw", [(8, 12), (9, 7)])
def test_downsample_pads_every_side(hw):
    from diffusers.models.downsampling import Downsample2D as TorchDownsample2D

    x = np.random.default_rng(6).standard_normal((2, *hw, 32)).astype(np.float32)
    ref = randomize_(TorchDownsample2D(32, use_conv=True, out_channels=32, padding=1, name="op"), 6)
    down = port(ref, lambda r: Downsample2D(32, padding=1, rngs=r))
    with torch.no_grad():
        expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert_close(down(jnp.asarray(x)), expected, TOL, f"Downsample2D on {hw}")


def test_cudnn_request_off_gpu_is_a_clear_error():
    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN is available here")
    attn = Attention(32, heads=4, head_dim=8, impl="cudnn", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU"):
        attn(jnp.ones((1, 4, 32)))


def test_temporal_conv_is_the_3d_conv_it_replaces():
    """Same parameters from the same keys (models initialize as before) and the same output as nnx.Conv (3,1,1)."""
    from jinbetween.models.layers import TemporalConv

    def conv3d(rngs):
        return nnx.Conv(8, 16, kernel_size=(3, 1, 1), padding=((1, 1), (0, 0), (0, 0)), rngs=rngs)

    ours, reference = TemporalConv(8, 16, rngs=nnx.Rngs(3)), conv3d(nnx.Rngs(3))
    np.testing.assert_array_equal(ours.kernel[...], reference.kernel[...])
    keys_after_ours, keys_after_reference = nnx.Rngs(5), nnx.Rngs(5)
    TemporalConv(8, 16, rngs=keys_after_ours), conv3d(keys_after_reference)
    np.testing.assert_array_equal(jax.random.key_data(keys_after_ours.params()),
                                  jax.random.key_data(keys_after_reference.params()))
    bias = jax.random.normal(jax.random.key(1), (16,))
    ours.bias[...], reference.bias[...] = bias, bias
    x = jax.random.normal(jax.random.key(0), (2, 5, 4, 3, 8))
    np.testing.assert_allclose(ours(x), reference(x), rtol=1e-6, atol=1e-6)


def test_fused_geglu_kernel_matches_xla_and_its_gradient():
    """The Pallas GEGLU kernel's program, run by the interpreter (its arithmetic, not its Triton compilation):
    the value and gate products, the bias and the gate (erf from a polynomial with |error| ≤ 1.5e-7) in float32,
    against XLA's GEGLU. Gradients come from the XLA path."""
    from jinbetween.models.geglu_kernel import TILE_COLS, TILE_DEPTH, TILE_ROWS, fits, geglu_fused, geglu_reference

    rows, channels, inner = 2 * TILE_ROWS, 2 * TILE_DEPTH, 3 * TILE_COLS
    assert fits(rows, channels, inner) and not fits(rows + 1, channels, inner)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, channels)), jnp.float32)
    kernel = jnp.asarray(0.1 * rng.standard_normal((channels, 2 * inner)), jnp.float32)
    bias = jnp.asarray(0.1 * rng.standard_normal((2 * inner,)), jnp.float32)
    assert_close(geglu_fused(x, kernel, bias, True), geglu_reference(x, kernel, bias), TOL, "fused GEGLU")

    def loss(fn):
        return lambda *args: jnp.sum(fn(*args) ** 2)

    fused_grads = jax.grad(loss(lambda *a: geglu_fused(*a, True)), argnums=(0, 1, 2))(x, kernel, bias)
    xla_grads = jax.grad(loss(geglu_reference), argnums=(0, 1, 2))(x, kernel, bias)
    for fused, xla, name in zip(fused_grads, xla_grads, ("x", "kernel", "bias")):
        assert_close(fused, xla, TOL, f"fused GEGLU gradient of {name}")


def test_fused_geglu_kernel_lowers_to_triton_for_a_gpu():
    """Lowered for CUDA on this CPU at SVD-XT's level-0 shape: Pallas' Triton lowering accepts the program, and the
    GPU program is one Triton call (its compilation for the H200: `bench/gpu_plan.py`)."""
    from jinbetween.models.geglu_kernel import geglu_fused

    rows, channels = 2 * 25 * 72 * 128, 320
    args = (jax.ShapeDtypeStruct((rows, channels), jnp.bfloat16),
            jax.ShapeDtypeStruct((channels, 8 * channels), jnp.bfloat16),
            jax.ShapeDtypeStruct((8 * channels,), jnp.bfloat16))
    text = jax.jit(geglu_fused).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1 and "pallas_geglu" in text


def test_feedforward_pallas_runs_the_kernel_where_tiles_fit(monkeypatch):
    """`impl="pallas"` routes a GEGLU whose rows, channels and inner width the tiles divide through the kernel
    (here interpreted, as the GPU is pretended), and any other through XLA; both equal XLA's feed-forward."""
    from jinbetween import hardware
    from jinbetween.models import geglu_kernel

    calls = []
    fused = geglu_kernel.geglu_fused
    monkeypatch.setattr(hardware, "modern_gpu", lambda: True)
    monkeypatch.setattr(geglu_kernel, "geglu_fused", lambda *a: calls.append(a[0].shape) or fused(*a, True))
    ff_xla = FeedForward(64, rngs=nnx.Rngs(3))
    ff_pallas = FeedForward(64, impl="pallas", rngs=nnx.Rngs(3))
    for shape in ((2, 128, 64), (3, 5, 64)):  # 256 rows fit the 128-row tiles; 15 rows do not
        x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
        assert_close(ff_pallas(x), ff_xla(x), TOL, f"pallas feed-forward on {shape}")
    assert calls == [(256, 64)]


def test_feedforward_pallas_off_gpu_is_a_clear_error():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is here")
    with pytest.raises(ValueError, match="feedforward_impl='xla'"):
        FeedForward(64, impl="pallas", rngs=nnx.Rngs(0))(jnp.ones((2, 128, 64)))
