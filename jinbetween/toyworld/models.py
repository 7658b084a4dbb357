"""The toy world's model configs: SVD's three architectures, small enough to train here and ship in the package.

128×128 videos of 14 frames: the VAE downsamples ×4 to 32×32×4 latents, the UNet ×4 again; the image encoder
sees 64×64 keyframes. About 19.6 M parameters in all, ~39 MB in bf16.
"""

from __future__ import annotations

from jinbetween.config import CROSS_ATTN_DOWN, CROSS_ATTN_UP, DOWN, UP, ImageEncoderConfig, UNetConfig, VAEConfig

EMBED_DIM = 128  # the image encoder's projection = the UNet's cross-attention width


def unet_config() -> UNetConfig:
    """Three levels (64/128/192 channels, 32-wide heads), one layer per block, 14 frames (~14.7 M parameters)."""
    channels = (64, 128, 192)
    return UNetConfig(
        down_block_types=(CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, DOWN),
        up_block_types=(UP, CROSS_ATTN_UP, CROSS_ATTN_UP),
        block_out_channels=channels,
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=3 * 32,
        layers_per_block=(1, 1, 1),
        cross_attention_dim=(EMBED_DIM,) * 3,
        transformer_layers_per_block=(1, 1, 1),
        num_attention_heads=tuple(c // 32 for c in channels),
        num_frames=14,
        sample_size=32,
    )


def vae_config() -> VAEConfig:
    """Three levels (32/64/128 channels): 128×128 frames ↔ 32×32×4 latents (~4.1 M parameters)."""
    return VAEConfig(block_out_channels=(32, 64, 128), down_block_types=("DownEncoderBlock2D",) * 3,
                     layers_per_block=2, sample_size=128)


def image_encoder_config() -> ImageEncoderConfig:
    """A 4-layer ViT on 64×64 images, 8×8 patches, width 128, embeddings of EMBED_DIM (~0.84 M parameters)."""
    return ImageEncoderConfig(hidden_size=128, intermediate_size=512, projection_dim=EMBED_DIM, num_hidden_layers=4,
                              num_attention_heads=4, image_size=64, patch_size=8)
