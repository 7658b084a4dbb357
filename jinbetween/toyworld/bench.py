"""Inbetweening measured against ground truth: held-out toy-world videos, their first and last frames as keyframes,
every method's in-between frames scored against the true ones (`metrics.score_video`), beside a linear cross-fade,
and each method's pair-by-pair difference to the cross-fade with a bootstrap interval (`paired_bootstrap`).

`toybench` is the benchmark (N pairs, a JSON table); `demo` renders a few pairs as videos and one contact sheet.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw

from jinbetween import atomic
from jinbetween import video as video_io
from jinbetween.conditioning import vae_pixels
from jinbetween.samplers import METHODS as SAMPLERS
from jinbetween.toyworld import metrics, world

log = logging.getLogger(__name__)

METHODS = ("gi", "trf", "mpd", "mpd-seq", "vibid", "mr-catr")
CROSSFADE = "crossfade"
ROUND_TRIP = "vae round trip"
TRUTH = "ground truth"
SCORES = ("psnr", "ssim", "keyframe_psnr", "track_3px", "track_6px", "path_error", "direction_reversals", "missing")
# Columns of the score tables: (score, header with the better direction, format spec).
_COLUMNS = (("psnr", "PSNR (dB) ↑", ".2f"), ("ssim", "SSIM ↑", ".3f"),
            ("keyframe_psnr", "keyframe PSNR (dB) ↑", ".2f"),
            ("track_3px", "track ≤ 3 px (fraction) ↑", ".3f"), ("track_6px", "track ≤ 6 px (fraction) ↑", ".3f"),
            ("path_error", "path error (px) ↓", ".2f"), ("direction_reversals", "direction reversals ↓", ".2f"),
            ("missing", "sprites missing ↓", ".1%"))
# Scores of the table of differences to the cross-fade.
COMPARED = ("track_3px", "track_6px", "path_error", "ssim", "psnr", "keyframe_psnr", "direction_reversals")


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
             batch_size: int = 16, fps: float | None = world.WorldConfig.fps,
             options: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Returns {method: uint8 `[N, F, H, W, 3]`}: each method's video between the first and last frames of `truth`
    (`[N, F, H, W, 3]`); pair i uses `fold_in(key, i)` whatever the batch size. `options`: config fields given to
    every method (an ablation; default none).

    Every method is conditioned on `fps`, by default the toy world's frame rate: the only one the toy model saw in
    training, where a method's own default (MPD's 9) would be a time id it never saw. None: each method's own.
    """
    out = {}
    for method in methods:
        start = time.perf_counter()
        parts = [pipeline.interpolate(list(truth[i:i + batch_size, 0]), list(truth[i:i + batch_size, -1]),
                                      method=method, key=key, first_index=i, num_frames=truth.shape[1],
                                      num_inference_steps=num_steps, fps=fps, **(options or {}))
                 for i in range(0, len(truth), batch_size)]
        out[method] = np.concatenate(parts)
        log.info("%s: %d pairs in %.1f s", method, len(truth), time.perf_counter() - start)
    return out


def _score_one(video: np.ndarray, seed: int, cfg: world.WorldConfig) -> dict[str, float]:
    scores = metrics.score_video(video, world.sample_scene(seed, cfg), cfg)
    return {name: float(scores[name]) for name in SCORES}


def score_pairs(videos: dict[str, np.ndarray], seeds: Sequence[int],
                cfg: world.WorldConfig = world.WorldConfig(),
                workers: int | None = None) -> dict[str, dict[str, list[float]]]:
    """Returns {method: {score: one value per pair}} of the in-between frames (all but the keyframes); NaN where a
    pair has no value (path error when no sprite was found), so that methods can be compared pair by pair.

    The videos are scored in `workers` processes (default: one per core, up to 16, when there are 32 videos or
    more; 1 scores here). Scoring is numpy alone, so the values do not depend on the number of workers.
    """
    counts = {method: min(len(batch), len(seeds)) for method, batch in videos.items()}
    jobs = [(video, seed) for batch in videos.values() for video, seed in zip(batch, seeds)]
    if workers is None:
        workers = min(os.cpu_count() or 1, 16) if len(jobs) >= 32 else 1
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_score_one, *zip(*jobs), itertools.repeat(cfg), chunksize=4))
    else:
        rows = [_score_one(video, seed, cfg) for video, seed in jobs]
    per_pair, rows = {}, iter(rows)
    for method in videos:
        scored = [next(rows) for _ in range(counts[method])]
        per_pair[method] = {name: [r[name] for r in scored] for name in SCORES}
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


def paired_bootstrap(per_pair: dict[str, dict[str, list[float]]], baseline: str = CROSSFADE, *,
                     resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> dict[str, dict[str, dict]]:
    """Returns {method: {score: {"mean", "low", "high", "pairs"}}} for every method of `per_pair` (`score_pairs`'
    output) but `baseline`, and every score both have: the mean of the per-pair differences (method − baseline) and
    the bounds of its `level` bootstrap interval, over the `pairs` pairs where both values are finite.

    Percentile bootstrap: resample those pairs with replacement (`resamples` draws of `pairs` pairs), take each
    draw's mean difference, and bound the interval by the (1 − level)/2 and (1 + level)/2 quantiles of these means.
    Each (method, score) draws from its own `default_rng(seed)`, so a comparison does not depend on which others are
    made, and comparisons over the same number of pairs resample the same pairs. With fewer than 2 pairs the bounds
    are NaN (one pair has no spread to resample), with none the mean too.
    """
    reference = per_pair[baseline]
    versus = {}
    for method, scores in per_pair.items():
        if method == baseline:
            continue
        if any(len(scores[name]) != len(reference[name]) for name in scores if name in reference):
            raise ValueError(f"{method} and {baseline} have different numbers of pairs: give one value per pair, the "
                             f"same pairs for every method.")
        versus[method] = {name: _bootstrap_mean(np.subtract(scores[name], reference[name], dtype=np.float64),
                                                resamples, level, np.random.default_rng(seed))
                          for name in scores if name in reference}
    return versus


def _bootstrap_mean(differences: np.ndarray, resamples: int, level: float, rng: np.random.Generator) -> dict:
    """Returns {"mean", "low", "high", "pairs"} of the finite values of `differences [N]` (see `paired_bootstrap`)."""
    kept = differences[np.isfinite(differences)]
    mean = float(kept.mean()) if kept.size else math.nan
    if kept.size < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "pairs": int(kept.size)}
    means = kept[rng.integers(0, kept.size, size=(resamples, kept.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": mean, "low": float(low), "high": float(high), "pairs": int(kept.size)}


def markdown_table(table: dict[str, dict[str, float]]) -> str:
    """Returns the score table as GitHub markdown, one row per method."""
    lines = ["| method | " + " | ".join(header for _, header, _ in _COLUMNS) + " |",
             "|---" * (len(_COLUMNS) + 1) + "|"]
    for method, s in table.items():
        lines.append(f"| {method} | " + " | ".join(f"{s[name]:{spec}}" for name, _, spec in _COLUMNS) + " |")
    return "\n".join(lines)


def difference_table(versus: dict[str, dict[str, dict]], scores: Sequence[str] = COMPARED,
                     baseline: str = CROSSFADE, level: float = 0.95) -> str:
    """Returns `paired_bootstrap`'s output as GitHub markdown: per method (row) and score (column), the mean
    difference to `baseline` and its interval, "n/a" where there is none; "(n=K)" marks a score compared on fewer
    pairs than the row's most."""
    columns = [next(column for column in _COLUMNS if column[0] == name) for name in scores]
    lines = [f"| method − {baseline} [{level:.0%} interval] | pairs | "
             + " | ".join(header for _, header, _ in columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for method, compared in versus.items():
        pairs = max(compared[name]["pairs"] for name, _, _ in columns)
        cells = [_difference_cell(compared[name], spec, pairs) for name, _, spec in columns]
        lines.append(f"| {method} | {pairs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _difference_cell(d: dict, spec: str, pairs: int) -> str:
    """Returns one difference as "+0.153 [+0.101, +0.204]", in the signed format `spec`."""
    if d["pairs"] == 0:
        return "n/a"
    interval = "n/a" if math.isnan(d["low"]) else f"{d['low']:+{spec}}, {d['high']:+{spec}}"
    fewer = f" (n={d['pairs']})" if d["pairs"] < pairs else ""
    return f"{d['mean']:+{spec}} [{interval}]{fewer}"


def _conditioning_fps(methods: Sequence[str], cfg: world.WorldConfig, method_fps: bool) -> dict[str, float]:
    """Returns {method: the fps its UNet is conditioned on}: its own default with `method_fps`, else the world's."""
    return {method: float(SAMPLERS[method].fps if method_fps else cfg.fps) for method in methods}


def toybench(pipeline, n: int = 50, methods: Sequence[str] = METHODS, *, seed: int = 0,
             num_steps: int | None = None, batch_size: int = 16, cfg: world.WorldConfig = world.WorldConfig(),
             method_fps: bool = False, options: Mapping[str, Any] | None = None,
             on_update: Callable[[dict], None] = lambda record: None) -> dict:
    """Returns the benchmark record: settings (with the fps each method was conditioned on: the world's, or with
    `method_fps` each method's own), per-method generation seconds (compilation included), the score table on `n`
    pairs, with the cross-fade baseline and the VAE round trip of the truth (a ceiling), every pair's scores
    (`per_pair`), and every other row's difference to the cross-fade with its 95% interval (`versus_crossfade`,
    `paired_bootstrap`, the round trip included); `options` are config fields given to every method (recorded);
    `on_update` gets the record so far after each method."""
    seeds, truth = held_out(n, cfg)
    record = {"pairs": n, "seed": seed, "num_steps": num_steps or "method defaults", "batch_size": batch_size,
              "fps": _conditioning_fps(methods, cfg, method_fps), "options": dict(options or {}),
              "backend": jax.default_backend(),
              "device": str(jax.devices()[0].device_kind), "seconds": {}, "scores": {}, "per_pair": {},
              "versus_crossfade": {}}

    def add(per_pair: dict[str, dict[str, list[float]]]) -> None:
        record["per_pair"].update(per_pair)
        record["scores"].update(mean_scores(per_pair))
        record["versus_crossfade"] = paired_bootstrap(record["per_pair"])

    add(score_pairs({CROSSFADE: crossfades(truth), ROUND_TRIP: round_trips(pipeline, truth)}, seeds, cfg))
    for method in methods:
        start = time.perf_counter()
        videos = generate(pipeline, truth, (method,), key=jax.random.key(seed), num_steps=num_steps,
                          batch_size=batch_size, fps=record["fps"][method], options=options)
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
         num_steps: int | None = None, seed: int = 0, cfg: world.WorldConfig = world.WorldConfig(),
         method_fps: bool = False, options: Mapping[str, Any] | None = None) -> dict:
    """Writes, for `pairs` held-out keyframe pairs: each method's video (`PAIR_METHOD.gif`, at the world's frame
    rate), a contact sheet per pair (ground truth, cross-fade, then one row per method) and `metrics.md` /
    `metrics.json`; returns the record of `metrics.json`: {"pairs": seeds, "fps": as in `toybench`, "options",
    "scores", "versus_crossfade"}. With one pair the differences have no interval."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds, truth = held_out(pairs, cfg)
    fps = _conditioning_fps(methods, cfg, method_fps)
    videos = {CROSSFADE: crossfades(truth)}
    for method in methods:
        videos.update(generate(pipeline, truth, (method,), key=jax.random.key(seed), num_steps=num_steps,
                               fps=fps[method], options=options))
    for i, scene_seed in enumerate(seeds):
        rows = {TRUTH: truth[i], **{name: batch[i] for name, batch in videos.items()}}
        for name, frames in rows.items():
            video_io.write_video(frames, out_dir / f"{scene_seed}_{name.replace(' ', '_')}.gif", fps=cfg.fps)
        with atomic.replacing(out_dir / f"{scene_seed}_sheet.png") as temporary:
            contact_sheet(rows).save(temporary, format="PNG")
    per_pair = score_pairs(videos, seeds, cfg)
    record = {"pairs": seeds, "fps": fps, "options": dict(options or {}), "scores": mean_scores(per_pair),
              "versus_crossfade": paired_bootstrap(per_pair)}
    atomic.write_json(out_dir / "metrics.json", record)
    atomic.write_text(out_dir / "metrics.md", (
        f"In-between frames of {pairs} held-out pair(s), seeds {seeds}, conditioned on fps {fps}"
        f"{f', with {dict(options)}' if options else ''}.\n\n"
        f"{markdown_table(record['scores'])}\n\nDifference to the cross-fade, pair by pair:\n\n"
        f"{difference_table(record['versus_crossfade'])}\n"))
    return record
