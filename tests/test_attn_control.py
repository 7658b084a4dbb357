"""Properties of attention-map capture, injection and rot180 (hypothesis + chex)."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from jinbetween import AttnControl, config, rot180
from jinbetween.errors import InputShapeError
from jinbetween.models import UNet, unet_apply

maps_arrays = hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 6)).map(
    lambda s: (s[0], s[1], s[2], s[2])), elements=st.floats(-10, 10, width=32, allow_subnormal=False))


@given(maps_arrays)
def test_rot180_is_an_exact_involution(p):
    maps = {"a": jnp.asarray(p)}
    np.testing.assert_array_equal(np.asarray(rot180(rot180(maps))["a"]), p)


@given(maps_arrays)
def test_rot180_reverses_both_frame_axes(p):
    f = p.shape[-1]
    rotated = np.asarray(rot180({"a": jnp.asarray(p)})["a"])
    i, j = np.meshgrid(np.arange(f), np.arange(f), indexing="ij")
    np.testing.assert_array_equal(rotated[..., i, j], p[..., f - 1 - i, f - 1 - j])


@given(maps_arrays)
def test_rot180_keeps_rows_stochastic(logits):
    probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
    np.testing.assert_allclose(np.asarray(rot180({"a": probs})["a"].sum(-1)), 1.0, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_unet():
    unet = UNet(config.tiny(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(unet)
    forward = jax.jit(lambda p, x, t, e, ids, attn=None: unet_apply(graphdef, p, x, t, e, ids, attn=attn))
    return unet, forward, params


def inputs(seed: int, frames: int = 4):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (2, frames, 8, 8, 8)), jnp.array([0.5, -1.0]),
            jax.random.normal(keys[1], (2, 1, 32)), jnp.array([[6.0, 127.0, 0.02], [6.0, 127.0, 0.02]]))


@given(st.integers(0, 2**31 - 1))
def test_injecting_a_pass_own_maps_reproduces_it(tiny_unet, seed):
    _, forward, params = tiny_unet
    args = inputs(seed)
    v, maps = forward(params, *args, attn=AttnControl.capture())
    chex.assert_trees_all_close(forward(params, *args, attn=AttnControl.inject(maps))[0], v, rtol=1e-5, atol=1e-5)


def test_injection_changes_only_listed_layers(tiny_unet):
    unet, forward, params = tiny_unet
    args = inputs(1)
    _, own = forward(params, *args, attn=AttnControl.capture())
    _, other = forward(params, *inputs(2), attn=AttnControl.capture())
    first, second = unet.temporal_attention_layers[:2]
    plain, _ = forward(params, *args)
    partial_own, _ = forward(params, *args, attn=AttnControl.inject({first: own[first]}))
    chex.assert_trees_all_close(partial_own, plain, rtol=1e-5, atol=1e-5)
    foreign, _ = forward(params, *args, attn=AttnControl.inject({second: other[second]}))
    assert float(jnp.abs(foreign - plain).max()) > 1e-3


def test_maps_are_empty_unless_captured(tiny_unet):
    """The UNet always returns (v, maps): maps hold the captured layers only."""
    _, forward, params = tiny_unet
    args = inputs(6)
    v, maps = forward(params, *args)
    assert maps == {} and v.shape == (2, 4, 8, 8, 4)
    _, injected_maps = forward(params, *args, attn=AttnControl.inject(forward(params, *args,
                                                                                attn=AttnControl.capture())[1]))
    assert injected_maps == {}


def test_capture_of_chosen_layers(tiny_unet):
    unet, forward, params = tiny_unet
    layer = "mid_block.attentions.0.temporal_transformer_blocks.0.attn1"
    assert layer in unet.temporal_attention_layers
    _, maps = forward(params, *inputs(3), attn=AttnControl.capture(layers=(layer,)))
    assert list(maps) == [layer]
    chex.assert_shape(maps[layer], (2 * 4 * 4, 4, 4, 4))  # [B·h·w, heads, F, F]: 4×4 latent and 4 heads at mid


def test_maps_are_probabilities(tiny_unet):
    _, forward, params = tiny_unet
    _, maps = forward(params, *inputs(4), attn=AttnControl.capture())
    for name, p in maps.items():
        assert float(p.min()) >= 0, name
        np.testing.assert_allclose(np.asarray(p.sum(-1)), 1.0, atol=1e-5, err_msg=name)


def test_injected_map_of_wrong_shape_is_refused(tiny_unet):
    # Jitted, as the samplers call it (the refusal comes while tracing): run eagerly, the capturing call compiled
    # every layer's operations one by one (45 s on 2 cores).
    _, forward, params = tiny_unet
    _, maps = forward(params, *inputs(5, frames=4), attn=AttnControl.capture())
    with pytest.raises(InputShapeError, match="capture maps from a call with the same shapes"):
        forward(params, *inputs(5, frames=3), attn=AttnControl.inject(maps))


def test_new_maps_do_not_retrace(tiny_unet):
    _, _, params = tiny_unet
    graphdef = nnx.graphdef(tiny_unet[0])

    @jax.jit
    @chex.assert_max_traces(n=1)
    def backward_pass(p, maps, *args):
        return unet_apply(graphdef, p, *args, attn=AttnControl.inject(rot180(maps)))

    _, forward, _ = tiny_unet
    for seed in range(3):
        _, maps = forward(params, *inputs(seed), attn=AttnControl.capture())
        backward_pass(params, maps, *inputs(seed + 10))


def test_bad_input_shapes_are_named(tiny_unet):
    unet, _, _ = tiny_unet
    x, t, e, ids = inputs(0)
    with pytest.raises(InputShapeError, match="channels-last"):
        unet(x[..., :4], t, e, ids)
    with pytest.raises(InputShapeError, match="image_embeds"):
        unet(x, t, e[:, 0], ids)
    with pytest.raises(InputShapeError, match="added_time_ids"):
        unet(x, t, e, ids[:, :2])
