"""25-frame VAE decode, jinbetween bf16 against diffusers fp16, side by side on one GPU.

    PYTHONPATH=. python bench/vae_decode_speed.py --out bench/results/vae_decode_speed.json

Each (implementation, chunk size) runs in its own process so that peak-memory readings do not mix:
JAX reports `memory_stats()["peak_bytes_in_use"]`, torch `max_memory_allocated()`; both include the
weights. Times are the median of `--repeats` calls after one warm-up call (JAX's first call, which
compiles, is reported separately). The diffusers side is `StableVideoDiffusionPipeline.decode_latents`'
loop: `vae.decode(latents[i:i+chunk] / 0.18215, num_frames=len(chunk))`.
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

FLOPS_PER_FRAME_576x1024 = 173.57e12 / 25  # svd_port.md §4, counted with torch's FlopCounterMode


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jinbetween import config
    from jinbetween.models import VAE

    from jinbetween.models import vae as vae_module

    lean = args.impl.startswith("jax:") or args.impl == "jax"
    if args.impl.startswith("jax:"):
        vae_module.FRAMES_PER_STEP = int(args.impl.split(":")[1])
    vae = VAE(config.svd_vae().replace(lean_decode=lean), rngs=nnx.Rngs(0))
    nnx.update(vae, jax.tree.map(lambda p: p.astype(jnp.bfloat16), nnx.state(vae)))
    latents = jax.random.normal(jax.random.key(0), (args.frames, args.height // 8, args.width // 8, 4))
    start = time.perf_counter()
    jax.block_until_ready(vae.decode_video(latents, args.chunk))
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(vae.decode_video(latents, args.chunk))
        times.append(time.perf_counter() - start)
    name = (f"jinbetween, {vae_module.FRAMES_PER_STEP} frame(s) per step" if lean else
            "jinbetween, lean_decode=False")
    return {"impl": name, "dtype": "bfloat16", "first_call_s": first, "median_s": statistics.median(times),
            "times_s": times, "peak_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
            "versions": {"jax": jax.__version__}}


def run_torch(args) -> dict:
    import diffusers
    import torch
    from diffusers import AutoencoderKLTemporalDecoder

    from jinbetween import config

    kwargs = {k: v for k, v in config.svd_vae().to_diffusers().items() if not k.startswith("_")}
    vae = AutoencoderKLTemporalDecoder(**kwargs).to("cuda", torch.float16).eval()
    latents = torch.randn(args.frames, 4, args.height // 8, args.width // 8, device="cuda", dtype=torch.float16)

    def decode():
        with torch.no_grad():
            z = latents / 0.18215
            return torch.cat([vae.decode(z[i:i + args.chunk], num_frames=len(z[i:i + args.chunk])).sample
                              for i in range(0, len(z), args.chunk)])

    decode()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        decode()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"impl": "diffusers", "dtype": "float16", "median_s": statistics.median(times), "times_s": times,
            "peak_bytes": torch.cuda.max_memory_allocated(),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", help="run one configuration (used by the driver): torch, jax (lean decode), "
                                       "jax:K (lean, K frames per step of the per-frame layers), jax-whole "
                                       "(lean_decode off)")
    parser.add_argument("--impls", default="torch,jax,jax-whole", help="configurations the driver runs")
    parser.add_argument("--chunks", default="25,8")
    parser.add_argument("--chunk", type=int, default=25)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="JSON file of the whole comparison (driver mode)")
    args = parser.parse_args()
    if args.impl:
        print(json.dumps({"chunk": args.chunk, **(run_torch(args) if args.impl == "torch" else run_jax(args))}))
        return
    import jax

    flops = FLOPS_PER_FRAME_576x1024 * args.frames * (args.height * args.width) / (576 * 1024)
    report = {"what": "VAE decode of latents [F, h, w, 4] to frames, median of repeats after warm-up",
              "frames": args.frames, "image": [args.height, args.width], "device": jax.devices()[0].device_kind,
              "python": platform.python_version(), "flops_counted": flops, "results": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for chunk in (int(c) for c in args.chunks.split(",")):
        for impl in args.impls.split(","):
            cmd = [sys.executable, __file__, "--impl", impl, "--chunk", str(chunk), "--frames", str(args.frames),
                   "--height", str(args.height), "--width", str(args.width), "--repeats", str(args.repeats)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if done.returncode:
                result = {"impl": impl, "chunk": chunk, "error": done.stderr[-2000:]}
            else:
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["achieved_TFLOPs"] = flops / result["median_s"] / 1e12
            report["results"].append(result)
            print(json.dumps(result)[:400], flush=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # after each: a cut-off run keeps its part


if __name__ == "__main__":
    main()
