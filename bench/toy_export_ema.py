"""Writes a stage-2 run's EMA in float32 (UNet and image encoder) as one .npz, keyed by the parameter paths.

    python bench/toy_export_ema.py --run /tmp/toyrun --out /tmp/ema.npz
"""
import argparse
from pathlib import Path

import jax
import numpy as np

from jinbetween.toyworld import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    run = train.Run(args.run)
    cfg, record = run.config(), run.record()
    _, state = train.init_train_state(train._load_trainables(train._init_folder(record), record["seed"]), cfg)
    state = run.restore_state(state)
    leaves = jax.tree_util.tree_flatten_with_path(state.ema)[0]
    np.savez(args.out, step=np.asarray(state.step),
             **{jax.tree_util.keystr(path): np.asarray(leaf, np.float32) for path, leaf in leaves})
    print({"step": int(state.step), "leaves": len(leaves), "bytes": args.out.stat().st_size})


if __name__ == "__main__":
    main()
