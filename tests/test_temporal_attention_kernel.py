"""The Pallas temporal-attention kernel (`models/temporal_attention_kernel.py`) against the XLA path.

The kernel's program runs in Pallas' interpreter here (its arithmetic, masks and padding); its lowering to Triton
for a GPU is checked too (cross-platform lowering runs on a CPU), and its compilation for the H200 by
`bench/gpu_plan.py`. Tolerance 1e-5 relative in float32: both paths
compute float32 logits, a float32 softmax and float32 accumulations, only the order of the sums differs (~1e-7).
In bfloat16 both round the same float32 results, so they may differ by one bf16 ulp (2⁻⁸ relative): 1e-2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jinbetween import config, hardware
from jinbetween.models import temporal_attention_kernel as core
from jinbetween.models import unet_apply
from jinbetween.models.attention import AttnControl, TemporalSelfAttention
from jinbetween.models.unet import UNet
from tests.helpers import assert_close

TOL = 1e-5
BF16_TOL = 1e-2


def _qkv(n: int, frames: int, channels: int, dtype=jnp.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(2 * rng.standard_normal((n, frames, channels)), dtype) for _ in range(3))


# (frames, heads, head dim): SVD-XT's 25 frames padded to a 32-frame tile; SVD's 14 to 16; a tile exactly full.
SHAPES = [(25, 2, 64), (14, 3, 32), (16, 1, 16)]


@pytest.mark.parametrize("frames,heads,head_dim", SHAPES)
def test_kernel_equals_xla_in_every_mode(frames, heads, head_dim):
    q, k, v = _qkv(3, frames, heads * head_dim)
    out, probs = core.attend_capture_reference(q, k, v, heads)
    assert_close(core.attend(q, k, v, heads, True), out, TOL, "attend")
    kernel_out, kernel_probs = core.attend_capture(q, k, v, heads, True)
    assert_close(kernel_out, out, TOL, "attend_capture output")
    assert_close(kernel_probs, probs, TOL, "attend_capture probabilities")
    # Padded frames must not leak: each row of the captured map sums to one over the real frames.
    np.testing.assert_allclose(np.asarray(kernel_probs).sum(-1), 1.0, rtol=1e-5)
    flipped = jnp.flip(probs, axis=(-2, -1))  # GI injects the other direction's maps, rotated
    assert_close(core.apply_probs(flipped, v, True), core.apply_probs_reference(flipped, v), TOL, "apply_probs")


def test_kernel_equals_xla_in_bfloat16():
    q, k, v = _qkv(2, 25, 128, jnp.bfloat16, seed=1)
    out, probs = core.attend_capture_reference(q, k, v, 2)
    kernel_out, kernel_probs = core.attend_capture(q, k, v, 2, True)
    assert kernel_out.dtype == kernel_probs.dtype == jnp.bfloat16
    assert_close(kernel_out.astype(jnp.float32), out.astype(jnp.float32), BF16_TOL, "bf16 output")
    assert_close(kernel_probs.astype(jnp.float32), probs.astype(jnp.float32), BF16_TOL, "bf16 probabilities")
    assert_close(core.apply_probs(probs, v, True).astype(jnp.float32),
                 core.apply_probs_reference(probs, v).astype(jnp.float32), BF16_TOL, "bf16 apply_probs")


def test_gradients_are_the_xla_paths():
    q, k, v = _qkv(2, 25, 128, seed=2)
    heads = 2

    def loss(out):
        return jnp.sum(jnp.sin(out))

    for kernel, reference, args, what in (
            (lambda *a: core.attend(*a, heads, True), lambda *a: core.attend_reference(*a, heads), (q, k, v),
             "attend"),
            (lambda *a: core.attend_capture(*a, heads, True), lambda *a: core.attend_capture_reference(*a, heads),
             (q, k, v), "attend_capture"),
            (lambda *a: core.apply_probs(*a, True), core.apply_probs_reference,
             (core.probs_reference(q, k, heads), v), "apply_probs")):
        def total(fn):
            return lambda *a: sum(loss(o) for o in jax.tree.leaves(fn(*a)))

        got = jax.grad(total(kernel), argnums=tuple(range(len(args))))(*args)
        want = jax.grad(total(reference), argnums=tuple(range(len(args))))(*args)
        for g, w, i in zip(got, want, range(len(args))):
            assert_close(g, w, TOL, f"{what}: gradient of argument {i}")


@pytest.mark.parametrize("mode", ["attend", "capture", "apply"])
def test_kernel_lowers_to_triton_for_a_gpu(mode):
    """Lowered for CUDA on this CPU: Pallas' Triton lowering accepts the program at SVD-XT's level-0 shapes (it
    refuses, e.g., tiles whose size is not a power of two), and the GPU program is one Triton call."""
    n, frames, heads, channels = 18432, 25, 5, 320

    def spec(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16)

    fn, args = {
        "attend": (lambda q, k, v: core.attend(q, k, v, heads), (spec(n, frames, channels),) * 3),
        "capture": (lambda q, k, v: core.attend_capture(q, k, v, heads), (spec(n, frames, channels),) * 3),
        "apply": (core.apply_probs, (spec(n, heads, frames, frames), spec(n, frames, channels))),
    }[mode]
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1 and f"pallas_temporal_attention_{mode}" in text


def test_fits_and_refuses_what_it_cannot_take():
    assert core.fits(25, 64) and core.fits(128, 16)
    assert not core.fits(25, 48) and not core.fits(25, 8) and not core.fits(129, 64)
    with pytest.raises(ValueError, match="check `fits` first"):
        core.attend(*_qkv(2, 25, 96), 2, True)  # head dim 48
    with pytest.raises(ValueError, match="do not match v"):
        core.apply_probs(jnp.ones((3, 2, 25, 25)), _qkv(2, 25, 128)[0], True)


@pytest.fixture
def pretend_gpu(monkeypatch):
    """A GPU as far as jinbetween's checks go, with the kernel run by the interpreter; records each kernel call."""
    calls = []
    monkeypatch.setattr(hardware, "modern_gpu", lambda: True)
    for name in ("attend", "attend_capture", "apply_probs"):
        original = getattr(core, name)
        monkeypatch.setattr(core, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a, True))
    return calls


def test_module_routes_every_mode_through_the_kernel(pretend_gpu):
    """`impl="pallas"` equals the XLA module for plain attention, a captured map and an injected one."""
    xla = TemporalSelfAttention(128, heads=2, head_dim=64, name="layer", impl="xla", rngs=nnx.Rngs(0))
    pallas = TemporalSelfAttention(128, heads=2, head_dim=64, name="layer", impl="pallas", rngs=nnx.Rngs(0))
    x = _qkv(6, 25, 128, seed=3)[0]
    out, _ = xla(x)
    assert_close(pallas(x)[0], out, TOL, "plain")
    (out_c, maps), (kernel_out_c, kernel_maps) = xla(x, AttnControl.capture()), pallas(x, AttnControl.capture())
    assert_close(kernel_out_c, out_c, TOL, "capture output")
    assert_close(kernel_maps["layer"], maps["layer"], TOL, "captured map")
    injected = AttnControl.inject({"layer": jnp.flip(maps["layer"], axis=(-2, -1))})
    assert_close(pallas(x, injected)[0], xla(x, injected)[0], TOL, "injected map")
    assert pretend_gpu == ["attend", "attend_capture", "apply_probs"]


@pytest.mark.parametrize("capability,uses_kernel", [((9, 0), True), ((8, 0), False), (None, False)])
def test_auto_uses_the_kernel_on_hopper_only(pretend_gpu, monkeypatch, capability, uses_kernel):
    """The default, "auto": the kernel on compute capability 9.0 or newer, where it was measured faster (H200),
    and XLA on Ampere or a GPU that does not report its capability."""
    monkeypatch.setattr(hardware, "gpu_compute_capability", lambda: capability)
    layer = TemporalSelfAttention(128, heads=2, head_dim=64, name="layer", rngs=nnx.Rngs(0))
    assert layer.core_impl == "auto" == config.svd_xt().temporal_attention_impl
    layer(_qkv(2, 25, 128)[0])
    assert pretend_gpu == (["attend"] if uses_kernel else [])


def test_module_falls_back_to_xla_where_the_kernel_does_not_fit(pretend_gpu):
    xla = TemporalSelfAttention(96, heads=2, head_dim=48, name="layer", impl="xla", rngs=nnx.Rngs(0))
    pallas = TemporalSelfAttention(96, heads=2, head_dim=48, name="layer", impl="pallas", rngs=nnx.Rngs(0))
    x = _qkv(2, 25, 96)[0]
    assert_close(pallas(x)[0], xla(x)[0], TOL, "fallback")
    assert pretend_gpu == []


def test_unet_with_the_kernel_equals_xla(pretend_gpu):
    """The switch reaches every temporal layer of a UNet, and the UNet's output and maps are unchanged."""
    cfg = config.tiny().replace(attention_impl="xla")  # the spatial kernel stays XLA on this pretended GPU
    models = {impl: UNet(cfg.replace(temporal_attention_impl=impl), rngs=nnx.Rngs(0)) for impl in ("xla", "pallas")}
    keys = jax.random.split(jax.random.key(0), 2)
    args = (jax.random.normal(keys[0], (1, 4, 8, 8, 8)), jnp.array([0.5]), jax.random.normal(keys[1], (1, 1, 32)),
            jnp.array([[6.0, 127.0, 0.02]]))
    results = {}
    for impl, model in models.items():
        graphdef, params = nnx.split(model)
        results[impl] = unet_apply(graphdef, params, *args, attn=AttnControl.capture())
    (out, maps), (kernel_out, kernel_maps) = results["xla"], results["pallas"]
    assert_close(kernel_out, out, TOL, "UNet output")
    assert sorted(kernel_maps) == sorted(maps) and len(maps) == 4  # the down, mid and two up layers
    for name in maps:
        assert_close(kernel_maps[name], maps[name], TOL, name)
    assert pretend_gpu == ["attend_capture"] * len(maps)


def test_kernel_off_gpu_is_a_clear_error():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is here")
    layer = TemporalSelfAttention(128, heads=2, head_dim=64, name="layer", impl="pallas", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="temporal_attention_impl='xla'"):
        layer(jnp.ones((2, 25, 128)))
