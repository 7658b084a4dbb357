"""PyTorch references for parity tests: diffusers modules with random weights, and attention oracles."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch

from jinbetween import config
from jinbetween.config import ImageEncoderConfig, UNetConfig, VAEConfig


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fills every parameter with random values so that no mapping mistake can hide behind an init.

    Weights ~ N(0, 1/fan_in) keep activations O(1) through a deep net; norm scales ~ 1 + N(0, 0.2²);
    biases, norm shifts and mix factors ~ N(0, 0.3²). The draws come from a generator on the module's device (the
    values depend on the device: benchmarks build on the GPU, where drawing 1.5 G numbers takes milliseconds).
    """
    device = next(module.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, device=device)
            if p.ndim >= 2:
                p.copy_(noise / np.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # GroupNorm / LayerNorm scale
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)
    return module.eval()


def _built_on(device: str, build, seed: int) -> torch.nn.Module:
    """`build()` made on `device` (then moved there: diffusers' AlphaBlender makes its mix factor with the legacy
    `torch.Tensor(...)`, which ignores the default device), with random weights."""
    with torch.device(device):
        return randomize_(build().to(device), seed)


def diffusers_unet(config: UNetConfig, seed: int = 0, device: str = "cpu"):
    """diffusers' UNet of `config` with random weights, on `device`."""
    from diffusers import UNetSpatioTemporalConditionModel

    kwargs = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
    return _built_on(device, lambda: UNetSpatioTemporalConditionModel(**kwargs), seed)


def diffusers_vae(cfg: VAEConfig, seed: int = 0, device: str = "cpu"):
    from diffusers import AutoencoderKLTemporalDecoder

    kwargs = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    return _built_on(device, lambda: AutoencoderKLTemporalDecoder(**kwargs), seed)


def transformers_clip(cfg: ImageEncoderConfig, seed: int = 0, device: str = "cpu"):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return _built_on(device, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg.to_transformers())), seed)


# scheduler/scheduler_config.json of the SVD repos (svd_port.md §1.6).
SVD_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "sigma_max": 700.0, "sigma_min": 0.002,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "timestep_type": "continuous",
    "trained_betas": None, "use_karras_sigmas": True}

# The pipeline resizes CLIP input to 224×224 whatever the encoder's config says, so tiny pipelines use a
# 224-pixel encoder with 32-pixel patches (49 tokens).
TINY_PIPELINE_CLIP = config.tiny_image_encoder().replace(image_size=224, patch_size=32)


def diffusers_svd_pipeline(seed: int = 0):
    """A StableVideoDiffusionPipeline of tiny random components (UNet and VAE each downsample by 2)."""
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor

    return StableVideoDiffusionPipeline(
        vae=diffusers_vae(config.tiny_vae(), seed), image_encoder=transformers_clip(TINY_PIPELINE_CLIP, seed),
        unet=diffusers_unet(config.tiny(), seed), scheduler=EulerDiscreteScheduler.from_config(SVD_SCHEDULER),
        feature_extractor=CLIPImageProcessor())


def torch_unet_forward(unet, x, c_noise, image_embeds, added_time_ids) -> np.ndarray:
    """Runs diffusers on channels-last numpy inputs; returns v as `[B, F, h, w, C]` numpy."""
    device = next(unet.parameters()).device
    x, c_noise, image_embeds, added_time_ids = (torch.from_numpy(np.array(a)).to(device)
                                                for a in (x, c_noise, image_embeds, added_time_ids))
    with torch.no_grad():
        out = unet(x.permute(0, 1, 4, 2, 3), c_noise, image_embeds, added_time_ids).sample
    return out.permute(0, 1, 3, 4, 2).cpu().numpy()


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


class CaptureProcessor:
    """Attention processor that computes probabilities explicitly and records them as `[N, heads, F, F]`:
    numpy arrays, or with `as_numpy=False` detached torch tensors on their device."""

    def __init__(self, store: dict, name: str, as_numpy: bool = True):
        self.store, self.name, self.as_numpy = store, name, as_numpy

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        n, f, _ = hidden_states.shape
        q, k, v = (attn.head_to_batch_dim(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        probs = attn.get_attention_scores(q, k, None)
        maps = probs.detach().reshape(n, attn.heads, f, f)
        self.store[self.name] = maps.cpu().numpy() if self.as_numpy else maps
        return attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v)))


class InjectProcessor:
    """Attention processor that outputs `to_out(P @ to_v(x))` with a given `P [N, heads, F, F]` (GI's backward pass)."""

    def __init__(self, probs: np.ndarray):
        self.probs = torch.from_numpy(np.array(probs))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        n, f, _ = hidden_states.shape
        v = attn.head_to_batch_dim(attn.to_v(hidden_states))
        probs = self.probs.to(v.device).reshape(-1, f, f)
        return attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v)))


@contextlib.contextmanager
def temporal_processors(unet, make_processor):
    """Installs `make_processor(layer_name)` on every temporal self-attention layer; yields their names.

    The original processors are put back on exit.
    """
    layers = {name: module for name, module in unet.named_modules()
              if name.endswith("attn1") and ".temporal_transformer_blocks." in name}
    originals = {name: module.processor for name, module in layers.items()}
    for name, module in layers.items():
        module.set_processor(make_processor(name))
    try:
        yield list(layers)
    finally:
        for name, module in layers.items():
            module.set_processor(originals[name])


# --------------------------------------------------------------------------------------------------
# GI's backward-motion fine-tune step (`train_reverse_motion_with_attnflip.py`, algorithms.md §3.4), in torch.


def set_temporal_processors(unet, make_processor) -> list[str]:
    """Installs `make_processor(layer_name)` on every temporal self-attention layer and leaves it there.

    Unlike `temporal_processors`, nothing is restored: activation checkpointing re-runs the forward during
    `backward()`, after any `with` block around the forward pass would have ended.
    """
    layers = [(name, module) for name, module in unet.named_modules()
              if name.endswith("attn1") and ".temporal_transformer_blocks." in name]
    for name, module in layers:
        module.set_processor(make_processor(name))
    return [name for name, _ in layers]


class TensorInjectProcessor:
    """Outputs `to_out(P @ to_v(x))` with `P = store[name]` read at call time, rotated by 180° if `rotate`.

    scores: also compute this layer's own probabilities and use `0·P_own + P`, as GI's AttentionFlipCtrlProcessor
    does (the same values, more work: a benchmark of GI's own step wants it, an oracle does not).
    """

    def __init__(self, store: dict, name: str, rotate: bool = True, scores: bool = False):
        self.store, self.name, self.rotate, self.scores = store, name, rotate, scores

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        n, f, _ = hidden_states.shape
        v = attn.head_to_batch_dim(attn.to_v(hidden_states))
        probs = self.store[self.name]
        probs = (probs.flip(-2, -1) if self.rotate else probs).reshape(-1, f, f).to(v.dtype)
        if self.scores:
            q, k = (attn.head_to_batch_dim(proj(hidden_states)) for proj in (attn.to_q, attn.to_k))
            probs = 0.0 * attn.get_attention_scores(q, k, None) + probs
        return attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v)))


@dataclasses.dataclass(frozen=True)
class TorchConditioning:
    """One conditioning image per clip, in diffusers' layout."""

    image_embeds: torch.Tensor  # [B, 1, D] CLIP embedding
    image_latent: torch.Tensor  # [B, C, h, w] unscaled VAE latent of the noise-augmented image
    added_time_ids: torch.Tensor  # [B, 3]

    def to(self, *args) -> "TorchConditioning":
        return TorchConditioning(*(t.to(*args) for t in dataclasses.astuple(self)))


def gi_finetune_loss(ref_unet, unet, z: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
                     cond: TorchConditioning, reference: TorchConditioning, *, params: dict | None = None,
                     rotate: bool = True, inject_scores: bool = False,
                     autocast=contextlib.nullcontext) -> torch.Tensor:
    """Returns GI's fine-tune loss (float32 scalar) for reversed clips `z [B, F, C, h, w]`, noise σ `[B]`, ε like z.

    The frozen `ref_unet` (in its own dtype, no autocast, no gradient) sees `[c_in·flip_t(z_t) ; reference latent]`
    and the reference embedding, and its temporal attn1 probabilities are captured; the trainable `unet` sees
    `[c_in·z_t ; cond latent]` and the cond embedding under `autocast()`, each temporal attn1 using the captured
    map of its layer rotated by 180°. `params` (name → tensor) replaces parameters of `unet` for this call
    (`torch.func.functional_call`), so a gradient can be taken w.r.t. anything they are computed from.
    Preconditioning (EDM v-prediction): c_in = 1/√(σ²+1), c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1),
    c_noise = ¼ ln σ; loss = mean(((1+σ²)/σ²)·(c_skip·z_t + c_out·v − z)²).
    """
    s = sigma[:, None, None, None, None]
    z_t = z + s * eps
    c_in, c_skip, c_out = (s**2 + 1) ** -0.5, 1 / (s**2 + 1), -s / (s**2 + 1) ** 0.5
    c_noise = 0.25 * sigma.log()

    def unet_input(scaled, keyframe: TorchConditioning):
        frames = keyframe.image_latent[:, None].expand(-1, scaled.shape[1], -1, -1, -1)
        return torch.cat([scaled, frames.to(scaled.dtype)], dim=2)

    maps: dict[str, torch.Tensor] = {}
    set_temporal_processors(ref_unet, lambda name: CaptureProcessor(maps, name, as_numpy=False))
    set_temporal_processors(unet, lambda name: TensorInjectProcessor(maps, name, rotate, inject_scores))
    ref_dtype = next(ref_unet.parameters()).dtype
    with torch.no_grad():
        reference = reference.to(ref_dtype)
        ref_unet(unet_input(c_in * z_t.flip(1), reference).to(ref_dtype), c_noise.to(ref_dtype),
                 encoder_hidden_states=reference.image_embeds, added_time_ids=reference.added_time_ids)
    args = (unet_input(c_in * z_t, cond), c_noise)
    kwargs = dict(encoder_hidden_states=cond.image_embeds, added_time_ids=cond.added_time_ids, return_dict=False)
    with autocast():
        v = (unet(*args, **kwargs) if params is None else torch.func.functional_call(unet, params, args, kwargs))[0]
    x0 = c_skip * z_t + c_out * v.float()
    return ((1 + s**2) / s**2 * (x0 - z) ** 2).mean()
