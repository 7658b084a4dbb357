"""FP8 (`jinbetween.models.fp8`): e4m3 rounding, the quantized layers' arithmetic, which layers are quantized,
calibration (eager and through a jitted sampler), and the refusal of `--precision fp8` off Hopper.

Off a Hopper GPU the FP8 layers compute FP8's values in the input dtype (the dequantized operands are exactly
representable), so these CPU tests measure the arithmetic that XLA hands to cuBLASLt there.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jinbetween import config
from jinbetween.cli import main as cli_main
from jinbetween.errors import ConfigError
from jinbetween.models import ImageEncoder, UNet, VAE, abstract_unet, fp8
from jinbetween.models.delta import delta_keys
from jinbetween.models.layers import TemporalConv
from jinbetween.pipeline import Pipeline

# e4m3 keeps 3 mantissa bits: round to nearest leaves at most half a step, 2^-4 of the value, for normal values.
E4M3_RELATIVE = 2.0**-4


def test_fake_quantize_rounds_to_the_nearest_e4m3_value():
    x = jax.random.normal(jax.random.key(0), (4096,), jnp.float32) * 3.0
    scale = fp8.tensor_scale(jnp.max(jnp.abs(x)))
    rounded = fp8.fake_quantize(x, scale)
    normal = jnp.abs(x) / scale >= 2.0**-6  # e4m3's smallest normal; below it the step is absolute (2^-9)
    relative = jnp.abs(rounded - x) / jnp.abs(x)
    assert float(jnp.max(jnp.where(normal, relative, 0))) <= E4M3_RELATIVE * (1 + 1e-6)
    assert float(jnp.max(jnp.where(normal, 0, jnp.abs(rounded - x) / scale))) <= 2.0**-10 * (1 + 1e-6)
    np.testing.assert_array_equal(fp8.fake_quantize(rounded, scale), rounded, "rounding is not idempotent")
    assert float(jnp.max(jnp.abs(rounded))) == pytest.approx(float(jnp.max(jnp.abs(x))), rel=1e-6), \
        "the tensor's max |x| must map onto e4m3's largest value exactly"
    assert float(jnp.max(relative)) > 1e-3, "negative control: e4m3 must actually round"


def test_values_beyond_the_calibrated_range_saturate():
    scale = fp8.tensor_scale(1.0)
    np.testing.assert_array_equal(fp8.fake_quantize(jnp.array([-5.0, 5.0, 1.0]), scale), [-1.0, 1.0, 1.0])


def _linear(in_features=64, out_features=48, seed=0):
    return nnx.Linear(in_features, out_features, rngs=nnx.Rngs(seed))


def test_fp8_linear_computes_the_product_of_its_rounded_operands():
    linear = _linear()
    linear.bias[...] = jax.random.normal(jax.random.key(3), linear.bias.shape)
    x = jax.random.normal(jax.random.key(1), (5, 7, 64), jnp.float32)
    amax = float(jnp.max(jnp.abs(x)))
    layer = fp8.Fp8Linear(linear, amax)
    assert layer.kernel.dtype == fp8.E4M3
    w = np.asarray(layer.kernel[...].astype(np.float32), np.float64) * float(layer.kernel_scale[...])
    xq = np.asarray(fp8.fake_quantize(x, fp8.tensor_scale(amax)), np.float64)
    expected = xq @ w + np.asarray(linear.bias[...], np.float64)
    got = np.asarray(layer(x), np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # float32 accumulation over 64 terms
    exact = np.asarray(linear(x), np.float64)
    error = np.abs(got - exact).max() / np.abs(exact).max()
    assert 1e-4 < error < 4 * E4M3_RELATIVE, f"relative error {error:.3g} against the unquantized layer"
    clipped = np.asarray(fp8.Fp8Linear(linear, 0.1 * amax)(x), np.float64)
    assert np.abs(clipped - exact).max() / np.abs(exact).max() > 10 * error, \
        "negative control: an input scale 10x too small must clip"


@pytest.mark.parametrize("kind", ["conv3x3_stride2", "conv1x1", "temporal"])
def test_fp8_convolutions_match_the_original_layer_within_e4m3_rounding(kind):
    rngs = nnx.Rngs(0)
    if kind == "temporal":
        layer, x = TemporalConv(32, 32, rngs=rngs), jax.random.normal(jax.random.key(1), (2, 5, 4, 4, 32))
    elif kind == "conv1x1":
        layer = nnx.Conv(32, 64, kernel_size=(1, 1), padding=((0, 0), (0, 0)), rngs=rngs)
        x = jax.random.normal(jax.random.key(1), (3, 6, 6, 32))
    else:
        layer = nnx.Conv(32, 32, kernel_size=(3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs)
        x = jax.random.normal(jax.random.key(1), (3, 8, 8, 32))
    layer.bias[...] = jax.random.normal(jax.random.key(2), layer.bias.shape)
    quantized = fp8.Fp8Conv(layer, float(jnp.max(jnp.abs(x))))
    exact, got = np.asarray(layer(x)), np.asarray(quantized(x))
    assert got.shape == exact.shape
    error = np.abs(got - exact).max() / np.abs(exact).max()
    assert 1e-4 < error < 4 * E4M3_RELATIVE, f"{kind}: relative error {error:.3g}"


def test_svd_xt_keeps_the_delta_layers_and_the_small_ones_and_quantizes_the_rest():
    unet = abstract_unet(config.svd_xt())
    every, quantized = fp8.layers(unet), fp8.quantized_layers(unet)
    kept = set(every) - set(quantized)
    assert not {key.removesuffix(".weight") for key in delta_keys(unet.config)} & set(quantized), \
        "GI's delta adds to temporal attn1 W_v/W_o: they must stay in the parameter dtype"
    assert {"conv_in", "conv_out", "time_embedding.linear_1"} <= kept
    assert all(".attn2." in name or "time_emb" in name or "time_pos_embed" in name or "add_embedding" in name
               or name in ("conv_in", "conv_out") or name.endswith(("attn1.to_v", "attn1.to_out.0"))
               for name in kept), sorted(kept)
    weights = {name: int(np.prod(layer.kernel.shape)) for name, layer in every.items()}
    share = sum(weights[name] for name in quantized) / sum(weights.values())
    assert share > 0.7, f"only {share:.0%} of the weights are quantized"
    for name in ("down_blocks.0.resnets.0.spatial_res_block.conv1", "mid_block.attentions.0.proj_in",
                 "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj",
                 "down_blocks.1.resnets.1.temporal_res_block.conv2",
                 "down_blocks.2.attentions.1.temporal_transformer_blocks.0.attn1.to_q"):
        assert name in quantized, name


@pytest.fixture(scope="module")
def tiny_pipeline():
    rngs = nnx.Rngs(0)
    return Pipeline(UNet(config.tiny(), rngs=rngs), VAE(config.tiny_vae().replace(scaling_factor=0.5), rngs=rngs),
                    ImageEncoder(config.tiny_image_encoder(), rngs=rngs), default_size=(32, 32), sigma_max=80.0)


def _keyframes():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]


def test_calibration_records_the_same_maxima_eagerly_and_inside_a_jitted_sampler(tiny_pipeline):
    from jinbetween.models import unet_apply

    unet = tiny_pipeline.unet
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 4, 8))
    args = (x, jnp.full((1,), 0.5), jnp.ones((1, 1, 32)), jnp.ones((1, 3)))
    eager = fp8.calibrate(unet, lambda probed: probed(*args))
    jitted = fp8.calibrate(unet, lambda probed: jax.jit(unet_apply, static_argnums=0)(*nnx.split(probed), *args))
    assert eager.keys() == set(fp8.quantized_layers(unet)) and all(v > 0 for v in eager.values())
    for name in eager:
        assert jitted[name] == pytest.approx(eager[name], rel=1e-5), name
    with pytest.raises(ConfigError, match="no UNet call"):
        fp8.calibrate(unet, lambda probed: None)


def test_fp8_pipeline_stays_close_to_the_full_precision_one(tiny_pipeline):
    start, end = _keyframes()
    run = dict(method="vibid", num_inference_steps=2, key=jax.random.key(1), output="latent")
    quantized = tiny_pipeline.with_fp8_unet(start, end, method="vibid", num_inference_steps=2, key=jax.random.key(2))
    assert any(isinstance(m, fp8.Fp8Linear) for _, m in nnx.iter_modules(quantized.unet))
    assert not any(isinstance(m, (fp8.Fp8Linear, fp8.Fp8Conv)) for _, m in nnx.iter_modules(tiny_pipeline.unet)), \
        "the original pipeline's UNet must stay unchanged"
    exact = np.asarray(tiny_pipeline.interpolate(start, end, **run), np.float64)

    def error(pipe) -> float:
        return float(np.linalg.norm(np.asarray(pipe.interpolate(start, end, **run), np.float64) - exact)
                     / np.linalg.norm(exact))

    # A random UNet amplifies rounding more than a trained one: a bound of a few e4m3 steps, not one.
    calibrated = error(quantized)
    assert 1e-5 < calibrated < 4 * E4M3_RELATIVE, f"relative error of the latents {calibrated:.3g}"
    amax = {fp8.layer_name(path): float(layer.input_scale[...]) * fp8.E4M3_MAX
            for path, layer in nnx.iter_modules(quantized.unet) if isinstance(layer, (fp8.Fp8Linear, fp8.Fp8Conv))}
    too_small = tiny_pipeline.with_unet(fp8.quantize_unet(tiny_pipeline.unet, {k: v / 20 for k, v in amax.items()}))
    assert error(too_small) > 2 * calibrated, "negative control: scales 20x too small must clip and do worse"


def test_fp8_is_refused_off_hopper_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights before refusing"))
    assert cli_main(["toybench", "--pairs", "1", "--precision", "fp8", "--out", str(tmp_path / "b.json")]) == 2
    message = capsys.readouterr().err
    assert "compute capability 9.0 or newer" in message and "cpu backend" in message, message
    assert "use --precision full" in message and message.count("\n") == 1, message
    assert not (tmp_path / "b.json").exists()


def test_the_pallas_geglu_kernel_is_refused_with_fp8():
    unet = UNet(config.tiny().replace(feedforward_impl="pallas"), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="feedforward_impl='xla'"):
        fp8.quantize_unet(unet, {})
