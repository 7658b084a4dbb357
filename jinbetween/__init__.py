"""jinbetween: two keyframes in, the video between them out (Stable Video Diffusion in JAX/Flax NNX)."""

from jinbetween import config, models
from jinbetween.config import ImageEncoderConfig, UNetConfig, VAEConfig
from jinbetween.errors import JinbetweenError
from jinbetween.models.attention import AttnControl, rot180

__all__ = ["AttnControl", "ImageEncoderConfig", "JinbetweenError", "UNetConfig", "VAEConfig", "config", "models",
           "rot180"]
__version__ = "0.1.0"
