"""PyTorch references for parity tests: diffusers modules with random weights, and attention oracles."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from jinbetween import config
from jinbetween.config import ImageEncoderConfig, UNetConfig, VAEConfig


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fills every parameter with random values so that no mapping mistake can hide behind an init.

    Weights ~ N(0, 1/fan_in) keep activations O(1) through a deep net; norm scales ~ 1 + N(0, 0.2²);
    biases, norm shifts and mix factors ~ N(0, 0.3²).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim >= 2:
                p.copy_(noise / np.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # GroupNorm / LayerNorm scale
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)
    return module.eval()


def diffusers_unet(config: UNetConfig, seed: int = 0):
    from diffusers import UNetSpatioTemporalConditionModel

    kwargs = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
    return randomize_(UNetSpatioTemporalConditionModel(**kwargs), seed)


def diffusers_vae(cfg: VAEConfig, seed: int = 0):
    from diffusers import AutoencoderKLTemporalDecoder

    return randomize_(AutoencoderKLTemporalDecoder(**{k: v for k, v in cfg.to_diffusers().items()
                                                      if not k.startswith("_")}), seed)


def transformers_clip(cfg: ImageEncoderConfig, seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg.to_transformers())), seed)


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
    """Attention processor that computes probabilities explicitly and records them as `[N, heads, F, F]`."""

    def __init__(self, store: dict, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        n, f, _ = hidden_states.shape
        q, k, v = (attn.head_to_batch_dim(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        probs = attn.get_attention_scores(q, k, None)
        self.store[self.name] = probs.reshape(n, attn.heads, f, f).cpu().numpy()
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
