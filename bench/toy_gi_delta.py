"""GI's backward delta trained afresh on a released toy-world model, the model itself unchanged; resumable.

A session with only a few GPU minutes cannot retrain the toy UNet (training does not carry across sessions), but it
can retrain the delta, the one part of the release that only GI uses, and compare the two deltas with
`jinbetween toybench --methods gi --backward-delta OUT/gi_backward`. OUT keeps the encoded pool, the compiled
programs and the full training state (delta and optimizer), so a second call with the same OUT and a larger
--steps continues where the first stopped, as if it had not:

    export XLA_FLAGS=--xla_gpu_autotune_level=0
    PYTHONPATH=. python3 bench/toy_gi_delta.py --out /tmp/delta --videos 4000 --steps 6000 --deadline-minutes 8
    PYTHONPATH=. python3 bench/toy_gi_delta.py --out /tmp/delta --videos 4000 --steps 6000 --deadline-minutes 8
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jinbetween import compile_cache, finetune
from jinbetween.checkpoint import TrainingCheckpoints
from jinbetween.models.state import ModelState
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
    parser.add_argument("--out", required=True, help="run folder: pool/, xla_cache/, checkpoints/, gi_backward/, "
                        "log.jsonl")
    parser.add_argument("--videos", type=int, default=4000, help="train-split videos in the pool")
    parser.add_argument("--steps", type=int, default=6000, help="total steps of the run (a deadline may stop it "
                        "earlier; call again to continue)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--deadline-minutes", type=float, help="stop training this many minutes after the start")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.monotonic()
    deadline = start + args.deadline_minutes * 60 if args.deadline_minutes else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    compile_cache.enable(out / "xla_cache")
    settings = {"weights": str(Path(args.weights).resolve()), "videos": args.videos, "batch_size": args.batch_size,
                "learning_rate": args.learning_rate, "seed": args.seed}
    log_file = (out / "log.jsonl").open("a")

    def log(record: dict) -> None:
        record = {**record, "seconds": round(time.monotonic() - start, 1)}
        print(json.dumps(record), flush=True)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    pipe = Pipeline.from_pretrained(args.weights, dtype=jnp.float32)
    unet, image_encoder = in_bf16(pipe.unet), in_bf16(pipe.image_encoder)
    if (out / "pool" / "cond_aug.npy").exists():
        pool = train.load_pool(out / "pool")
        if len(pool) != args.videos:
            raise SystemExit(f"{out / 'pool'} holds {len(pool)} videos, not --videos {args.videos}: use another --out.")
    else:
        pool = train.build_pool(pipe.vae, world.split_seeds("train", args.videos), jax.random.key(args.seed),
                                train.UNetTrainConfig())
        train.save_pool(pool, out / "pool")
    log({"stage": "pool", "videos": len(pool)})

    with TrainingCheckpoints(out / "checkpoints", keep=1) as checkpoints:
        resumed = None
        if checkpoints.latest_step() is not None:
            like = finetune.init_train_state(ModelState.of(train._for_training(unet)),
                                             finetune.TrainConfig(learning_rate=args.learning_rate))
            tree, record = checkpoints.restore(checkpoints.latest_step(),
                                               jax.eval_shape(lambda: finetune._train_state_tree(like)))
            if record != settings:
                raise SystemExit(f"{out} was trained with {record}, not {settings}: use another --out.")
            resumed = finetune._train_state_from_tree(tree, like)
            log({"stage": "resumed", "step": int(resumed.step)})
        state = train.train_backward_delta(
            unet, image_encoder, pipe.vae, pool, steps=args.steps, batch_size=args.batch_size, seed=args.seed + 2,
            learning_rate=args.learning_rate, deadline=deadline, on_log=log, start=resumed)
        checkpoints.save(int(state.step), finetune._train_state_tree(state), settings)
    save_delta(out / BACKWARD_DELTA, state.delta, pipe.unet.config, trained_steps=int(state.step),
               base=f"{args.weights} (its UNet in bf16)", **{k: v for k, v in settings.items() if k != "weights"},
               noise_aug_strength=0.02)
    log({"stage": "saved", "out": str(out / BACKWARD_DELTA), "steps": int(state.step)})


if __name__ == "__main__":
    main()
