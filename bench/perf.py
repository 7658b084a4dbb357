"""Speed and memory on one GPU, jinbetween (bf16) beside diffusers (fp16, eager and `torch.compile`), one harness.

    PYTHONPATH=. python bench/perf.py models   --out bench/results/perf_models_h200.json
    PYTHONPATH=. python bench/perf.py samplers --out bench/results/perf_samplers_h200.json
    PYTHONPATH=. python bench/perf.py profile  --out bench/results/perf_profile_h200.json --trace-dir $OUT
    python bench/perf.py table bench/results/perf_models_h200.json bench/results/perf_samplers_h200.json
    PYTHONPATH=. python bench/perf.py flops --out bench/results/flops_svd_xt.json    # no GPU needed

A *set* is a list of cases, `--cases` picks some (comma-separated); each case runs in a process of its own,
so that peak-memory readings do not mix, and the JSON is rewritten after every case, so a run cut short
keeps what it finished. Cases are `KIND/IMPL/TARGET[:option=value,...]`:

  unet/jax/b2, unet/torch-eager/b2, unet/torch-compile/b2   one UNet forward on B videos (B=2: one CFG call)
  vae/jax, vae/jax:lean=0, vae/torch-eager, vae/torch-compile  decode of all frames (`:chunk=8` for chunks)
  run/jax/METHOD (i2v, gi, trf, mpd, mpd-seq, vibid, mr-catr) one video through the Pipeline's calls, phase by phase
  run/torch-eager/i2v                                        diffusers' StableVideoDiffusionPipeline
  profile/jax/unet-b2, profile/torch-eager/unet-b2           per-kernel time of one warm UNet forward

Random weights (speed and memory do not depend on their values); SVD-XT, 25 frames at 576×1024 unless
set otherwise; methods at their defaults (`--steps` overrides, for smoke runs). JAX: compiled ahead of time
(compile seconds apart), then the median of `--repeats` calls after one warm-up call; run cases time the
keyframe encoding and the decode (first call apart, then `--run-repeats` calls) and `--run-repeats` executions
of the sampler, compiled ahead of time. Options: `:attention=xla` / `:shortcut=0` / `:feedforward=pallas` /
`:temporal=xla|pallas` switch the UNet's kernels, `:precision=fp8` runs its large products in FP8
(`jinbetween.models.fp8`, calibrated on the case's own first call or a 4-step run; a UNet case also reports the
relative error of its output against the full-precision forward), `:xla=PRESET` adds XLA flags (XLA_PRESETS), `:decode_chunks=8+all`
decodes a run with each chunk size in turn, `:maps=capture` / `:maps=inject` time a JAX UNet case as GI's two
directions run it (capturing every temporal layer's attention maps; taking them instead of computing its own);
a case may take several options, comma-separated.
Torch: the first call
(torch.compile's compilation included) apart, then the median. Peak memory: `memory_stats()
["peak_bytes_in_use"]` / `torch.cuda.max_memory_allocated()`, weights included. FLOPs are counted, not
estimated: jinbetween's from its jaxpr (`jinbetween.flops`), diffusers' with `FlopCounterMode`; both count
matrix products and convolutions only. Torch has no GI/TRF/MPD/ViBiD/MR-CATR: `table` estimates them as
UNet calls × diffusers' B=2 forward + its decode, and says so. `--tiny` runs tiny models on a CPU (a check
of this script, not a benchmark).

On the GPU machine diffusers is not installed: carry its wheel (see bench/NOTES.md, "Running the harness").
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETS = {
    "models": ["unet/jax/b1", "unet/jax/b2", "vae/jax", "vae/jax:lean=0", "unet/torch-eager/b1", "unet/torch-eager/b2",
               "vae/torch-eager", "unet/torch-compile/b1", "unet/torch-compile/b2", "vae/torch-compile"],
    "samplers": ["run/jax/gi:decode_chunks=8+all", "run/jax/mpd", "run/jax/vibid", "run/jax/i2v", "run/torch-eager/i2v",
                 "run/jax/trf", "run/jax/mpd-seq", "run/jax/mr-catr"],
    "profile": ["profile/jax/unet-b2", "profile/torch-eager/unet-b2"],
    # The UNet's switches against its defaults (bench/NOTES.md), then XLA's flags.
    "variants": ["unet/jax/b2:temporal=xla", "unet/jax/b2:feedforward=pallas", "unet/jax/b2:maps=capture",
                 "unet/jax/b2:maps=inject", "unet/jax/b2:maps=capture,temporal=xla",
                 "unet/jax/b2:maps=inject,temporal=xla", "unet/jax/b2:xla=triton-gemm-any",
                 "unet/jax/b2:xla=cudnn-gemm-fusion",
                 "unet/jax/b2:xla=no-triton-gemm", "unet/jax/b2:xla=cudnn-layer-norm", "unet/jax/b2:shortcut=0",
                 "unet/jax/b2:attention=xla_chunked", "run/jax/vibid:progress=1"],
}
# `:xla=NAME` runs a case under these XLA flags (added to XLA_FLAGS); each names one thing to try on the profile.
XLA_PRESETS = {
    "triton-gemm-any": "--xla_gpu_triton_gemm_any=true",  # Triton matmuls may take elementwise producers (GEGLU)
    "no-triton-gemm": "--xla_gpu_enable_triton_gemm=false",  # every matmul to cuBLAS
    "cudnn-gemm-fusion": "--xla_gpu_cudnn_gemm_fusion_level=2",  # cuDNN matmuls with fused elementwise operands
    "cudnn-layer-norm": "--xla_gpu_enable_cudnn_layer_norm=true",  # LayerNorm as one cuDNN kernel
    "no-command-buffer": "--xla_gpu_enable_command_buffer=",  # no CUDA graphs
}
# Options a case accepts, by kind (jinbetween's UNet switches apply wherever its UNet runs).
_UNET_OPTIONS = {"attention", "shortcut", "feedforward", "temporal", "xla"}
CASE_OPTIONS = {"unet": _UNET_OPTIONS | {"maps", "precision"}, "vae": {"lean", "chunk", "xla"},
                "profile": _UNET_OPTIONS | {"maps"}, "run": _UNET_OPTIONS | {"decode_chunks", "progress", "precision"}}
METHOD_NAMES = ("i2v", "gi", "trf", "mpd", "mpd-seq", "vibid", "mr-catr")


# --------------------------------------------------------------------------------------------------
# Cases.


def parse_case(text: str) -> tuple[str, str, str, dict[str, str]]:
    """Returns (kind, impl, target, options) of `KIND/IMPL/TARGET[:k=v,...]`."""
    spec, _, opts = text.partition(":")
    parts = spec.split("/")
    if parts[0] == "vae" and len(parts) == 2:
        parts.append("decode")
    if len(parts) != 3 or parts[0] not in ("unet", "vae", "run", "profile"):
        raise SystemExit(f"bad case {text!r}: expected KIND/IMPL/TARGET[:option=value,...] (see --help)")
    pairs = [kv.split("=", 1) for kv in opts.split(",") if kv]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"bad options in case {text!r}: write them as :option=value,option=value")
    kind, impl, target = parts
    options = dict(pairs)
    unknown = sorted(set(options) - CASE_OPTIONS[kind])
    if unknown:
        raise SystemExit(f"case {text!r} has unknown option(s) {unknown}; {kind} cases take "
                         f"{sorted(CASE_OPTIONS[kind])}")
    if "xla" in options and options["xla"] not in XLA_PRESETS:
        raise SystemExit(f"case {text!r}: unknown XLA preset {options['xla']!r}; choose one of {sorted(XLA_PRESETS)}")
    if options.get("precision", "full") not in ("full", "fp8") or ("precision" in options and impl != "jax"):
        raise SystemExit(f"case {text!r}: precision=full or precision=fp8, on JAX cases")
    if options.get("maps", "capture") not in ("capture", "inject") or ("maps" in options and impl != "jax"):
        raise SystemExit(f"case {text!r}: maps=capture or maps=inject, on JAX cases (diffusers has no GI)")
    return kind, impl, target, options


def split_cases(text: str) -> list[str]:
    """Cases of a comma-separated list, where a case's own options are comma-separated too: a new case starts at
    each comma followed by `kind/` (`unet/jax/b2:feedforward=pallas,temporal=pallas,vae/jax` is two cases)."""
    return [case for case in re.split(r",(?=[\w-]+/)", text) if case]


def apply_options(sizes: "Sizes", options: dict[str, str]) -> None:
    """Sets the UNet switches a case names (`attention=`, `shortcut=`, `feedforward=`, `temporal=`) and its XLA
    flags (`xla=`, before the backend starts)."""
    if "xla" in options:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_PRESETS[options['xla']]}".strip()
    overrides = {}
    if "attention" in options:
        overrides["attention_impl"] = options["attention"]
    if "shortcut" in options:
        overrides["cross_attention_shortcut"] = options["shortcut"] != "0"
    if "feedforward" in options:
        overrides["feedforward_impl"] = options["feedforward"]
    if "temporal" in options:
        overrides["temporal_attention_impl"] = options["temporal"]
    sizes.unet = sizes.unet.replace(**overrides)


class Sizes:
    """Model configs and tensor sizes of a run: SVD-XT at the given size, or tiny models (`--tiny`)."""

    def __init__(self, args):
        from jinbetween import config

        self.tiny = args.tiny
        if args.tiny:
            from tests.torch_reference import TINY_PIPELINE_CLIP

            self.unet, self.vae, self.encoder = config.tiny(), config.tiny_vae(), TINY_PIPELINE_CLIP
        else:
            self.unet, self.vae, self.encoder = config.svd_xt(), config.svd_vae(), config.svd_image_encoder()
        self.frames, self.height, self.width = args.frames, args.height, args.width
        factor = self.vae.downsample_factor
        self.latent = (self.height // factor, self.width // factor)


def timed_calls(fn, repeats: int, warm_up_counts: bool = False, warm_ups: int = 1) -> dict:
    """Calls `fn` (which blocks until done) `warm_ups` times to warm up, then `repeats` times; returns the times
    (`first_call_s`: the first warm-up). With `warm_up_counts`, the first call is one of the timed ones (when
    nothing is left to warm up)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warm_ups - 1):
        fn()
    times = [first] if warm_up_counts else []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"first_call_s": first, "median_s": statistics.median(times), "times_s": times}



def median_seconds(fn, args: tuple, repeats: int, warm_ups: int = 2) -> float:
    """Median seconds of `fn(*args)`, blocked until ready, after `warm_ups` calls (the kernel benchmarks' timer)."""
    import jax

    return timed_calls(lambda: jax.block_until_ready(fn(*args)), repeats, warm_ups=warm_ups)["median_s"]

def with_rate(result: dict, flops: float | None) -> dict:
    """Adds the counted FLOPs and the achieved TFLOP/s of the median time."""
    result["flops"] = flops
    result["tflop_per_s"] = flops / result["median_s"] / 1e12 if flops and result.get("median_s") else None
    return result


# --------------------------------------------------------------------------------------------------
# jinbetween.


def jax_dtype(sizes: Sizes):
    import jax.numpy as jnp

    return jnp.float32 if sizes.tiny else jnp.bfloat16


def random_module(abstract, seed: int, dtype):
    """The abstract NNX module filled with N(0, 0.02²) parameters in `dtype`. Each parameter is a window at a random
    offset into one pool of normal draws (speed does not depend on the values; drawing 1.5 G numbers would take
    longer than the benchmark)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(abstract)
    largest = max(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state))
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(largest + (1 << 20), np.float32) * np.float32(0.02)

    def fill(leaf):
        size = int(np.prod(leaf.shape))
        start = int(rng.integers(0, len(pool) - size + 1))
        return jnp.asarray(pool[start:start + size].reshape(leaf.shape), dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


@functools.lru_cache(maxsize=None)
def counting_model(config, dtype):
    """(graphdef, state of ShapeDtypeStructs) of the model of `config` (a UNet, VAE or image encoder config) with
    its attention on the XLA kernel, whose products the counter sees (a fused kernel is one opaque call). Cached:
    building an abstract model takes seconds, and a count needs no weights."""
    import jax
    from flax import nnx

    from jinbetween.config import ImageEncoderConfig, UNetConfig
    from jinbetween.models import abstract_image_encoder, abstract_unet, abstract_vae

    build = (abstract_unet if isinstance(config, UNetConfig) else
             abstract_image_encoder if isinstance(config, ImageEncoderConfig) else abstract_vae)
    graphdef, state = nnx.split(build(config.replace(attention_impl="xla")))
    return graphdef, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), state)


def unet_inputs(sizes: Sizes, batch: int):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(7), 2)
    h, w = sizes.latent
    x = jax.random.normal(keys[0], (batch, sizes.frames, h, w, sizes.unet.in_channels), jnp.float32)
    embeds = jax.random.normal(keys[1], (batch, 1, sizes.unet.cross_attention_dim[0]), jnp.float32)
    c_noise = jnp.full((batch,), 0.25 * jnp.log(700.0), jnp.float32)
    ids = jnp.tile(jnp.asarray([[6.0, 127.0, 0.02]], jnp.float32), (batch, 1))
    return x, c_noise, embeds, ids


def unet_forward(graphdef, state, inputs, maps: str | None):
    """(function of (state, *inputs, *map_args), map_args as ShapeDtypeStructs) of one UNet forward: plain, or one
    of GI's two directions (`maps="capture"` also returns every temporal self-attention layer's maps,
    `maps="inject"` takes them, a dict, in place of its own, skipping those layers' queries and keys)."""
    import jax

    from jinbetween.models import AttnControl, unet_apply

    if maps is None:
        return functools.partial(unet_apply, graphdef), ()
    if maps == "capture":
        return lambda s, *i: unet_apply(graphdef, s, *i, attn=AttnControl.capture()), ()
    if maps != "inject":
        raise SystemExit(f"maps={maps!r}: choose capture or inject")
    _, shapes = jax.eval_shape(lambda s, *i: unet_apply(graphdef, s, *i, attn=AttnControl.capture()), state, *inputs)

    def inject(s, *inputs_and_maps):
        return unet_apply(graphdef, s, *inputs_and_maps[:-1], attn=AttnControl.inject(inputs_and_maps[-1]))

    return inject, (shapes,)


def random_maps(shapes: dict) -> dict:
    """Attention maps of the given shapes: softmaxes of random logits."""
    import jax

    keys = jax.random.split(jax.random.key(11), len(shapes))
    return {name: jax.nn.softmax(jax.random.normal(key, shape.shape), axis=-1).astype(shape.dtype)
            for key, (name, shape) in zip(keys, sorted(shapes.items()))}


def counted_unet_flops(sizes: Sizes, batch: int, maps: str | None = None) -> float:
    """FLOPs of one forward, counted on the XLA attention kernel (a fused kernel is one opaque call)."""
    from jinbetween.flops import count_flops

    graphdef, state = counting_model(sizes.unet, jax_dtype(sizes))
    inputs = unet_inputs(sizes, batch)
    forward, extra = unet_forward(graphdef, state, inputs, maps)
    return count_flops(forward, state, *inputs, *extra).total


def counted_decode_flops(sizes: Sizes, chunk: int, lean: bool) -> float:
    import jax

    from jinbetween.flops import count_flops
    from jinbetween.models.vae import _decode_video

    graphdef, state = counting_model(sizes.vae.replace(lean_decode=lean), jax_dtype(sizes))
    latents = jax.ShapeDtypeStruct((sizes.frames, *sizes.latent, sizes.vae.latent_channels), "float32")
    return count_flops(lambda s, z: _decode_video(graphdef, s, z, chunk), state, latents).total


def jax_unet(sizes: Sizes, batch: int, repeats: int, maps: str | None = None, precision: str = "full") -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jinbetween.models import abstract_unet

    unet = random_module(abstract_unet(sizes.unet), 0, jax_dtype(sizes))
    inputs = unet_inputs(sizes, batch)
    reference = None
    if precision == "fp8":
        from jinbetween.models import fp8, unet_apply

        apply = jax.jit(unet_apply, static_argnums=0)
        reference = apply(*nnx.split(unet), *inputs)[0]
        unet = fp8.quantize_unet(unet, fp8.calibrate(unet, lambda probed: apply(*nnx.split(probed), *inputs)))
    graphdef, state = nnx.split(unet)
    forward, extra = unet_forward(graphdef, state, inputs, maps)
    extra = tuple(random_maps(shapes) for shapes in extra)
    start = time.perf_counter()
    compiled = jax.jit(forward).lower(state, *inputs, *extra).compile()
    compile_s = time.perf_counter() - start
    result = {"compile_s": compile_s,
              **timed_calls(lambda: jax.block_until_ready(compiled(state, *inputs, *extra)), repeats)}
    if reference is not None:
        v = compiled(state, *inputs, *extra)[0]
        result["relative_error_vs_full"] = float(jnp.linalg.norm((v - reference).astype(jnp.float32))
                                                 / jnp.linalg.norm(reference.astype(jnp.float32)))
    return with_rate(result, counted_unet_flops(sizes, batch, maps))


def jax_vae(sizes: Sizes, options: dict, repeats: int) -> dict:
    import jax
    from flax import nnx

    from jinbetween.models import abstract_vae
    from jinbetween.models.vae import _decode_video

    lean = options.get("lean", "1") != "0"
    chunk = min(int(options.get("chunk", sizes.frames)), sizes.frames)
    vae = random_module(abstract_vae(sizes.vae.replace(lean_decode=lean)), 0, jax_dtype(sizes))
    graphdef, state = nnx.split(vae)
    latents = jax.random.normal(jax.random.key(1), (sizes.frames, *sizes.latent, sizes.vae.latent_channels))
    start = time.perf_counter()
    compiled = _decode_video.lower(graphdef, state, latents, chunk).compile()
    compile_s = time.perf_counter() - start
    result = {"compile_s": compile_s, "chunk": chunk, "lean_decode": lean,
              **timed_calls(lambda: jax.block_until_ready(compiled(state, latents)), repeats)}
    return with_rate(result, counted_decode_flops(sizes, chunk, lean))


def random_pipeline(sizes: Sizes):
    import jax.numpy as jnp
    import numpy as np

    from jinbetween import Pipeline
    from jinbetween.models import abstract_image_encoder, abstract_unet, abstract_vae
    from jinbetween.models.delta import delta_shapes

    dtype = jax_dtype(sizes)
    pipe = Pipeline(random_module(abstract_unet(sizes.unet), 0, dtype),
                    random_module(abstract_vae(sizes.vae), 1, dtype),
                    random_module(abstract_image_encoder(sizes.encoder), 2, dtype))
    rng = np.random.default_rng(3)
    pipe.backward_delta = {k: jnp.asarray(0.01 * rng.standard_normal(s, np.float32))
                           for k, s in sorted(delta_shapes(sizes.unet).items())}
    return pipe


def counted_run_flops(sizes: Sizes, method: str, cfg, chunk: int) -> dict[str, float]:
    """FLOPs of one video: the sampler (its whole lax.scan), the decode, and the encoding of its keyframes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jinbetween import conditioning
    from jinbetween.conditioning import Conditioning
    from jinbetween.flops import count_flops
    from jinbetween.models.delta import delta_shapes
    from jinbetween.models.state import ModelState
    from jinbetween.samplers import METHODS, sample_i2v

    dtype = jax_dtype(sizes)
    unet = ModelState(*counting_model(sizes.unet, dtype))
    h, w = sizes.latent
    sds = jax.ShapeDtypeStruct
    cond = Conditioning(image_embeds=sds((1, 1, sizes.unet.cross_attention_dim[0]), jnp.float32),
                        image_latent=sds((1, h, w, sizes.vae.latent_channels), jnp.float32),
                        clean_latent=sds((1, h, w, sizes.vae.latent_channels), jnp.float32),
                        added_time_ids=sds((1, 3), jnp.float32))
    keys = jax.random.split(jax.random.key(0), 1)
    if method == "i2v":
        sample = count_flops(lambda u, c, k: sample_i2v(u, c, k, cfg), unet, cond, keys)
        keyframes = 1
    else:
        spec = METHODS[method]
        extra = ({k: sds(s, jnp.float32) for k, s in delta_shapes(sizes.unet).items()},) if spec.uses_delta else ()
        sample = count_flops(lambda u, s, e, k, *d: spec.sample(u, s, e, k, cfg, delta=d[0] if d else None), unet,
                             cond, cond, keys, *extra)
        keyframes = 2
    # A move under `lax.cond` (MPD's distillation makes one UNet call where other moves make two) counts as its
    # dearest branch; there, count the calls the program makes instead.
    sample_flops = sample.total if sample.exact else unet_calls_of(method, cfg) * counted_unet_flops(sizes, 2)
    vae_graph, vae_state = counting_model(sizes.vae, dtype)
    enc_graph, enc_state = counting_model(sizes.encoder, dtype)
    size = sizes.encoder.image_size
    encode = count_flops(
        lambda vs, es, px, clip, noise, ids: conditioning.encode_keyframes(
            nnx.merge(vae_graph, vs), nnx.merge(enc_graph, es), px, clip, noise, ids),
        vae_state, enc_state, sds((keyframes, sizes.height, sizes.width, 3), jnp.float32),
        sds((keyframes, size, size, 3), jnp.float32), sds((keyframes, sizes.height, sizes.width, 3), jnp.float32),
        sds((3,), jnp.float32)).total
    return {"sample": sample_flops, "decode": counted_decode_flops(sizes, chunk, sizes.vae.lean_decode),
            "encode": encode}


def unet_calls_of(method: str, cfg) -> int:
    """UNet calls (each on a `[uncond; cond]` batch) of a run of `method` with `cfg`."""
    from jinbetween.samplers import unet_calls

    return len(cfg.program()) if method == "i2v" else unet_calls(method, cfg)


def peak_bytes() -> int | None:
    import jax

    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def jax_run(sizes: Sizes, method: str, options: dict, repeats: int, steps: int | None) -> dict:
    """One video, phase by phase, through the calls `Pipeline.interpolate` (`image_to_video`) makes: encode the
    keyframes, run the sampler (compiled ahead of time, so compilation is timed apart), decode to uint8 frames on
    the host. `decode_chunks=8+25` decodes with each chunk size in turn, recording the peak after each (peaks only
    grow, so order them small to large)."""
    import jax
    import numpy as np

    from jinbetween.pipeline import _method_config, _sample_keys
    from jinbetween.samplers import METHODS, I2VConfig, sample_i2v

    pipe = random_pipeline(sizes)
    rng = np.random.default_rng(0)
    keyframes = rng.integers(0, 256, (2, 1, sizes.height, sizes.width, 3), dtype=np.uint8)
    progress = options.get("progress", "0") == "1"
    if options.get("precision") == "fp8":
        pipe = pipe.with_fp8_unet(keyframes[0, 0], keyframes[1, 0], method="vibid" if method == "i2v" else method,
                                  num_frames=sizes.frames, key=jax.random.key(2))
    aug_keys, sample_keys = _sample_keys(jax.random.key(1), 0, 1)
    if method == "i2v":
        cfg = I2VConfig(num_frames=sizes.frames, num_steps=steps or 25)

        def encode():
            return (pipe.encode(keyframes[0], keys=aug_keys),)

        sampler, extra = sample_i2v, {}
    else:
        spec = METHODS[method]
        cfg = _method_config(spec, num_frames=sizes.frames, num_steps=steps)

        def encode():
            return pipe._pair_conditioning(keyframes[0], keyframes[1], aug_keys, spec, fps=spec.fps,
                                           motion_bucket_id=127, noise_aug_strength=0.02)

        sampler, extra = spec.sample, ({"delta": pipe.backward_delta} if spec.uses_delta else {})
    phases = {"encode": timed_calls(lambda: jax.block_until_ready(encode()), repeats)}
    conditioning = encode()
    peaks = {"after_encode": peak_bytes()}
    start = time.perf_counter()
    report = (lambda step: None) if progress else None  # a host callback per move, as the CLI's progress bar
    compiled = sampler.lower(pipe._unet_state, *conditioning, sample_keys, cfg, progress=report, **extra).compile()
    compile_s = time.perf_counter() - start
    outputs = []

    def sample():
        outputs.append(jax.block_until_ready(compiled(pipe._unet_state, *conditioning, sample_keys, **extra).latents))

    # Compiled ahead of time, so the first execution is a warm one: all `repeats` executions count.
    phases["sample"] = {"compile_s": compile_s, **timed_calls(sample, repeats - 1, warm_up_counts=True)}
    latents = outputs[-1]
    peaks["after_sample"] = peak_bytes()
    chunks = [None if c == "all" else int(c) for c in options.get("decode_chunks", "all").split("+")]
    decodes = {}
    for chunk in chunks:
        decodes[str(chunk or sizes.frames)] = timed_calls(lambda: pipe._finish(latents, "uint8", chunk), repeats)
        peaks[f"after_decode_chunk_{chunk or sizes.frames}"] = peak_bytes()
    phases["decode"] = decodes[str(chunks[-1] or sizes.frames)]
    warm = sum(phases[p]["median_s"] for p in ("encode", "sample", "decode"))
    first = (phases["encode"]["first_call_s"] + compile_s + phases["sample"]["first_call_s"]
             + phases["decode"]["first_call_s"])
    flops = counted_run_flops(sizes, method, cfg, chunks[-1] or sizes.frames)
    calls = unet_calls_of(method, cfg)
    result = {"method": method, "steps": cfg.num_steps, "unet_calls": calls, "moves": len(cfg.program()),
              "progress": progress, "median_s": warm, "first_call_s": first,
              "s_per_unet_call": phases["sample"]["median_s"] / calls, "phases": phases,
              "decode_by_chunk": decodes, "peaks": peaks, "peak_bytes": peak_bytes(), "flops_by_phase": flops}
    return with_rate(result, sum(flops.values()))


def jax_profile(sizes: Sizes, target: str, trace_dir: str | None, maps: str | None = None) -> dict:
    """Per-kernel time of one warm UNet forward (`unet-b1` / `unet-b2`) from JAX's profiler trace; with `trace_dir`,
    the trace and the optimized HLO are copied there."""
    import gzip
    import shutil
    import tempfile

    import jax
    from flax import nnx

    from jinbetween.models import abstract_unet

    batch = int(target.removeprefix("unet-b"))
    unet = random_module(abstract_unet(sizes.unet), 0, jax_dtype(sizes))
    graphdef, state = nnx.split(unet)
    inputs = unet_inputs(sizes, batch)
    function, extra = unet_forward(graphdef, state, inputs, maps)
    inputs = (*inputs, *(random_maps(shapes) for shapes in extra))
    forward = jax.jit(function).lower(state, *inputs).compile()
    for _ in range(2):
        jax.block_until_ready(forward(state, *inputs))
    folder = tempfile.mkdtemp(prefix="jaxprof")
    start = time.perf_counter()
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        jax.block_until_ready(forward(state, *inputs))
    wall = time.perf_counter() - start
    trace = next(Path(folder).rglob("*.trace.json.gz"))
    summary = summarize_jax_trace(trace)
    if trace_dir:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        name = f"jax_{target}" + (f"_{maps}" if maps else "")
        shutil.copy(trace, Path(trace_dir) / f"{name}.trace.json.gz")
        # The optimized HLO names every fusion the trace shows (which ops each kernel runs).
        (Path(trace_dir) / f"{name}.hlo.txt.gz").write_bytes(gzip.compress(forward.as_text().encode()))
    return {"wall_s_under_profiler": wall, **summary}


# --------------------------------------------------------------------------------------------------
# diffusers.


def torch_device():
    import torch

    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)


def torch_timed(fn, repeats: int) -> dict:
    import torch

    def synced():
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return timed_calls(synced, repeats)


def torch_flops(fn) -> float:
    """FLOPs of `fn()` by FlopCounterMode. On a CPU, attention takes the math path: FlopCounterMode knows the
    GPU's fused attention kernels but not the CPU's, which it would count as zero."""
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    backend = contextlib.nullcontext() if torch.cuda.is_available() else sdpa_kernel(SDPBackend.MATH)
    with backend, FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def torch_peak(reset: bool = False) -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated()


def torch_unet_call(sizes: Sizes, batch: int):
    """Returns (module, call) for diffusers' UNet on random inputs on the torch device."""
    import torch

    from tests.torch_reference import diffusers_unet

    device, dtype = torch_device()
    unet = diffusers_unet(sizes.unet, device=device).to(dtype)
    h, w = sizes.latent
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(batch, sizes.frames, sizes.unet.in_channels, h, w, generator=gen).to(device, dtype)
    embeds = torch.randn(batch, 1, sizes.unet.cross_attention_dim[0], generator=gen).to(device, dtype)
    t = torch.full((batch,), 0.25 * float(torch.log(torch.tensor(700.0))), device=device)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * batch, device=device, dtype=dtype)

    def call(module):
        with torch.no_grad():
            return module(x, t, embeds, ids, return_dict=False)[0]

    return unet, call


def torch_unet(sizes: Sizes, batch: int, compiled: bool, repeats: int) -> dict:
    import torch

    unet, call = torch_unet_call(sizes, batch)
    flops = torch_flops(lambda: call(unet))
    module = torch.compile(unet) if compiled else unet
    torch_peak(reset=True)
    result = torch_timed(lambda: call(module), repeats)
    result["peak_bytes"] = torch_peak()
    return with_rate(result, flops)


def torch_vae(sizes: Sizes, options: dict, compiled: bool, repeats: int) -> dict:
    import torch

    from tests.torch_reference import diffusers_vae

    device, dtype = torch_device()
    vae = diffusers_vae(sizes.vae, device=device).to(dtype)
    chunk = min(int(options.get("chunk", sizes.frames)), sizes.frames)
    latents = torch.randn(sizes.frames, sizes.vae.latent_channels, *sizes.latent,
                          generator=torch.Generator().manual_seed(1)).to(device, dtype)
    decoder = torch.compile(vae.decode) if compiled else vae.decode

    def decode(fn):  # StableVideoDiffusionPipeline.decode_latents' loop
        with torch.no_grad():
            z = latents / sizes.vae.scaling_factor
            return torch.cat([fn(z[i:i + chunk], num_frames=len(z[i:i + chunk])).sample
                              for i in range(0, len(z), chunk)])

    flops = torch_flops(lambda: decode(vae.decode))
    torch_peak(reset=True)
    result = torch_timed(lambda: decode(decoder), repeats)
    result.update(chunk=chunk, peak_bytes=torch_peak())
    return with_rate(result, flops)


def torch_run_i2v(sizes: Sizes, repeats: int, steps: int | None) -> dict:
    """diffusers' StableVideoDiffusionPipeline, whole call (encode, 25 Euler steps with CFG, decode, to numpy)."""
    import numpy as np
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor

    from tests.torch_reference import SVD_SCHEDULER, diffusers_unet, diffusers_vae, transformers_clip

    device, dtype = torch_device()
    pipe = StableVideoDiffusionPipeline(
        vae=diffusers_vae(sizes.vae, device=device), image_encoder=transformers_clip(sizes.encoder, device=device),
        unet=diffusers_unet(sizes.unet, device=device), scheduler=EulerDiscreteScheduler.from_config(SVD_SCHEDULER),
        feature_extractor=CLIPImageProcessor()).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (sizes.height, sizes.width, 3), dtype=np.uint8))
    num_steps = steps or 25

    def call():
        return pipe(image, height=sizes.height, width=sizes.width, num_frames=sizes.frames,
                    num_inference_steps=num_steps, output_type="np").frames

    torch_peak(reset=True)
    result = torch_timed(call, repeats)
    result.update(method="i2v", steps=num_steps, unet_calls=num_steps, peak_bytes=torch_peak())
    return with_rate(result, torch_flops(call))


def torch_profile(sizes: Sizes, target: str) -> dict:
    """Per-kernel time of one warm diffusers UNet forward from torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    unet, call = torch_unet_call(sizes, int(target.removeprefix("unet-b")))
    for _ in range(2):
        call(unet)
    activities = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        call(unet)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    gpu = torch.cuda.is_available()
    kernels = {}
    for event in prof.key_averages():
        us = event.device_time_total if gpu else event.self_cpu_time_total
        if us > 0:
            kernels[event.key] = (us / 1e6, event.count)
    return summarize_kernels(kernels, source="torch.profiler " + ("CUDA kernels" if gpu else "CPU ops (self time)"))


# --------------------------------------------------------------------------------------------------
# Profile summaries.

_CATEGORIES = [  # (category, pattern): the first match names a kernel's category
    ("pallas kernel", r"pallas"),  # jinbetween's own Triton kernels, named pallas_*
    ("attention", r"sdpa|fmha|flash|attention"),
    ("gemm (XLA triton)", r"triton_gemm|gemm_fusion|__triton_gemm"),
    ("transpose / copy", r"transpose|copy|memcpy|memset|concatenate|\bcat\b|permute|dynamic.update.slice"),
    ("reduction fusion", r"^input_|reduce|norm|softmax"),
    ("elementwise fusion", r"^loop_|^fusion|^wrapped_|elementwise|^triton"),
    ("convolution", r"fprop|implicit|conv|winograd|dgrad|wgrad"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|matmul|cublas|\bmm\b|addmm|bmm"),
]


def categorize(name: str) -> str:
    lowered = name.lower()
    for category, pattern in _CATEGORIES:
        if re.search(pattern, lowered):
            return category
    return "other"


def summarize_kernels(kernels: dict[str, tuple[float, int]], source: str, top: int = 40) -> dict:
    """Totals by category and the `top` kernels by time, from {kernel name: (seconds, count)}."""
    by_category: dict[str, float] = {}
    for name, (seconds, _) in kernels.items():
        by_category[categorize(name)] = by_category.get(categorize(name), 0.0) + seconds
    total = sum(by_category.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {"source": source, "kernel_s_total": total, "kernels": len(kernels),
            "by_category_s": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
            "top": [{"name": name[:160], "s": s, "count": n, "category": categorize(name)} for name, (s, n) in ranked]}


def summarize_jax_trace(path: Path) -> dict:
    """Kernel times from a JAX profiler trace (`*.trace.json.gz`, trace-event JSON).

    On a GPU: the events of the `/device:GPU:*` lines named "Stream ..." (one per kernel launch), or, if no line
    is named so, of every device line but the profiler's summaries (modules, ops, steps). Without a GPU: the host
    events that carry an `hlo_op` (XLA's CPU thunks), so the same summary works on a CPU trace. The seconds of
    every device line are kept too (`device_lines_s`), to check which lines were taken.
    """
    import gzip

    events = json.loads(gzip.open(path).read())["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device_pids = {pid for pid, name in processes.items() if name.startswith("/device:")}
    spans = [(threads.get((e["pid"], e.get("tid")), ""), e) for e in events
             if e.get("ph") == "X" and "dur" in e and (e["pid"] in device_pids or not device_pids)]
    lines: dict[str, float] = {}
    for line, e in spans:
        lines[line] = lines.get(line, 0.0) + e["dur"] / 1e6
    if device_pids:
        taken = {line for line in lines if line.startswith("Stream")} or {
            line for line in lines if not re.search(r"module|ops|step|framework|source", line.lower())}
        spans = [(line, e) for line, e in spans if line in taken]
        source = f"jax.profiler device lines {sorted(taken)}"
    else:
        spans = [(line, e) for line, e in spans if "hlo_op" in e.get("args", {})]
        source = "jax.profiler CPU thunks (no GPU in this trace)"
    kernels: dict[str, tuple[float, int]] = {}
    hlo_ops: dict[str, tuple[float, int]] = {}
    for _, e in spans:
        for table_, name in ((kernels, e["name"]), (hlo_ops, e.get("args", {}).get("hlo_op"))):
            if name:
                seconds, count = table_.get(name, (0.0, 0))
                table_[name] = (seconds + e["dur"] / 1e6, count + 1)
    summary = summarize_kernels(kernels, source=source)
    summary["device_lines_s"] = lines if device_pids else {}
    summary["top_hlo_ops"] = [{"op": op, "s": s, "count": n}
                              for op, (s, n) in sorted(hlo_ops.items(), key=lambda kv: -kv[1][0])[:40]]
    return summary


# --------------------------------------------------------------------------------------------------
# One case (a child process).


def environment() -> dict:
    info = {"python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "")}
    try:
        import jax

        info.update(jax=jax.__version__, device=jax.devices()[0].device_kind, backend=jax.default_backend())
        import flax

        info["flax"] = flax.__version__
    except Exception as error:  # noqa: BLE001 (recorded, not fatal: the torch side may still run)
        info["jax_error"] = repr(error)
    return info


def torch_environment() -> dict:
    import diffusers
    import torch

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch_dtype": str(torch_device()[1]).removeprefix("torch.")}


def run_case(case: str, args) -> dict:
    kind, impl, target, options = parse_case(case)
    sizes = Sizes(args)
    apply_options(sizes, options)
    if impl == "jax":
        import jax.numpy as jnp

        if kind == "unet":
            result = jax_unet(sizes, int(target.removeprefix("b")), args.repeats, options.get("maps"),
                              options.get("precision", "full"))
        elif kind == "vae":
            result = jax_vae(sizes, options, args.repeats)
        elif kind == "run":
            if target not in METHOD_NAMES:
                raise SystemExit(f"unknown method {target!r}; choose one of {METHOD_NAMES}")
            result = jax_run(sizes, target, options, args.run_repeats, args.steps)
        else:
            result = jax_profile(sizes, target, args.trace_dir, options.get("maps"))
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        result.setdefault("peak_bytes", stats.get("peak_bytes_in_use"))
        result["dtype"] = jnp.dtype(jax_dtype(sizes)).name
        env = environment()
    elif impl in ("torch-eager", "torch-compile"):
        compiled = impl == "torch-compile"
        if kind == "unet":
            result = torch_unet(sizes, int(target.removeprefix("b")), compiled, args.repeats)
        elif kind == "vae":
            result = torch_vae(sizes, options, compiled, args.repeats)
        elif kind == "run" and target == "i2v" and not compiled:
            result = torch_run_i2v(sizes, args.run_repeats, args.steps)
        elif kind == "profile" and not compiled:
            result = torch_profile(sizes, target)
        else:
            raise SystemExit(f"no torch implementation for case {case!r}")
        env = torch_environment()
    else:
        raise SystemExit(f"unknown implementation {impl!r} in {case!r}: jax, torch-eager or torch-compile")
    return {"case": case, "kind": kind, "impl": impl, "target": target, "options": options, **result, "env": env}


# --------------------------------------------------------------------------------------------------
# Driver and table.


def shared_flags(args) -> list[str]:
    flags = ["--frames", str(args.frames), "--height", str(args.height), "--width", str(args.width),
             "--repeats", str(args.repeats), "--run-repeats", str(args.run_repeats)]
    flags += ["--tiny"] if args.tiny else []
    flags += ["--steps", str(args.steps)] if args.steps else []
    flags += ["--trace-dir", args.trace_dir] if args.trace_dir else []
    return flags


def run_child(case: str, args) -> dict:
    """Runs one case in a process of its own; returns its result, or what went wrong."""
    cmd = [sys.executable, __file__, "case", case, *shared_flags(args)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                              timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"timed out after {args.case_timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"case": case, "error": (done.stderr or done.stdout)[-3000:], "returncode": done.returncode}


def drive(args) -> dict:
    cases = split_cases(args.cases) if args.cases else SETS[args.command]
    for case in cases:
        if "xla" in parse_case(case)[3] and args.in_process:
            raise SystemExit(f"case {case!r} sets XLA flags, which apply only in a process of its own: drop "
                             "--in-process")
    report = {"what": f"bench/perf.py {args.command}", "tiny": args.tiny, "frames": args.frames,
              "image": [args.height, args.width], "steps_override": args.steps, "repeats": args.repeats,
              "run_repeats": args.run_repeats, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    for case in cases:
        elapsed = time.monotonic() - began
        if args.budget_s and elapsed > args.budget_s:
            result = {"case": case, "skipped": f"time budget of {args.budget_s} s spent ({elapsed:.0f} s)"}
        else:
            result = run_case(case, args) if args.in_process else run_child(case, args)
            result["wall_s"] = time.monotonic() - began - elapsed
        report["results"].append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("top", "top_hlo_ops", "env")})[:700], flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _gb(value) -> str:
    return "–" if value is None else f"{value / 1e9:.1f} GB"


def _s(value) -> str:
    if value is None:
        return "–"
    return f"{value * 1e3:.0f} ms" if value < 1 else (f"{value:.2f} s" if value < 100 else f"{value:.0f} s")


def _ratio(ours: dict | None, theirs: dict | None) -> float | None:
    return ours["median_s"] / theirs["median_s"] if ours and theirs else None


def table(paths: list[str]) -> str:
    """Markdown tables of harness JSON files: the models side by side, whole runs (diffusers estimated where it has no
    implementation, and said so), and the performance targets of issue 7 against what was measured."""
    results = {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        if "results" not in report:
            raise SystemExit(f"{path} is not a bench/perf.py report (no 'results'; the kernel benchmarks write their "
                             "own layout): leave it out of `table`'s files")
        for r in report["results"]:
            if "error" not in r and "skipped" not in r:
                results[r["case"]] = r

    def cell(r):
        if r is None:
            return "–"
        first = r.get("compile_s", r.get("first_call_s"))
        rate = f" · {r['tflop_per_s']:.0f} TFLOP/s" if r.get("tflop_per_s") else ""
        return f"{_s(r['median_s'])} · {_s(first)} · {_gb(r.get('peak_bytes'))}{rate}"

    lines = ["| what | jinbetween bf16: median · compile · peak · rate | diffusers fp16 eager: median · first call "
             "· peak · rate | diffusers fp16 torch.compile | jinbetween ÷ eager / ÷ compile |",
             "|---|---|---|---|---|"]
    rows = [("UNet forward, B=1", "unet/jax/b1", "unet/{}/b1"),
            ("UNet forward, B=2 (one CFG call)", "unet/jax/b2", "unet/{}/b2"),
            ("VAE decode, all frames (lean)", "vae/jax", "vae/{}"),
            ("VAE decode, all frames, lean_decode off", "vae/jax:lean=0", "vae/{}")]
    for label, ours_case, torch_case in rows:
        ours = results.get(ours_case)
        eager, compiled = (results.get(torch_case.format(impl)) for impl in ("torch-eager", "torch-compile"))
        if ours or eager:
            ratios = " / ".join("–" if q is None else f"{q:.2f}×"
                                for q in (_ratio(ours, eager), _ratio(ours, compiled)))
            lines.append(f"| {label} | {cell(ours)} | {cell(eager)} | {cell(compiled)} | {ratios} |")
    variants = [r for case, r in results.items() if ":" in case and r["kind"] in ("unet", "profile")]
    for r in variants:
        lines.append(f"| variant `{r['case']}` | {cell(r)} | | | |")

    runs = [r for r in results.values() if r["kind"] == "run" and r["impl"] == "jax"]
    unet_torch = {impl: results.get(f"unet/{impl}/b2") for impl in ("torch-eager", "torch-compile")}
    vae_torch = {impl: results.get(f"vae/{impl}") for impl in ("torch-eager", "torch-compile")}
    torch_i2v = results.get("run/torch-eager/i2v")
    if runs:
        lines += ["", "| run (case) | UNet calls | jinbetween warm: encode + sample + decode = total · peak "
                      "| first call (sampler compile) | diffusers fp16 eager | diffusers fp16 compile |",
                  "|---|---|---|---|---|---|"]
    for r in runs:
        estimates = []
        for impl in ("torch-eager", "torch-compile"):
            if r["method"] == "i2v" and impl == "torch-eager" and torch_i2v:
                estimates.append(f"{_s(torch_i2v['median_s'])} (measured)")
            elif unet_torch[impl] and vae_torch[impl]:
                estimate = r["unet_calls"] * unet_torch[impl]["median_s"] + vae_torch[impl]["median_s"]
                estimates.append(f"≈ {_s(estimate)} (calls × B=2 UNet + decode)")
            else:
                estimates.append("–")
        p = r["phases"]
        lines.append(f"| {r['case'].removeprefix('run/jax/')} | {r['unet_calls']} | "
                     f"{_s(p['encode']['median_s'])} + {_s(p['sample']['median_s'])} + "
                     f"{_s(p['decode']['median_s'])} = {_s(r['median_s'])} · "
                     f"{_gb(r.get('peak_bytes'))} | {_s(r['first_call_s'])} ({_s(p['sample']['compile_s'])}) | "
                     f"{estimates[0]} | {estimates[1]} |")

    def run_of(method):
        return next((r for r in runs if r["method"] == method and not r["progress"]), None)

    gi, mpd = run_of("gi"), run_of("mpd")
    unet_b2 = results.get("unet/jax/b2")
    gi_peaks = {k.removeprefix("after_decode_chunk_"): v for k, v in (gi or {}).get("peaks", {}).items()
                if k.startswith("after_decode")}
    targets = [
        ("UNet forward B=2 ≤ 0.65× torch.compile", _ratio(unet_b2, unet_torch["torch-compile"]), 0.65, "×"),
        ("UNet forward B=2 ≤ 0.45× eager", _ratio(unet_b2, unet_torch["torch-eager"]), 0.45, "×"),
        ("VAE decode of 25 frames ≤ 0.3× eager", _ratio(results.get("vae/jax"), vae_torch["torch-eager"]), 0.3,
         "×"),
        ("GI end to end ≤ 100 s", gi and gi["median_s"], 100, " s"),
        ("MPD-par end to end ≤ 25 s", mpd and mpd["median_s"], 25, " s"),
        ("first call's compilation ≤ 90 s (GI: first calls − warm calls)",
         gi and gi["first_call_s"] - gi["median_s"], 90, " s"),
    ]
    targets += [(f"GI peak ≤ 16 GB (decode chunk {chunk})", peak and peak / 1e9, 16, " GB")
                for chunk, peak in gi_peaks.items()]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for label, value, bound, unit in targets:
        shown = "not measured" if value is None else f"{value:.2f}{unit}"
        lines.append(f"| {label} | {shown} | {'–' if value is None else ('yes' if value <= bound else 'no')} |")
    return "\n".join(lines)


def count_all(args) -> dict:
    """FLOPs of every benchmarked program, counted from jaxprs (no device needed), with each one's time at
    `--peak-tflops` (the floor no implementation of the same arithmetic can beat on that GPU)."""
    from jinbetween.pipeline import _method_config
    from jinbetween.samplers import METHODS, I2VConfig

    sizes = Sizes(args)
    peak = args.peak_tflops * 1e12
    counts = {}
    for shortcut in (True, False):
        sizes.unet = sizes.unet.replace(cross_attention_shortcut=shortcut)
        for batch in (1, 2):
            counts[f"unet/b{batch}" + ("" if shortcut else ":shortcut=0")] = {"flops": counted_unet_flops(sizes, batch)}
    sizes.unet = sizes.unet.replace(cross_attention_shortcut=True)
    for lean in (True, False):
        counts["vae" + ("" if lean else ":lean=0")] = {"flops": counted_decode_flops(sizes, sizes.frames, lean)}
    for method in METHOD_NAMES:
        cfg = (I2VConfig(num_frames=sizes.frames, num_steps=args.steps or 25) if method == "i2v" else
               _method_config(METHODS[method], num_frames=sizes.frames, num_steps=args.steps))
        phases = counted_run_flops(sizes, method, cfg, sizes.frames)
        counts[f"run/{method}"] = {"flops": sum(phases.values()), "flops_by_phase": phases,
                                   "unet_calls": unet_calls_of(method, cfg)}
    for entry in counts.values():
        entry["floor_s"] = entry["flops"] / peak
    return {"what": "FLOPs counted from jaxprs (matrix products and convolutions, as FlopCounterMode counts)",
            "frames": sizes.frames, "image": [sizes.height, sizes.width], "tiny": sizes.tiny,
            "peak_tflops_for_floor": args.peak_tflops, "counts": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*SETS, "case", "table", "flops"])
    parser.add_argument("names", nargs="*", help="case: the case; table: the JSON files")
    parser.add_argument("--cases", help="comma-separated cases instead of the whole set")
    parser.add_argument("--out", help="JSON report (sets)")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int, help="override every method's steps (smoke runs)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of a model case after the warm-up")
    parser.add_argument("--run-repeats", type=int, default=1,
                        help="run cases: timed calls of encode and decode after the first, and sampler executions")
    parser.add_argument("--tiny", action="store_true", help="tiny models on a CPU: checks the script")
    parser.add_argument("--budget-s", type=float, help="start no case after this many seconds")
    parser.add_argument("--case-timeout", type=float, default=1800)
    parser.add_argument("--in-process", action="store_true",
                        help="run the cases one after another in this process (quick checks on a CPU: peak memory "
                             "readings then mix, and XLA flag presets cannot apply)")
    parser.add_argument("--trace-dir", help="profile cases copy their traces here")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="flops: the GPU's bf16 matrix rate for the floor times (790: an H200, measured here)")
    args = parser.parse_args()
    args.frames = args.frames or (3 if args.tiny else 25)
    args.height = args.height or (16 if args.tiny else 576)
    args.width = args.width or (24 if args.tiny else 1024)
    if args.command == "table":
        print(table(args.names))
    elif args.command == "case":
        print(json.dumps(run_case(args.names[0], args)))
    elif args.command == "flops":
        report = count_all(args)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        for name, entry in report["counts"].items():
            print(f"{name:24s} {entry['flops'] / 1e12:10.2f} TFLOP   floor {entry['floor_s']:8.3f} s")
    else:
        if not args.out:
            parser.error("--out is required for a set")
        drive(args)


if __name__ == "__main__":
    main()
