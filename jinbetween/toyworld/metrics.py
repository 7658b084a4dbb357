"""Scores for inbetweening on the toy world: per-frame PSNR and SSIM against the ground-truth render, and sprite
motion read back from a generated video by colour (where each sprite is, how often it is where it should be, whether
it went back and forth).

The benchmark: a held-out test video's first and last frames are the keyframes, a method generates all frames, and
its in-between frames are compared with the render of the same scene. Everything here is numpy in float64.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jinbetween.toyworld.world import _OUTLINE_DARKEN, Scene, Sprite, WorldConfig, render, trajectory

# Aggregates cap per-frame PSNR here, so an exactly reproduced frame (+inf dB) cannot swamp a mean. An 8-bit
# 128×128 frame off by one level in one channel of one pixel scores 95 dB: every inexact frame stays below the cap.
PSNR_CAP_DB = 100.0
# SSIM constants of Wang et al. 2004, on images in [0, 1].
SSIM_SIGMA, SSIM_RADIUS, SSIM_K1, SSIM_K2 = 1.5, 5, 0.01, 0.03
# Colour distance (RGB in [0, 1]) at which a pixel's weight for a sprite falls to exp(-1/2); also the margin by which
# the sprite must beat every rival explanation of the pixel (backdrop, other sprites) for full weight.
COLOUR_TOLERANCE = 0.08
# A sprite counts as found when its weight adds up to this fraction of its full area in pixels.
MIN_VISIBLE_FRACTION = 0.2
# A sprite is read inside a disc this much (pixels) wider than itself, around the densest sprite-sized patch of its
# colour: stray pixels elsewhere (another sprite's antialiased outline) cannot pull the centroid.
WINDOW_MARGIN_PX = 3.0
# Not found, rather than placed at one of them, when the sprite's colour weighs more than this fraction of the
# window's weight outside the window: a second ghost (a cross-fade) or a smear.
GHOST_FRACTION = 0.5
# A turn of the estimated path counts as a reversal once it has retreated this far (pixels) from its extreme.
REVERSAL_THRESHOLD_PX = 2.0
# Track accuracy scores and their radii (pixels). 3 px: several times the estimator's error on a fully visible true
# sprite, so only a misplaced sprite misses; occlusion can shift a half-hidden sprite's centroid further, so the truth
# itself misses some occluded positions. 6 px: below the smallest sprite's circumradius (0.06 frame heights, 7.7 px
# at 128 px), so a match still puts the sprite's centre inside the true sprite.
TRACK_RADII_PX = {"track_3px": 3.0, "track_6px": 6.0}
# `_draw_shadow` darkens the ground by at most this factor.
_SHADOW_DARKEN = 0.35
# Area / circumradius² of each shape (ring: outer radius r, inner 0.6 r).
_AREA = {"disc": math.pi, "ring": 0.64 * math.pi, "square": 2.0, "triangle": 0.75 * math.sqrt(3)}


def _unit_float(video: np.ndarray, name: str) -> np.ndarray:
    """Returns `video` as float64 in [0, 1]: uint8 divided by 255, floats as they are (assumed in [0, 1])."""
    video = np.asarray(video)
    if video.dtype == np.uint8:
        return video.astype(np.float64) / 255.0
    if np.issubdtype(video.dtype, np.floating):
        return video.astype(np.float64)
    raise TypeError(f"{name} has dtype {video.dtype}; give uint8 in [0, 255] or floats in [0, 1].")


def _video_pair(video: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns both videos `[F, H, W, 3]` as float64 in [0, 1], after checking that their shapes agree."""
    video, truth = _unit_float(video, "video"), _unit_float(truth, "truth")
    if video.shape != truth.shape or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video {video.shape} and truth {truth.shape}: give two RGB videos [F, H, W, 3] of one shape.")
    return video, truth


def psnr(video: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Returns the PSNR (dB) of each frame, float64 `[F]`, for videos `[F, H, W, 3]` (uint8 or floats in [0, 1]).

    Peak 1 (or 255 for uint8): 10·log10(1 / MSE) over all pixels and channels of a frame. An identical frame gives
    +inf; `score_video` caps each frame at `PSNR_CAP_DB` before averaging.
    """
    video, truth = _video_pair(video, truth)
    mse = np.mean((video - truth) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return -10.0 * np.log10(mse)


def _gaussian_taps(sigma: float, radius: int) -> np.ndarray:
    """Returns the normalised 1-D Gaussian window `[2 * radius + 1]`."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _filter_valid(images: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Returns `images [F, H, W, C]` filtered by `taps` along H then W, 'valid' only: `[F, H - K + 1, W - K + 1, C]`
    for K taps. Separable, so K multiply-adds per pixel and axis instead of K²."""
    k = len(taps)
    height, width = images.shape[1] - k + 1, images.shape[2] - k + 1
    rows = sum(w * images[:, i:i + height] for i, w in enumerate(taps))
    return sum(w * rows[:, :, i:i + width] for i, w in enumerate(taps))


def ssim(video: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Returns the SSIM of each frame, float64 `[F]`, for videos `[F, H, W, 3]` (uint8 or floats in [0, 1]), H, W >= 11.

    Wang et al. 2004: 11×11 Gaussian window of σ = 1.5, K1 = 0.01, K2 = 0.03, dynamic range L = 1, population
    (not sample) variances. Computed per RGB channel and averaged over the channels and the 'valid' pixels (those
    whose window lies inside the frame; no padding). Matches `skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)`.
    """
    x, y = _video_pair(video, truth)
    size = 2 * SSIM_RADIUS + 1
    if min(x.shape[1:3]) < size:
        raise ValueError(f"frames {x.shape[1]}×{x.shape[2]} are smaller than the {size}×{size} SSIM window.")
    taps = _gaussian_taps(SSIM_SIGMA, SSIM_RADIUS)
    mean_x, mean_y = _filter_valid(x, taps), _filter_valid(y, taps)
    var_x = _filter_valid(x * x, taps) - mean_x ** 2
    var_y = _filter_valid(y * y, taps) - mean_y ** 2
    cov = _filter_valid(x * y, taps) - mean_x * mean_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    index = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2))
    return index.mean(axis=(1, 2, 3))


def _segment_distance(pixels: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Returns each pixel's RGB distance to the segment from `start` to `end`, `[...]` for `pixels [..., 3]` and
    endpoints broadcastable to it."""
    direction = end - start
    length2 = np.maximum(np.sum(direction * direction, axis=-1, keepdims=True), 1e-12)
    t = np.clip(np.sum((pixels - start) * direction, axis=-1, keepdims=True) / length2, 0.0, 1.0)
    return np.linalg.norm(pixels - start - t * direction, axis=-1)


def _sprite_colour_distance(pixels: np.ndarray, sprite: Sprite) -> np.ndarray:
    """Returns each pixel's RGB distance `[...]` to the colours that `sprite` can take, for `pixels [..., 3]`.

    `_draw_sprite` paints `colour · brightness · (1 - _OUTLINE_DARKEN · edge)` with brightness in 1 ± shade, then the
    frame is clipped to [0, 1]: every sprite pixel lies on the curve s ↦ clip(s · colour) for s between the darkest
    outline and the brightest interior. That curve is a polyline (its corners where a channel reaches 1), so the
    distance is exact: the nearest of its segments.
    """
    colour = np.asarray(sprite.colour, np.float64)
    darkest, brightest = (1 - sprite.shade) * (1 - _OUTLINE_DARKEN), 1 + sprite.shade
    corners = [1 / c for c in colour if c > 0 and darkest < 1 / c < brightest]
    scales = sorted([darkest, brightest, *corners])
    knots = [np.clip(s * colour, 0.0, 1.0) for s in scales]
    return np.min([_segment_distance(pixels, a, b) for a, b in zip(knots, knots[1:])], axis=0)


def _box_sums(weight: np.ndarray, half: int) -> np.ndarray:
    """Returns the sum of `weight [H, W]` over the (2·half + 1)² square around each pixel, `[H, W]` (cut at the
    frame's edges), from an integral image."""
    side = 2 * half + 1
    integral = np.pad(np.pad(weight, half).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side] + integral[:-side, :-side]


def _locate(weight: np.ndarray, radius_px: float) -> tuple[float, float, float, float]:
    """Returns the weighted centroid (x, y in pixels) of `weight [H, W]` inside a disc of `radius_px` +
    WINDOW_MARGIN_PX around its densest sprite-sized patch, with the weight inside and outside that disc.

    The disc is centred twice: on the patch, then on the centroid it gives, which holds every pixel of a sprite
    whose centre was within WINDOW_MARGIN_PX - 1 of the patch's.
    """
    density = _box_sums(weight, max(int(round(radius_px)), 1))
    row, col = np.unravel_index(np.argmax(density), density.shape)
    x, y = col + 0.5, row + 0.5
    ys, xs = np.mgrid[:weight.shape[0], :weight.shape[1]] + 0.5
    for _ in range(2):
        inside = np.where((xs - x) ** 2 + (ys - y) ** 2 <= (radius_px + WINDOW_MARGIN_PX) ** 2, weight, 0.0)
        mass = inside.sum()
        if mass <= 0:
            return math.nan, math.nan, 0.0, float(weight.sum())
        x, y = float((inside * xs).sum() / mass), float((inside * ys).sum() / mass)
    return x, y, float(mass), float(weight.sum() - mass)


def sprite_centroids(video: np.ndarray, scene: Scene, cfg: WorldConfig = WorldConfig()) -> np.ndarray:
    """Returns each sprite's estimated centre in every frame, float64 `[F, N, 2]` (x, y in frame heights, like
    `trajectory().position`), NaN where a sprite is not found; `video [F, cfg.height, cfg.width, 3]` of `scene`.

    Each pixel is explained by the nearest of rival colour models: each sprite (`_sprite_colour_distance`) and the
    backdrop at that pixel, possibly under a shadow (the scene rendered without sprites, darkened by up to
    `_SHADOW_DARKEN`). Sprite j weighs a pixel by exp(-d_j² / 2τ²) · clip((d_rival - d_j) / τ, 0, 1) with
    τ = COLOUR_TOLERANCE: close to its colour and closer to it than to anything else by a margin, so a half-faded
    sprite (as likely the backdrop as the sprite) weighs little. The estimate is the weighted centroid of the pixel
    centres in a window around the densest sprite-sized patch of weight (`_locate`). A sprite is not found where
    its weight in the window adds up to less than MIN_VISIBLE_FRACTION of its area, or where more than
    GHOST_FRACTION of that weight again lies outside the window (a ghost at each of two places, as in a cross-fade).

    Occlusion biases the estimate towards the visible part; a fully hidden sprite is not found.
    """
    frames = _unit_float(video, "video")
    if frames.ndim != 4 or frames.shape[1:] != (cfg.height, cfg.width, 3):
        raise ValueError(f"video {frames.shape}: expected [F, {cfg.height}, {cfg.width}, 3] for this config.")
    backdrop = _unit_float(render(dataclasses.replace(scene, sprites=()), cfg, [0.0])[0], "backdrop")
    distances = np.stack([_sprite_colour_distance(frames, sprite) for sprite in scene.sprites], axis=1)
    background_distance = _segment_distance(frames, (1 - _SHADOW_DARKEN) * backdrop, backdrop)
    scale = float(cfg.height)
    centres = np.full((len(frames), len(scene.sprites), 2), np.nan)
    for j, sprite in enumerate(scene.sprites):
        rivals = np.min(np.concatenate([distances[:, :j], distances[:, j + 1:], background_distance[:, None]], 1), 1)
        own = distances[:, j]
        weight = np.exp(-0.5 * (own / COLOUR_TOLERANCE) ** 2) * np.clip((rivals - own) / COLOUR_TOLERANCE, 0, 1)
        radius_px = sprite.radius * scale
        area_px = _AREA[sprite.shape] * radius_px ** 2
        for f in range(len(frames)):
            x, y, inside, outside = _locate(weight[f], radius_px)
            if inside >= MIN_VISIBLE_FRACTION * area_px and outside <= GHOST_FRACTION * inside:
                centres[f, j] = x / scale, y / scale
    return centres


def _zigzag_turns(values: np.ndarray, threshold: float) -> int:
    """Returns how many times the 1-D sequence `values` turns back by at least `threshold` from its running extreme.

    A zigzag count with hysteresis: jitter smaller than `threshold` never counts, however often its sign flips,
    and a slow drift back counts once it has added up to `threshold`.
    """
    if len(values) == 0:
        return 0
    direction, low, high, turns = 0, values[0], values[0], 0
    for value in values[1:]:
        low, high = min(low, value), max(high, value)
        if direction == 0:
            if value - low >= threshold:
                direction, high = 1, value
            elif high - value >= threshold:
                direction, low = -1, value
        elif direction == 1 and high - value >= threshold:
            direction, low, turns = -1, value, turns + 1
        elif direction == -1 and value - low >= threshold:
            direction, high, turns = 1, value, turns + 1
    return turns


def track_accuracy(estimated: np.ndarray, true: np.ndarray, visible: np.ndarray, *, pixels_per_unit: float,
                   radius_px: float) -> float:
    """Returns the fraction of the visible (frame, sprite) positions where the estimated centre lies within
    `radius_px` pixels of the true one; NaN when no position is visible.

    `estimated [F, N, 2]` (NaN where a sprite was not found: a miss) and `true [F, N, 2]` in scene units, converted to
    pixels by `pixels_per_unit`; `visible [F, N]` bool, the positions that count (the denominator).
    """
    estimated, true, visible = np.asarray(estimated, np.float64), np.asarray(true, np.float64), np.asarray(visible)
    if not (estimated.shape == true.shape and estimated.shape[:-1] == visible.shape and estimated.shape[-1] == 2):
        raise ValueError(f"estimated {estimated.shape}, true {true.shape} and visible {visible.shape}: give [F, N, 2], "
                         f"[F, N, 2] and [F, N].")
    if not visible.any():
        return math.nan
    error = np.linalg.norm(estimated - true, axis=-1) * pixels_per_unit
    # NaN compares False: a sprite not found is a miss.
    return float(np.count_nonzero((error <= radius_px) & visible) / np.count_nonzero(visible))


def motion_scores(estimated: np.ndarray, true: np.ndarray, *, pixels_per_unit: float, frames=slice(None),
                  reference: np.ndarray | None = None, noise_px: float = REVERSAL_THRESHOLD_PX) -> dict[str, float]:
    """Returns how well an estimated sprite motion follows the true one: a dict of floats, distances in pixels.

    `estimated [F, N, 2]` (NaN where a sprite was not found) and `true [F, N, 2]` in scene units, converted to pixels
    by `pixels_per_unit` (the frame height). `reference [F, N, 2]` (default `true`) is the path whose turns are
    allowed; `score_video` passes the centres read from the ground-truth render, so that the estimator's own
    artefacts (an occluded sprite's centroid shifting towards its visible part) cancel. Keys:
    - `track_3px`, `track_6px` (TRACK_RADII_PX): `track_accuracy` on `frames` at 3 and 6 px, the visible
      positions being those where `reference` is found, so a sprite hidden in the truth is never charged and one
      that the estimated video lost is a miss.
    - `path_error`: mean distance between estimated and true centres over the found (frame, sprite) pairs of
      `frames`; NaN when none was found. A lost sprite is not charged here (see `missing` and the track scores).
    - `missing`: fraction of the (frame, sprite) pairs of `frames` that were not found.
    - `direction_reversals`: over all F frames (a reversal into or out of a keyframe counts too), for each sprite
      and axis, the turns of the estimated path by at least `noise_px` (`_zigzag_turns`) minus those of the
      reference on the same frames (where both are found), floored at 0; summed over axes and sprites. The true
      path's own turns (a bounce) are allowed, extra ones (forward, back, forward again) count. Turns are counted,
      not matched in time, so a missed bounce can hide a spurious turn elsewhere on the same axis.
    - `endpoint_error`: mean distance on the first and last frames (the keyframes), over the found ones.
    """
    estimated, true = np.asarray(estimated, np.float64), np.asarray(true, np.float64)
    reference = true if reference is None else np.asarray(reference, np.float64)
    if not (estimated.shape == true.shape == reference.shape and estimated.ndim == 3 and estimated.shape[-1] == 2):
        raise ValueError(f"estimated {estimated.shape}, true {true.shape} and reference {reference.shape}: give "
                         f"[F, N, 2] arrays of one shape.")
    visible = np.isfinite(reference[frames]).all(-1)
    tracks = {name: track_accuracy(estimated[frames], true[frames], visible, pixels_per_unit=pixels_per_unit,
                                   radius_px=radius) for name, radius in TRACK_RADII_PX.items()}
    estimated_px, reference_px = estimated * pixels_per_unit, reference * pixels_per_unit
    error = np.linalg.norm(estimated_px - true * pixels_per_unit, axis=-1)
    selected = error[frames]
    found = np.isfinite(selected)
    path_error = float(selected[found].mean()) if found.any() else math.nan
    ends = error[[0, -1]]
    endpoint_error = float(ends[np.isfinite(ends)].mean()) if np.isfinite(ends).any() else math.nan
    reversals = 0
    for j in range(estimated.shape[1]):
        seen = np.isfinite(estimated_px[:, j]).all(-1) & np.isfinite(reference_px[:, j]).all(-1)
        for axis in range(2):
            extra = (_zigzag_turns(estimated_px[seen, j, axis], noise_px)
                     - _zigzag_turns(reference_px[seen, j, axis], noise_px))
            reversals += max(extra, 0)
    return {**tracks, "path_error": path_error, "missing": float(1 - found.mean()),
            "direction_reversals": float(reversals), "endpoint_error": endpoint_error}


def crossfade(first: np.ndarray, last: np.ndarray, num_frames: int) -> np.ndarray:
    """Returns the linear cross-fade baseline, uint8 `[num_frames, H, W, 3]`, from uint8 keyframes `[H, W, 3]`:
    frame k is (1 - k / (F - 1)) · first + k / (F - 1) · last, rounded, so its ends are the keyframes exactly."""
    first, last = _unit_float(first, "first"), _unit_float(last, "last")
    if first.shape != last.shape or num_frames < 2:
        raise ValueError(f"keyframes {first.shape} and {last.shape}, {num_frames} frames: give two frames of one "
                         f"shape and at least 2 frames.")
    mix = np.linspace(0.0, 1.0, num_frames)[:, None, None, None]
    blend = (1 - mix) * first + mix * last
    return (np.clip(blend, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def score_video(video: np.ndarray, scene: Scene, cfg: WorldConfig = WorldConfig(),
                frames=slice(1, -1)) -> dict[str, float]:
    """Returns a generated video's scores against the ground truth of `scene`, a dict of floats.

    `video [cfg.num_frames, cfg.height, cfg.width, 3]`, uint8 or floats in [0, 1], generated for the default frame
    times. `psnr` (dB, each frame capped at PSNR_CAP_DB) and `ssim` are means over `frames` (default: the
    in-betweens, without the keyframes); `keyframe_psnr` is the capped PSNR of the first and last frames, averaged:
    how faithfully the method kept the keyframes it was given. `track_3px`, `track_6px`, `path_error`, `missing`,
    `direction_reversals` and `endpoint_error` are those of `motion_scores` on the sprite centres read back by
    `sprite_centroids` (distances in pixels), against the true trajectory, with the centres read back from the
    ground-truth render as the reference (their turns allowed, the sprites they find the ones that count).
    """
    expected = (cfg.num_frames, cfg.height, cfg.width, 3)
    if np.shape(video) != expected:
        raise ValueError(f"video {np.shape(video)}: expected {expected} for this config.")
    truth = render(scene, cfg)
    positions = trajectory(scene, cfg.frame_times, cfg.substep).position
    motion = motion_scores(sprite_centroids(video, scene, cfg), positions, pixels_per_unit=float(cfg.height),
                           frames=frames, reference=sprite_centroids(truth, scene, cfg))
    video = np.asarray(video)
    picked, picked_truth, ends = video[frames], truth[frames], [0, -1]
    return {"psnr": float(np.mean(np.minimum(psnr(picked, picked_truth), PSNR_CAP_DB))),
            "ssim": float(np.mean(ssim(picked, picked_truth))),
            "keyframe_psnr": float(np.mean(np.minimum(psnr(video[ends], truth[ends]), PSNR_CAP_DB))), **motion}


def frame_differences(video: np.ndarray) -> np.ndarray:
    """Returns the mean absolute difference `[F − 1]` (0..1) of each pair of consecutive frames of `video`."""
    return np.abs(np.diff(_unit_float(video, "video"), axis=0)).mean(axis=(1, 2, 3))


def accelerations(centres: np.ndarray, pixels_per_unit: float) -> np.ndarray:
    """Returns each sprite's acceleration |c[t+1] − 2c[t] + c[t−1]| `[F, N]` in pixels per frame² from its centres
    `[F, N, 2]` (NaN at the first and last frame and wherever a sprite is not found)."""
    out = np.full(centres.shape[:2], np.nan)
    out[1:-1] = np.linalg.norm(centres[2:] - 2 * centres[1:-1] + centres[:-2], axis=-1) * pixels_per_unit
    return out


def seam_scores(video: np.ndarray, joins: np.ndarray, scene: Scene, cfg: WorldConfig = WorldConfig()) -> dict:
    """Returns how a video through keyframes moves at its joins (frames `joins`, its inner keyframes) and within its
    segments: the mean frame difference over the two frame steps touching a join and over the other steps; each
    sprite's mean acceleration (pixels per frame²) at a join frame and at the other inner frames, and the fraction of
    those sprite positions not found; and the join / within ratios (1: a join moves like any other frame)."""
    differences = frame_differences(video)
    step_at_join = np.zeros(len(differences), bool)
    step_at_join[np.concatenate([joins - 1, joins])] = True
    acceleration = accelerations(sprite_centroids(video, scene, cfg), float(cfg.height))
    frame_at_join, inner = np.zeros(len(video), bool), np.zeros(len(video), bool)
    frame_at_join[joins], inner[1:-1] = True, True
    within = inner & ~frame_at_join
    scores = {"difference_join": float(differences[step_at_join].mean()),
              "difference_within": float(differences[~step_at_join].mean()),
              "acceleration_join_px": float(np.nanmean(acceleration[frame_at_join])),
              "acceleration_within_px": float(np.nanmean(acceleration[within])),
              "lost_join": float(np.isnan(acceleration[frame_at_join]).mean()),
              "lost_within": float(np.isnan(acceleration[within]).mean())}
    return {**scores, "difference_ratio": scores["difference_join"] / scores["difference_within"],
            "acceleration_ratio": scores["acceleration_join_px"] / scores["acceleration_within_px"]}
