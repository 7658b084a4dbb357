"""Keyframe conditioning: CLIP preprocessing as diffusers' SVD pipeline, time ids, CFG batches."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jinbetween import conditioning
from jinbetween.conditioning import Conditioning, cfg_batch


def pipeline_clip_input(images: np.ndarray) -> np.ndarray:
    """diffusers `StableVideoDiffusionPipeline._encode_image` up to the encoder, channels-last."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
    from transformers import CLIPImageProcessor

    x = torch.from_numpy(images.astype(np.float32) / 255).permute(0, 3, 1, 2) * 2 - 1
    x = (_resize_with_antialiasing(x, (224, 224)) + 1) / 2
    pixels = CLIPImageProcessor()(images=x, do_normalize=True, do_center_crop=False, do_resize=False,
                                  do_rescale=False, return_tensors="pt").pixel_values
    return pixels.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("size", [(576, 1024), (1024, 576), (64, 96), (224, 224), (333, 517)])
def test_clip_preprocessing_equals_the_pipeline(size):
    images = np.random.default_rng(sum(size)).integers(0, 256, (2, *size, 3), dtype=np.uint8)
    ours, reference = conditioning.clip_pixels(images), pipeline_clip_input(images)
    assert ours.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)


def test_jax_image_resize_is_not_the_pipeline_resize():
    # Why clip_pixels exists: jax.image.resize's cubic kernel (a = -0.5, antialiased) is another function.
    import jax

    images = np.random.default_rng(0).integers(0, 256, (1, 576, 1024, 3), dtype=np.uint8)
    x = images.astype(np.float32) / 255
    resized = np.asarray(jax.image.resize(x, (1, 224, 224, 3), "cubic"))
    normalized = (resized - np.float32(conditioning.CLIP_MEAN)) / np.float32(conditioning.CLIP_STD)
    assert np.abs(normalized - pipeline_clip_input(images)).max() > 0.1


def test_added_time_ids_subtract_one_from_fps():
    np.testing.assert_allclose(conditioning.added_time_ids(7, 127, 0.02), [6, 127, 0.02])


def test_cfg_batch_puts_zeroed_unconditional_half_first():
    cond = Conditioning(image_embeds=jnp.ones((2, 1, 8)), image_latent=jnp.full((2, 3, 4, 4), 2.0),
                        clean_latent=jnp.zeros((2, 3, 4, 4)), added_time_ids=jnp.asarray([[6, 127, 0.02]] * 2))
    embeds, latents, ids = cfg_batch(cond, guided=True)
    assert embeds.shape == (4, 1, 8) and latents.shape == (4, 3, 4, 4) and ids.shape == (4, 3)
    assert float(jnp.abs(embeds[:2]).max()) == 0 and float(embeds[2:].min()) == 1
    assert float(jnp.abs(latents[:2]).max()) == 0 and float(latents[2:].min()) == 2
    np.testing.assert_array_equal(ids[:2], ids[2:])
    unguided = cfg_batch(cond, guided=False)
    assert unguided[0].shape == (2, 1, 8)
