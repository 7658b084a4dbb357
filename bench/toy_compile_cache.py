"""Compiles the toy world's stage-2 training step into a persistent compilation cache, and nothing else.

A session's training run (`bench/toy_session.sh`) spends minutes of its set-up compiling the step, autotuning
included. This fills a cache with the same program (traced by `toyworld.train.start_new_run`, as a new run traces
it: from the shipped weights, on the shapes of a pool of `--videos` videos), without rendering or encoding a pool,
so that a device call too short for training still leaves the next sessions a compiled step.

    python3 bench/toy_compile_cache.py --cache /tmp/cc/xla_cache --videos 16000 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jinbetween import compile_cache, logs
from jinbetween.models.state import ModelState
from jinbetween.toyworld import train, world

SHIPPED = Path("jinbetween/toyworld/weights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="the persistent compilation cache to fill")
    parser.add_argument("--videos", type=int, default=16000, help="the pool size the step is traced for")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--init", type=Path, default=SHIPPED)
    args = parser.parse_args()
    logs.configure()
    compile_cache.enable(args.cache)
    start = time.monotonic()
    base = train.UNetTrainConfig(batch_size=args.batch_size)
    world.split_seeds("train", args.videos)  # the same check of --videos as a run's
    vae, _, _, compiling = train.start_new_run(args.init, args.init, 0, args.videos, base, [args.batch_size],
                                               on_log=lambda r: print(json.dumps(r)))
    compiled = compiling.result()
    failed = isinstance(compiled[args.batch_size], Exception)
    # The pool's encode program, for chunks of 256 videos as `train.build_pool` encodes them.
    scene = world.WorldConfig()
    chunk = jax.ShapeDtypeStruct((256, scene.num_frames, scene.height, scene.width, 3), jnp.uint8)
    train.encode_videos.lower(ModelState.of(vae), chunk, jax.random.key(0), draws=base.cond_draws,
                              aug_log_mean=base.aug_log_mean, aug_log_std=base.aug_log_std).compile()
    print(json.dumps({"compiled": not failed, "batch_size": args.batch_size, "videos": args.videos,
                      "seconds": round(time.monotonic() - start, 1),
                      "cache_files": sorted(p.name for p in args.cache.iterdir() if p.is_file())}))
    if failed:
        raise SystemExit(f"The step did not compile: {compiled[args.batch_size]}")


if __name__ == "__main__":
    main()
