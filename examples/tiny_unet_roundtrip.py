"""Smoke run of the weights path on a CPU: a tiny random diffusers UNet → convert_weights.py → jinbetween.

    python examples/tiny_unet_roundtrip.py [--out weights/tiny-random]

Builds a small `UNetSpatioTemporalConditionModel` with random weights (real SVD weights need a Hugging
Face licence and a download), saves it with `save_pretrained`, converts it with `convert_weights.py`,
loads the converted dir with `jinbetween.weights.load_unet`, and compares one forward pass
(with CFG-style batch of 2 and 4 frames) against diffusers. Needs the `test` extra (torch, diffusers).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import torch
from flax import nnx

import jinbetween as jb
from jinbetween.weights import load_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="weights/tiny-random", help="where to write the converted weights")
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(0)
    cfg = jb.config.tiny()
    reference = UNetSpatioTemporalConditionModel(**{k: v for k, v in cfg.to_diffusers().items()
                                                    if not k.startswith("_")}).eval()
    with tempfile.TemporaryDirectory() as scratch:  # the diffusers layout is only the converter's input
        source = Path(scratch) / "unet"
        reference.save_pretrained(source)
        converter = Path(__file__).resolve().parent.parent / "convert_weights.py"
        subprocess.run([sys.executable, str(converter), "--local-dir", str(source), "--out", args.out], check=True)
    unet = load_unet(args.out)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 12, 8)).astype(np.float32)  # [B, F, h, w, 8], channels-last
    c_noise = np.array([1.6, 1.6], np.float32)                     # 0.25·ln σ at σ = 600
    image_embeds = rng.standard_normal((2, 1, 32)).astype(np.float32)
    added_time_ids = np.array([[6, 127, 0.02]] * 2, np.float32)
    graphdef, params = nnx.split(unet)  # one compiled program: called eagerly, every layer's ops compile one by one
    forward = jax.jit(lambda p, *a: jb.models.unet_apply(graphdef, p, *a, attn=jb.AttnControl.capture()))
    v, maps = forward(params, x, c_noise, image_embeds, added_time_ids)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).permute(0, 1, 4, 2, 3), torch.from_numpy(c_noise),
                             torch.from_numpy(image_embeds), torch.from_numpy(added_time_ids)).sample
    expected = expected.permute(0, 1, 3, 4, 2).numpy()
    error = float(np.abs(np.asarray(v) - expected).max() / np.abs(expected).max())
    print(f"converted a random diffusers UNet -> {args.out}")
    print(f"UNet output {v.shape}, {len(maps)} temporal attention maps captured, e.g. "
          f"{next(iter(maps))}: {next(iter(maps.values())).shape}")
    print(f"max|jinbetween - diffusers| / max|diffusers| = {error:.2e} (fp32)")
    if error > 1e-5:
        sys.exit("parity check failed")


if __name__ == "__main__":
    main()
