"""Batch generation throughput on one device and on every local device (`Pipeline.interpolate_batch`).

    PYTHONPATH=. python bench/batch_scaling.py --out bench/results/batch_scaling_h200x2.json
    PYTHONPATH=. python bench/batch_scaling.py --random-svd-xt --steps 5 --pairs 8 --per-device 1 \\
        --out bench/results/batch_scaling_svd_xt_h200x2.json

Default: the shipped toy-world model (128×128, 14 frames) with ViBiD at its 25 steps. `--random-svd-xt` builds
SVD-XT with random weights in bf16 (speed does not depend on their values; 576×1024, 25 frames), `--weights DIR`
loads a pipeline folder. For each device count (1 and all local devices unless `--devices` says otherwise) the
same pairs run with `--per-device` pairs per device in each chunk: first one chunk (compilation included, timed
apart), then the timed call over all `--pairs` (keyframe encoding, sampling, decoding, uint8 frames on the host).
Each count reports pairs/s, its speed-up over the first count, and whether its videos equal the first count's
(each device runs the same program, so they should be bit-identical). Needs jax, flax and numpy (and jinbetween's
own dependencies), not diffusers or PyAV. A CPU check of the script with 2 fake devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu PYTHONPATH=. python bench/batch_scaling.py \\
        --size 64 64 --frames 3 --steps 1 --pairs 4 --out /tmp/batch_scaling_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def load_pipeline(args):
    """(pipeline, description of its weights)."""
    import jax
    import jax.numpy as jnp

    from jinbetween import Pipeline, config

    if not args.random_svd_xt:
        return Pipeline.from_pretrained(args.weights), args.weights or "shipped toy-world model"
    from bench.i2v_e2e import random_model
    from jinbetween.models import abstract_image_encoder, abstract_unet, abstract_vae

    keys = jax.random.split(jax.random.key(0), 3)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    pipe = Pipeline(random_model(abstract_unet(config.svd_xt()), keys[0], dtype),
                    random_model(abstract_vae(config.svd_vae()), keys[1], dtype),
                    random_model(abstract_image_encoder(config.svd_image_encoder()), keys[2], dtype))
    return pipe, f"random SVD-XT weights ({jnp.dtype(dtype).name})"


def run(args) -> dict:
    import jax
    import numpy as np

    from jinbetween import distributed

    pipe, weights = load_pipeline(args)
    height, width = args.size or pipe.default_size
    rng = np.random.default_rng(0)
    pairs = [tuple(rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(2))
             for _ in range(args.pairs)]
    options = dict(method=args.method, key=jax.random.key(0), num_inference_steps=args.steps,
                   num_frames=args.frames, allow_untrained_backward=True)
    local = jax.local_devices()
    counts = [int(n) for n in args.devices.split(",")] if args.devices else sorted({1, len(local)})
    report = {"what": "interpolate_batch throughput: the same pairs on 1 and on all local devices (warm, uint8 "
                      "frames on the host)",
              "device": local[0].device_kind, "local_devices": len(local), "weights": weights,
              "method": args.method, "steps": args.steps or "method default",
              "frames": args.frames or pipe.unet.config.num_frames, "size": [height, width], "pairs": args.pairs,
              "per_device": args.per_device, "python": platform.python_version(),
              "versions": {"jax": jax.__version__}, "runs": []}
    reference = None
    for count in counts:
        mesh = distributed.local_mesh(local[:count])
        batch_size = args.per_device * count

        def generate(some_pairs):
            return np.stack(list(pipe.interpolate_batch(some_pairs, batch_size=batch_size, mesh=mesh, **options)))

        started = time.perf_counter()
        generate(pairs[:batch_size])
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        videos = generate(pairs)
        seconds = time.perf_counter() - started
        result = {"devices": count, "batch_size": batch_size, "first_chunk_s": first_s, "seconds": seconds,
                  "pairs_per_s": args.pairs / seconds,
                  "peak_bytes_since_start": [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in local[:count]]}
        if reference is None:
            reference = (count, videos, result["pairs_per_s"])
        else:
            differing = videos != reference[1]
            result.update({"speedup": result["pairs_per_s"] / reference[2],
                           f"equal_to_{reference[0]}_device_run": not differing.any(),
                           "differing_values": int(differing.sum()),
                           "max_abs_diff": int(np.abs(videos.astype(int) - reference[1]).max())})
        report["runs"].append(result)
        print(json.dumps(result), flush=True)
        write(report, args.out)
    return report


def write(report: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="a pipeline folder (default: the shipped toy-world model)")
    weights.add_argument("--random-svd-xt", action="store_true", help="SVD-XT with random weights, built in memory")
    parser.add_argument("--method", default="vibid", help="inbetweening method (default vibid)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the method's)")
    parser.add_argument("--frames", type=int, help="frames per video (default: the model's)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="keyframe size (default: the pipeline's, 128×128 toy, 576×1024 SVD-XT)")
    parser.add_argument("--pairs", type=int, default=64, help="pairs timed per device count (default 64)")
    parser.add_argument("--per-device", type=int, default=8, help="pairs per device in each chunk (default 8)")
    parser.add_argument("--devices", help="device counts to time, e.g. 1,2 (default: 1 and all local devices)")
    parser.add_argument("--out", required=True, help="JSON file of the results")
    args = parser.parse_args()
    run(args)


if __name__ == "__main__":
    main()
