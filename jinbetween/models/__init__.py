"""Flax NNX ports of the SVD models; attribute paths equal the diffusers/transformers state-dict names."""

from jinbetween.models.attention import ATTENTION_KERNELS, AttnControl, rot180
from jinbetween.models.unet import UNet, abstract_unet, temporal_attention_layers, unet_apply

__all__ = ["ATTENTION_KERNELS", "AttnControl", "UNet", "abstract_unet", "rot180", "temporal_attention_layers",
           "unet_apply"]
