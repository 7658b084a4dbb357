"""Speed of the toy world's stage-2 training step on one GPU: compile time, step time, and where the time goes.

    PYTHONPATH=. python bench/toy_train_step.py --out $OUT/toy_train_step.json --trace-dir $OUT
    XLA_FLAGS=--xla_gpu_autotune_level=0 PYTHONPATH=. python bench/toy_train_step.py --out ...   # compile cheaper

The step is `toyworld.train.make_unet_step` as a run compiles it (float32 state, bf16 forward, AdamW, EMA), on a
small pool of freshly rendered and encoded training videos (the step's time does not depend on the pool's size, only
its gather does, and that is in the profile). Reports the compile time (autotuning included), the median of
`--repeats` steps after two warm-ups, clips/s, and the per-kernel summary of one profiled step (bench/perf.py's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import summarize_jax_trace  # noqa: E402

from jinbetween.weights import load_vae  # noqa: E402
from jinbetween.toyworld import train, world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", type=Path, default=Path("jinbetween/toyworld/weights"))
    parser.add_argument("--videos", type=int, default=1024, help="pool size")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trace-dir", type=Path, help="copy the profiler trace here")
    args = parser.parse_args()

    cfg = train.UNetTrainConfig(batch_size=args.batch_size)
    vae = load_vae(args.init, dtype=np.float32)
    graphdef, state = train.init_train_state(train._load_trainables(args.init, 0), cfg)
    pool = train.build_pool(vae, world.split_seeds("train", args.videos), jax.random.key(0), cfg)
    key, zero = jax.random.key(1), np.float32(0)

    start = time.perf_counter()
    step = train.make_unet_step(graphdef, cfg).lower(state, pool, key, zero, zero).compile()
    compile_s = time.perf_counter() - start
    for i in range(2):
        state, _ = step(state, pool, jax.random.fold_in(key, i), zero, zero)
    jax.block_until_ready(state)
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        state, _ = step(state, pool, jax.random.fold_in(key, 10 + i), zero, zero)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    costs = step.cost_analysis()
    flops = (costs[0] if isinstance(costs, list) else costs or {}).get("flops")

    folder = tempfile.mkdtemp(prefix="toystep")
    with jax.profiler.trace(folder):
        state, _ = step(state, pool, jax.random.fold_in(key, 99), zero, zero)
        jax.block_until_ready(state)
    trace = next(Path(folder).rglob("*.trace.json.gz"))
    if args.trace_dir:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
        (args.trace_dir / "toy_train_step.trace.json.gz").write_bytes(trace.read_bytes())
    record = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "xla_flags": os.environ.get(
        "XLA_FLAGS", ""), "batch_size": args.batch_size, "compile_s": round(compile_s, 1), "step_s": step_s,
        "step_s_all": times, "clips_per_s": round(args.batch_size / step_s, 1),
        "flops_per_step": flops, "tflop_per_s": round(flops / step_s / 1e12, 1) if flops else None,
        "profile": summarize_jax_trace(trace)}
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k not in ("profile", "step_s_all")}))
    print(json.dumps(record["profile"]["by_category_s"]))


if __name__ == "__main__":
    main()
