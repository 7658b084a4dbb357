"""VAE and CLIP parity at full size: jinbetween (each dtype) against the PyTorch float32 references, one device.

    PYTHONPATH=. python bench/vae_clip_parity.py --out bench/results/vae_clip_parity.json

Random weights (tests/torch_reference.randomize_). VAE: encode of one 576×1024 image (posterior mean)
and decode of 25 frames of 72×128 latents as one chunk; CLIP: image_embeds of two 224×224 images.
Metric max|Δ| / max|reference|; torch runs in float32 with TF32 off, JAX float32 at the precision given.
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

from jinbetween import config  # noqa: E402
from jinbetween.models.naming import flat_params, merge_params  # noqa: E402
from jinbetween.weights.loading import IMAGE_ENCODER_COMPONENT, VAE_COMPONENT, convert_tensors  # noqa: E402
from jinbetween.weights.tensors import TensorSource  # noqa: E402

from tests.torch_reference import randomize_, state_dict_numpy  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def relative(a, ref) -> float:
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


def port(component, cfg, state, dtype):
    abstract = component.abstract(cfg)
    return merge_params(abstract, convert_tensors(TensorSource.from_arrays(state), flat_params(abstract),
                                                  model=component.model, dtype=dtype, rename=component.rename))


def run_jax(fn, module, *args) -> tuple[np.ndarray, float]:
    graphdef, state = nnx.split(module)
    compiled = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))
    jax.block_until_ready(compiled(state, *args))
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(state, *args))
    return np.asarray(out), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--precision", default="highest", choices=["default", "high", "highest"])
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a CPU check of this script)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", args.precision)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    vae_cfg = config.tiny_vae() if args.tiny else config.svd_vae()
    clip_cfg = config.tiny_image_encoder() if args.tiny else config.svd_image_encoder()
    rng = np.random.default_rng(0)
    h, w, f = args.height, args.width, args.frames
    factor = vae_cfg.downsample_factor
    image = rng.uniform(-1, 1, (1, h, w, 3)).astype(np.float32)
    latents = rng.standard_normal((f, h // factor, w // factor, 4)).astype(np.float32)
    pixels = rng.standard_normal((2, clip_cfg.image_size, clip_cfg.image_size, 3)).astype(np.float32)
    to_torch = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).to(device)  # noqa: E731
    from_torch = lambda t: t.permute(0, 2, 3, 1).float().cpu().numpy()  # noqa: E731

    report = {"what": "VAE / CLIP parity vs PyTorch float32, random weights", "image": [h, w], "frames": f,
              "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "matmul_precision": args.precision, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE"), "lean_decode": vae_cfg.lean_decode,
              "versions": {
                  "jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version(),
                  "diffusers": __import__("diffusers").__version__,
                  "transformers": __import__("transformers").__version__}, "results": []}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    reference = randomize_(AutoencoderKLTemporalDecoder(**{k: v for k, v in vae_cfg.to_diffusers().items()
                                                           if not k.startswith("_")}), 0).to(device)
    with torch.no_grad():
        ref_mean = from_torch(reference.encode(to_torch(image)).latent_dist.mean).astype(np.float64)
        ref_frames = from_torch(reference.decode(to_torch(latents), num_frames=f).sample).astype(np.float64)
        if device == "cuda":
            report["torch_fp32_decode_peak_bytes"] = torch.cuda.max_memory_allocated()
    vae_state = state_dict_numpy(reference.cpu())
    del reference
    clip_reference = randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_cfg.to_transformers())),
                                0).to(device)
    with torch.no_grad():
        ref_embeds = clip_reference(pixel_values=to_torch(pixels)).image_embeds.float().cpu().numpy()
    clip_state = state_dict_numpy(clip_reference.cpu())
    del clip_reference
    if device == "cuda":
        torch.cuda.empty_cache()

    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        try:
            vae = port(VAE_COMPONENT, vae_cfg, vae_state, dtype)
            mean, encode_s = run_jax(lambda m, x: m.encode(x), vae, image)
            frames, decode_s = run_jax(lambda m, z: m.decode(z, f), vae, latents)
            del vae
            encoder = port(IMAGE_ENCODER_COMPONENT, clip_cfg, clip_state, dtype)
            embeds, clip_s = run_jax(lambda m, p: m(p), encoder, pixels)
            del encoder
        except Exception as err:  # e.g. out of memory: record it and go on with the next dtype
            report["results"].append({"dtype": name, "error": f"{type(err).__name__}: {str(err)[:1500]}"})
            print(json.dumps(report["results"][-1]), flush=True)
            out_path.write_text(json.dumps(report, indent=2) + "\n")
            continue
        report["results"].append({
            "dtype": name, "vae_encode_relative_error": relative(mean, ref_mean),
            "vae_decode_relative_error": relative(frames, ref_frames),
            "clip_relative_error": relative(embeds, ref_embeds),
            "warm_call_s": {"vae_encode": encode_s, "vae_decode": decode_s, "clip": clip_s},
            "peak_bytes_in_use": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")})
        print(json.dumps(report["results"][-1]), flush=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
