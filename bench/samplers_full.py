"""Every inbetweening method once at full size: compile time, sampling wall time, UNet calls, peak GPU memory.

    PYTHONPATH=. python bench/samplers_full.py --out bench/results/samplers_full.json

SVD-XT with random weights (times and memory do not depend on their values), bf16, one keyframe pair,
25 frames at 576×1024 (latent 72×128), each method at its defaults (GI with a random backward delta).
Sampling only: keyframe encoding and the VAE decode are the same for every method (see i2v_e2e.json
and vae_decode_speed.json). Each method runs in its own process so that peak memory readings do not
mix; the first call is compiled ahead of time and timed separately. `--tiny` checks the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_METHODS = "gi,vibid,mr-catr,mpd-seq,trf,mpd"


def run_one(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.i2v_e2e import random_model
    from jinbetween import config
    from jinbetween.conditioning import Conditioning
    from jinbetween.models import abstract_unet
    from jinbetween.models.delta import delta_shapes
    from jinbetween.models.state import ModelState
    from jinbetween.samplers import METHODS, unet_calls

    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    cfg_unet = config.tiny() if args.tiny else config.svd_xt()
    unet = ModelState.of(random_model(abstract_unet(cfg_unet), jax.random.key(0), dtype))
    h, w = args.height // 8, args.width // 8
    rng = np.random.default_rng(0)

    def keyframe() -> Conditioning:
        return Conditioning(
            image_embeds=jnp.asarray(rng.standard_normal((1, 1, cfg_unet.cross_attention_dim[0])), jnp.float32),
            image_latent=jnp.asarray(rng.standard_normal((1, h, w, 4)), jnp.float32),
            clean_latent=jnp.asarray(rng.standard_normal((1, h, w, 4)), jnp.float32),
            added_time_ids=jnp.asarray([[6.0, 127.0, 0.02]], jnp.float32))

    spec = METHODS[args.method]
    cfg = spec.config(num_frames=args.frames)
    start, end, keys = keyframe(), keyframe(), jax.random.split(jax.random.key(1), 1)
    extra = {}
    if spec.uses_delta:
        shapes = delta_shapes(cfg_unet)
        extra = {"delta": {k: 0.01 * jax.random.normal(jax.random.key(2), s) for k, s in shapes.items()}}
    t0 = time.perf_counter()
    compiled = spec.sample.lower(unet, start, end, keys, cfg, **extra).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    t0 = time.perf_counter()
    latents = jax.block_until_ready(compiled(unet, start, end, keys, **extra)).latents
    sample_s = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    calls = unet_calls(args.method, cfg)
    return {"method": args.method, "dtype": jnp.dtype(dtype).name, "moves": len(cfg.program()), "unet_calls": calls,
            "compile_s": compile_s, "sample_s": sample_s, "s_per_unet_call": sample_s / calls,
            "peak_bytes": stats.get("peak_bytes_in_use"),
            "xla_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
            "finite": bool(jnp.all(jnp.isfinite(latents))), "versions": {"jax": jax.__version__}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", help="run one method (used by the driver)")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", help="JSON file of all methods (driver mode)")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return
    import jax

    report = {"what": "inbetweening samplers, one run each at defaults (sampling only), random weights",
              "frames": args.frames, "image": [args.height, args.width], "device": jax.devices()[0].device_kind,
              "python": platform.python_version(), "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--method", method, "--frames", str(args.frames), "--height",
               str(args.height), "--width", str(args.width)] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        result = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else
                  {"method": method, "error": done.stderr[-2000:]})
        report["results"].append(result)
        print(json.dumps(result)[:600], flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
