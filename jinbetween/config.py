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
FEEDFORWARD_IMPLS = ("xla", "pallas")
TEMPORAL_ATTENTION_IMPLS = ("auto", "xla", "pallas")

GROUPNORM_GROUPS = 32

_DIFFUSERS_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """`UNetSpatioTemporalConditionModel` hyper-parameters (diffusers names) plus runtime switches.

    `attention_impl` picks the spatial self-attention kernel: "auto" uses cuDNN flash attention on a
    GPU for bf16/fp16 activations, otherwise XLA (query-chunked when the logits would be large).
    `cross_attention_shortcut` replaces attention over a single context token by the exactly equal
    to_out(to_v(context)) broadcast (softmax over one key is 1). `temporal_attention_impl="pallas"` runs the core
    of each temporal self-attention (logits, softmax, probabilities·v, and GI's captured or injected maps) as one
    Triton kernel (`models/temporal_attention_kernel.py`); "auto" (the default) does so on Hopper GPUs, where it
    was faster than "xla", and uses XLA elsewhere. `feedforward_impl="pallas"` runs each GEGLU's projection and
    gate as one Triton kernel (`models/geglu_kernel.py`; experimental, slower than "xla"). The timings are in
    bench/NOTES.md ("Measurements behind the code").
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
    feedforward_impl: str = "xla"
    temporal_attention_impl: str = "auto"

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
        if self.feedforward_impl not in FEEDFORWARD_IMPLS:
            raise ConfigError(f"feedforward_impl={self.feedforward_impl!r}; choose one of {FEEDFORWARD_IMPLS}.")
        if self.temporal_attention_impl not in TEMPORAL_ATTENTION_IMPLS:
            raise ConfigError(f"temporal_attention_impl={self.temporal_attention_impl!r}; choose one of "
                              f"{TEMPORAL_ATTENTION_IMPLS}.")

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
        _check_class(config, "UNetSpatioTemporalConditionModel", "unet")
        values = _known_fields(cls, config, "UNet", _UNET_RUNTIME_FIELDS)
        n = len(values.get("down_block_types", cls.down_block_types))
        for name in _PER_BLOCK_FIELDS:
            if name in values:
                values[name] = _per_block(name, values[name], n)
        return cls(**values, **runtime)

    def to_diffusers(self) -> dict[str, Any]:
        """Returns the diffusers `config.json` dict (architecture fields only)."""
        return _to_dict(self, "UNetSpatioTemporalConditionModel", _UNET_RUNTIME_FIELDS)


_UNET_RUNTIME_FIELDS = ("attention_impl", "cross_attention_shortcut", "feedforward_impl", "temporal_attention_impl")
_VAE_RUNTIME_FIELDS = ("attention_impl", "lean_decode")
_PER_BLOCK_FIELDS = ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "num_attention_heads")


def _check_class(config: Mapping[str, Any], expected: str, folder: str) -> None:
    found = config.get("_class_name", expected)
    if found != expected:
        raise ConfigError(f"config.json describes a {found}, not a {expected}; point at the `{folder}/` folder of "
                          "an SVD pipeline.")


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


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """`AutoencoderKLTemporalDecoder` hyper-parameters (diffusers names) plus the attention kernel switch.

    The mid-block attentions have one head of width `block_out_channels[-1]` (512 for SVD), beyond
    cuDNN's head-dim limit, so "auto" means XLA (query-chunked) here.

    `lean_decode` (default on) runs the decoder's per-frame layers one frame at a time and its temporal
    layers in row tiles, so that a decoded chunk holds little more than one block's input and output at a
    time: the same arithmetic, a fraction of the memory. Off, every layer runs on the whole chunk at once.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    sample_size: int = 768
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    attention_impl: str = "auto"
    lean_decode: bool = True

    def __post_init__(self):
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ConfigError(f"VAEConfig has {len(self.down_block_types)} down_block_types but "
                              f"{len(self.block_out_channels)} block_out_channels; give one per level.")
        bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        if bad:
            raise ConfigError(f"Unsupported VAE down block type(s) {bad}; jinbetween implements DownEncoderBlock2D.")
        for c in self.block_out_channels:
            if c % GROUPNORM_GROUPS:
                raise ConfigError(f"VAE block_out_channels entry {c} is not divisible by the {GROUPNORM_GROUPS} "
                                  "GroupNorm groups; use multiples of 32.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}.")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for SVD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def replace(self, **changes: Any) -> "VAEConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], **runtime: Any) -> "VAEConfig":
        """Returns the config of a diffusers `vae/config.json` dict; unknown fields raise ConfigError."""
        _check_class(config, "AutoencoderKLTemporalDecoder", "vae")
        return cls(**_known_fields(cls, config, "VAE", _VAE_RUNTIME_FIELDS), **runtime)

    def to_diffusers(self) -> dict[str, Any]:
        """Returns the diffusers `config.json` dict (architecture fields only)."""
        return _to_dict(self, "AutoencoderKLTemporalDecoder", _VAE_RUNTIME_FIELDS)


@dataclasses.dataclass(frozen=True)
class ImageEncoderConfig:
    """transformers `CLIPVisionConfig` fields that shape the computation (OpenCLIP ViT-H/14 for SVD).

    Only these fields are read from a transformers config.json; its many generic fields (dtype,
    return_dict, id2label, ...) do not change the forward pass and are ignored.
    """

    hidden_size: int = 1280
    intermediate_size: int = 5120
    projection_dim: int = 1024
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.hidden_act not in ("gelu", "quick_gelu"):
            raise ConfigError(f"CLIP hidden_act={self.hidden_act!r} is not supported; jinbetween implements "
                              "'gelu' (exact erf, OpenCLIP/SVD) and 'quick_gelu' (OpenAI CLIP).")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"CLIP hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}.")
        if self.image_size % self.patch_size:
            raise ConfigError(f"CLIP image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}.")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def replace(self, **changes: Any) -> "ImageEncoderConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], **runtime: Any) -> "ImageEncoderConfig":
        """Returns the config of a transformers CLIPVisionModelWithProjection `config.json` dict."""
        model_type = config.get("model_type", "clip_vision_model")
        architectures = config.get("architectures") or ["CLIPVisionModelWithProjection"]
        if model_type != "clip_vision_model" or "CLIPVisionModelWithProjection" not in architectures:
            raise ConfigError(f"config.json describes {architectures} ({model_type}), not a "
                              "CLIPVisionModelWithProjection; point at the `image_encoder/` folder of an SVD pipeline.")
        fields = {f.name for f in dataclasses.fields(cls)} - {"attention_impl"}
        return cls(**{k: v for k, v in config.items() if k in fields}, **runtime)

    def to_transformers(self) -> dict[str, Any]:
        """Returns the transformers `config.json` dict (computation fields only)."""
        out = _to_dict(self, None, ("attention_impl",))
        return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model", **out}


def _known_fields(cls, config: Mapping[str, Any], what: str, runtime_fields: tuple[str, ...]) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(cls)} - set(runtime_fields)
    unknown = sorted(k for k in config if k not in fields and k not in _DIFFUSERS_META_KEYS)
    if unknown:
        raise ConfigError(f"Unsupported {what} config field(s) {unknown}; jinbetween reads {sorted(fields)}.")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}


def _to_dict(config, class_name: str | None, runtime_fields: tuple[str, ...]) -> dict[str, Any]:
    out = {"_class_name": class_name} if class_name else {}
    for f in dataclasses.fields(config):
        if f.name not in runtime_fields:
            value = getattr(config, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def svd_vae() -> VAEConfig:
    """The SVD / SVD-XT temporal-decoder VAE (`vae/` of either repo)."""
    return VAEConfig()


def svd_image_encoder() -> ImageEncoderConfig:
    """OpenCLIP ViT-H/14 vision tower with projection (`image_encoder/` of the SVD repos)."""
    return ImageEncoderConfig()


def tiny_vae() -> VAEConfig:
    """A two-level VAE (latent = pixels / 2) for tests and smoke runs on a CPU."""
    return VAEConfig(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                     layers_per_block=1, sample_size=32)


def tiny_image_encoder() -> ImageEncoderConfig:
    """A two-layer CLIP vision tower on 28×28 images (4 patches of 14) for tests and smoke runs."""
    return ImageEncoderConfig(hidden_size=64, intermediate_size=128, projection_dim=32, num_hidden_layers=2,
                              num_attention_heads=4, image_size=28, patch_size=14)
