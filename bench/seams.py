"""Seam quality of videos through many keyframes, on the toy world: the jump at the joins against the jumps within
segments, for each way of joining segments (`jinbetween.sequence.SEAMS`) and for the true render.

Each scene is one long true render, (K − 1)·(F − 1) + 1 frames; its keyframes are every (F − 1)-th frame. The
segments are sampled once (one batch, `Pipeline.interpolate_batch`) and joined each way, then scored by
`toyworld.metrics.seam_scores`: frame-to-frame difference and sprite-track acceleration at the joins over their
means within segments, and the sprites lost at the joins.

    python bench/seams.py --scenes 3 --keyframes 4 --steps 10 --out bench/results/seams_toy_cpu.json
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import jax
import numpy as np

from jinbetween import atomic, sequence
from jinbetween.pipeline import Pipeline
from jinbetween.toyworld import metrics, world


def measure(pipe: Pipeline, seeds: list[int], keyframes: int, method: str, steps: int, key: jax.Array,
            on_update: Callable[[dict], None] = lambda record: None) -> dict:
    """Returns per-scene seam scores of the truth and of each seam, and their means over the scenes; `on_update`
    gets the record of the scenes done so far after each scene."""
    segment_frames = pipe.unet.config.num_frames
    cfg = world.WorldConfig(num_frames=(keyframes - 1) * (segment_frames - 1) + 1)
    counts = [segment_frames - 1] * (keyframes - 1)
    joins = sequence.join_positions(counts)
    indices = [sequence.retime_indices(count, segment_frames) for count in counts]
    scenes = []
    for n, seed in enumerate(seeds):
        truth = world.video(seed, cfg)
        scene = world.sample_scene(seed, cfg)
        keys = truth[::segment_frames - 1]
        began = time.perf_counter()
        latents = np.stack(list(pipe.interpolate_batch(
            list(zip(keys[:-1], keys[1:])), method=method, key=jax.random.fold_in(key, n), batch_size=len(keys) - 1,
            num_inference_steps=steps, fps=cfg.fps, output="latent")))
        record = {"seed": seed, "seconds": time.perf_counter() - began,
                  "truth": metrics.seam_scores(truth, joins, scene, cfg)}
        for seam in sequence.SEAMS:
            joined = np.round(pipe.decode(sequence.seam_latents(latents, seam)) * 255).astype(np.uint8)
            record[seam] = metrics.seam_scores(sequence.join(list(joined), indices), joins, scene, cfg)
        scenes.append(record)
        print(seed, {name: {k: round(record[name][k], 3) for k in ("difference_ratio", "acceleration_ratio")}
                     for name in ("truth", *sequence.SEAMS)}, flush=True)
        on_update(_record(scenes, method, steps, keyframes, segment_frames, cfg))
    return _record(scenes, method, steps, keyframes, segment_frames, cfg)


def _record(scenes: list[dict], method: str, steps: int, keyframes: int, segment_frames: int,
            cfg: world.WorldConfig) -> dict:
    means = {name: {score: float(np.mean([s[name][score] for s in scenes])) for score in scenes[0][name]}
             for name in ("truth", *sequence.SEAMS)}
    return {"method": method, "steps": steps, "keyframes": keyframes, "segment_frames": segment_frames,
            "frames": cfg.num_frames, "size": [cfg.height, cfg.width], "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "scenes": scenes, "mean": means}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=3, help="test-split scenes (default 3)")
    parser.add_argument("--keyframes", type=int, default=4, help="keyframes per scene (default 4)")
    parser.add_argument("--method", default="gi", help="inbetweening method (default gi)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the record as JSON here (after every scene)")
    args = parser.parse_args()
    def save(record: dict) -> None:
        if args.out:
            atomic.write_json(args.out, record)

    record = measure(Pipeline.from_pretrained(), world.split_seeds("test", args.scenes), args.keyframes, args.method,
                     args.steps, jax.random.key(args.seed), on_update=save)
    for name, means in record["mean"].items():
        print(f"{name:>9}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    if args.out:
        atomic.write_json(args.out, record)


if __name__ == "__main__":
    main()
