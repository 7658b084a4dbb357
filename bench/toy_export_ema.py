"""Writes a stage-2 run's EMA in float32 (UNet and image encoder) as one .npz, keyed by the parameter paths, for
`python -m jinbetween.toyworld.carry pack --ema`.

    python bench/toy_export_ema.py --run /tmp/toyrun --out /tmp/ema.npz
"""
import argparse
from pathlib import Path

import numpy as np

from jinbetween.toyworld import carry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    ema, _, _, step = carry.run_ema(args.run)
    np.savez(args.out, step=np.asarray(step), **ema)
    print({"step": step, "leaves": len(ema), "bytes": args.out.stat().st_size})


if __name__ == "__main__":
    main()
