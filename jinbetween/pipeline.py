"""Pipeline: loads the three SVD models once, encodes keyframes, runs a sampler, decodes the video."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from jinbetween import conditioning, schedule
from jinbetween.conditioning import Conditioning
from jinbetween.conversion import (IMAGE_ENCODER_COMPONENT, MANIFEST, UNET_COMPONENT, VAE_COMPONENT, read_manifest,
                                   save_model_folder)
from jinbetween.errors import ConfigError, ImageError, InputShapeError
from jinbetween.models import VAE, ImageEncoder, UNet
from jinbetween.models.state import ModelState
from jinbetween.delta import BACKWARD_DELTA, Delta, load_delta, save_delta
from jinbetween.errors import WeightsNotFoundError
from jinbetween.samplers import METHODS
from jinbetween.samplers.core import Draws, sampling_progress
from jinbetween.samplers.i2v import I2VConfig, sample_i2v
from jinbetween.video import check_size

log = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray

# What `save_pretrained` writes besides the models: diffusers' SVD scheduler and the pipeline's component classes.
_SVD_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
                  "interpolation_type": "linear", "use_karras_sigmas": True, "timestep_spacing": "leading",
                  "timestep_type": "continuous", "steps_offset": 1, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "clip_sample": False}
_PIPELINE_CLASSES = {"feature_extractor": ("transformers", "CLIPImageProcessor"),
                     "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
                     "scheduler": ("diffusers", "EulerDiscreteScheduler"),
                     "unet": ("diffusers", "UNetSpatioTemporalConditionModel"),
                     "vae": ("diffusers", "AutoencoderKLTemporalDecoder")}


def default_dtype():
    """bf16 parameters on a GPU, float32 elsewhere."""
    return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32


@jax.jit
def _encode(vae: ModelState[VAE], encoder: ModelState[ImageEncoder], pixels, clip_input, aug_keys, aug_noise,
            time_ids) -> Conditioning:
    if aug_noise is None:
        aug_noise = jax.vmap(lambda k: jax.random.normal(k, pixels.shape[1:]))(aug_keys)
    return conditioning.encode_keyframes(vae.merge(), encoder.merge(), pixels, clip_input, aug_noise, time_ids)


class Pipeline:
    """The SVD models plus the pipeline settings (CLIP normalization, noise schedule range)."""

    def __init__(self, unet: UNet, vae: VAE, image_encoder: ImageEncoder, *, clip_mean=conditioning.CLIP_MEAN,
                 clip_std=conditioning.CLIP_STD, sigma_min: float = schedule.SIGMA_MIN,
                 sigma_max: float = schedule.SIGMA_MAX, default_size: tuple[int, int] = (576, 1024),
                 backward_delta: Delta | None = None):
        self.unet, self.vae, self.image_encoder = unet, vae, image_encoder
        self.backward_delta = backward_delta
        self.clip_mean, self.clip_std = tuple(clip_mean), tuple(clip_std)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.default_size = default_size
        self._unet_state, self._vae_state, self._encoder_state = (ModelState.of(m) for m in (unet, vae, image_encoder))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, dtype=None, **runtime: Any) -> "Pipeline":
        """Loads a converted jinbetween dir or a diffusers SVD pipeline folder (parameters in `dtype`,
        default bf16 on GPU and float32 elsewhere); `runtime` overrides UNet switches like `attention_impl`.
        Without a path: the shipped toy-world model (`jinbetween.toyworld.release`), which models that world only.

        A converted dir's GI backward delta (`gi_backward/`, see `convert_weights.py --gi-unet`) is loaded too.
        """
        if path is None:
            from jinbetween.toyworld.release import default_weights

            path = default_weights()
        path = Path(path)
        dtype = dtype or default_dtype()
        settings = _pipeline_settings(path)
        unet = UNet.from_pretrained(path, dtype=dtype, **runtime)
        delta = load_delta(path / BACKWARD_DELTA, unet.config) if (path / BACKWARD_DELTA).exists() else None
        return cls(unet, VAE.from_pretrained(path, dtype=dtype), ImageEncoder.from_pretrained(path, dtype=dtype),
                   backward_delta=delta, **settings)

    def save_pretrained(self, path: str | os.PathLike, *, dtype=jnp.float32,
                        max_shard_bytes: int | None = None) -> Path:
        """Writes the pipeline as a diffusers `StableVideoDiffusionPipeline` folder (weights in `dtype`), which
        `from_pretrained` (and diffusers) read back, plus the backward delta in `gi_backward/` if there is one.

        For models trained with jinbetween (the toy world's); converted SVD weights need no saving.
        """
        path = Path(path)
        for module, component in ((self.unet, UNET_COMPONENT), (self.vae, VAE_COMPONENT),
                                  (self.image_encoder, IMAGE_ENCODER_COMPONENT)):
            save_model_folder(module, path / component.name, component, dtype=dtype, max_shard_bytes=max_shard_bytes)
        configs = {
            "model_index.json": {"_class_name": "StableVideoDiffusionPipeline",
                                 "_jinbetween_default_size": list(self.default_size),
                                 **{name: list(kind) for name, kind in _PIPELINE_CLASSES.items()}},
            "scheduler/scheduler_config.json": {**_SVD_SCHEDULER, "sigma_min": self.sigma_min,
                                                "sigma_max": self.sigma_max},
            "feature_extractor/preprocessor_config.json": {
                "image_processor_type": "CLIPImageProcessor", "image_mean": list(self.clip_mean),
                "image_std": list(self.clip_std), "do_normalize": True, "do_resize": True, "do_center_crop": True,
                "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3,
                "size": {"shortest_edge": self.image_encoder.config.image_size},
                "crop_size": {"height": self.image_encoder.config.image_size,
                              "width": self.image_encoder.config.image_size}},
        }
        for relative, config in configs.items():
            (path / relative).parent.mkdir(parents=True, exist_ok=True)
            (path / relative).write_text(json.dumps(config, indent=2) + "\n")
        if self.backward_delta is not None:
            save_delta(path / BACKWARD_DELTA, self.backward_delta, self.unet.config)
        return path

    def load_backward_delta(self, path: str | os.PathLike) -> None:
        """Uses the GI backward delta saved at `path` (a converted `gi_backward/` or a fine-tune's output)."""
        self.backward_delta = load_delta(path, self.unet.config)

    @property
    def size_multiple(self) -> int:
        """Video height and width must be multiples of this (64 for SVD: VAE ×8, UNet ×8)."""
        return self.vae.config.downsample_factor * self.unet.config.downsample_factor

    def encode(self, images: np.ndarray, *, keys: jax.Array | None = None, aug_noise: np.ndarray | None = None,
               fps: float = 7, motion_bucket_id: float = 127, noise_aug_strength: float = 0.02) -> Conditioning:
        """Returns the Conditioning of uint8 keyframes `[N, H, W, 3]`; augmentation noise from `keys [N]`
        unless `aug_noise [N, H, W, 3]` is given."""
        images = np.asarray(images)
        check_size(images.shape[1], images.shape[2], self.size_multiple)
        clip_input = conditioning.clip_pixels(images, self.image_encoder.config.image_size, self.clip_mean,
                                              self.clip_std)
        time_ids = conditioning.added_time_ids(fps, motion_bucket_id, noise_aug_strength)
        return _encode(self._vae_state, self._encoder_state, conditioning.vae_pixels(images), clip_input, keys,
                       None if aug_noise is None else jnp.asarray(aug_noise, jnp.float32), time_ids)

    def decode(self, latents: jax.Array, chunk_size: int | None = None) -> np.ndarray:
        """Returns float32 frames `[B, F, H, W, 3]` in [0, 1] for sampler latents `[B, F, h, w, C]`.

        Videos are decoded one at a time (diffusers flattens the batch, so its chunks can straddle videos).
        """
        videos = [self.vae.decode_video(video, chunk_size) for video in latents]
        return np.clip(np.stack([np.asarray(v) for v in videos]) / 2 + 0.5, 0, 1)

    def image_to_video(self, image: ImageLike | Sequence[ImageLike], *, key: jax.Array | None = None,
                       num_frames: int | None = None, num_inference_steps: int = 25, fps: float = 7,
                       motion_bucket_id: float = 127, noise_aug_strength: float = 0.02,
                       min_guidance_scale: float = 1.0, max_guidance_scale: float = 3.0,
                       decode_chunk_size: int | None = None, latents: np.ndarray | None = None,
                       aug_noise: np.ndarray | None = None, output: str = "uint8", first_index: int = 0,
                       progress: bool = False) -> np.ndarray:
        """Returns the video that starts at `image`: uint8 `[F, H, W, 3]`, float32 in [0, 1] with
        `output="float"`, or the sampler's latents `[F, h, w, C]` with `output="latent"`; a list of images
        gives a leading batch axis.

        Image i uses `fold_in(key, first_index + i)` (a random seed when `key` is None), so a result never
        depends on the batch it ran in: split a global batch anywhere and pass each part its first index.
        `latents` (`[F, h, w, C]` standard normal, scaled by √(σmax²+1) here, as diffusers does) and
        `aug_noise` (`[H, W, 3]`) replace the two random draws, for parity with other implementations.
        """
        _check_output(output)
        batched = isinstance(image, (list, tuple))
        images = _as_uint8_batch(image if batched else [image])
        num_frames = num_frames or self.unet.config.num_frames
        aug_keys, noise_keys = _sample_keys(key, first_index, len(images))
        cond = self.encode(images, keys=aug_keys, aug_noise=_batch_of(aug_noise, batched), fps=fps,
                           motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength)
        cfg = I2VConfig(num_frames=num_frames, num_steps=num_inference_steps, min_guidance_scale=min_guidance_scale,
                        max_guidance_scale=max_guidance_scale, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                        progress=progress)
        with _progress_bar(len(cfg.program()) if progress else 0):
            video_latents = sample_i2v(self._unet_state, cond, noise_keys, cfg, _batch_of(latents, batched))
        frames = self._finish(video_latents, output, decode_chunk_size)
        return frames if batched else frames[0]

    def interpolate(self, start: ImageLike | Sequence[ImageLike], end: ImageLike | Sequence[ImageLike], *,
                    method: str = "gi", key: jax.Array | None = None, num_frames: int | None = None,
                    num_inference_steps: int | None = None, fps: float | None = None,
                    motion_bucket_id: float = 127, noise_aug_strength: float = 0.02,
                    decode_chunk_size: int | None = None, output: str = "uint8", first_index: int = 0,
                    progress: bool = False, allow_untrained_backward: bool = False, draws: Draws | None = None,
                    **options: Any) -> np.ndarray:
        """Returns the video from `start` to `end`: uint8 `[F, H, W, 3]` (float32 in [0, 1] with `output="float"`,
        latents with `output="latent"`); lists of keyframes give a leading batch axis of pairs.

        method: "gi", "trf", "mpd" (MPD-par), "mpd-seq" or "vibid" (`jinbetween.samplers.METHODS`).
        num_inference_steps and fps default to each method's official values (GI and TRF 50 steps at
        fps 7, MPD 25 at fps 9, ViBiD 25 at fps 7). `options` set fields of the method's config
        (e.g. `noise_injection_steps=0` for GI, `faithful=True` for TRF). Pair i uses
        `fold_in(key, first_index + i)`, as in `image_to_video`. GI needs a backward delta
        (`load_backward_delta`); `allow_untrained_backward=True` runs it with the base weights instead
        (the paper's "w/o fine-tuning" ablation). `draws` injects every random draw (tests, parity).
        """
        _check_output(output)
        if method not in METHODS:
            raise ConfigError(f"Unknown method {method!r}; choose one of {sorted(METHODS)}.")
        spec = METHODS[method]
        if spec.uses_delta and self.backward_delta is None and not allow_untrained_backward:
            raise WeightsNotFoundError(
                "GI needs its backward model: a delta on the temporal attention W_v/W_o. Convert GI's released "
                "UNet with `python convert_weights.py --gi-unet PATH/unet --gi-base "
                "stabilityai/stable-video-diffusion-img2vid --out WEIGHTS_DIR` (then load WEIGHTS_DIR), train one "
                "with `jinbetween finetune`, or pass allow_untrained_backward=True (CLI: --allow-untrained-backward) "
                "to run the paper's ablation without fine-tuning.")
        batched = isinstance(start, (list, tuple))
        starts = _as_uint8_batch(start if batched else [start])
        ends = _as_uint8_batch(end if isinstance(end, (list, tuple)) else [end])
        if starts.shape != ends.shape:
            raise InputShapeError(f"Start keyframes {starts.shape} and end keyframes {ends.shape} differ; pass as "
                                  "many ends as starts, all of one size.")
        n = len(starts)
        cfg = _method_config(spec, num_frames=num_frames or self.unet.config.num_frames,
                             num_steps=num_inference_steps, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                             progress=progress, **options)
        aug_keys, sample_keys = _sample_keys(key, first_index, n)
        if spec.shared_aug_noise:
            pair_aug_keys = jnp.concatenate([aug_keys, aug_keys])
        else:
            pair_aug_keys = jnp.concatenate([jax.vmap(lambda k: jax.random.fold_in(k, j))(aug_keys) for j in (0, 1)])
        cond = self.encode(np.concatenate([starts, ends]), keys=pair_aug_keys, fps=spec.fps if fps is None else fps,
                           motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength)
        start_cond, end_cond = (jax.tree.map(lambda a, s=s: a[s], cond) for s in (slice(0, n), slice(n, 2 * n)))
        extra = (self.backward_delta,) if spec.uses_delta else ()
        with _progress_bar(len(cfg.program()) if progress else 0):
            video_latents = spec.sample(self._unet_state, start_cond, end_cond, sample_keys, cfg, *extra,
                                        draws=draws)
        frames = self._finish(video_latents, output, decode_chunk_size)
        return frames if batched else frames[0]

    def _finish(self, video_latents: jax.Array, output: str, decode_chunk_size: int | None) -> np.ndarray:
        if output == "latent":
            return np.asarray(video_latents)
        frames = self.decode(video_latents, decode_chunk_size)
        return frames if output == "float" else np.round(frames * 255).astype(np.uint8)


def _check_output(output: str) -> None:
    if output not in ("uint8", "float", "latent"):
        raise ValueError(f"output={output!r}; choose 'uint8', 'float' or 'latent'.")


def _sample_keys(key: jax.Array | None, first_index: int, n: int) -> tuple[jax.Array, jax.Array]:
    """(augmentation keys, sampler keys), each `[n]`: sample i derives both from `fold_in(key, first_index + i)`."""
    if key is None:
        seed = secrets.randbits(31)
        log.info("sampling with seed %d", seed)
        key = jax.random.key(seed)
    sample_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(n))
    return tuple(jax.vmap(lambda k: jax.random.split(k)[j])(sample_keys) for j in (0, 1))


def _method_config(spec, *, num_steps: int | None, **fields: Any):
    """The method's config with the pipeline's fields and the caller's options (unknown names refused)."""
    if num_steps is not None:
        fields["num_steps"] = num_steps
    known = {f.name for f in dataclasses.fields(spec.config())}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{spec.name} has no option(s) {unknown}; its options are {sorted(known)}.")
    return spec.config(**fields)


@contextlib.contextmanager
def _progress_bar(total: int):
    """A tqdm bar over sampling steps, fed by the samplers' step callback (nothing when total is 0)."""
    if not total:
        yield
        return
    with tqdm(total=total, desc="denoising", unit="step") as bar, sampling_progress(lambda step: bar.update()):
        yield


def _batch_of(array: np.ndarray | None, batched: bool) -> np.ndarray | None:
    """An injected draw as float32 with a leading batch axis (added for a single image)."""
    if array is None:
        return None
    array = np.asarray(array, np.float32)
    return array if batched else array[None]


def _as_uint8_batch(images: Sequence[ImageLike]) -> np.ndarray:
    arrays = []
    for image in images:
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ImageError(f"A keyframe has shape {image.shape}; pass PIL images or uint8 arrays [H, W, 3] "
                             "(jinbetween.video.read_keyframe reads files).")
        if image.dtype != np.uint8:
            if image.min() < 0 or image.max() > 1:
                raise ImageError("Float keyframes must be in [0, 1]; pass uint8 arrays for 0..255 data.")
            image = np.round(image * 255).astype(np.uint8)
        arrays.append(image)
    if len({a.shape for a in arrays}) > 1:
        raise InputShapeError(f"Keyframes of one batch must share a size, got {sorted({a.shape for a in arrays})}; "
                              "fit them with jinbetween.video.fit_image.")
    return np.stack(arrays)


def _pipeline_settings(path: Path) -> dict[str, Any]:
    """CLIP normalization and the noise range from a converted dir's manifest or a diffusers pipeline folder."""
    root = path if (path / MANIFEST).exists() else path.parent if (path.parent / MANIFEST).exists() else None
    if root is not None:
        configs = read_manifest(root).get("pipeline", {})
    else:
        configs = {name: json.loads((path / rel).read_text()) for name, rel in (
            ("feature_extractor", "feature_extractor/preprocessor_config.json"),
            ("scheduler", "scheduler/scheduler_config.json"), ("model_index", "model_index.json"))
            if (path / rel).exists()}
    settings: dict[str, Any] = {}
    extractor = configs.get("feature_extractor", {})
    if "image_mean" in extractor:
        settings.update(clip_mean=extractor["image_mean"], clip_std=extractor["image_std"])
    scheduler = configs.get("scheduler", {})
    if scheduler.get("prediction_type", "v_prediction") != "v_prediction":
        raise ConfigError(f"The scheduler config asks for {scheduler['prediction_type']} prediction; jinbetween "
                          "implements SVD's v-prediction EDM sampler only.")
    settings.update({k: float(scheduler[k]) for k in ("sigma_min", "sigma_max") if scheduler.get(k) is not None})
    size = configs.get("model_index", {}).get("_jinbetween_default_size")
    if size is not None:
        settings["default_size"] = tuple(int(n) for n in size)
    return settings
