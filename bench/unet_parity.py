"""UNet parity at full size: jinbetween (each dtype) against diffusers float32, on the same device.

    PYTHONPATH=. python bench/unet_parity.py --config svd_xt --batch 2 --frames 25 --latent 72x128 \
        --out bench/results/unet_parity_svd_xt.json

Builds diffusers' UNetSpatioTemporalConditionModel with random weights (tests/torch_reference.randomize_),
converts its state dict with jinbetween.weights, and compares v = UNet(x, c_noise, image_embeds,
added_time_ids) and all temporal attention maps. Torch runs in float32 with TF32 off; JAX float32 runs
with `jax_default_matmul_precision="highest"`. Metric: max|Δ| / max|reference|. Call times are single
warm calls, recorded for orientation only (bench/ speed benchmarks are separate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from jinbetween import AttnControl, config  # noqa: E402
from jinbetween.models import abstract_unet, unet_apply  # noqa: E402
from jinbetween.models.attention import resolve_attention_impl  # noqa: E402
from jinbetween.models.naming import flat_params, merge_params  # noqa: E402
from jinbetween.weights.loading import convert_tensors
from jinbetween.weights.tensors import TensorSource

from tests.torch_reference import (CaptureProcessor, diffusers_unet, state_dict_numpy,  # noqa: E402
                                   temporal_processors, torch_unet_forward)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def relative(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - ref).max() / np.abs(ref).max())


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def jit_each_block() -> None:
    """Makes every down/mid/up block's `__call__` one compiled program (the model around them runs eagerly)."""
    from jinbetween.models.unet import DownBlock, MidBlock, UpBlock

    for cls, static in ((DownBlock, (4,)), (MidBlock, (4,)), (UpBlock, (5, 7))):
        if getattr(cls, "_jitted_for_bench", False):
            continue
        compiled = nnx.jit(cls.__call__, static_argnums=static)
        cls.__call__ = lambda self, *args, _c=compiled: _c(self, *args)
        cls._jitted_for_bench = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="svd_xt", choices=["svd_xt", "svd", "tiny"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--latent", default="72x128", help="h x w of the latent")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eager", default="", help="comma-separated dtypes to run op by op instead of one jit "
                        "(bounds XLA's temporaries to one op; for float32 at highest precision on GPU)")
    parser.add_argument("--per-block", default="", help="comma-separated dtypes to run with one jit per down/mid/up "
                        "block (bounds XLA's temporaries to the largest block)")
    parser.add_argument("--precision", default="highest", choices=["default", "high", "highest"],
                        help="JAX matmul precision for float32 (default highest). On GPU, full float32 convolutions "
                             "make XLA's autotuner pick cuDNN algorithms whose scratch totals ~240 GB; "
                             "XLA_FLAGS=--xla_gpu_autotune_level=0 keeps the default algorithms (12 GB, ~2 min per "
                             "call). 'high' and 'default' are faster and ~1e-3 off")
    parser.add_argument("--switches", default="", help="jinbetween's UNet runtime switches, e.g. "
                        "feedforward_impl=pallas,temporal_attention_impl=pallas (the Pallas kernels; bf16 only)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    switches = dict(item.split("=", 1) for item in args.switches.split(",") if item)
    jax.config.update("jax_default_matmul_precision", args.precision)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"

    cfg = getattr(config, args.config)()
    h, w = (int(s) for s in args.latent.split("x"))
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, args.frames, h, w, cfg.in_channels)).astype(np.float32)
    c_noise = np.full((args.batch,), 0.25 * np.log(700.0), np.float32)  # first step of the schedule
    image_embeds = rng.standard_normal((args.batch, 1, cfg.cross_attention_dim[0])).astype(np.float32)
    added_time_ids = np.tile(np.array([[6.0, 127.0, 0.02]], np.float32), (args.batch, 1))
    inputs = (x, c_noise, image_embeds, added_time_ids)

    report = {
        "what": "UNet parity, jinbetween vs diffusers float32, random weights (tests/torch_reference.randomize_)",
        "config": args.config, "batch": args.batch, "frames": args.frames, "latent": [h, w],
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "jax_backend": jax.default_backend(), "versions": {
            "jax": jax.__version__, "flax": __import__("flax").__version__, "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__, "python": platform.python_version()},
        "metric": "max|jax - torch_fp32| / max|torch_fp32|", "results": []}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out_path.write_text(json.dumps(report, indent=2) + "\n")

    t0 = time.perf_counter()
    reference = diffusers_unet(cfg, seed=args.seed).to(device)
    report["torch_init_s"] = time.perf_counter() - t0
    torch_unet_forward(reference, *inputs)  # warm-up
    t0 = time.perf_counter()
    v_ref = torch_unet_forward(reference, *inputs).astype(np.float64)
    report["torch_fp32_call_s"] = time.perf_counter() - t0
    ref_maps: dict[str, np.ndarray] = {}
    with temporal_processors(reference, lambda name: CaptureProcessor(ref_maps, name)):
        torch_unet_forward(reference, *inputs)
    report["max_abs_reference"] = float(np.abs(v_ref).max())
    state = state_dict_numpy(reference.cpu())
    del reference
    torch.cuda.empty_cache()
    save()

    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        abstract = abstract_unet(cfg.replace(**switches))
        unet = merge_params(abstract, convert_tensors(TensorSource.from_arrays(state), flat_params(abstract),
                                                      model="UNet", dtype=dtype))
        graphdef, params = nnx.split(unet)
        if dtype_name in args.per_block.split(","):
            jit_each_block()
            forward, compile_s, temp_bytes = (lambda p, *a: nnx.merge(graphdef, p)(*a, attn=AttnControl.capture()),
                                              None, None)
        elif dtype_name in args.eager.split(","):
            forward, compile_s, temp_bytes = (lambda p, *a: nnx.merge(graphdef, p)(*a, attn=AttnControl.capture()),
                                              None, None)
        else:
            start = time.perf_counter()
            forward = jax.jit(lambda p, *a: unet_apply(graphdef, p, *a, attn=AttnControl.capture())).lower(
                params, *inputs).compile()
            compile_s = time.perf_counter() - start
            temp_bytes = forward.memory_analysis().temp_size_in_bytes
        stats = jax.devices()[0].memory_stats() or {}
        free_bytes = stats.get("bytes_limit", float("inf")) - stats.get("bytes_in_use", 0)
        if temp_bytes is not None and temp_bytes > free_bytes:
            report["results"].append({"dtype": dtype_name, "skipped": f"XLA plans {temp_bytes / 1e9:.1f} GB of "
                                      f"temporaries, {free_bytes / 1e9:.1f} GB free", "compile_s": compile_s})
            print(report["results"][-1], flush=True)
            del unet, params
            save()
            continue
        (v, maps), first_call_s = timed(forward, params, *inputs)
        (v, maps), call_s = timed(forward, params, *inputs)
        v = np.asarray(v)
        map_errors = {name: relative(np.asarray(p, np.float32), ref_maps[name]) for name, p in maps.items()}
        report["results"].append({
            "dtype": dtype_name,
            "mode": ("one jit per block" if dtype_name in args.per_block.split(",") else
                     "eager (op by op)" if compile_s is None else "jit"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "matmul_precision": args.precision, "switches": switches,
            "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE"),
            "spatial_attention_kernel": resolve_attention_impl(cfg.attention_impl, dtype, cfg.block_out_channels[0]
                                                               // cfg.num_attention_heads[0]),
            "relative_error": relative(v, v_ref),
            "max_abs_error": float(np.abs(v - v_ref).max()),
            "mean_abs_error": float(np.abs(v - v_ref).mean()),
            "attention_maps_compared": len(map_errors),
            "attention_maps_max_relative_error": max(map_errors.values()),
            "attention_maps_worst_layer": max(map_errors, key=map_errors.get),
            "compile_s": compile_s,
            "first_call_s": first_call_s,
            "warm_call_s": call_s,
            "xla_temp_bytes": temp_bytes,
            "peak_bytes_in_use": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
        })
        print(json.dumps(report["results"][-1], indent=2), flush=True)
        del unet, params, maps, v
        save()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
