"""The Pallas temporal-attention kernel (`jinbetween/models/temporal_attention_kernel.py`) against XLA's path, on the
temporal self-attention shapes of one guided SVD-XT UNet call (B=2, 25 frames, 576×1024), one GPU, bf16.

    PYTHONPATH=. python bench/temporal_attention_kernel.py --out bench/results/temporal_attention_kernel_h200.json

Per level and mode (`attend`: i2v, TRF, MPD; `capture`: GI's direction that hands out its maps; `apply`: the
direction that takes them): XLA's time, the kernel's under several warp counts, the bytes the kernel must move (q,
k, v and the output, plus the maps where captured or applied) and the rate that makes, and the kernel's largest
difference from XLA's output relative to the output's largest magnitude. Median of `--repeats` calls after two
warm-ups. The UNet has 5, 5 and 5 temporal self-attention layers at the three levels (and 1 at level 3,
not timed here), so a per-level saving × 5 is the saving per call. `--tiny` runs small shapes with the kernel in
Pallas' interpreter on any backend (a check of this script, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (sequences = B·h·w, heads, channels) at levels 0, 1, 2; head dim 64.
LEVELS = [(2 * 72 * 128, 5, 320), (2 * 36 * 64, 10, 640), (2 * 18 * 32, 20, 1280)]
TINY_LEVELS = [(6, 2, 128), (4, 4, 256)]
FRAMES = 25
WARPS = (1, 2, 4)
MODES = ("attend", "capture", "apply")


def functions(mode: str, heads: int, interpret: bool):
    """(XLA path, kernel) of one mode, each taking the mode's arrays."""
    from jinbetween.models import temporal_attention_kernel as core

    if mode == "attend":
        return (lambda q, k, v: core.attend_reference(q, k, v, heads),
                lambda q, k, v: core.attend(q, k, v, heads, interpret))
    if mode == "capture":
        return (lambda q, k, v: core.attend_capture_reference(q, k, v, heads),
                lambda q, k, v: core.attend_capture(q, k, v, heads, interpret))
    return core.apply_probs_reference, lambda probs, v: core.apply_probs(probs, v, interpret)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="small shapes, the kernel interpreted (a script check)")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from bench.perf import median_seconds

    from jinbetween.models import temporal_attention_kernel as core

    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "frames": FRAMES, "tiny": args.tiny,
              "levels": []}
    for n, heads, channels in TINY_LEVELS if args.tiny else LEVELS:
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (n, FRAMES, channels), jnp.bfloat16) for key in keys)
        probs = core.probs_reference(q, k, heads).astype(jnp.bfloat16)
        activation_bytes = n * FRAMES * channels * 2
        map_bytes = n * heads * FRAMES * FRAMES * 2
        for mode in MODES:
            inputs = (probs, v) if mode == "apply" else (q, k, v)
            moved = {"attend": 4 * activation_bytes, "capture": 4 * activation_bytes + map_bytes,
                     "apply": 2 * activation_bytes + map_bytes}[mode]
            reference, kernel = functions(mode, heads, args.tiny)
            reference = jax.jit(reference)
            expected = jax.tree.leaves(reference(*inputs))[0].astype(jnp.float32)
            scale = float(jnp.max(jnp.abs(expected)))
            entry = {"sequences": n, "heads": heads, "channels": channels, "mode": mode, "bytes_needed": moved,
                     "xla_s": median_seconds(reference, inputs, args.repeats), "kernel": []}
            for warps in WARPS:
                core.NUM_WARPS = warps
                fused = jax.jit(lambda *a, _k=kernel: _k(*a))  # traced anew with this warp count
                try:
                    seconds = median_seconds(fused, inputs, args.repeats)
                    got = jax.tree.leaves(fused(*inputs))[0].astype(jnp.float32)
                    entry["kernel"].append({"warps": warps, "s": seconds, "TB_per_s": moved / seconds / 1e12,
                                            "max_error_relative": float(jnp.max(jnp.abs(got - expected))) / scale})
                except Exception as error:  # reported, so one configuration cannot cost the others
                    entry["kernel"].append({"warps": warps, "error": str(error)[:500]})
            report["levels"].append(entry)
            print(json.dumps(entry), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
