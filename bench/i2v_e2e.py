"""A whole image-to-video run, jinbetween (bf16) beside diffusers' StableVideoDiffusionPipeline (fp16), one GPU.

    PYTHONPATH=. python bench/i2v_e2e.py --out bench/results/i2v_e2e.json

Random weights (the timings do not depend on their values), SVD-XT at 576×1024, 25 frames, 25 steps,
CFG. Each implementation runs in its own process so that peak memory readings do not mix. Per phase:
keyframe encoding, sampling, decoding; the first call (compilation included) and the median of warm calls.
`--tiny` runs the tiny configs on a CPU (a check of this script, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(first-call seconds, median warm seconds, last result) of `fn()`, which must block until done."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def random_model(abstract, key, dtype):
    """The abstract NNX module filled with N(0, 0.02²) parameters in `dtype` (speed does not depend on values)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(key, len(leaves))
    filled = [jax.random.normal(k, leaf.shape, dtype) * 0.02 for k, leaf in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, filled))


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jinbetween import Pipeline, config
    from jinbetween.models import abstract_image_encoder, abstract_unet, abstract_vae
    from jinbetween.samplers import I2VConfig, sample_i2v

    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    cfgs = ((config.tiny(), config.tiny_vae(), config.tiny_image_encoder()) if args.tiny else
            (config.svd_xt(), config.svd_vae(), config.svd_image_encoder()))
    keys = jax.random.split(jax.random.key(0), 3)
    pipe = Pipeline(random_model(abstract_unet(cfgs[0]), keys[0], dtype),
                    random_model(abstract_vae(cfgs[1]), keys[1], dtype),
                    random_model(abstract_image_encoder(cfgs[2]), keys[2], dtype))
    image = np.random.default_rng(0).integers(0, 256, (1, args.height, args.width, 3), dtype=np.uint8)
    sample_keys = jax.random.split(jax.random.key(1), 1)
    cfg = I2VConfig(num_frames=args.frames, num_steps=args.steps)
    encode = timed(lambda: jax.block_until_ready(pipe.encode(image, keys=sample_keys)), args.repeats)
    cond = encode[2]
    sample = timed(lambda: jax.block_until_ready(sample_i2v(pipe._unet_state, cond, sample_keys, cfg).latents),
                   args.repeats)
    decode = timed(lambda: pipe.decode(sample[2], args.decode_chunk_size), args.repeats)
    stats = jax.devices()[0].memory_stats() or {}
    return {"impl": "jinbetween", "dtype": jnp.dtype(dtype).name, "versions": {"jax": jax.__version__},
            "phases": {name: {"first_call_s": first, "warm_s": warm} for name, (first, warm, _) in
                       (("encode", encode), ("sample", sample), ("decode", decode))},
            "warm_total_s": encode[1] + sample[1] + decode[1], "peak_bytes": stats.get("peak_bytes_in_use")}


def run_torch(args) -> dict:
    import diffusers
    import torch
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor

    from tests.torch_reference import SVD_SCHEDULER, diffusers_svd_pipeline, diffusers_unet, diffusers_vae, \
        transformers_clip
    from jinbetween import config

    if args.tiny:
        pipe = diffusers_svd_pipeline(0)
        device, dtype = "cpu", torch.float32
    else:
        torch.manual_seed(0)
        pipe = StableVideoDiffusionPipeline(
            vae=diffusers_vae(config.svd_vae()), image_encoder=transformers_clip(config.svd_image_encoder()),
            unet=diffusers_unet(config.svd_xt()), scheduler=EulerDiscreteScheduler.from_config(SVD_SCHEDULER),
            feature_extractor=CLIPImageProcessor())
        device, dtype = "cuda", torch.float16
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(__import__("numpy").random.default_rng(0).integers(
        0, 256, (args.height, args.width, 3), dtype="uint8"))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def latents():
        out = pipe(image, height=args.height, width=args.width, num_frames=args.frames,
                   num_inference_steps=args.steps, output_type="latent").frames
        sync()
        return out

    def decode(lat):
        with torch.no_grad():
            out = pipe.decode_latents(lat, args.frames, args.decode_chunk_size or args.frames)
        sync()
        return out

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    encode_and_sample = timed(latents, args.repeats)
    decoded = timed(lambda: decode(encode_and_sample[2]), args.repeats)
    return {"impl": "diffusers", "dtype": str(dtype).removeprefix("torch."),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
            "phases": {"encode+sample": {"first_call_s": encode_and_sample[0], "warm_s": encode_and_sample[1]},
                       "decode": {"first_call_s": decoded[0], "warm_s": decoded[1]}},
            "warm_total_s": encode_and_sample[1] + decoded[1],
            "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["jax", "torch"], help="run one side (used by the driver)")
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--decode-chunk-size", type=int)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", help="JSON file of the comparison (driver mode)")
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(run_jax(args) if args.impl == "jax" else run_torch(args)))
        return
    results = []
    for impl in ("torch", "jax"):
        cmd = [sys.executable, __file__, "--impl", impl, *sys.argv[1:]]
        cmd = [c for i, c in enumerate(cmd) if c != "--out" and (i == 0 or cmd[i - 1] != "--out")]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        results.append(json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else
                       {"impl": impl, "error": done.stderr[-3000:]})
        print(json.dumps(results[-1])[:600], flush=True)
    import jax

    report = {"what": "image-to-video, random weights, CFG, per phase", "image": [args.height, args.width],
              "frames": args.frames, "steps": args.steps, "device": jax.devices()[0].device_kind,
              "python": platform.python_version(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
