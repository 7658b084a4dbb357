"""XLA's compiled memory plan for the UNet and its level-0 pieces (compile only, nothing is run).

    PYTHONPATH=. python bench/unet_memory.py --dtypes float32,bfloat16 --out bench/results/unet_memory.json

For each dtype: the whole SVD-XT UNet forward (B=2, F=25, 72×128), one level-0 transformer
(TransformerSpatioTemporalModel, C=320), one level-0 resnet (SpatioTemporalResBlock) and one level-0
spatial self-attention call. Reports `memory_analysis()` temp/argument/output bytes and compile time,
so that a memory blow-up can be located without running out of memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jinbetween import AttnControl, config
from jinbetween.models import abstract_unet, unet_apply
from jinbetween.models.attention import ATTENTION_KERNELS, NO_CONTROL, resolve_attention_impl
from jinbetween.models.resnet import SpatioTemporalResBlock
from jinbetween.models.transformer import TransformerSpatioTemporalModel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
GB = 1e9


def plan(fn, *abstract_args) -> dict:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*abstract_args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return {"compile_s": round(seconds, 2), "temp_GB": memory.temp_size_in_bytes / GB,
            "argument_GB": memory.argument_size_in_bytes / GB, "output_GB": memory.output_size_in_bytes / GB}


def abstract_params(module_fn, dtype):
    graphdef, state = nnx.split(nnx.eval_shape(module_fn))
    return graphdef, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), state)


def block_plans(cfg, b: int, f: int, h: int, w: int, dtype, name: str, results: list, on_result) -> None:
    """Plans every down/mid/up block of the UNet on its own (shapes as in the full forward), into `results`."""
    unet = abstract_unet(cfg)
    sds = jax.ShapeDtypeStruct
    temb, ctx = sds((b * f, cfg.time_embed_dim), dtype), sds((b, 1, cfg.cross_attention_dim[0]), dtype)
    size, channels = (h, w), cfg.block_out_channels[0]
    skips = [(channels, size)]  # (channels, spatial size) of every skip, in push order
    level_sizes = []

    def record(piece, fn, *args):
        results.append({"piece": piece, "dtype": name, **plan(fn, *args)})
        print(results[-1], flush=True)
        on_result()

    for i, block in enumerate(unet.down_blocks):
        graphdef, params = abstract_params(lambda blk=block: blk, dtype)
        record(f"down_blocks.{i}", lambda p, x, t, c, g=graphdef: nnx.merge(g, p)(x, t, c, f, NO_CONTROL)[0],
               params, sds((b * f, *size, channels), dtype), temb, ctx)
        channels = cfg.block_out_channels[i]
        level_sizes.append(size)
        skips += [(channels, size)] * len(block.resnets)
        if block.downsamplers is not None:
            size = tuple(-(-s // 2) for s in size)
            skips.append((channels, size))
    graphdef, params = abstract_params(lambda: unet.mid_block, dtype)
    record("mid_block", lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c, f, NO_CONTROL)[0],
           params, sds((b * f, *size, channels), dtype), temb, ctx)
    n = len(cfg.block_out_channels)
    for j, block in enumerate(unet.up_blocks):
        level = n - 1 - j
        popped = skips[-len(block.resnets):]
        del skips[-len(block.resnets):]
        upsample = skips[-1][1] if skips else None
        graphdef, params = abstract_params(lambda blk=block: blk, dtype)
        record(f"up_blocks.{j}",
               lambda p, x, s, t, c, g=graphdef, up=upsample: nnx.merge(g, p)(x, list(s), t, c, f, NO_CONTROL, up)[0],
               params, sds((b * f, *level_sizes[level], channels), dtype),
               [sds((b * f, *sz, c), dtype) for c, sz in popped], temb, ctx)
        channels = cfg.block_out_channels[level]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--latent", default="72x128")
    parser.add_argument("--pieces", default="unet,transformer,resnet,attention",
                        help="any of unet, blocks (every down/mid/up block alone), transformer, resnet, attention")
    parser.add_argument("--precision", default="default", choices=["default", "high", "highest"],
                        help="jax_default_matmul_precision for float32 dots and convs")
    parser.add_argument("--capture", action="store_true", help="the UNet also returns all temporal attention maps")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", args.precision)
    b, f = args.batch, args.frames
    h, w = (int(s) for s in args.latent.split("x"))
    cfg = config.svd_xt()
    report = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
              "jax": jax.__version__, "python": platform.python_version(), "batch": b, "frames": f,
              "latent": [h, w], "matmul_precision": args.precision, "results": []}
    sds = jax.ShapeDtypeStruct

    def save():  # after every piece, so that a run stopped by a time limit keeps what it measured
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        pieces = args.pieces.split(",")
        if "unet" in pieces:
            graphdef, params = abstract_params(lambda: abstract_unet(cfg), dtype)
            inputs = (sds((b, f, h, w, 8), jnp.float32), sds((b,), jnp.float32), sds((b, 1, 1024), jnp.float32),
                      sds((b, 3), jnp.float32))
            attn = AttnControl.capture() if args.capture else None
            report["results"].append({"piece": "unet" + ("+capture" if args.capture else ""), "dtype": name, **plan(
                lambda p, *a: unet_apply(graphdef, p, *a, attn=attn), params, *inputs)})
            print(report["results"][-1], flush=True)
            save()
        if "blocks" in pieces:
            block_plans(cfg, b, f, h, w, dtype, name, report["results"], on_result=save)
        if "transformer" in pieces:
            graphdef, params = abstract_params(lambda: TransformerSpatioTemporalModel(
                320, heads=5, context_dim=1024, num_layers=1, impl="auto", shortcut=True, name="t",
                rngs=nnx.Rngs(0)), dtype)
            report["results"].append({"piece": "transformer_level0", "dtype": name, **plan(
                lambda p, x, c: nnx.merge(graphdef, p)(x, c, f)[0], params, sds((b * f, h, w, 320), dtype),
                sds((b, 1, 1024), dtype))})
            print(report["results"][-1], flush=True)
            save()
        if "resnet" in pieces:
            graphdef, params = abstract_params(lambda: SpatioTemporalResBlock(
                320, 320, temb_dim=1280, eps=1e-6, rngs=nnx.Rngs(0)), dtype)
            report["results"].append({"piece": "resnet_level0", "dtype": name, **plan(
                lambda p, x, t: nnx.merge(graphdef, p)(x, t, f), params, sds((b * f, h, w, 320), dtype),
                sds((b * f, 1280), dtype))})
            print(report["results"][-1], flush=True)
            save()
        if "attention" in pieces:
            impl = resolve_attention_impl("auto", dtype, 64)
            q = sds((b * f, h * w, 5, 64), dtype)
            report["results"].append({"piece": f"spatial_attention_level0[{impl}]", "dtype": name, **plan(
                ATTENTION_KERNELS[impl], q, q, q)})
            print(report["results"][-1], flush=True)
            save()
        save()


if __name__ == "__main__":
    main()
