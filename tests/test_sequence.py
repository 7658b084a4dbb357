"""Videos through many keyframes, the parts without a model: joining segments, their timing, the seams, the frame
grid that shows a long video, and the `keyframes` lines of a batch file."""

import json

import numpy as np
import pytest
from PIL import Image

from jinbetween import sequence, video
from jinbetween.cli import read_pairs
from jinbetween.errors import ArgumentError, ConfigError


def numbered_segments(segments: int, frames: int) -> np.ndarray:
    """Segments `[S, F, 1]` whose frame values are their time in the joined video (boundary frames agree)."""
    return np.stack([np.arange(i * (frames - 1), (i + 1) * (frames - 1) + 1) for i in range(segments)])[..., None]


def test_joined_video_has_one_frame_per_join_and_no_repeat():
    segments, frames = 3, 5
    joined = sequence.join(list(numbered_segments(segments, frames)), [np.arange(frames)] * segments)
    assert len(joined) == segments * (frames - 1) + 1
    np.testing.assert_array_equal(joined[:, 0], np.arange(len(joined)), err_msg="a frame repeats or is missing")


def test_join_keeps_the_earlier_segments_boundary_frame():
    parts = [np.full((4, 1), 1.0), np.full((4, 1), 2.0)]
    joined = sequence.join(parts, [np.arange(4)] * 2)
    assert joined[3, 0] == 1.0 and joined[4, 0] == 2.0 and len(joined) == 7


@pytest.mark.parametrize("count", range(1, 14))
def test_retimed_gaps_keep_both_keyframes_and_strictly_increasing_frames(count):
    kept = sequence.retime_indices(count, 14)
    assert len(kept) == count + 1 and kept[0] == 0 and kept[-1] == 13
    assert (np.diff(kept) > 0).all(), f"a frame is shown twice: {kept}"


def test_a_full_gap_keeps_every_frame():
    np.testing.assert_array_equal(sequence.retime_indices(13, 14), np.arange(14))


def test_durations_become_frame_counts_and_joins_sit_at_the_keyframes():
    counts = sequence.gap_frames([1.0, 0.5, 13 / 7], fps=7, segment_frames=14, gaps=3)
    assert counts == [7, 4, 13]
    np.testing.assert_array_equal(sequence.join_positions(counts), [7, 11])
    joined = sequence.join(list(numbered_segments(3, 14)), [sequence.retime_indices(c, 14) for c in counts])
    assert len(joined) == sum(counts) + 1


@pytest.mark.parametrize("durations, fragment", [
    ([3.0], "21 frame(s)"),  # longer than a segment: the model makes no more frames
    ([0.01], "0 frame(s)"),
    ([1.0, 1.0], "2 duration(s) for 1 keyframe gap"),
    ([-1.0], "> 0"),
])
def test_durations_the_model_cannot_show_are_refused(durations, fragment):
    with pytest.raises(ArgumentError, match="durations") as error:
        sequence.gap_frames(durations, fps=7, segment_frames=14, gaps=1)
    assert fragment in str(error.value) and "pass" in str(error.value)


def test_too_few_keyframes_or_frames_are_refused():
    with pytest.raises(ArgumentError, match="at least two"):
        sequence.check_keyframe_count(1)
    with pytest.raises(ArgumentError, match="≥ 3"):
        sequence.check_segment_frames(2)
    sequence.check_keyframe_count(2)
    assert sequence.check_segment_frames(3) == 3


def test_shared_seam_leaves_the_segments_as_sampled():
    latents = np.random.default_rng(0).standard_normal((3, 5, 2, 2, 4)).astype(np.float32)
    np.testing.assert_array_equal(sequence.seam_latents(latents, "shared"), latents)


def test_smoothed_seam_averages_the_boundary_and_touches_only_the_frames_beside_it():
    latents = np.random.default_rng(0).standard_normal((3, 6, 2, 2, 4)).astype(np.float32)
    out = sequence.seam_latents(latents, "smoothed")
    for i in range(2):
        boundary = (latents[i, -1] + latents[i + 1, 0]) / 2
        np.testing.assert_allclose(out[i, -1], boundary, atol=1e-6)
        np.testing.assert_allclose(out[i + 1, 0], boundary, atol=1e-6)
        np.testing.assert_allclose(out[i, -2], (latents[i, -3] + 2 * latents[i, -2] + boundary) / 4, atol=1e-6)
    untouched = np.ones(6, bool)
    untouched[[0, 1, 4, 5]] = False
    np.testing.assert_array_equal(out[1, untouched], latents[1, untouched])
    assert not np.allclose(out[0, -1], latents[0, -1]), "negative control: the boundary frame did change"


def test_smoothed_seam_keeps_a_straight_latent_path_straight():
    """Latents moving at constant speed through the joins are left as they are: the smoothing bends no true motion."""
    segments = numbered_segments(3, 6).astype(np.float32)
    np.testing.assert_allclose(sequence.seam_latents(segments, "smoothed"), segments, atol=1e-6)


def test_unknown_seam_is_refused():
    with pytest.raises(ArgumentError, match="seam='glue'"):
        sequence.seam_latents(np.zeros((2, 3, 1)), "glue")


def test_frame_grid_wraps_a_long_wide_video_into_rows_of_thumbnails(tmp_path):
    frames = np.zeros((25, 576, 1024, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(25)[:, None, None] * 10
    grid = np.asarray(Image.open(video.frame_grid(frames, tmp_path / "g.png", columns=8, thumb_width=192)))
    thumb_h = round(576 * 192 / 1024)
    assert grid.shape[1] == 8 * (192 + 4) + 4, grid.shape
    assert grid.shape[0] == 4 * (thumb_h + 14 + 4) + 4, grid.shape  # ceil(25 / 8) rows, each with an index line
    assert grid[4 + 3 * (thumb_h + 18) + 10, 4 + 10, 0] == 240, "frame 24 is not the first thumbnail of row 4"
    row = np.asarray(Image.open(video.contact_sheet([frames[:, :64, :64]], tmp_path / "r.png")))
    assert row.shape[1] > 25 * 64, "negative control: the contact sheet is one long row"


def test_frame_grid_writes_each_frame_index_under_its_thumbnail(tmp_path):
    frames = np.full((3, 32, 32, 3), 255, np.uint8)
    grid = np.asarray(Image.open(video.frame_grid(frames, tmp_path / "g.png", columns=3)))
    labels = grid[4 + 32:4 + 32 + 14]
    assert (labels < 128).any(), "no index drawn under the thumbnails"
    assert (grid[4:4 + 32, 4:4 + 32] == 255).all(), "the index is drawn over the thumbnail"


def test_batch_lines_take_a_keyframes_list(tmp_path):
    for name in "abc":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{name}.png")
    lines = [{"start": "a.png", "end": "b.png"}, {"keyframes": ["a.png", "b.png", "c.png"], "seed": 2}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    pair, chain = read_pairs(tmp_path / "p.jsonl")
    assert pair.keyframes == (tmp_path / "a.png", tmp_path / "b.png")
    assert chain.keyframes == tuple(tmp_path / f"{n}.png" for n in "abc") and chain.seed == 2
    assert str(chain.out) == "0001_a_c.mp4" and chain.start.name == "a.png" and chain.end.name == "c.png"


@pytest.mark.parametrize("line, fragment", [
    ({"keyframes": ["a.png"]}, '"keyframes" is not a list of two or more'),
    ({"keyframes": "a.png"}, '"keyframes" is not a list'),
    ({"keyframes": ["a.png", "b.png"], "start": "a.png"}, 'both "keyframes" and "start"/"end"'),
    ({"keyframes": ["a.png", "nowhere.png"]}, "keyframe 1 keyframe nowhere.png not found"),
])
def test_bad_keyframes_lines_are_refused(tmp_path, line, fragment):
    for name in "ab":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "p.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(ConfigError) as error:
        read_pairs(tmp_path / "p.jsonl")
    assert fragment in str(error.value), str(error.value)


def test_seam_scores_see_a_jump_at_a_join():
    """A render whose second half skips 3 frames at the join jumps there; the render itself (the control) does not."""
    from jinbetween.toyworld import metrics, world

    cfg = world.WorldConfig(num_frames=30)
    seed = world.split_seeds("test", 1)[0]
    truth, scene = world.video(seed, cfg), world.sample_scene(seed, cfg)
    joins = np.array([13])
    jumped = np.concatenate([truth[:14], truth[17:30]])
    smooth = metrics.seam_scores(truth[:27], joins, scene, cfg)
    jumpy = metrics.seam_scores(jumped, joins, scene, cfg)
    assert jumpy["difference_ratio"] > 1.3 * smooth["difference_ratio"], (jumpy, smooth)
    assert jumpy["acceleration_join_px"] > smooth["acceleration_join_px"], (jumpy, smooth)
