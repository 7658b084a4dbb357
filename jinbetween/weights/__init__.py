"""Storage: safetensors I/O, the hub, the models' load and save, converted dirs and their manifests, GI's delta.

The models never import this package; it imports them (their parameter naming is `jinbetween.models.naming`).
"""

from jinbetween.weights.delta import BACKWARD_DELTA, GI_BASE_REPO, convert_gi_delta, load_delta, save_delta
from jinbetween.weights.hub import download_pipeline, download_unet, hub_allow_patterns
from jinbetween.weights.loading import (COMPONENTS, IMAGE_ENCODER_COMPONENT, UNET_COMPONENT, VAE_COMPONENT, Component,
                                        convert_pipeline, load_component, load_image_encoder, load_unet, load_vae,
                                        read_config, save_model_folder)
from jinbetween.weights.manifest import MANIFEST, check_out_dir, read_manifest, verify_component
from jinbetween.weights.release import default_weights, verify_release

__all__ = ["BACKWARD_DELTA", "COMPONENTS", "check_out_dir", "Component", "GI_BASE_REPO", "IMAGE_ENCODER_COMPONENT", "MANIFEST",
           "UNET_COMPONENT", "VAE_COMPONENT", "convert_gi_delta", "convert_pipeline", "default_weights",
           "download_pipeline", "download_unet", "hub_allow_patterns", "load_component", "load_delta",
           "load_image_encoder", "load_unet", "load_vae", "read_config", "read_manifest", "save_delta",
           "save_model_folder", "verify_component", "verify_release"]
