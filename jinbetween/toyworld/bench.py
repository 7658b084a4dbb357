"""Inbetweening measured against ground truth: held-out toy-world videos, their first and last frames as keyframes,
every method's in-between frames scored against the true ones (`metrics.score_video`), beside a linear cross-fade.

`toybench` is the benchmark (N pairs, a JSON table); `demo` renders a few pairs as videos and one contact sheet.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw

from jinbetween import video as video_io
from jinbetween.conditioning import vae_pixels
from jinbetween.toyworld import metrics, world

log = logging.getLogger(__name__)

METHODS = ("gi", "trf", "mpd", "mpd-seq", "vibid")
CROSSFADE = "crossfade"
ROUND_TRIP = "vae round trip"
TRUTH = "ground truth"
SCORES = ("psnr", "ssim", "path_error", "direction_reversals", "missing")


def held_out(n: int, cfg: world.WorldConfig = world.WorldConfig()) -> tuple[list[int], np.ndarray]:
    """Returns (the first `n` test-split seeds, their videos uint8 `[n, F, H, W, 3]`)."""
    seeds = world.split_seeds("test", n)
    return seeds, np.stack([world.video(seed, cfg) for seed in seeds])


def crossfades(truth: np.ndarray) -> np.ndarray:
    """Returns the linear cross-fade baseline uint8 `[N, F, H, W, 3]` between the end frames of `truth`."""
    return np.stack([metrics.crossfade(v[0], v[-1], len(v)) for v in truth])


def round_trips(pipeline, truth: np.ndarray) -> np.ndarray:
    """Returns uint8 `[N, F, H, W, 3]`: each true video encoded (posterior mean) and decoded by the pipeline's VAE,
    the ceiling of what any method that samples in its latent space can score."""
    vae = pipeline.vae
    latents = np.stack([np.asarray(vae.config.scaling_factor * vae.encode(vae_pixels(video))) for video in truth])
    return np.round(pipeline.decode(latents) * 255).astype(np.uint8)


def generate(pipeline, truth: np.ndarray, methods: Sequence[str], *, key: jax.Array, num_steps: int | None = None,
             batch_size: int = 16) -> dict[str, np.ndarray]:
    """Returns {method: uint8 `[N, F, H, W, 3]`}: each method's video between the first and last frames of `truth`
    (`[N, F, H, W, 3]`); pair i uses `fold_in(key, i)` whatever the batch size."""
    out = {}
    for method in methods:
        start = time.perf_counter()
        parts = [pipeline.interpolate(list(truth[i:i + batch_size, 0]), list(truth[i:i + batch_size, -1]),
                                      method=method, key=key, first_index=i, num_frames=truth.shape[1],
                                      num_inference_steps=num_steps)
                 for i in range(0, len(truth), batch_size)]
        out[method] = np.concatenate(parts)
        log.info("%s: %d pairs in %.1f s", method, len(truth), time.perf_counter() - start)
    return out


def score_pairs(videos: dict[str, np.ndarray], seeds: Sequence[int],
                cfg: world.WorldConfig = world.WorldConfig()) -> dict[str, dict[str, list[float]]]:
    """Returns {method: {score: one value per pair}} of the in-between frames (all but the keyframes); NaN where a
    pair has no value (path error when no sprite was found), so that methods can be compared pair by pair."""
    per_pair = {}
    for method, batch in videos.items():
        rows = [metrics.score_video(v, world.sample_scene(seed, cfg), cfg) for v, seed in zip(batch, seeds)]
        per_pair[method] = {name: [float(r[name]) for r in rows] for name in SCORES}
    return per_pair


def mean_scores(per_pair: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Returns {method: {score: mean over the pairs that have a value}} of `score_pairs`' output."""
    return {method: {name: _nan_mean(values) for name, values in scores.items()} for method, scores in per_pair.items()}


def _nan_mean(values: list[float]) -> float:
    """The mean of the values that are not NaN; NaN (without numpy's warning) when there are none."""
    finite = np.asarray(values, float)[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def score(videos: dict[str, np.ndarray], seeds: Sequence[int],
          cfg: world.WorldConfig = world.WorldConfig()) -> dict[str, dict[str, float]]:
    """Returns {method: {score: mean over pairs}} of the in-between frames (all but the keyframes); PSNR and SSIM
    averaged over pairs, path error over the pairs where the sprites were found."""
    return mean_scores(score_pairs(videos, seeds, cfg))


def markdown_table(table: dict[str, dict[str, float]]) -> str:
    """Returns the score table as GitHub markdown, one row per method."""
    lines = ["| method | PSNR (dB) ↑ | SSIM ↑ | path error (px) ↓ | direction reversals ↓ | sprites missing ↓ |",
             "|---|---|---|---|---|---|"]
    for method, s in table.items():
        lines.append(f"| {method} | {s['psnr']:.2f} | {s['ssim']:.3f} | {s['path_error']:.2f} | "
                     f"{s['direction_reversals']:.2f} | {s['missing']:.1%} |")
    return "\n".join(lines)


def toybench(pipeline, n: int = 50, methods: Sequence[str] = METHODS, *, seed: int = 0,
             num_steps: int | None = None, batch_size: int = 16, cfg: world.WorldConfig = world.WorldConfig(),
             on_update: Callable[[dict], None] = lambda record: None) -> dict:
    """Returns the benchmark record: settings, per-method generation seconds (compilation included), the score
    table on `n` pairs, with the cross-fade baseline and the VAE round trip of the truth (a ceiling), and every
    pair's scores (`per_pair`, for paired comparisons); `on_update` gets the record so far after each method."""
    seeds, truth = held_out(n, cfg)
    record = {"pairs": n, "seed": seed, "num_steps": num_steps or "method defaults", "batch_size": batch_size,
              "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "seconds": {},
              "scores": {}, "per_pair": {}}

    def add(per_pair: dict[str, dict[str, list[float]]]) -> None:
        record["per_pair"].update(per_pair)
        record["scores"].update(mean_scores(per_pair))

    add(score_pairs({CROSSFADE: crossfades(truth), ROUND_TRIP: round_trips(pipeline, truth)}, seeds, cfg))
    for method in methods:
        start = time.perf_counter()
        videos = generate(pipeline, truth, (method,), key=jax.random.key(seed), num_steps=num_steps,
                          batch_size=batch_size)
        record["seconds"][method] = round(time.perf_counter() - start, 2)
        add(score_pairs(videos, seeds, cfg))
        on_update(record)
    return record


def contact_sheet(rows: dict[str, np.ndarray], every: int = 1, label_width: int = 96) -> Image.Image:
    """Returns one image with a labelled row per video (`{label: uint8 [F, H, W, 3]}`), every `every`-th frame."""
    strips = [np.concatenate(list(v[::every]), axis=1) for v in rows.values()]
    height, width = strips[0].shape[0], strips[0].shape[1] + label_width
    sheet = Image.new("RGB", (width, height * len(strips)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, strip) in enumerate(zip(rows, strips)):
        sheet.paste(Image.fromarray(strip), (label_width, i * height))
        draw.text((6, i * height + height // 2 - 6), label, fill="black")
    return sheet


def demo(pipeline, out_dir: str | os.PathLike, *, pairs: int = 1, methods: Sequence[str] = METHODS,
         num_steps: int | None = None, seed: int = 0, fps: float = 7) -> dict:
    """Writes, for `pairs` held-out keyframe pairs: each method's video (`PAIR_METHOD.gif`), a contact sheet per pair
    (ground truth, cross-fade, then one row per method) and `metrics.md` / `metrics.json`; returns the scores."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds, truth = held_out(pairs)
    videos = {CROSSFADE: crossfades(truth), **generate(pipeline, truth, methods, key=jax.random.key(seed),
                                                        num_steps=num_steps)}
    for i, scene_seed in enumerate(seeds):
        rows = {TRUTH: truth[i], **{name: batch[i] for name, batch in videos.items()}}
        for name, frames in rows.items():
            video_io.write_video(frames, out_dir / f"{scene_seed}_{name.replace(' ', '_')}.gif", fps=fps)
        contact_sheet(rows).save(out_dir / f"{scene_seed}_sheet.png")
    table = score(videos, seeds)
    (out_dir / "metrics.json").write_text(json.dumps({"pairs": seeds, "scores": table}, indent=2) + "\n")
    (out_dir / "metrics.md").write_text(f"In-between frames of {pairs} held-out pair(s), seeds {seeds}.\n\n"
                                        f"{markdown_table(table)}\n")
    return table
