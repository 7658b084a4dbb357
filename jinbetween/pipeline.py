"""Pipeline: loads the three SVD models once, encodes keyframes, runs a sampler, decodes the video."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from PIL import Image
from tqdm.auto import tqdm

from jinbetween import atomic, checks, conditioning, distributed, hardware, schedule, sequence
from jinbetween.conditioning import Conditioning
from jinbetween.errors import ConfigError, DivergedError, ImageError, InputShapeError, WeightsNotFoundError
from jinbetween.models import VAE, ImageEncoder, UNet
from jinbetween.models.delta import Delta
from jinbetween.models.state import ModelState
from jinbetween.samplers import METHODS, Method
from jinbetween.samplers.core import Draws, Sampled
from jinbetween.samplers.i2v import I2VConfig, sample_i2v
from jinbetween.video import check_size
from jinbetween.weights import load_image_encoder, load_unet, load_vae
from jinbetween.weights.delta import BACKWARD_DELTA, load_delta, save_delta
from jinbetween.weights.loading import (IMAGE_ENCODER_COMPONENT, UNET_COMPONENT, VAE_COMPONENT, nonfinite_parameters,
                                        raise_nonfinite, read_config, save_model_folder)
from jinbetween.weights.manifest import MANIFEST, read_manifest

log = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray
Pair = tuple[ImageLike, ImageLike] | tuple[ImageLike, ImageLike, jax.Array]  # (start, end[, key])

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
    """Returns the parameter dtype: bf16 on an Ampere or newer GPU, fp16 on older GPUs (T4, V100: no bf16 tensor
    cores), float32 elsewhere."""
    if jax.default_backend() != "gpu":
        return jnp.float32
    if hardware.modern_gpu():
        return jnp.bfloat16
    hardware.note_old_gpu("fp16 parameters (no bf16 tensor cores)")
    return jnp.float16


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """What a weights folder holds, read from its configs alone: the video size it defaults to, the multiple that
    heights and widths must be, the UNet's frame count, and whether it carries a GI backward delta."""

    path: Path
    default_size: tuple[int, int]
    size_multiple: int
    num_frames: int
    has_backward_delta: bool


def weights_info(path: str | os.PathLike | None = None) -> WeightsInfo:
    """Returns the WeightsInfo of a converted dir or diffusers SVD pipeline folder (None: the shipped toy-world
    model) without loading any weights, so that arguments can be checked before the slow load."""
    path = Path(path) if path is not None else _default_weights()
    unet, vae = read_config(path, UNET_COMPONENT), read_config(path, VAE_COMPONENT)
    return WeightsInfo(path=path, default_size=_pipeline_settings(path).get("default_size", (576, 1024)),
                       size_multiple=vae.downsample_factor * unet.downsample_factor, num_frames=unet.num_frames,
                       has_backward_delta=(path / BACKWARD_DELTA).exists())


def _default_weights() -> Path:
    from jinbetween.weights.release import default_weights

    return default_weights()


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
        self._step_bar = _StepBar()
        self._replicas: dict[Mesh, tuple[ModelState, ModelState, ModelState]] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, dtype=None, verify: bool = True,
                        **runtime: Any) -> "Pipeline":
        """Loads a converted jinbetween dir or a diffusers SVD pipeline folder (parameters in `dtype`,
        default bf16 on GPU and float32 elsewhere); `runtime` overrides UNet switches like `attention_impl`.
        Without a path: the shipped toy-world model (`jinbetween.weights.release`), which models that world only.

        A converted dir's GI backward delta (`gi_backward/`, see `convert_weights.py --gi-unet`) is loaded too.
        The files are first checked against the sha256 hashes the folder records (a converted dir's manifest.json,
        a release's release.json such as the toy-world model's; cached by size and modification time, see
        `jinbetween.integrity`); `verify=False` skips that. Weights holding NaN or Inf are refused by name.
        """
        path = Path(path) if path is not None else _default_weights()
        dtype = dtype or default_dtype()
        settings = _pipeline_settings(path)
        if verify and (path / "release.json").exists():
            from jinbetween.weights.release import verify_release

            verify_release(path)
        unet = load_unet(path, dtype=dtype, verify=verify, **runtime)
        delta = (load_delta(path / BACKWARD_DELTA, unet.config, verify=verify) if (path / BACKWARD_DELTA).exists()
                 else None)
        return cls(unet, load_vae(path, dtype=dtype, verify=verify),
                   load_image_encoder(path, dtype=dtype, verify=verify), backward_delta=delta, **settings)

    def save_pretrained(self, path: str | os.PathLike, *, dtype=jnp.float32,
                        max_shard_bytes: int | None = None) -> Path:
        """Writes the pipeline as a diffusers `StableVideoDiffusionPipeline` folder (weights in `dtype`), which
        `from_pretrained` (and diffusers) read back, plus the backward delta in `gi_backward/` if there is one; the
        folder is written beside `path` and then replaces it whole. Returns `path`.

        For models trained with jinbetween (the toy world's); converted SVD weights need no saving.
        """
        with atomic.replacing_dir(path) as staging:
            self._save(staging, dtype, max_shard_bytes)
        return Path(path)

    def _save(self, path: Path, dtype, max_shard_bytes: int | None) -> None:
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
            atomic.write_json(path / relative, config)
        if self.backward_delta is not None:
            save_delta(path / BACKWARD_DELTA, self.backward_delta, self.unet.config)

    def load_backward_delta(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        """Uses the GI backward delta saved at `path` (a converted `gi_backward/` or a fine-tune's output), its files
        checked against the sha256 in its delta.json unless `verify=False`."""
        self.backward_delta = load_delta(path, self.unet.config, verify=verify)

    def with_unet(self, unet: UNet) -> "Pipeline":
        """Returns a pipeline with `unet` and this one's VAE, image encoder, settings and backward delta."""
        return Pipeline(unet, self.vae, self.image_encoder, clip_mean=self.clip_mean, clip_std=self.clip_std,
                        sigma_min=self.sigma_min, sigma_max=self.sigma_max, default_size=self.default_size,
                        backward_delta=self.backward_delta)

    def with_fp8_unet(self, start: ImageLike | Sequence[ImageLike], end: ImageLike | Sequence[ImageLike], *,
                      method: str = "vibid", num_inference_steps: int = 4, key: jax.Array | None = None,
                      **settings: Any) -> "Pipeline":
        """Returns this pipeline with its UNet in FP8 (`jinbetween.models.fp8`): the input scales are the maxima
        over the UNet calls of one `method` run from `start` to `end` (`interpolate`'s keyword `settings`) with
        this UNet. On a GPU before Hopper, or off GPU, FP8's values are computed in the parameter dtype: the
        same results at no gain in speed, for measuring FP8's error (`precision="fp8"` in the CLI refuses it)."""
        from jinbetween.models import fp8

        def run(unet: UNet) -> None:
            self.with_unet(unet).interpolate(start, end, method=method, num_inference_steps=num_inference_steps,
                                             key=key, output="latent", **settings)

        return self.with_unet(fp8.quantize_unet(self.unet, fp8.calibrate(self.unet, run)))

    @property
    def size_multiple(self) -> int:
        """Video height and width must be multiples of this (64 for SVD: VAE ×8, UNet ×8)."""
        return self.vae.config.downsample_factor * self.unet.config.downsample_factor

    def encode(self, images: np.ndarray, *, keys: jax.Array | None = None, aug_noise: np.ndarray | None = None,
               fps: float = 7, motion_bucket_id: float = 127, noise_aug_strength: float = 0.02) -> Conditioning:
        """Returns the Conditioning of uint8 keyframes `[N, H, W, 3]`; augmentation noise from `keys [N]`
        unless `aug_noise [N, H, W, 3]` is given."""
        pixels, clip_input = self._encoder_inputs(images)
        time_ids = conditioning.added_time_ids(fps, motion_bucket_id, noise_aug_strength)
        return _encode(self._vae_state, self._encoder_state, pixels, clip_input, keys,
                       None if aug_noise is None else jnp.asarray(aug_noise, jnp.float32), time_ids)

    def _encoder_inputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (VAE input in [-1, 1], CLIP input) of uint8 keyframes `[N, H, W, 3]`, computed on the host."""
        images = np.asarray(images)
        check_size(images.shape[1], images.shape[2], self.size_multiple)
        clip_input = conditioning.clip_pixels(images, self.image_encoder.config.image_size, self.clip_mean,
                                              self.clip_std)
        return conditioning.vae_pixels(images), clip_input

    def decode(self, latents: jax.Array, chunk_size: int | None = None) -> np.ndarray:
        """Returns float32 frames `[B, F, H, W, 3]` in [0, 1] for sampler latents `[B, F, h, w, C]`.

        Videos are decoded one at a time (diffusers flattens the batch, so its chunks can straddle videos). Frames
        holding NaN or Inf raise (DivergedError, or NonFiniteWeightsError if the weights hold them).
        """
        if chunk_size is not None:
            checks.integer(chunk_size, "chunk_size", "the frames decoded at once", minimum=1, example=8)
        return self._decoded(latents, "float", chunk_size)

    def _decoded(self, latents: jax.Array, output: str, chunk_size: int | None, first_index: int = 0) -> np.ndarray:
        """Decodes video by video and converts the frames to `output` ("float" or "uint8") on the device, so that
        the host receives the final array (uint8: a quarter of the bytes, and no host passes over the frames);
        raises if a video's frames hold NaN or Inf (`first_index` numbers the videos in the message)."""
        return self._fetched([self.vae.decode_video(video, chunk_size) for video in latents], output, first_index)

    def _fetched(self, videos: jax.Array | list[jax.Array], output: str, first_index: int,
                 count: int | None = None) -> np.ndarray:
        """Returns the first `count` (default all) decoded videos (raw, in [-1, 1]; an array `[B, ...]` or a list of
        `[F, ...]`) on the host as `output`; raises DivergedError for the first whose frames hold NaN or Inf (after
        checking the weights)."""
        frames, finite = (part[:count] for part in _fetch(videos, output))
        if not finite.all():
            self._check_weights(None)
            video = first_index + int(np.argmin(finite))
            raise DivergedError(f"The VAE decoded frames holding NaN or Inf for video {video} from finite latents, so "
                                "the video is refused; decode in float32 (--dtype float32) or in smaller chunks "
                                "(--decode-chunk-size).", None)
        return frames

    def _check_weights(self, delta: Delta | None) -> None:
        """Raises NonFiniteWeightsError naming the tensors of the three models (and of `delta`) that hold NaN or
        Inf; returns None when they are all finite."""
        for model, module in (("UNet", self.unet), ("VAE", self.vae), ("image encoder", self.image_encoder)):
            tensors = nonfinite_parameters(module)
            if tensors:
                raise_nonfinite(model, "this pipeline", tensors)
        if delta is not None:
            tensors = [key for key, value in delta.items() if not np.isfinite(np.asarray(value)).all()]
            if tensors:
                raise_nonfinite("backward delta", "this pipeline", tensors)

    def _check_sampled(self, diverged_at: jax.Array, cfg: Any, method: str, first_index: int,
                       delta: Delta | None = None) -> None:
        """Raises if a video's latents came to hold NaN or Inf (`Sampled.diverged_at` ≥ 0): NonFiniteWeightsError
        naming the tensors if the weights hold them, else DivergedError saying at which sampler move and denoising
        step it began. Returns None when every video stayed finite."""
        diverged_at = np.asarray(diverged_at)
        bad = np.flatnonzero(diverged_at >= 0)
        if not bad.size:
            return
        self._check_weights(delta)
        video, move = int(bad[0]), int(diverged_at[bad[0]])
        raise DivergedError(f"{method} diverged: the latents of video {first_index + video} held NaN or Inf "
                            f"{_divergence_point(cfg, move)}, although the weights are finite, so the video is "
                            "refused; try float32 parameters (--dtype float32), another seed or other settings.", move)

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
        _check_settings(num_inference_steps=num_inference_steps, fps=fps, motion_bucket_id=motion_bucket_id,
                        noise_aug_strength=noise_aug_strength, decode_chunk_size=decode_chunk_size,
                        first_index=first_index)
        batched = isinstance(image, (list, tuple))
        images = _as_uint8_batch(image if batched else [image])
        num_frames = self.unet.config.num_frames if num_frames is None else num_frames
        cfg = I2VConfig(num_frames=num_frames, num_steps=num_inference_steps, min_guidance_scale=min_guidance_scale,
                        max_guidance_scale=max_guidance_scale, sigma_min=self.sigma_min, sigma_max=self.sigma_max)
        aug_keys, noise_keys = _sample_keys(key, first_index, len(images))
        cond = self.encode(images, keys=aug_keys, aug_noise=_batch_of(aug_noise, batched), fps=fps,
                           motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength)
        with self._sampling_progress(progress, len(cfg.program())) as report:
            sampled = sample_i2v(self._unet_state, cond, noise_keys, cfg, _batch_of(latents, batched), progress=report)
        self._check_sampled(sampled.diverged_at, cfg, "i2v", first_index)
        frames = self._finish(sampled.latents, output, decode_chunk_size, first_index)
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

        method: "gi", "trf", "mpd" (MPD-par), "mpd-seq", "vibid" or "mr-catr" (`jinbetween.samplers.METHODS`).
        num_inference_steps and fps default to each method's official values (GI and TRF 50 steps at
        fps 7, MPD 25 at fps 9, ViBiD 25 at fps 7, MR-CATR 25 at fps 11). `options` set fields of the method's config
        (e.g. `noise_injection_steps=0` for GI, `faithful=True` for TRF). Pair i uses
        `fold_in(key, first_index + i)`, as in `image_to_video`. GI needs a backward delta
        (`load_backward_delta`); `allow_untrained_backward=True` runs it with the base weights instead
        (the paper's "w/o fine-tuning" ablation). `draws` injects every random draw (tests, parity).
        """
        _check_output(output)
        _check_settings(num_inference_steps=num_inference_steps, fps=fps, motion_bucket_id=motion_bucket_id,
                        noise_aug_strength=noise_aug_strength, decode_chunk_size=decode_chunk_size,
                        first_index=first_index)
        spec = self._method(method, allow_untrained_backward)
        check_method_options(method, options)
        batched = isinstance(start, (list, tuple))
        starts = _as_uint8_batch(start if batched else [start])
        ends = _as_uint8_batch(end if isinstance(end, (list, tuple)) else [end])
        if starts.shape != ends.shape:
            raise InputShapeError(f"Start keyframes {starts.shape} and end keyframes {ends.shape} differ; pass as "
                                  "many ends as starts, all of one size.")
        n = len(starts)
        cfg = _method_config(spec, num_frames=self.unet.config.num_frames if num_frames is None else num_frames,
                             num_steps=num_inference_steps, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                             **options)
        aug_keys, sample_keys = _sample_keys(key, first_index, n)
        start_cond, end_cond = self._pair_conditioning(
            starts, ends, aug_keys, spec, fps=spec.fps if fps is None else fps, motion_bucket_id=motion_bucket_id,
            noise_aug_strength=noise_aug_strength)
        with self._sampling_progress(progress, len(cfg.program())) as report:
            sampled = self._sample(spec, start_cond, end_cond, sample_keys, cfg, draws=draws, progress=report)
        self._check_sampled(sampled.diverged_at, cfg, spec.name, first_index,
                            self.backward_delta if spec.uses_delta else None)
        frames = self._finish(sampled.latents, output, decode_chunk_size, first_index)
        return frames if batched else frames[0]

    def interpolate_batch(self, pairs: Iterable[Pair], *, method: str = "gi", key: jax.Array | None = None,
                          batch_size: int | None = None, mesh: Mesh | None = None, num_frames: int | None = None,
                          num_inference_steps: int | None = None, fps: float | None = None,
                          motion_bucket_id: float = 127, noise_aug_strength: float = 0.02,
                          decode_chunk_size: int | None = None, output: str = "uint8", first_index: int = 0,
                          progress: bool = False, allow_untrained_backward: bool = False,
                          **options: Any) -> Iterator[np.ndarray]:
        """Yields the video of each pair of `pairs`, in order, as `interpolate` returns it for one pair.

        pairs: (start, end) keyframes, all of one size, or (start, end, pair_key); consumed one chunk at a time,
        so a generator that reads files keeps a chunk ahead of the devices. Other arguments as in `interpolate`.

        The pairs run in chunks of `batch_size` (default: one pair per device), split evenly over the devices of
        `mesh` (default: every local device, `distributed.local_mesh()`): each device runs `interpolate`'s
        programs on its own pairs (`jax.shard_map`), parameters replicated, keyframes encoded, sampled and
        decoded where they are. A short last chunk is padded with copies of its last pair, so one compilation
        serves every chunk; the copies are not yielded. Pair i uses `fold_in(key, first_index + i)`, and a
        pair with its own key `fold_in(pair_key, 0)`, as `interpolate(start, end, key=pair_key)` does.

        For a given number of pairs per device (batch_size / devices) a video does not depend on the device
        count on CPU: runs on 1, 2, 4, … devices are bit-identical (the schedule writes divisions by a scalar as
        multiplications by its reciprocal, which XLA would otherwise rewrite in one-device programs only), and a
        one-device run is `interpolate` on that many pairs. Other numbers of pairs per device change float32
        rounding (~1e-6), as batching does in `interpolate` (XLA picks matmul kernels by shape). On GPUs in
        bf16, programs compiled for different meshes may pick different kernels, and the sampler amplifies those
        rounding differences into visible ones (bench/NOTES.md); the randomness itself is the same.
        """
        _check_output(output)
        _check_settings(num_inference_steps=num_inference_steps, fps=fps, motion_bucket_id=motion_bucket_id,
                        noise_aug_strength=noise_aug_strength, decode_chunk_size=decode_chunk_size,
                        first_index=first_index)
        spec = self._method(method, allow_untrained_backward)
        check_method_options(method, options)
        mesh = distributed.local_mesh() if mesh is None else distributed.check_mesh(mesh)
        batch_size = mesh.size if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or batch_size % mesh.size:
            raise ConfigError(f"batch_size={batch_size} does not split over {mesh.size} devices; pass a multiple "
                              f"of {mesh.size}.")
        cfg = _method_config(spec, num_frames=self.unet.config.num_frames if num_frames is None else num_frames,
                             num_steps=num_inference_steps, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                             **options)
        settings = dict(fps=spec.fps if fps is None else fps, motion_bucket_id=motion_bucket_id,
                        noise_aug_strength=noise_aug_strength)
        if self._holds_parameters(mesh):
            run = functools.partial(self._run_in_place, spec=spec, cfg=cfg, settings=settings, output=output,
                                    decode_chunk_size=decode_chunk_size)
        else:
            extra = (distributed.replicate(self.backward_delta, mesh),) if spec.uses_delta else ()
            run = functools.partial(self._run_sharded, mesh=mesh, spec=spec, cfg=cfg, extra=extra,
                                    settings=settings, output=output, decode_chunk_size=decode_chunk_size)
        log.info("interpolating in chunks of %d pairs over %d device(s)", batch_size, mesh.size)
        chunks = _pair_chunks(pairs, batch_size, _typed_key(_resolve_key(key)), first_index)
        total = len(pairs) if isinstance(pairs, Sequence) else None
        delta = self.backward_delta if spec.uses_delta else None

        def fetch(results: tuple[jax.Array, Any], position: int, count: int) -> np.ndarray:
            diverged_at, videos = results
            self._check_sampled(np.asarray(diverged_at)[:count], cfg, spec.name, first_index + position, delta)
            return self._fetched(videos, output, first_index + position, count)

        return _pipelined(chunks, run, fetch, progress, total)

    def interpolate_sequence(self, keyframes: Sequence[ImageLike], *, method: str = "gi", key: jax.Array | None = None,
                             num_frames: int | None = None, durations: Sequence[float] | None = None,
                             seam: str = "shared", mesh: Mesh | None = None, num_inference_steps: int | None = None,
                             fps: float | None = None, motion_bucket_id: float = 127, noise_aug_strength: float = 0.02,
                             decode_chunk_size: int | None = None, output: str = "uint8", progress: bool = False,
                             allow_untrained_backward: bool = False, **options: Any) -> np.ndarray:
        """Returns the one video that passes through every keyframe, uint8 `[(K−1)·(F−1)+1, H, W, 3]` for K keyframes
        of one size and F = `num_frames` per segment (float32 in [0, 1] with `output="float"`, the joined latents
        with `output="latent"`).

        The K − 1 segments (keyframe i to i + 1) run as one batch through `interpolate_batch`'s program, split
        over the devices of `mesh` (default: up to one device per segment); segment i uses `fold_in(key, i)`, so
        its random draws do not depend on K, and K = 2 is `interpolate(start, end)`. Each segment shares its
        boundary frame with the next (`sequence.SEAMS`: `seam`). `durations` (seconds, one per gap) retime each
        gap to round(duration · fps) frames by keeping evenly spread frames of its segment (at most F − 1 per
        gap; slower gaps are refused, as the model makes F frames per segment). Segments are decoded one at a
        time, so the decoder's memory does not grow with K. Other arguments as in `interpolate`.
        """
        _check_output(output)
        _check_settings(num_inference_steps=num_inference_steps, fps=fps, motion_bucket_id=motion_bucket_id,
                        noise_aug_strength=noise_aug_strength, decode_chunk_size=decode_chunk_size, first_index=0)
        checks.choice(seam, "seam", sequence.SEAMS, "how segments are joined")
        sequence.check_keyframe_count(len(keyframes))
        frames = _as_uint8_batch(keyframes)
        segments = len(frames) - 1
        num_frames = sequence.check_segment_frames(self.unet.config.num_frames if num_frames is None else num_frames)
        spec = self._method(method, allow_untrained_backward)
        fps = spec.fps if fps is None else fps
        counts = ([num_frames - 1] * segments if durations is None
                  else sequence.gap_frames(durations, fps, num_frames, segments))
        if mesh is None:
            mesh = distributed.local_mesh(jax.local_devices()[:segments])
        mesh = distributed.check_mesh(mesh)
        latents = np.stack(list(self.interpolate_batch(
            list(zip(frames[:-1], frames[1:])), method=method, key=key, batch_size=-(-segments // mesh.size) *
            mesh.size, mesh=mesh, num_frames=num_frames, num_inference_steps=num_inference_steps, fps=fps,
            motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength, output="latent",
            progress=progress, allow_untrained_backward=allow_untrained_backward, **options)))
        latents = sequence.seam_latents(latents, seam)
        parts = latents if output == "latent" else (
            self._decoded(latents[i:i + 1], output, decode_chunk_size, i)[0] for i in range(segments))
        return sequence.join(list(parts), [sequence.retime_indices(count, num_frames) for count in counts])

    def _method(self, method: str, allow_untrained_backward: bool) -> Method:
        """Returns the method called `method`, checked to be runnable with this pipeline."""
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
        return spec

    def _pair_conditioning(self, starts: np.ndarray, ends: np.ndarray, aug_keys: jax.Array, spec: Method,
                           **settings: float) -> tuple[Conditioning, Conditioning]:
        """Returns the Conditioning of uint8 start and end keyframes `[n, H, W, 3]`, encoded in one batch."""
        cond = self.encode(np.concatenate([starts, ends]), keys=_pair_aug_keys(spec, aug_keys), **settings)
        return _halves(cond)

    @contextlib.contextmanager
    def _sampling_progress(self, show: bool, total: int) -> Iterator[Callable[[int], None] | None]:
        """Yields the samplers' progress callback, None unless `show`: a tqdm bar over the `total` moves."""
        if not show:
            yield None
            return
        with tqdm(total=total, desc="denoising", unit="step") as bar:
            self._step_bar.bar = bar
            try:
                yield self._step_bar
                # Sampling is dispatched asynchronously: wait for its step callbacks before the bar is detached.
                jax.effects_barrier()
            finally:
                self._step_bar.bar = None

    def _holds_parameters(self, mesh: Mesh) -> bool:
        """True for a one-device mesh on the device that holds the parameters: `interpolate`'s programs run as is."""
        devices = jax.tree.leaves(self._unet_state.state)[0].devices()
        return mesh.size == 1 and devices == set(mesh.devices.flat)

    def _sample(self, spec: Method, start: Conditioning, end: Conditioning, keys: jax.Array, cfg: Any, *,
                draws: Draws | None = None, progress: Callable[[int], None] | None = None) -> Sampled:
        """Runs `spec`'s sampler on this pipeline's UNet (and backward delta where the method uses one). Every call
        passes the same keywords: jit keys its programs by the keywords given, so `interpolate` and a one-device
        batch share one."""
        return spec.sample(self._unet_state, start, end, keys, cfg,
                           delta=self.backward_delta if spec.uses_delta else None, draws=draws, progress=progress)

    def _run_in_place(self, starts: np.ndarray, ends: np.ndarray, pair_keys: jax.Array, *, spec: Method, cfg: Any,
                      settings: dict[str, float], output: str, decode_chunk_size: int | None):
        """Dispatches one chunk exactly as `interpolate` runs it; returns (`Sampled.diverged_at`, latents or the
        decoded videos)."""
        aug_keys, sample_keys = _split_keys(pair_keys)
        start_cond, end_cond = self._pair_conditioning(starts, ends, aug_keys, spec, **settings)
        sampled = self._sample(spec, start_cond, end_cond, sample_keys, cfg)
        if output == "latent":
            return sampled.diverged_at, sampled.latents
        return sampled.diverged_at, [self.vae.decode_video(video, decode_chunk_size) for video in sampled.latents]

    def _run_sharded(self, starts: np.ndarray, ends: np.ndarray, pair_keys: jax.Array, *, mesh: Mesh, spec: Method,
                     cfg: Any, extra: tuple, settings: dict[str, float], output: str,
                     decode_chunk_size: int | None) -> tuple[jax.Array, jax.Array]:
        """Dispatches one chunk over `mesh`, device d taking pairs [d·b, (d+1)·b); returns (`Sampled.diverged_at`,
        latents or raw frames), split over the devices. `extra`: the sampler's replicated extra arguments (GI's
        backward delta).

        Device d's rows are exactly what `interpolate` gives its encoder and sampler for those b pairs: keyframes
        [starts; ends] (CLIP input prepared per device, as for b pairs) with their augmentation keys.
        """
        b = len(starts) // mesh.size
        aug_keys, sample_keys = _split_keys(pair_keys)
        blocks = [slice(d * b, (d + 1) * b) for d in range(mesh.size)]
        inputs = [self._encoder_inputs(np.concatenate([starts[block], ends[block]])) for block in blocks]
        pixels, clip_input = (np.concatenate(parts) for parts in zip(*inputs))
        block_aug_keys = jnp.concatenate([_pair_aug_keys(spec, aug_keys[block]) for block in blocks])
        unet, vae, encoder = self._replicated(mesh)
        time_ids = distributed.replicate(conditioning.added_time_ids(**settings), mesh)
        encode = distributed.per_device(_encode_pairs, mesh, (False, False, True, True, True, False))
        start_cond, end_cond = encode(vae, encoder, *distributed.shard_rows((pixels, clip_input, block_aug_keys), mesh),
                                      time_ids)
        sample = distributed.per_device(_pair_sampler(spec.name, cfg), mesh,
                                        (False, True, True, True, *(False,) * len(extra)))
        sampled = sample(unet, start_cond, end_cond, distributed.shard_rows(sample_keys, mesh), *extra)
        if output == "latent":
            return sampled.diverged_at, sampled.latents
        decode = distributed.per_device(_video_decoder(decode_chunk_size), mesh, (False, True))
        return sampled.diverged_at, decode(vae, sampled.latents)

    def _replicated(self, mesh: Mesh) -> tuple[ModelState, ModelState, ModelState]:
        """The UNet, VAE and image encoder states copied to every device of `mesh` (kept for later batches)."""
        if mesh not in self._replicas:
            self._replicas[mesh] = distributed.replicate((self._unet_state, self._vae_state, self._encoder_state),
                                                         mesh)
        return self._replicas[mesh]

    def _finish(self, video_latents: jax.Array, output: str, decode_chunk_size: int | None,
                first_index: int = 0) -> np.ndarray:
        if output == "latent":
            return np.asarray(video_latents)
        return self._decoded(video_latents, output, decode_chunk_size, first_index)


def _encode_pairs(vae: ModelState[VAE], encoder: ModelState[ImageEncoder], pixels: jax.Array, clip_input: jax.Array,
                  aug_keys: jax.Array, time_ids: jax.Array) -> tuple[Conditioning, Conditioning]:
    """Returns (start, end) Conditioning of one device's keyframe rows [starts; ends] (run per device)."""
    return _halves(_encode(vae, encoder, pixels, clip_input, aug_keys, None, time_ids))


@functools.lru_cache(maxsize=32)
def _pair_sampler(method: str, cfg: Any) -> Callable:
    """Returns `(unet, start, end, keys, [delta]) -> Sampled`: the method's sampler with `cfg` (one object per
    (method, cfg), so that `distributed.per_device` compiles it once)."""
    spec = METHODS[method]

    def sample(unet, start, end, keys, *delta):
        return spec.sample(unet, start, end, keys, cfg, delta=delta[0] if delta else None)

    return sample


@functools.lru_cache(maxsize=8)
def _video_decoder(chunk_size: int | None) -> Callable:
    """Returns `(vae, latents [B, F, h, w, C]) -> frames [B, F, H, W, 3]` in [-1, 1], decoding video by video as
    `Pipeline.decode` does."""

    def decode(vae, latents):
        return jax.lax.map(lambda video: vae.merge().decode_video(video, chunk_size), latents)

    return decode


def _pipelined(chunks: Iterator[tuple[int, np.ndarray, np.ndarray, jax.Array]], run: Callable,
               fetch: Callable[[Any, int, int], np.ndarray], progress: bool, total: int | None) -> Iterator[np.ndarray]:
    """Yields each pair's result, `fetch(results, position of the chunk's first pair, pairs in the chunk)`: chunk
    k+1 is prepared and dispatched before chunk k is fetched to the host."""
    dispatched = ((count, run(*chunk)) for count, *chunk in chunks)
    with tqdm(total=total, desc="interpolating", unit="pair", disable=not progress) as bar:
        previous, position = None, 0
        for current in itertools.chain(dispatched, [None]):  # drawing `current` dispatches the next chunk
            if previous is not None:
                count, results = previous
                yield from fetch(results, position, count)
                position += count
                bar.update(count)
            previous = current


def _fetch(videos: jax.Array | list[jax.Array], output: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns a chunk's results on the host, latents or frames (raw, in [-1, 1]) as `output` asks, and `[B]`
    whether each video's frames are finite (latents: True, the sampler checks them)."""
    if output == "latent":
        latents = np.asarray(videos)
        return latents, np.ones(len(latents), bool)
    parts = [_device_output(v[None], output) for v in videos] if isinstance(videos, list) else \
        [_device_output(videos, output)]
    return (np.concatenate([np.asarray(part) for part, _ in parts]),
            np.concatenate([np.asarray(finite) for _, finite in parts]))


def _pair_chunks(pairs: Iterable[Pair], batch_size: int, key: jax.Array,
                 first_index: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, jax.Array]]:
    """Yields (pairs in the chunk, starts `[B, H, W, 3]`, ends, pair keys `[B]`), B = batch_size; a short chunk
    is padded with copies of its last pair."""
    chunk: list[tuple[np.ndarray, jax.Array, int]] = []
    size = None
    for position, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) not in (2, 3):
            raise ConfigError(f"Pair {position} is a {type(pair).__name__}; pass (start, end) or (start, end, key).")
        keyframes = _as_uint8_batch(pair[:2])
        size = size or keyframes.shape[1:]
        if keyframes.shape[1:] != size:
            raise InputShapeError(f"Pair {position} has keyframes of {keyframes.shape[1:]}, the first pair "
                                  f"{size}; fit every keyframe to one size with jinbetween.video.fit_image.")
        own_key = len(pair) == 3
        chunk.append((keyframes, _typed_key(pair[2]) if own_key else key, 0 if own_key else first_index + position))
        if len(chunk) == batch_size:
            yield _pack(chunk, batch_size)
            chunk = []
    if chunk:
        yield _pack(chunk, batch_size)


def _pack(chunk: list[tuple[np.ndarray, jax.Array, int]], batch_size: int):
    count = len(chunk)
    chunk = chunk + chunk[-1:] * (batch_size - count)
    keyframes = np.stack([k for k, _, _ in chunk])
    bases = jnp.stack([base for _, base, _ in chunk])
    indices = jnp.asarray([index for _, _, index in chunk], jnp.int32)
    return count, keyframes[:, 0], keyframes[:, 1], jax.vmap(jax.random.fold_in)(bases, indices)


def _typed_key(key: jax.Array) -> jax.Array:
    """Returns `key` as a typed key array (`jax.random.key`), wrapping a raw uint32 one (`PRNGKey`)."""
    return key if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def _halves(cond: Conditioning) -> tuple[Conditioning, Conditioning]:
    """Returns the first and second half of a Conditioning batch (start keyframes, then end keyframes)."""
    n = cond.image_embeds.shape[0] // 2
    return tuple(jax.tree.map(lambda a, s=s: a[s], cond) for s in (slice(0, n), slice(n, 2 * n)))


def _pair_aug_keys(spec: Method, aug_keys: jax.Array) -> jax.Array:
    """Returns the augmentation keys `[2n]` of n pairs' [starts; ends]: one draw shared by both keyframes of a
    pair, or one each, as the method's official code does."""
    if spec.shared_aug_noise:
        return jnp.concatenate([aug_keys, aug_keys])
    return jnp.concatenate([jax.vmap(lambda k: jax.random.fold_in(k, j))(aug_keys) for j in (0, 1)])


@functools.partial(jax.jit, static_argnames="output")
def _device_output(frames: jax.Array, output: str) -> tuple[jax.Array, jax.Array]:
    """Returns (decoded videos `[B, F, H, W, 3]` in [-1, 1] as float32 in [0, 1] (clipped), or as uint8 (round half
    to even) for "uint8"; `[B]` whether each video's frames were finite before clipping)."""
    unit = jnp.clip(frames.astype(jnp.float32) / 2 + 0.5, 0, 1)
    finite = jnp.all(jnp.isfinite(frames).reshape(frames.shape[0], -1), axis=1)
    return (unit if output == "float" else jnp.round(unit * 255).astype(jnp.uint8)), finite


def _divergence_point(cfg: Any, move: int) -> str:
    """Returns where in `cfg`'s step program the latents first held NaN or Inf, after `move` moves had run."""
    if move == 0:
        return "before the first sampler move (in the keyframe conditioning or the initial noise)"
    program, row = cfg.program(), move - 1
    return (f"from sampler move {move} of {len(program)} on (denoising step {int(program.step[row]) + 1} of "
            f"{cfg.num_steps}, σ {float(program.sigma[row]):.4g} → {float(program.sigma_next[row]):.4g})")


def _check_output(output: str) -> None:
    checks.choice(output, "output", ("uint8", "float", "latent"), "the result's form")


MIN_FPS, MAX_FPS = 1, 240


def _check_settings(*, num_inference_steps: int | None, fps: float | None, motion_bucket_id: float,
                    noise_aug_strength: float, decode_chunk_size: int | None, first_index: int) -> None:
    """Raises ArgumentError for a generation setting out of range (frame counts and method options are checked by
    the sampler configs)."""
    if num_inference_steps is not None:
        checks.integer(num_inference_steps, "num_inference_steps", "the denoising steps", minimum=1, example=25)
    if fps is not None:
        checks.number(fps, "fps", "the frame rate", minimum=MIN_FPS, maximum=MAX_FPS, example=7)
    checks.number(motion_bucket_id, "motion_bucket_id", "the motion bucket", minimum=0, example=127)
    checks.number(noise_aug_strength, "noise_aug_strength", "the keyframe noise level", minimum=0, example=0.02)
    if decode_chunk_size is not None:
        checks.integer(decode_chunk_size, "decode_chunk_size", "the frames decoded at once", minimum=1, example=8)
    checks.integer(first_index, "first_index", "the first video's index", minimum=0, example=0)


def _sample_keys(key: jax.Array | None, first_index: int, n: int) -> tuple[jax.Array, jax.Array]:
    """(augmentation keys, sampler keys), each `[n]`: sample i derives both from `fold_in(key, first_index + i)`."""
    key = _resolve_key(key)
    return _split_keys(jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(n)))


def _resolve_key(key: jax.Array | None) -> jax.Array:
    """Returns `key`, or a key from a fresh random seed (logged) when it is None."""
    if key is None:
        seed = secrets.randbits(31)
        log.info("sampling with seed %d", seed)
        key = jax.random.key(seed)
    return key


def _split_keys(sample_keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(augmentation keys, sampler keys), each `[n]`, from the samples' own keys `[n]`."""
    return tuple(jax.vmap(lambda k: jax.random.split(k)[j])(sample_keys) for j in (0, 1))


# Config fields that the pipeline sets from its own arguments and weights, never from a method option.
_PIPELINE_FIELDS = {"num_frames": "num_frames= (--num-frames)", "num_steps": "num_inference_steps= (--steps)",
                    "sigma_min": "the weights' scheduler config", "sigma_max": "the weights' scheduler config",
                    "progress": "progress="}


def check_method_options(method: str, options: Mapping[str, Any]) -> None:
    """Raises ConfigError for an unknown method, an option the method does not have or that the pipeline sets itself
    (frames, steps, noise range, progress), or a value the method's config refuses; reads no weights."""
    if method not in METHODS:
        raise ConfigError(f"Unknown method {method!r}; choose one of {sorted(METHODS)}.")
    spec = METHODS[method]
    for name in options:
        if name in _PIPELINE_FIELDS:
            raise ConfigError(f"{name} is not a {method} option to set: it comes from {_PIPELINE_FIELDS[name]}; "
                              "pass it there instead.")
    _method_config(spec, num_steps=None, **options)


def _method_config(spec, *, num_steps: int | None, **fields: Any):
    """The method's config with the pipeline's fields and the caller's options (unknown names refused)."""
    if num_steps is not None:
        fields["num_steps"] = num_steps
    known = {f.name for f in dataclasses.fields(spec.config())}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{spec.name} has no option(s) {unknown}; choose among its options "
                          f"{sorted(known - set(_PIPELINE_FIELDS))}.")
    return spec.config(**fields)


class _StepBar:
    """A Pipeline's sampler progress callback (one object, so that the samplers compile once with it): advances the
    bar of the sampling under way."""

    def __init__(self):
        self.bar = None

    def __call__(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update()


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
