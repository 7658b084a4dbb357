"""Spatial self-attention kernels on the shapes of one guided SVD-XT UNet call (B=2, 25 frames, 576×1024), one
GPU, bf16: cuDNN's flash attention (what the UNet uses on GPUs), JAX's Pallas Triton flash attention
(`pallas.ops.gpu.attention.mha`) and JAX's Mosaic GPU (FA3-style, Hopper) attention
(`pallas.ops.gpu.attention_mgpu`), under several tilings each.

    PYTHONPATH=. python bench/spatial_attention_kernel.py --out bench/results/perf/spatial_attention_kernel_h200.json

A probe, to decide whether another kernel is worth wiring into `models/attention.py`: the level-0 spatial
attention (5 layers of [50, 9216, 5 heads, 64]) is ~27 of the call's 154 TFLOP and ran at ~435 TFLOP/s in cuDNN.
Per level: each kernel's median time, TFLOP/s, and its largest difference from a float32 reference relative to
the reference's largest magnitude. Neither Pallas kernel scales the logits, so they get q·D^-1/2 (exact in bf16 at
D=64). Mosaic's kernel is tried in bf16 and, where its bf16 is refused, in float16 (inputs cast, a separate
pass not timed here). Errors are reported per configuration. `--tiny` runs small shapes with the Triton kernel in
Pallas' interpreter on any backend (a check of this script, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (batch = B·F, sequence = h·w, heads) at levels 0, 1, 2; head dim 64.
LEVELS = [(50, 72 * 128, 5), (50, 36 * 64, 10), (50, 18 * 32, 20)]
TINY_LEVELS = [(2, 128, 2)]
HEAD_DIM = 64
# Pallas Triton: (block_q, block_k, num_warps, num_stages).
TRITON_TILINGS = [(64, 64, 4, 2), (128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3)]
TINY_TRITON_TILINGS = [(64, 64, 4, 2)]
# Mosaic GPU: (block_q, block_kv, max_concurrent_steps).
MOSAIC_TILINGS = [(64, 64, 2), (64, 128, 2), (128, 64, 2), (128, 128, 2), (64, 128, 4), (128, 128, 4)]


def candidates(tiny: bool):
    """(name, tiling, function of bf16 q, k, v) for every kernel and tiling to try."""
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import attention as triton_attention

    from jinbetween.models.attention import ATTENTION_KERNELS

    scale = HEAD_DIM ** -0.5
    found = []
    if not tiny:
        found.append(("cudnn", None, ATTENTION_KERNELS["cudnn"]))
    for bq, bk, warps, stages in TINY_TRITON_TILINGS if tiny else TRITON_TILINGS:
        blocks = triton_attention.BlockSizes(block_q=bq, block_k=bk)
        found.append(("pallas_triton", {"block_q": bq, "block_k": bk, "num_warps": warps, "num_stages": stages},
                      lambda q, k, v, _b=blocks, _w=warps, _s=stages: triton_attention.mha(
                          q, k, v, None, sm_scale=scale, block_sizes=_b, num_warps=_w, num_stages=_s,
                          interpret=tiny)))
    if not tiny:
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        for bq, bkv, steps in MOSAIC_TILINGS:
            config = attention_mgpu.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=steps)
            tiling = {"block_q": bq, "block_kv": bkv, "max_concurrent_steps": steps}
            found.append(("mosaic_bf16", tiling, lambda q, k, v, _c=config: attention_mgpu.attention(
                (q * scale).astype(q.dtype), k, v, _c)))
            found.append(("mosaic_fp16", tiling, lambda q, k, v, _c=config: attention_mgpu.attention(
                (q * scale).astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16),
                _c).astype(q.dtype)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="small shapes, the Triton kernel interpreted")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from bench.perf import median_seconds

    from jinbetween.models.attention import ATTENTION_KERNELS

    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "head_dim": HEAD_DIM,
              "tiny": args.tiny, "levels": []}
    reference = jax.jit(ATTENTION_KERNELS["xla_chunked"])
    for batch, seq, heads in TINY_LEVELS if args.tiny else LEVELS:
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (batch, seq, heads, HEAD_DIM), jnp.bfloat16) for key in keys)
        expected = reference(*(t.astype(jnp.float32) for t in (q, k, v)))
        magnitude = float(jnp.max(jnp.abs(expected)))
        flops = 4 * batch * heads * seq * seq * HEAD_DIM
        entry = {"batch": batch, "sequence": seq, "heads": heads, "flops": flops, "kernels": []}
        for name, tiling, kernel in candidates(args.tiny):
            fused = jax.jit(kernel)
            row = {"kernel": name, "tiling": tiling}
            try:
                got = fused(q, k, v).astype(jnp.float32)
                row["max_error_relative"] = float(jnp.max(jnp.abs(got - expected))) / magnitude
                row["s"] = median_seconds(fused, (q, k, v), args.repeats)
                row["tflop_per_s"] = flops / row["s"] / 1e12
            except Exception as error:  # reported, so one configuration cannot cost the others
                row["error"] = f"{type(error).__name__}: {str(error)[:400]}"
            entry["kernels"].append(row)
            print(json.dumps({"sequence": seq, **row}), flush=True)
        report["levels"].append(entry)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
