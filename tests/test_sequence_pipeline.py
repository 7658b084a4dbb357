"""`Pipeline.interpolate_sequence`, `jinbetween interpolate` with several keyframes and `batch`'s keyframes lines, on
the shipped toy-world model at 64×64, 3 frames per segment and two ViBiD steps."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from jinbetween import Pipeline
from jinbetween.cli import main as cli_main
from jinbetween.errors import ArgumentError, InputShapeError
from jinbetween.video import read_video

SIZE, F = 64, 3
RUN = dict(method="vibid", num_inference_steps=2, num_frames=F)


def keyframe(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained()


@pytest.fixture(scope="module")
def four(pipe):
    """Latents of a 4-keyframe sequence, its segments joined as sampled."""
    return pipe.interpolate_sequence([keyframe(i) for i in range(4)], key=jax.random.key(1), seam="shared",
                                     output="latent", **RUN)


def test_two_keyframes_give_exactly_interpolate(pipe):
    start, end = keyframe(0), keyframe(1)
    expected = pipe.interpolate(start, end, key=jax.random.key(1), **RUN)
    got = pipe.interpolate_sequence([start, end], key=jax.random.key(1), **RUN)
    np.testing.assert_array_equal(got, expected)
    other = pipe.interpolate_sequence([start, end], key=jax.random.key(2), **RUN)
    assert not np.array_equal(other, expected), "negative control: another key gives another video"


def test_four_keyframes_give_one_video_through_all_of_them(pipe, four):
    assert four.shape[0] == 3 * (F - 1) + 1
    frames = pipe.interpolate_sequence([keyframe(i) for i in range(4)], key=jax.random.key(1), **RUN)
    assert frames.shape == (3 * (F - 1) + 1, SIZE, SIZE, 3) and frames.dtype == np.uint8


def test_a_segment_does_not_depend_on_the_keyframe_count(pipe, four):
    """Segment 0 alone (K = 2) and within a 4-keyframe sequence: the same draws (float32 batching rounding only)."""
    two = pipe.interpolate_sequence([keyframe(0), keyframe(1)], key=jax.random.key(1), output="latent", **RUN)
    np.testing.assert_allclose(four[:F], two, atol=1e-4, err_msg="segment 0 changed with more keyframes")
    other = pipe.interpolate_sequence([keyframe(0), keyframe(1)], key=jax.random.key(2), output="latent", **RUN)
    assert np.abs(other[1:F - 1] - four[1:F - 1]).max() > 0.1, "negative control: another key changes segment 0"


def test_segment_i_is_the_pair_interpolated_with_key_fold_in_i(pipe, four):
    """Segment 2 after its shared first frame (segment 1's last) is the pair (keyframes 2, 3) drawn from fold_in(key, 2)."""
    pair = pipe.interpolate(keyframe(2), keyframe(3), key=jax.random.key(1), first_index=2, output="latent", **RUN)
    np.testing.assert_allclose(four[2 * (F - 1) + 1:], pair[1:], atol=1e-4)


def test_durations_retime_each_gap(pipe, four):
    frames = pipe.interpolate_sequence([keyframe(i) for i in range(4)], key=jax.random.key(1),
                                       durations=[2 / 7, 1 / 7, 2 / 7], fps=7, seam="shared", output="latent",
                                       **RUN)
    np.testing.assert_array_equal(frames, four[[0, 1, 2, 4, 5, 6]], err_msg="gap 1 (one frame) keeps its keyframe only")


@pytest.mark.parametrize("keyframes, settings, error, fragment", [
    ([keyframe(0)], {}, ArgumentError, "at least two"),
    ([keyframe(0), keyframe(1, 128)], {}, InputShapeError, "share a size"),
    ([keyframe(0), keyframe(1)], {"num_frames": 2}, ArgumentError, "num_frames=2"),
    ([keyframe(0), keyframe(1)], {"durations": [1.0]}, ArgumentError, "durations[0]=1.0"),
    ([keyframe(0), keyframe(1)], {"seam": "glue"}, ArgumentError, "seam='glue'"),
])
def test_bad_sequences_are_refused_before_any_work(pipe, monkeypatch, keyframes, settings, error, fragment):
    def no_work(*args, **kwargs):
        raise AssertionError("sampling began before the arguments were checked")

    monkeypatch.setattr(Pipeline, "interpolate_batch", no_work)
    monkeypatch.setattr(Pipeline, "encode", no_work)
    with pytest.raises(error) as raised:
        pipe.interpolate_sequence(keyframes, **{**RUN, "num_frames": F, **settings})
    assert fragment in str(raised.value), str(raised.value)


def test_cli_interpolate_and_batch_take_several_keyframes(pipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Pipeline, "from_pretrained", lambda *args, **kwargs: pipe)  # the same weights, loaded once
    for i in range(4):
        Image.fromarray(keyframe(i)).save(tmp_path / f"k{i}.png")
    common = ["--method", "vibid", "--steps", "2", "--num-frames", str(F), "--height", str(SIZE), "--width", str(SIZE),
              "--seed", "1"]
    assert cli_main(["interpolate", *(str(tmp_path / f"k{i}.png") for i in range(4)), "--out",
                     str(tmp_path / "v.gif"), *common]) == 0
    written = read_video(tmp_path / "v.gif")
    assert written.shape == (3 * (F - 1) + 1, SIZE, SIZE, 3)
    assert (tmp_path / "v_sheet.png").exists() and "4 keyframes" in capsys.readouterr().out
    lines = [{"start": "k0.png", "end": "k1.png"},
             {"keyframes": [f"k{i}.png" for i in range(4)], "out": "s.gif", "seed": 1}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert cli_main(["batch", str(tmp_path / "p.jsonl"), "--out-dir", str(tmp_path / "out"), *common]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [v["frames"] for v in summary["videos"]] == [F, 3 * (F - 1) + 1]
    np.testing.assert_array_equal(read_video(tmp_path / "out" / "s.gif"), written,
                                  err_msg="the batch line with seed 1 is not `interpolate … --seed 1`")
