"""Model configs: frozen dataclasses, presets, and translation from/to diffusers `config.json`.

Architecture fields mirror the diffusers config so a converted checkpoint can be audited field by
field; per-block fields are normalized to tuples. Runtime fields (attention kernel, cross-attention
shortcut) do not change the parameters and are not part of the diffusers config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jinbetween.errors import ConfigError

CROSS_ATTN_DOWN = "CrossAttnDownBlockSpatioTemporal"
DOWN = "DownBlockSpatioTemporal"
CROSS_ATTN_UP = "CrossAttnUpBlockSpatioTemporal"
UP = "UpBlockSpatioTemporal"
DOWN_BLOCK_TYPES = (CROSS_ATTN_DOWN, DOWN)
UP_BLOCK_TYPES = (CROSS_ATTN_UP, UP)

ATTENTION_IMPLS = ("auto", "xla", "xla_chunked", "cudnn")

GROUPNORM_GROUPS = 32

_DIFFUSERS_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """`UNetSpatioTemporalConditionModel` hyper-parameters (diffusers names) plus runtime switches.

    `attention_impl` picks the spatial self-attention kernel: "auto" uses cuDNN flash attention on a
    GPU for bf16/fp16 activations, otherwise XLA (query-chunked when the logits would be large).
    `cross_attention_shortcut` replaces attention over a single context token by the exactly equal
    to_out(to_v(context)) broadcast (softmax over one key is 1).
    """

    in_channels: int = 8
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, DOWN)
    up_block_types: tuple[str, ...] = (UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 768
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    cross_attention_dim: tuple[int, ...] = (1024, 1024, 1024, 1024)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_attention_heads: tuple[int, ...] = (5, 10, 20, 20)
    num_frames: int = 25
    sample_size: int | None = 96
    attention_impl: str = "auto"
    cross_attention_shortcut: bool = True

    def __post_init__(self):
        n = len(self.down_block_types)
        for name in ("up_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
                     "transformer_layers_per_block", "num_attention_heads"):
            if len(getattr(self, name)) != n:
                raise ConfigError(
                    f"UNetConfig.{name} has {len(getattr(self, name))} entries but there are {n} down blocks; "
                    "give one entry per block (or a single int in from_diffusers).")
        for kind, types, allowed in (("down", self.down_block_types, DOWN_BLOCK_TYPES),
                                     ("up", self.up_block_types, UP_BLOCK_TYPES)):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ConfigError(f"Unsupported {kind} block type(s) {bad}; jinbetween implements {list(allowed)}.")
        for c, heads in zip(self.block_out_channels, self.num_attention_heads):
            if c % GROUPNORM_GROUPS:
                raise ConfigError(f"block_out_channels entry {c} is not divisible by the {GROUPNORM_GROUPS} "
                                  "GroupNorm groups; use multiples of 32.")
            if c % heads:
                raise ConfigError(f"block_out_channels entry {c} is not divisible by num_attention_heads {heads}.")
        if self.num_ids * self.addition_time_embed_dim != self.projection_class_embeddings_input_dim:
            raise ConfigError(
                f"projection_class_embeddings_input_dim={self.projection_class_embeddings_input_dim} is not a "
                f"multiple of addition_time_embed_dim={self.addition_time_embed_dim}.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}.")

    @property
    def num_ids(self) -> int:
        """Number of added-time conditioning values per video (3 for SVD: fps-1, motion bucket, noise aug)."""
        return self.projection_class_embeddings_input_dim // self.addition_time_embed_dim

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def downsample_factor(self) -> int:
        """Ratio of the latent size to the coarsest level's size (8 for SVD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def replace(self, **changes: Any) -> "UNetConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], **runtime: Any) -> "UNetConfig":
        """Returns the config of a diffusers `unet/config.json` dict; unknown fields raise ConfigError."""
        class_name = config.get("_class_name", "UNetSpatioTemporalConditionModel")
        if class_name != "UNetSpatioTemporalConditionModel":
            raise ConfigError(f"config.json describes a {class_name}, not a UNetSpatioTemporalConditionModel; "
                              "point at the `unet/` folder of an SVD pipeline.")
        arch_fields = {f.name for f in dataclasses.fields(cls)} - {"attention_impl", "cross_attention_shortcut"}
        unknown = sorted(k for k in config if k not in arch_fields and k not in _DIFFUSERS_META_KEYS)
        if unknown:
            raise ConfigError(f"Unsupported UNet config field(s) {unknown}; jinbetween reads {sorted(arch_fields)}.")
        n = len(config.get("down_block_types", cls.down_block_types))
        values: dict[str, Any] = {}
        for name, value in config.items():
            if name in _DIFFUSERS_META_KEYS:
                continue
            if name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                        "num_attention_heads"):
                value = _per_block(name, value, n)
            elif name in ("down_block_types", "up_block_types", "block_out_channels"):
                value = tuple(value)
            values[name] = value
        return cls(**values, **runtime)

    def to_diffusers(self) -> dict[str, Any]:
        """Returns the diffusers `config.json` dict (architecture fields only)."""
        out = {"_class_name": "UNetSpatioTemporalConditionModel"}
        for f in dataclasses.fields(self):
            if f.name in ("attention_impl", "cross_attention_shortcut"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _per_block(name: str, value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if any(not isinstance(v, int) for v in value):
        raise ConfigError(f"UNet config field {name}={value!r}: nested per-layer values are not supported; "
                          "give one int per block.")
    return tuple(value)


def svd_xt() -> UNetConfig:
    """SVD-XT (`stabilityai/stable-video-diffusion-img2vid-xt`), 25 frames: `convert_weights.py --repo ...-xt`."""
    return UNetConfig()


def svd() -> UNetConfig:
    """Plain SVD (`stabilityai/stable-video-diffusion-img2vid`): same network, trained for 14 frames."""
    return UNetConfig(num_frames=14)


def tiny() -> UNetConfig:
    """A two-level UNet with every SVD block type, for tests and smoke runs on a CPU (~1.3 M parameters)."""
    return UNetConfig(
        down_block_types=(CROSS_ATTN_DOWN, DOWN),
        up_block_types=(UP, CROSS_ATTN_UP),
        block_out_channels=(32, 64),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
        layers_per_block=(1, 1),
        cross_attention_dim=(32, 32),
        transformer_layers_per_block=(1, 1),
        num_attention_heads=(2, 4),
        num_frames=4,
        sample_size=8,
    )
