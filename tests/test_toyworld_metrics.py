"""Toy-world inbetweening metrics: PSNR and SSIM against their definitions (and skimage where installed), sprite
centres read back from ground-truth renders, and motion scores that tell a true path from a cross-fade and from
back-and-forth motion."""

import math

import numpy as np
import pytest

from jinbetween import toyworld
from jinbetween.toyworld import WorldConfig, metrics

CFG = WorldConfig()
TEST_SEEDS = toyworld.split_seeds("test", 6)


def _unoccluded(scene: toyworld.Scene, position: np.ndarray) -> np.ndarray:
    """Returns which (frame, sprite) pairs `[F, N]` overlap no other sprite: centres farther apart than the sum of the
    circumradii."""
    radius = np.array([sprite.radius for sprite in scene.sprites])
    gap = np.linalg.norm(position[:, :, None] - position[:, None], axis=-1) - (radius[:, None] + radius[None])
    others = ~np.eye(len(radius), dtype=bool)
    return ~((gap < 0) & others).any(axis=-1)


def test_psnr_matches_formula_and_is_inf_on_identical_frames():
    truth = np.full((2, 16, 16, 3), 100, np.uint8)
    video = truth.copy()
    video[1] += 10
    got = metrics.psnr(video, truth)
    expected = 20 * math.log10(255 / 10)
    assert got[0] == np.inf, f"identical frame gave {got[0]} dB, expected +inf"
    assert abs(got[1] - expected) < 1e-9, f"PSNR {got[1]} dB for a uniform 10-level error, expected {expected}"
    as_float = metrics.psnr(video.astype(np.float32) / 255, truth.astype(np.float32) / 255)
    assert abs(as_float[1] - expected) < 1e-4, f"float input gave {as_float[1]} dB, uint8 {expected}"


def test_ssim_is_one_on_identical_frames_symmetric_and_drops_with_noise():
    truth = toyworld.video(TEST_SEEDS[0], CFG)[:3]
    rng = np.random.default_rng(0)
    noisy = [np.clip(truth + rng.normal(0, sigma, truth.shape), 0, 255).astype(np.uint8) for sigma in (4, 16)]
    same = metrics.ssim(truth, truth)
    assert np.allclose(same, 1.0, atol=1e-12), f"ssim(x, x) = {same}, expected 1"
    forward, backward = metrics.ssim(noisy[0], truth), metrics.ssim(truth, noisy[0])
    assert np.allclose(forward, backward, atol=1e-12), f"ssim not symmetric: {forward} vs {backward}"
    weak, strong = forward, metrics.ssim(noisy[1], truth)
    assert np.all(weak < 1) and np.all(strong < weak - 0.05), f"SSIM with noise σ=4: {weak}, σ=16: {strong}"


def test_ssim_matches_skimage():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    truth = toyworld.video(TEST_SEEDS[1], CFG)[:2]
    video = np.clip(truth + np.random.default_rng(1).normal(0, 10, truth.shape), 0, 255).astype(np.uint8)
    ours = metrics.ssim(video, truth)
    reference = [skimage_metrics.structural_similarity(a / 255, b / 255, gaussian_weights=True, sigma=1.5,
                                                       use_sample_covariance=False, data_range=1, channel_axis=-1)
                 for a, b in zip(video, truth)]
    assert np.allclose(ours, reference, atol=1e-9), f"SSIM {ours} vs skimage {reference}"


def test_centroids_of_unoccluded_sprites_are_within_a_pixel_on_ground_truth():
    # Shade, outline and antialiasing are symmetric about the centre, so only 8-bit rounding and the odd background
    # pixel biases the estimate: 0.41 px at most over 5366 unoccluded (frame, sprite) pairs of 200 test seeds,
    # median 0.05 px. 1 px leaves room; an estimator that lost half a sprite's pixels would be off by several.
    errors = []
    for seed in TEST_SEEDS:
        scene = toyworld.sample_scene(seed, CFG)
        position = toyworld.trajectory(scene, CFG.frame_times).position
        estimate = metrics.sprite_centroids(toyworld.render(scene, CFG), scene, CFG)
        clear = _unoccluded(scene, position)
        errors.append(np.linalg.norm(estimate - position, axis=-1)[clear] * CFG.height)
    errors = np.concatenate(errors)
    assert len(errors) > 100, f"only {len(errors)} unoccluded (frame, sprite) pairs; pick other seeds"
    assert np.isfinite(errors).all(), f"{np.isnan(errors).sum()} of {len(errors)} unoccluded sprites not found"
    assert errors.max() < 1.0 and np.median(errors) < 0.2, (
        f"centroid error on ground truth: max {errors.max():.3f} px (< 1), median {np.median(errors):.3f} px (< 0.2)")


def test_ground_truth_scores_no_reversals_and_near_zero_path_error():
    for seed in TEST_SEEDS[:3]:
        scene = toyworld.sample_scene(seed, CFG)
        scores = metrics.score_video(toyworld.render(scene, CFG), scene, CFG)
        assert scores["psnr"] == metrics.PSNR_CAP_DB and scores["ssim"] == pytest.approx(1.0), f"{seed}: {scores}"
        assert scores["direction_reversals"] == 0, f"seed {seed}: ground truth has reversals: {scores}"
        assert scores["path_error"] < 1.0 and scores["missing"] < 0.1, f"seed {seed}: {scores}"


def test_crossfade_keeps_keyframes_and_scores_worse_path_error_and_missing_than_ground_truth():
    for seed in TEST_SEEDS[:3]:
        scene = toyworld.sample_scene(seed, CFG)
        truth = toyworld.render(scene, CFG)
        faded = metrics.crossfade(truth[0], truth[-1], CFG.num_frames)
        np.testing.assert_array_equal(faded[[0, -1]], truth[[0, -1]], err_msg="cross-fade ends are not the keyframes")
        ideal, baseline = metrics.score_video(truth, scene, CFG), metrics.score_video(faded, scene, CFG)
        assert baseline["missing"] > ideal["missing"] + 0.2, f"seed {seed}: cross-fade {baseline}, truth {ideal}"
        assert baseline["path_error"] > ideal["path_error"] + 2.0, f"seed {seed}: cross-fade {baseline}, truth {ideal}"
        assert baseline["psnr"] < ideal["psnr"] and baseline["ssim"] < ideal["ssim"], f"seed {seed}: {baseline}"


def test_back_and_forth_motion_counts_reversals_and_true_order_none():
    scene = toyworld.sample_scene(TEST_SEEDS[0], CFG)
    # Frames 0, 2, 4, …, 10, then back to 4 and forward again to 13: the same end frames as the true video.
    steps = np.array([0, 2, 4, 6, 8, 10, 8, 6, 4, 6, 8, 10, 12, 13])
    position = toyworld.trajectory(scene, steps / CFG.fps).position * CFG.height
    travel = np.abs(position[5] - position[8]).max()
    assert travel > 10, f"sprites move only {travel:.1f} px between the turns; pick a livelier seed"
    wobbly = metrics.score_video(toyworld.render(scene, CFG, steps / CFG.fps), scene, CFG)
    straight = metrics.score_video(toyworld.render(scene, CFG), scene, CFG)
    assert wobbly["direction_reversals"] >= 2, f"back-and-forth video: {wobbly}"
    assert straight["direction_reversals"] == 0, f"true order: {straight}"


def test_reversals_ignore_jitter_below_threshold_and_count_real_turns():
    frames = 14
    resting = np.full((frames, 1, 2), 0.5)
    jitter = resting.copy()
    # ±0.8 px about a resting sprite flips the sign of every step: noise, not motion, under the 2 px threshold.
    jitter[:, 0, 0] += np.where(np.arange(frames) % 2, 0.8, -0.8) / CFG.height
    calm = metrics.motion_scores(jitter, resting, pixels_per_unit=CFG.height)
    assert calm["direction_reversals"] == 0, f"±0.8 px jitter counted as reversals: {calm}"
    assert calm["path_error"] == pytest.approx(0.8), f"path error of ±0.8 px jitter: {calm}"
    true = np.zeros((frames, 1, 2))
    true[:, 0, 0] = np.linspace(0.1, 0.9, frames)
    there_and_back = true.copy()
    there_and_back[6:9, 0, 0] = true[6, 0, 0] - np.array([0.0, 0.06, 0.12])
    turned = metrics.motion_scores(there_and_back, true, pixels_per_unit=CFG.height)
    assert turned["direction_reversals"] == 2, f"forward, back, forward counted as {turned}"


def test_missing_frames_are_counted_and_left_out_of_path_error():
    true = np.zeros((6, 2, 2))
    estimated = true + 1.0 / CFG.height
    estimated[2:4, 1] = np.nan
    scores = metrics.motion_scores(estimated, true, pixels_per_unit=CFG.height)
    assert scores["missing"] == pytest.approx(2 / 12), f"2 of 12 pairs missing, got {scores}"
    assert scores["path_error"] == pytest.approx(math.sqrt(2)), f"path error over found pairs: {scores}"
    nothing = metrics.motion_scores(np.full_like(true, np.nan), true, pixels_per_unit=CFG.height)
    assert nothing["missing"] == 1 and math.isnan(nothing["path_error"]), f"all missing: {nothing}"
