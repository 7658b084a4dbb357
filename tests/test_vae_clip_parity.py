"""VAE and image-encoder parity with diffusers' AutoencoderKLTemporalDecoder and transformers' CLIP vision tower.

Models go through the real path: `save_pretrained` → our converter → `from_pretrained`. Tolerance 1e-5
relative (fp32, highest matmul precision), the issue's target for tiny configs.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jinbetween import config
from jinbetween.cli import main as cli_main
from jinbetween.errors import InputShapeError
from jinbetween.models import abstract_image_encoder, abstract_vae
from jinbetween.models import vae as vae_module
from jinbetween.weights import load_image_encoder, load_unet, load_vae

from tests.helpers import assert_close
from tests.torch_reference import diffusers_unet, diffusers_vae, transformers_clip

TOL = 1e-5

VAE_CASES = {
    # layers_per_block 1: the decoder's mid block has one resnet, so diffusers never applies its attention.
    "tiny": (config.tiny_vae(), (16, 24)),
    # SVD's layout at three levels: two resnets around the mid attention, 24×40 pixels → 6×10 latents.
    "three_level": (config.VAEConfig(block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                                     layers_per_block=2, sample_size=32), (24, 40)),
}


@pytest.fixture(scope="module", params=list(VAE_CASES), ids=str)
def vae_case(request, tmp_path_factory):
    cfg, size = VAE_CASES[request.param]
    reference = diffusers_vae(cfg, seed=3)
    folder = tmp_path_factory.mktemp(request.param) / "vae"
    reference.save_pretrained(folder)
    return cfg, size, reference, load_vae(folder)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def test_vae_encode_matches_diffusers(vae_case):
    cfg, (h, w), reference, vae = vae_case
    images = np.random.default_rng(0).uniform(-1, 1, (3, h, w, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = reference.encode(nchw(images)).latent_dist
    mean, logvar = jax.jit(lambda x: vae.encode_moments(x))(images)
    assert_close(mean, nhwc(posterior.mean), TOL, "posterior mean")
    assert_close(logvar, nhwc(posterior.logvar), TOL, "posterior logvar")
    assert_close(vae.encode(images), nhwc(posterior.mode()), TOL, "encode() = mode")


# lean: per-frame layers frame by frame, temporal layers in row tiles (one tile at these sizes, several with
# "lean, 4-row tiles"); whole: every layer on the whole chunk.
DECODE_MODES = {"lean": (True, vae_module.ROW_TILE_ELEMENTS), "lean, 4-row tiles": (True, 1), "whole": (False, 0)}


@pytest.mark.parametrize("mode", list(DECODE_MODES))
@pytest.mark.parametrize("videos,frames", [(1, 5), (2, 3)])
def test_vae_decode_matches_diffusers(vae_case, videos, frames, mode, monkeypatch):
    cfg, (h, w), reference, vae = vae_case
    lean, tile_elements = DECODE_MODES[mode]
    monkeypatch.setattr(vae.decoder, "lean", lean)
    monkeypatch.setattr(vae_module, "ROW_TILE_ELEMENTS", tile_elements)
    f = cfg.downsample_factor
    z = np.random.default_rng(1).standard_normal((videos * frames, h // f, w // f, 4)).astype(np.float32)
    with torch.no_grad():
        expected = nhwc(reference.decode(nchw(z), num_frames=frames).sample)
    out = jax.jit(lambda z: vae.decode(z, frames))(z)
    assert_close(out, expected, TOL, f"{mode} decode of {videos} video(s) × {frames} frames")


@pytest.mark.parametrize("budget,tiles", [(10**9, 1), (300, 6), (250, 6), (100, 12)])
def test_row_tiles_are_the_fewest_equal_tiles_within_the_budget(budget, tiles, monkeypatch):
    monkeypatch.setattr(vae_module, "ROW_TILE_ELEMENTS", budget)
    video = jnp.zeros((1, 5, 12, 8, 3))  # 120 elements per row; a row never splits, so 100 gives one row per tile
    assert vae_module._row_tiles(video) == tiles


@pytest.mark.parametrize("chunk", [None, 2, 3])
def test_chunked_video_decode_matches_the_pipeline_loop(vae_case, chunk):
    cfg, (h, w), reference, vae = vae_case
    f = cfg.downsample_factor
    latents = np.random.default_rng(2).standard_normal((5, h // f, w // f, 4)).astype(np.float32)
    size = chunk or 5
    with torch.no_grad():  # StableVideoDiffusionPipeline.decode_latents
        scaled = torch.from_numpy(latents / cfg.scaling_factor).permute(0, 3, 1, 2)
        expected = np.concatenate([nhwc(reference.decode(scaled[i:i + size], num_frames=len(scaled[i:i + size]))
                                        .sample) for i in range(0, 5, size)])
    assert_close(vae.decode_video(jnp.asarray(latents), chunk), expected, TOL, f"decode_video(chunk={chunk})")


def test_posterior_sample_is_mean_plus_scaled_noise(vae_case):
    cfg, (h, w), _, vae = vae_case
    images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, h, w, 3)), jnp.float32)
    key = jax.random.key(7)
    mean, logvar = vae.encode_moments(images)
    expected = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    assert_close(vae.encode_sample(images, key), expected, 1e-6, "posterior sample")
    assert not np.allclose(vae.encode_sample(images, jax.random.key(8)), expected)


def test_vae_refuses_bad_shapes():
    vae = abstract_vae(config.tiny_vae())  # no weights: the shapes are refused before any of them is read
    with pytest.raises(InputShapeError, match="not a multiple of 2"):
        vae.encode(jnp.zeros((1, 15, 16, 3)))
    with pytest.raises(InputShapeError, match="channels-last"):
        vae.encode(jnp.zeros((1, 3, 16, 16)))
    with pytest.raises(InputShapeError, match="multiple of num_frames=3"):
        vae.decode(jnp.zeros((4, 8, 8, 4)), 3)


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_image_encoder_matches_transformers(act, tmp_path):
    cfg = config.tiny_image_encoder().replace(hidden_act=act)
    reference = transformers_clip(cfg, seed=4)
    reference.save_pretrained(tmp_path / "image_encoder")
    encoder = load_image_encoder(tmp_path / "image_encoder")
    pixels = np.random.default_rng(4).standard_normal((3, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(pixel_values=nchw(pixels)).image_embeds.numpy()
    assert_close(jax.jit(lambda p: encoder(p))(pixels), expected, TOL, f"CLIP image_embeds ({act})")


def test_image_encoder_drops_a_stored_position_ids_buffer(tmp_path):
    from safetensors.numpy import load_file, save_file

    reference = transformers_clip(config.tiny_image_encoder(), seed=5)
    reference.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["vision_model.embeddings.position_ids"] = np.arange(5)[None]
    save_file(tensors, tmp_path / "model.safetensors")
    pixels = np.random.default_rng(5).standard_normal((1, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(pixel_values=nchw(pixels)).image_embeds.numpy()
    assert_close(load_image_encoder(tmp_path)(pixels), expected, TOL, "CLIP with position_ids in file")


def test_image_encoder_refuses_wrong_resolution():
    encoder = abstract_image_encoder(config.tiny_image_encoder())  # no weights, as above
    with pytest.raises(InputShapeError, match="CLIP-normalized"):
        encoder(jnp.zeros((1, 32, 32, 3)))


# --------------------------------------------------------------------------------------------------


def test_pipeline_folder_converts_to_one_manifest(tmp_path):
    pipeline = tmp_path / "svd-tiny"
    diffusers_unet(config.tiny(), seed=6).save_pretrained(pipeline / "unet")
    diffusers_vae(config.tiny_vae(), seed=6).save_pretrained(pipeline / "vae")
    transformers_clip(config.tiny_image_encoder(), seed=6).save_pretrained(pipeline / "image_encoder")
    (pipeline / "scheduler").mkdir()
    (pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps({"sigma_max": 700.0}))
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
    out = tmp_path / "weights" / "svd-tiny"
    assert cli_main(["convert", "--local-dir", str(pipeline), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["components"]) == ["image_encoder", "unet", "vae"]
    assert manifest["pipeline"]["scheduler"] == {"sigma_max": 700.0}
    for load in (load_unet, load_vae, load_image_encoder):
        from_converted, from_folder = load(out), load(pipeline)
        for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(from_converted)),
                                     nnx.to_flat_state(nnx.state(from_folder))):
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                          err_msg=f"{load.__name__} {path}")
