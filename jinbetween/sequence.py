"""Videos through many keyframes: the segments' timing and how consecutive segments are joined.

A sequence of K keyframes is K − 1 segments, segment i from keyframe i to keyframe i + 1, each F frames. Segment i's
last frame and segment i + 1's first frame stand for the same keyframe, so the joined video keeps one of them:
(K − 1)·(F − 1) + 1 frames.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jinbetween import checks
from jinbetween.errors import ArgumentError

# How the frames at a join are made: "shared" keeps each segment as sampled (the boundary frame is the earlier
# segment's); "smoothed" averages the two boundary latents and smooths the frame on either side of a join with
# its neighbours (a [1, 2, 1] / 4 filter in latent space).
SEAMS = ("shared", "smoothed")


def check_keyframe_count(count: int, name: str = "keyframes") -> None:
    """Raises ArgumentError unless there are at least two keyframes (one segment)."""
    if count < 2:
        raise ArgumentError(f"{name}: {count} keyframe(s) given; a video through keyframes needs at least two, "
                            "pass the first and the last frame at least.")


def check_segment_frames(num_frames: int, name: str = "num_frames") -> int:
    """Returns `num_frames` checked to give a segment at least one frame between its two keyframes."""
    return checks.integer(num_frames, name, "the frames per segment, both keyframes included,", minimum=3,
                          example=14)


def gap_frames(durations: Sequence[float], fps: float, segment_frames: int, gaps: int,
               name: str = "durations") -> list[int]:
    """Returns each keyframe gap's frame count, round(duration · fps): the frames after a gap's first keyframe up to
    and including its second.

    A segment has `segment_frames` frames, so a gap can show at most `segment_frames` − 1 of them (its frames are
    dropped, not invented: see `retime_indices`); a longer duration or a count below 1 is refused.
    """
    if len(durations) != gaps:
        raise ArgumentError(f"{name}: {len(durations)} duration(s) for {gaps} keyframe gap(s); pass one duration "
                            "(seconds) per gap between consecutive keyframes.")
    counts = []
    for gap, duration in enumerate(durations):
        checks.number(duration, f"{name}[{gap}]", "a gap's duration in seconds", above=0, example=1.0)
        count = round(duration * fps)
        if not 1 <= count <= segment_frames - 1:
            raise ArgumentError(
                f"{checks.shown(f'{name}[{gap}]', duration)}: {duration:g} s at {fps:g} fps is {count} frame(s), and a segment "
                f"of {segment_frames} frames holds 1 to {segment_frames - 1} after its first keyframe; pass a "
                f"duration from {1 / fps:.3g} to {(segment_frames - 1) / fps:.3g} s, or another fps.")
        counts.append(count)
    return counts


def retime_indices(count: int, segment_frames: int) -> np.ndarray:
    """Returns the segment frames `[count + 1]` kept for a gap of `count` frames: evenly spread, strictly increasing,
    from the first keyframe (0) to the second (`segment_frames` − 1); every frame when `count` = `segment_frames` − 1.
    """
    return np.round(np.linspace(0, segment_frames - 1, count + 1)).astype(int)


def seam_latents(latents: np.ndarray, seam: str) -> np.ndarray:
    """Returns the segments' latents `[S, F, ...]` with their joins made as `seam` says (`SEAMS`), still one row per
    segment so that each is decoded on its own."""
    checks.choice(seam, "seam", SEAMS, "how segments are joined")
    if seam == "shared" or len(latents) < 2:
        return latents
    out = np.array(latents, np.float32)
    for i in range(len(latents) - 1):
        before, after = latents[i, -2], latents[i + 1, 1]
        boundary = (latents[i, -1] + latents[i + 1, 0]) / 2
        out[i, -1] = out[i + 1, 0] = boundary
        out[i, -2] = (latents[i, -3] + 2 * before + boundary) / 4
        out[i + 1, 1] = (boundary + 2 * after + latents[i + 1, 2]) / 4
    return out.astype(latents.dtype)


def join(segments: Sequence[np.ndarray], indices: Sequence[np.ndarray]) -> np.ndarray:
    """Returns the joined video: segment i's frames `indices[i]`, each segment after the first without its first
    frame (the previous segment's last)."""
    return np.concatenate([segment[kept if i == 0 else kept[1:]]
                           for i, (segment, kept) in enumerate(zip(segments, indices))])


def join_positions(counts: Sequence[int]) -> np.ndarray:
    """Returns the joined video's frame index of each inner keyframe (a join), for gaps of `counts` frames."""
    return np.cumsum(counts)[:-1]
