"""The fused Pallas GEGLU kernel (`jinbetween/models/geglu_kernel.py`) against XLA's two passes, on the GEGLU shapes
of one guided SVD-XT UNet call (B=2, 25 frames, 576×1024), one GPU, bf16.

    PYTHONPATH=. python bench/geglu_kernel.py --out bench/results/geglu_kernel_h200.json

Per shape: XLA's GEGLU (cuBLAS matmul, then the gate pass), its matmul alone, and the kernel under several tile
configurations (rows × columns × depth, warps, pipeline stages). Median of `--repeats` calls after two warm-ups;
the kernel's largest difference from XLA's output, relative to the output's largest magnitude (both in bf16).
The UNet runs 15, 15 and 15 GEGLUs at the three shapes (5 spatial and 10 temporal per level), so a per-shape
saving × 15 is the saving per call. `--tiny` runs small shapes with the kernel in Pallas' interpreter on any backend
(a check of this script, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (rows, channels): level 0, 1, 2 of SVD-XT's UNet on 2 × 25 frames of 72×128 latents; inner = 4 · channels.
SHAPES = [(2 * 25 * 72 * 128, 320), (2 * 25 * 36 * 64, 640), (2 * 25 * 18 * 32, 1280)]
TINY_SHAPES = [(512, 128)]
TILES = [(128, 64, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3),
         (128, 64, 32, 4, 4), (256, 64, 64, 8, 3), (128, 128, 32, 8, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="small shapes, the kernel interpreted (a script check)")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from bench.perf import median_seconds

    from jinbetween.models import geglu_kernel

    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "tiny": args.tiny, "shapes": []}
    for rows, channels in TINY_SHAPES if args.tiny else SHAPES:
        inner = 4 * channels
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (rows, channels), jnp.bfloat16)
        kernel = (0.05 * jax.random.normal(keys[1], (channels, 2 * inner))).astype(jnp.bfloat16)
        bias = (0.05 * jax.random.normal(keys[2], (2 * inner,))).astype(jnp.bfloat16)
        flops = 2 * rows * channels * 2 * inner
        reference = jax.jit(geglu_kernel.geglu_reference)
        expected = reference(x, kernel, bias)
        scale = float(jnp.max(jnp.abs(expected.astype(jnp.float32))))
        entry = {"rows": rows, "channels": channels, "inner": inner, "flops": flops,
                 "xla_s": median_seconds(reference, (x, kernel, bias), args.repeats),
                 "xla_matmul_only_s": median_seconds(jax.jit(lambda a, w: a @ w), (x, kernel), args.repeats),
                 "fused": []}
        for tile in TILES:
            (geglu_kernel.TILE_ROWS, geglu_kernel.TILE_COLS, geglu_kernel.TILE_DEPTH, geglu_kernel.NUM_WARPS,
             geglu_kernel.NUM_STAGES) = tile
            if not geglu_kernel.fits(rows, channels, inner):
                continue
            fused = jax.jit(lambda a, w, b: geglu_kernel.geglu_fused(a, w, b, args.tiny))  # traced with this tile
            try:
                seconds = median_seconds(fused, (x, kernel, bias), args.repeats)
                error = float(jnp.max(jnp.abs(fused(x, kernel, bias).astype(jnp.float32)
                                              - expected.astype(jnp.float32)))) / scale
                entry["fused"].append({"tile": tile, "s": seconds, "TFLOP_per_s": flops / seconds / 1e12,
                                       "max_error_relative": error})
            except Exception as error:  # a tile Triton cannot compile (shared memory, registers) is reported
                entry["fused"].append({"tile": tile, "error": str(error)[:500]})
        report["shapes"].append(entry)
        print(json.dumps(entry), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
