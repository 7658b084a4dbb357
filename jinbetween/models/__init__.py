"""Flax NNX ports of the SVD models; attribute paths equal the diffusers/transformers state-dict names.

The models never know where their weights come from: `jinbetween.weights` loads and saves them.
"""

from jinbetween.models.attention import ATTENTION_KERNELS, AttnControl, rot180
from jinbetween.models.image_encoder import ImageEncoder, abstract_image_encoder
from jinbetween.models.unet import UNet, abstract_unet, temporal_attention_layers, unet_apply
from jinbetween.models.vae import VAE, abstract_vae

__all__ = ["ATTENTION_KERNELS", "AttnControl", "ImageEncoder", "UNet", "VAE", "abstract_image_encoder",
           "abstract_unet", "abstract_vae", "rot180", "temporal_attention_layers", "unet_apply"]
