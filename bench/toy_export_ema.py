"""Writes a toy-world run's EMA (bf16) as a pipeline folder, the init of the next session's run: `python
bench/toy_export_ema.py RUN OUT` (RUN: a `toytrain unet` run folder). See bench/NOTES.md, "next session's calls"."""
import json
import sys
from pathlib import Path

import jax.numpy as jnp

from jinbetween.pipeline import Pipeline
from jinbetween.toyworld import train as t

run, out = t.Run(sys.argv[1]), Path(sys.argv[2])
cfg, record = run.config(), run.record()
init = t._load_trainables(t._init_folder(record), record["seed"])
graphdef, state = t.init_train_state(init, cfg)
state = run.restore_state(state)
ema = t.trainables_of(graphdef, t._bf16(state.ema), init)
base = Pipeline.from_pretrained(Path(record["vae"]), dtype=jnp.float32)
Pipeline(ema.unet, base.vae, ema.image_encoder, clip_mean=base.clip_mean, clip_std=base.clip_std,
         sigma_min=base.sigma_min, sigma_max=base.sigma_max, default_size=base.default_size).save_pretrained(
    out, dtype=jnp.bfloat16)
(out / "ema_export.json").write_text(json.dumps({"steps": int(state.step), "batch_size": cfg.batch_size,
                                                 "init": record["init"]}) + "\n")
print(json.dumps({"exported_steps": int(state.step)}))
