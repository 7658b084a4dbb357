"""One GI backward-motion fine-tune step: jinbetween (bf16 UNet, fp32 delta) beside GI's PyTorch step, one GPU.

    PYTHONPATH=. python bench/finetune_step.py --out bench/results/finetune_step.json [--tiny] [--remat none,high_res]

Target (issue): the jinbetween step ≤ 0.6× the torch step time, and its peak ≤ 40 GB. Full size is GI's training
setting: 14-frame SVD (`config.svd()`), 576×1024 (latent 72×128), batch 1, random weights (times and memory do not
depend on their values). Each side runs in its own process so that peak memory readings do not mix, and the
JSON is rewritten after each one; a side that fails (out of memory, say) is recorded with its error.

* jinbetween: the jitted `finetune.train_step` (frozen pass capturing the maps, trainable pass with the rotated
  maps, AdamW on the fp32 delta), UNet parameters bf16, `TrainConfig(remat=...)`.
* torch: GI's `train_reverse_motion_with_attnflip.py` step (algorithms.md §3.4) on diffusers'
  UNetSpatioTemporalConditionModel: a frozen fp16 `ref_unet` capturing its temporal attn1 maps (torch tensors,
  on the GPU), a trainable fp32 `unet` (GI never casts it; only the 32 temporal attn1 W_v/W_o require grad)
  injecting them under fp16 autocast, GradScaler, clip_grad_norm_ 1.0, AdamW. GI's shipped script does not pass
  `--gradient_checkpointing`, so "off" is GI's step; "on" (diffusers' `enable_gradient_checkpointing`) is timed
  too by default. `--torch-inject gi` also computes each injected layer's own Q·K probabilities and discards
  them (0·P + P_ref), as GI's processor does; the default skips that work, a faster baseline.

Each step is timed to completion (block_until_ready / cuda.synchronize): the first step (compilation included)
separately, then the median of `--repeats` warm steps. `--tiny` runs tiny configs (3 frames, 8×8 latent) on a CPU
with the same dtypes (a check of this script, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

TARGET_RATIO = 0.6
TARGET_PEAK_BYTES = 40 * 10**9


def timed_steps(step, repeats: int) -> dict:
    """Times `step()` (which must block until done): {first_step_s, warm_step_s (median), warm_steps_s}."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"first_step_s": first, "warm_step_s": statistics.median(times), "warm_steps_s": times}


def latent_shape(args) -> tuple[int, int, int]:
    """(frames, h, w) of the latents: 8× downsampling at full size, 2× for the tiny UNet on an 8×8 latent."""
    return (args.frames, 8, 8) if args.tiny else (args.frames, args.height // 8, args.width // 8)


def run_jax(args) -> dict:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import flax
    import jax
    import jax.numpy as jnp
    import optax

    from bench.i2v_e2e import random_model
    from jinbetween import config
    from jinbetween.conditioning import Conditioning
    from jinbetween.finetune import ClipBatch, TrainConfig, init_train_state, train_step
    from jinbetween.models import abstract_unet
    from jinbetween.models.state import ModelState

    cfg = config.tiny() if args.tiny else config.svd()
    dtype = jnp.bfloat16
    frames, h, w = latent_shape(args)
    keys = jax.random.split(jax.random.key(0), 6)
    unet = ModelState.of(random_model(abstract_unet(cfg), keys[0], dtype))

    def conditioning(key):
        k1, k2 = jax.random.split(key)
        return Conditioning(image_embeds=jax.random.normal(k1, (1, 1, cfg.cross_attention_dim[0])),
                            image_latent=jax.random.normal(k2, (1, h, w, cfg.out_channels)),
                            clean_latent=jnp.zeros((1, h, w, cfg.out_channels)),
                            added_time_ids=jnp.array([[6.0, 127.0, 0.02]]))

    batch = ClipBatch(latents=jax.random.normal(keys[1], (1, frames, h, w, cfg.out_channels)),
                      cond=conditioning(keys[2]), reference=conditioning(keys[3]))
    train_cfg = TrainConfig(remat=args.remat)
    state = init_train_state(unet, train_cfg)
    device = jax.devices()[0]
    weights_bytes = (device.memory_stats() or {}).get("bytes_in_use")
    metrics_log = []

    def step():
        nonlocal state
        state, metrics = train_step(unet, state, batch, jax.random.fold_in(keys[4], len(metrics_log)), train_cfg)
        jax.block_until_ready((state, metrics))
        metrics_log.append({k: float(v) for k, v in metrics.items()})

    timing = timed_steps(step, args.repeats)
    stats = device.memory_stats() or {}
    return {"impl": "jinbetween", "device": device.device_kind, "remat": args.remat,
            "dtypes": {"unet_params": jnp.dtype(dtype).name, "delta_and_optimizer": "float32"},
            "trainable_tensors": len(state.delta),
            "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
            **timing, "weights_bytes": weights_bytes, "peak_bytes": stats.get("peak_bytes_in_use"),
            "metrics": metrics_log}


def run_torch(args) -> dict:
    import copy

    import diffusers
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    from jinbetween import config
    from jinbetween.models.delta import delta_keys

    from tests.torch_reference import TorchConditioning, gi_finetune_loss

    cfg = config.tiny() if args.tiny else config.svd()
    device = "cpu" if args.tiny else "cuda"
    # GI: ref_unet and the image encoder/VAE outputs in fp16, the trainable unet fp32 under fp16 autocast.
    half = torch.float16
    frames, h, w = latent_shape(args)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel(**{k: v for k, v in cfg.to_diffusers().items()
                                                   if not k.startswith("_")})
    unet = unet.to(device)  # AlphaBlender's legacy torch.Tensor([...]) ignores the device context
    ref_unet = copy.deepcopy(unet).to(half).requires_grad_(False).eval()
    unet.requires_grad_(False).train()
    weights = dict(unet.named_parameters())
    trainable = [weights[k].requires_grad_() for k in delta_keys(cfg)]
    if args.torch_checkpointing == "on":
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler(device)

    def conditioning():
        return TorchConditioning(torch.randn(1, 1, cfg.cross_attention_dim[0], device=device, dtype=half),
                                 torch.randn(1, cfg.out_channels, h, w, device=device, dtype=half),
                                 torch.tensor([[6.0, 127.0, 0.02]], device=device, dtype=half))

    z = torch.randn(1, frames, cfg.out_channels, h, w, device=device)
    cond, reference = conditioning(), conditioning()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    weights_bytes = None
    if device == "cuda":
        # Setup briefly held a second fp32 UNet (the deepcopy before its fp16 cast); the steps' peak is what counts.
        torch.cuda.reset_peak_memory_stats()
        weights_bytes = torch.cuda.memory_allocated()
    metrics_log = []

    def step():
        u = torch.rand(1, device=device) * (1 - 2e-7) + 1e-7  # GI's rand_log_normal(loc=0.7, scale=1.6)
        sigma = torch.distributions.Normal(0.7, 1.6).icdf(u).exp()
        loss = gi_finetune_loss(ref_unet, unet, z, sigma, torch.randn_like(z), cond, reference,
                                inject_scores=args.torch_inject == "gi",
                                autocast=lambda: torch.autocast(device, dtype=half))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync()
        metrics_log.append({"loss": loss.item(), "grad_norm": grad_norm.item(), "sigma": sigma.item(),
                            "grad_scale": scaler.get_scale()})

    timing = timed_steps(step, args.repeats)
    return {"impl": "torch", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "gradient_checkpointing": args.torch_checkpointing == "on", "inject": args.torch_inject,
            "dtypes": {"ref_unet": "float16", "unet_params": "float32", "autocast": "float16", "grad_scaler": True},
            "trainable_tensors": len(trainable),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "cuda": torch.version.cuda},
            **timing, "weights_bytes": weights_bytes,
            "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved() if device == "cuda" else None,
            "metrics": metrics_log}


def side(args) -> None:
    """Runs one implementation and prints its result as the last line of stdout (or its error)."""
    try:
        result = run_jax(args) if args.impl == "jax" else run_torch(args)
    except Exception as err:  # out of memory among others: recorded, and the driver goes on
        traceback.print_exc()
        result = {"impl": args.impl, "error": f"{type(err).__name__}: {err}"[:3000]}
    print(json.dumps(result), flush=True)


def sides(args) -> list[tuple[str, list[str]]]:
    """(label, extra argv) of every process the driver starts."""
    out = []
    for impl in args.impls.split(","):
        if impl == "jax":
            for remat in args.remat.split(","):
                out.append((f"jinbetween remat={remat}", ["--remat", remat]))
        else:
            for ckpt in ("off", "on") if args.torch_checkpointing == "both" else (args.torch_checkpointing,):
                out.append((f"torch checkpointing={ckpt} inject={args.torch_inject}",
                            ["--torch-checkpointing", ckpt]))
    return out


def summary(results: list[dict]) -> dict:
    """The issue's targets: jinbetween's warm step over each torch variant's, and its peak against 40 GB."""
    ours = next((r for r in results if r.get("impl") == "jinbetween" and "warm_step_s" in r), None)
    if ours is None:
        return {}
    out = {"peak_GB": ours["peak_bytes"] / 1e9 if ours["peak_bytes"] else None,
           "fits_40GB": ours["peak_bytes"] <= TARGET_PEAK_BYTES if ours["peak_bytes"] else None, "ratios": {}}
    for r in results:
        if r.get("impl") == "torch" and "warm_step_s" in r:
            ratio = ours["warm_step_s"] / r["warm_step_s"]
            out["ratios"][r["label"]] = {"jax_over_torch": ratio, "meets_0.6": ratio <= TARGET_RATIO}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["jax", "torch"], help="run one side (used by the driver)")
    parser.add_argument("--impls", default="jax,torch", help="sides the driver runs, in order")
    parser.add_argument("--frames", type=int, default=14)
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="warm steps timed after the first")
    parser.add_argument("--remat", default="high_res,none",
                        help="jinbetween: TrainConfig.remat settings to run, comma-separated (none, high_res, all)")
    parser.add_argument("--torch-checkpointing", choices=["off", "on", "both"], default="both",
                        help="torch: diffusers gradient checkpointing (GI's script: off)")
    parser.add_argument("--torch-inject", choices=["lean", "gi"], default="lean",
                        help="torch: skip (lean) or compute and discard (gi) the injected layers' own Q·K maps")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per side before it is recorded as hung")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on a CPU: checks this script")
    parser.add_argument("--out", default="bench/results/finetune_step.json")
    args = parser.parse_args()
    if args.tiny:
        args.frames = 3
    if args.impl:
        side(args)
        return

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frames, h, w = latent_shape(args)
    report = {"what": "one GI backward-motion fine-tune step (frozen pass, trainable pass with rotated maps, "
                      "backward, optimizer), random weights",
              "unet": "tiny" if args.tiny else "svd (14 frames)", "batch": 1, "frames": frames,
              "image": None if args.tiny else [args.height, args.width], "latent": [h, w], "repeats": args.repeats,
              "targets": {"jax_over_torch_max": TARGET_RATIO, "peak_bytes_max": TARGET_PEAK_BYTES},
              "python": platform.python_version(), "platform": platform.platform(), "results": []}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if args.tiny:
        env["JAX_PLATFORMS"] = "cpu"
    for label, extra in sides(args):
        impl = "jax" if label.startswith("jinbetween") else "torch"
        cmd = [sys.executable, __file__, "--impl", impl, "--frames", str(args.frames), "--height", str(args.height),
               "--width", str(args.width), "--repeats", str(args.repeats), "--torch-inject", args.torch_inject,
               *extra] + (["--tiny"] if args.tiny else [])
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
            lines = done.stdout.strip().splitlines()
            result = json.loads(lines[-1]) if lines else {"impl": impl, "error": f"exit {done.returncode}"}
            if done.returncode or "error" in result:
                result["stderr_tail"] = done.stderr[-3000:]
        except subprocess.TimeoutExpired:
            result = {"impl": impl, "error": f"timed out after {args.timeout:g} s"}
        except json.JSONDecodeError as err:
            result = {"impl": impl, "error": f"unreadable result ({err})", "stderr_tail": done.stderr[-3000:]}
        result = {"label": label, **result, "process_s": time.perf_counter() - start}
        report["results"].append(result)
        report["device"] = report.get("device") or result.get("device")
        report["summary"] = summary(report["results"])
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k not in ("metrics", "stderr_tail")})[:800], flush=True)


if __name__ == "__main__":
    main()
