"""jinbetween: two keyframes in, the video between them out (Stable Video Diffusion in JAX/Flax NNX)."""

from jinbetween import config, denoiser, models, samplers, video, weights
from jinbetween.config import ImageEncoderConfig, UNetConfig, VAEConfig
from jinbetween.errors import JinbetweenError
from jinbetween.models.attention import AttnControl, rot180
from jinbetween.pipeline import Pipeline

__all__ = ["AttnControl", "ImageEncoderConfig", "JinbetweenError", "Pipeline", "UNetConfig", "VAEConfig", "config",
           "denoiser", "models", "rot180", "samplers", "video", "weights"]
__version__ = "0.1.0"
