"""GI's backward delta trained afresh on a released toy-world model, the model itself unchanged.

A session with only a few GPU minutes cannot retrain the toy UNet (training does not carry across sessions), but it
can retrain the delta, the one part of the release that only GI uses, and compare the two deltas with
`jinbetween toybench --methods gi --backward-delta OUT/gi_backward`:

    PYTHONPATH=. python3 bench/toy_gi_delta.py --out /tmp/delta --videos 4000 --batch-size 32 --deadline-minutes 4
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jinbetween.pipeline import Pipeline
from jinbetween.toyworld import train, world
from jinbetween.weights.delta import BACKWARD_DELTA, save_delta

SHIPPED = Path(__file__).resolve().parents[1] / "jinbetween" / "toyworld" / "weights"


def in_bf16(module: nnx.Module) -> nnx.Module:
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, train._bf16(state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(SHIPPED), help="the released toy-world pipeline (default: shipped)")
    parser.add_argument("--out", required=True, help="folder for gi_backward/ and log.jsonl")
    parser.add_argument("--videos", type=int, default=4000, help="train-split videos in the pool")
    parser.add_argument("--steps", type=int, default=100_000, help="most steps (the deadline usually stops first)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--deadline-minutes", type=float, help="stop training this many minutes after the start")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.monotonic()
    deadline = start + args.deadline_minutes * 60 if args.deadline_minutes else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "log.jsonl").open("a")

    def log(record: dict) -> None:
        record = {**record, "seconds": round(time.monotonic() - start, 1)}
        print(json.dumps(record), flush=True)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    pipe = Pipeline.from_pretrained(args.weights, dtype=jnp.float32)
    pool = train.build_pool(pipe.vae, world.split_seeds("train", args.videos), jax.random.key(args.seed),
                            train.UNetTrainConfig())
    jax.block_until_ready(pool)
    log({"stage": "pool", "videos": len(pool)})
    delta, steps = train.train_backward_delta(
        in_bf16(pipe.unet), in_bf16(pipe.image_encoder), pipe.vae, pool, steps=args.steps,
        batch_size=args.batch_size, seed=args.seed + 2, learning_rate=args.learning_rate, deadline=deadline, on_log=log)
    save_delta(out / BACKWARD_DELTA, delta, pipe.unet.config, trained_steps=steps,
               base=f"{args.weights} (its UNet in bf16)", batch_size=args.batch_size,
               learning_rate=args.learning_rate, noise_aug_strength=0.02, videos=args.videos)
    log({"stage": "saved", "out": str(out / BACKWARD_DELTA), "steps": steps})


if __name__ == "__main__":
    main()
