"""The toy world's model configs: SVD's three architectures, small enough to train here and ship in the package.

128×128 videos of 14 frames: the VAE downsamples ×8 (like SVD's) to 16×16 latents of 8 channels (SVD has 4: twice
the channels keeps the small sprites, 1–2 latent pixels wide, apart), and the UNet ×4 again. The image encoder
sees 64×64 keyframes. About 21.7 M parameters in all, ~43 MB in bf16: small enough for the CPU demo (timings in
bench/NOTES.md).
"""

from __future__ import annotations

from jinbetween.config import CROSS_ATTN_DOWN, CROSS_ATTN_UP, DOWN, UP, ImageEncoderConfig, UNetConfig, VAEConfig

EMBED_DIM = 128  # the image encoder's projection = the UNet's cross-attention width
LATENT_CHANNELS = 8


def unet_config() -> UNetConfig:
    """Three levels (64/128/192 channels, 32-wide heads) on 16×16 latents, one layer per block, 14 frames
    (~14.7 M parameters)."""
    channels = (64, 128, 192)
    return UNetConfig(
        in_channels=2 * LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
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
        sample_size=16,
    )


def vae_config() -> VAEConfig:
    """Four levels (32/64/128/128 channels): 128×128 frames ↔ 16×16×8 latents (~6.2 M parameters).

    `scaling_factor` is a placeholder here: training sets it to 1 / the latents' standard deviation.
    """
    return VAEConfig(block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
                     layers_per_block=2, latent_channels=LATENT_CHANNELS, sample_size=128, scaling_factor=1.0)


def image_encoder_config() -> ImageEncoderConfig:
    """A 4-layer ViT on 64×64 images, 8×8 patches, width 128, embeddings of EMBED_DIM (~0.84 M parameters)."""
    return ImageEncoderConfig(hidden_size=128, intermediate_size=512, projection_dim=EMBED_DIM, num_hidden_layers=4,
                              num_attention_heads=4, image_size=64, patch_size=8)
