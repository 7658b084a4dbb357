"""Training clips: exact frame counts, strided frames, natural order, a seeded resumable order, skipping, the loader.

Every test video encodes its frame index in its pixels: 8 vertical bands, band b white when bit b of the index is
set. That survives lossy codecs and tells which source frame a clip frame came from.
"""

import logging
import threading

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from jinbetween import data, video
from jinbetween.errors import DataError

H, W, BANDS = 32, 48, 8


def _frame(index: int) -> np.ndarray:
    bits = (index >> np.arange(BANDS)) & 1
    return np.repeat(np.repeat(bits * 255, W // BANDS)[None, :, None], H, 0).repeat(3, 2).astype(np.uint8)


def _index(frame: np.ndarray) -> int:
    centres = frame[:, W // BANDS // 2::W // BANDS].mean(axis=(0, 2))
    return int(sum(1 << b for b, value in enumerate(centres) if value > 127))


def _write_video(path, count, codec="ffv1", pix_fmt="yuv444p", options=None, rotation=None, rate=10):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width, stream.pix_fmt = H, W, pix_fmt
        stream.options = options or {}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(count):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(_frame(i), format="rgb24")))
        container.mux(stream.encode())
    return path


def _write_cut_video(path, count, dropped):
    """Writes an H.264 mp4 of `count` frames (a key frame every 4) without its first `dropped` packets."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.height, stream.width, stream.pix_fmt, stream.options = H, W, "yuv420p", {"g": "4", "crf": "10"}
        packets = [p for i in range(count) for p in stream.encode(av.VideoFrame.from_ndarray(_frame(i), "rgb24"))]
        container.mux((packets + stream.encode())[dropped:])
    return path


def _write_frames(folder, count, name="frame{}.png", sizes=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.fromarray(_frame(i))
        if sizes is not None:
            image = image.resize(sizes[i % len(sizes)], Image.NEAREST)
        image.save(folder / name.format(i))
    return folder


# Written once: (file name, frame count, codec, pix_fmt, options). The mp4 has a key frame every 4 frames, so clips
# are read after a seek; the avi's B-frames make AVI seeks land past the key frame asked for, which the reader must
# notice. The mov (PNG, all key frames) is counted from packets, the others by decoding.
VIDEOS = [("a.mkv", 24, "ffv1", "yuv444p", None), ("b.mp4", 30, "libx264", "yuv420p", {"g": "4", "crf": "10"}),
          ("c.gif", 12, "gif", "rgb8", None), ("d.mov", 20, "png", "rgb24", None),
          ("e.avi", 20, "mpeg4", "yuv420p", {"g": "3", "bf": "2"})]
FOLDER_FRAMES = 16


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("library")
    (root / "clips").mkdir()
    for name, count, codec, pix_fmt, options in VIDEOS:
        _write_video(root / "clips" / name, count, codec, pix_fmt, options)
    _write_frames(root / "clips" / "shot", FOLDER_FRAMES)
    return root


def _scan(root, num_frames=4, stride=3, height=H, width=W, resize="crop"):
    return data.VideoDataset.scan(root, data.ClipSpec(num_frames, stride, height, width, resize))


def _clip_indices(clip):
    return [_index(frame) for frame in clip]


def test_frame_counts_are_exact(library):
    dataset = _scan(library, num_frames=1)
    counts = {s.path.name: s.num_frames for s in dataset.sources}
    assert counts == {**{name: count for name, count, *_ in VIDEOS}, "shot": FOLDER_FRAMES}
    for source in dataset.sources:
        if not source.files:
            assert len(video.read_video(source.path)) == source.num_frames, f"{source.path.name}: decoder disagrees"
    assert dataset.skipped == ()


def test_frame_count_is_what_the_decoder_yields_not_the_packet_count(tmp_path):
    # Without its first key frame the container holds 29 frames; the decoder can show 26, from the next key frame.
    _write_cut_video(tmp_path / "cut.mp4", 30, dropped=1)
    dataset = _scan(tmp_path, num_frames=2, stride=25)
    assert dataset.sources[0].num_frames == len(video.read_video(tmp_path / "cut.mp4")) == 26
    assert _clip_indices(dataset.read_clip(0, 0)) == [4, 29]


def test_sources_are_sorted_and_stable(library):
    first, second = _scan(library), _scan(library)
    assert [s.path.name for s in first.sources] == ["a.mkv", "b.mp4", "c.gif", "d.mov", "e.avi", "shot"]
    assert first.sources == second.sources and first.fingerprint == second.fingerprint


def test_clip_holds_the_strided_frames(library):
    dataset = _scan(library, num_frames=4, stride=3)
    for i, source in enumerate(dataset.sources):
        last = source.num_frames - dataset.spec.span
        for start in sorted({0, 1, min(5, last), last}):
            clip = dataset.read_clip(i, start)
            assert clip.shape == (4, H, W, 3) and clip.dtype == np.uint8
            assert _clip_indices(clip) == [start, start + 3, start + 6, start + 9], f"{source.path.name} @ {start}"


@pytest.mark.parametrize("name", ["b.mp4", "e.avi"])
def test_seeking_gives_the_frames_of_a_decode_from_the_start(library, caplog, name):
    dataset = _scan(library, num_frames=3, stride=2)
    i = [s.path.name for s in dataset.sources].index(name)
    assert dataset.sources[i].keys[1:], f"{name} should have key frames after frame 0 to seek to"
    every = video.read_video(dataset.sources[i].path)
    with caplog.at_level(logging.DEBUG, logger="jinbetween.data"):
        for start in range(dataset.sources[i].num_frames - dataset.spec.span + 1):
            np.testing.assert_array_equal(dataset.read_clip(i, start), every[start:start + 5:2],
                                          err_msg=f"clip from frame {start}")
    if name == "b.mp4":
        assert "landed elsewhere" not in caplog.text, "MP4 seeks should land on the key frame asked for"


@pytest.mark.parametrize("resize", video.RESIZE_MODES)
def test_frames_are_fitted_to_the_clip_size(library, resize):
    dataset = _scan(library, num_frames=2, stride=1, height=64, width=40, resize=resize)
    for i in range(len(dataset)):
        assert dataset.read_clip(i, 0).shape == (2, 64, 40, 3)


def test_frame_folder_is_in_natural_order_and_sizes_may_differ(tmp_path):
    # frame2 sorts before frame10 only by value; the sizes differ from frame to frame.
    _write_frames(tmp_path / "shot", 12, sizes=[(W, H), (2 * W, 2 * H), (W + 8, H)])
    _write_video(tmp_path / "shot" / "also.mkv", 10)  # a video beside the frames is a source of its own
    dataset = _scan(tmp_path, num_frames=3, stride=4, height=H, width=W, resize="stretch")
    assert [s.path.name for s in dataset.sources] == ["shot", "also.mkv"]
    names = [f.name for f in dataset.sources[0].files]
    assert names == [f"frame{i}.png" for i in range(12)]
    assert _clip_indices(dataset.read_clip(0, 1)) == [1, 5, 9]


def test_order_is_a_function_of_the_seed(library):
    dataset, again = _scan(library), _scan(library)
    order = [dataset.clip_at(7, k) for k in range(3 * len(dataset))]
    assert order == [again.clip_at(7, k) for k in range(3 * len(dataset))]
    assert order != [dataset.clip_at(8, k) for k in range(3 * len(dataset))]
    for epoch in range(3):
        visited = sorted(s for s, _ in order[epoch * len(dataset):(epoch + 1) * len(dataset)])
        assert visited == list(range(len(dataset))), f"epoch {epoch} does not visit every source once"
    assert all(0 <= start <= dataset.sources[s].num_frames - dataset.spec.span for s, start in order)
    assert len({start for s, start in order if s == 1}) > 1, "starts should vary between epochs"


def _same_batches(expected, got):
    assert got.index == expected.index and got.sources == expected.sources
    np.testing.assert_array_equal(got.frames, expected.frames, err_msg=f"batch at clip {got.index}")


@settings(max_examples=8)
@given(consumed=st.integers(0, 4), batch_size=st.integers(1, 3), seed=st.integers(0, 3),
       prefetch=st.sampled_from([0, 2]))
def test_resuming_at_the_checkpointed_position_continues_the_same_batches(library, consumed, batch_size, seed,
                                                                          prefetch):
    dataset = _scan(library)
    with data.ClipLoader(dataset, batch_size, seed=seed, prefetch=prefetch) as loader:
        batches = [next(loader) for _ in range(consumed)]
        checkpoint = loader.position
        batches += [next(loader) for _ in range(2)]
    assert checkpoint == consumed * batch_size
    assert [b.index for b in batches] == [i * batch_size for i in range(consumed + 2)]
    with data.ClipLoader(dataset, batch_size, seed=seed, start=checkpoint, prefetch=2 - prefetch) as resumed:
        for expected in batches[consumed:]:
            _same_batches(expected, next(resumed))
    assert resumed.position == loader.position


def test_batches_are_consecutive_clips_of_the_order(library):
    dataset = _scan(library)
    with data.ClipLoader(dataset, 3, seed=5, start=4) as loader:
        batch = next(loader)
    assert batch.frames.shape == (3, 4, H, W, 3) and batch.index == 4 and loader.position == 7
    for (path, start), k in zip(batch.sources, range(4, 7)):
        source, expected_start = dataset.clip_at(5, k)
        assert (path, start) == (dataset.sources[source].path, expected_start)


def test_short_and_corrupt_sources_are_skipped_with_a_warning(tmp_path, caplog):
    _write_video(tmp_path / "long.mkv", 12)
    _write_video(tmp_path / "short.mkv", 5)
    (tmp_path / "x.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    _write_cut_video(tmp_path / "keyless.mp4", 3, dropped=1)
    with av.open(str(tmp_path / "sound.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        silence = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        silence.sample_rate = 16000
        container.mux(stream.encode(silence) + stream.encode())
    _write_frames(tmp_path / "few", 3)
    with caplog.at_level(logging.WARNING, logger="jinbetween.data"):
        dataset = _scan(tmp_path, num_frames=4, stride=3)
    assert [s.path.name for s in dataset.sources] == ["long.mkv"]
    reasons = {path.name: reason for path, reason in dataset.skipped}
    assert reasons["short.mkv"] == "too short (5 frames < 10 needed)"
    assert reasons["few"] == "too short (3 frames < 10 needed)"
    assert reasons["x.mp4"].startswith("unreadable")
    assert reasons["keyless.mp4"] == "no frames" and reasons["sound.mp4"] == "no video stream"
    for name in reasons:
        assert name in caplog.text, f"no warning names {name}"


def test_unusable_roots_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _scan(tmp_path / "missing")
    with pytest.raises(DataError, match="holds no videos"):
        _scan(tmp_path)
    (tmp_path / "notes.txt").write_text("no videos here")
    with pytest.raises(DataError, match="holds no videos"):
        _scan(tmp_path)
    with pytest.raises(DataError, match="is a file"):
        _scan(tmp_path / "notes.txt")
    _write_video(tmp_path / "short.mkv", 5)
    (tmp_path / "x.mp4").write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match=r"2 found, all skipped: short.mkv too short \(5 frames < 10 needed\), "
                                        r"x.mp4 unreadable.*fewer frames or a smaller stride"):
        _scan(tmp_path, num_frames=4, stride=3)


def test_a_clip_that_fails_to_read_is_skipped_the_same_way_on_resume(tmp_path, caplog):
    _write_frames(tmp_path / "broken", 8)
    _write_frames(tmp_path / "fine", 8)
    dataset = _scan(tmp_path, num_frames=2, stride=1)
    (tmp_path / "broken" / "frame3.png").unlink()  # the clips of "broken" from frame 2 or 3 now fail
    failing = [k for k in range(30) if dataset.clip_at(0, k) in ((0, 2), (0, 3))]
    assert failing, "the order should reach a clip holding the missing frame"
    batches, positions = [], []
    with caplog.at_level(logging.WARNING, logger="jinbetween.data"), data.ClipLoader(dataset, 2) as loader:
        for _ in range(10):
            batches.append(next(loader))
            positions.append(loader.position)
    assert f"Skipping clip {failing[0]}" in caplog.text and "frame3.png" in caplog.text
    clips = [(path.name, start) for b in batches for path, start in b.sources]
    assert not {("broken", 2), ("broken", 3)} & set(clips), "a clip with a missing frame was returned"
    assert positions[-1] == 20 + sum(k < positions[-1] for k in failing), "skipped clips should count as consumed"
    for b in range(1, len(batches)):
        with data.ClipLoader(dataset, 2, start=positions[b - 1]) as resumed:
            _same_batches(batches[b], next(resumed))


def test_a_video_changed_since_the_scan_is_an_error_not_a_wrong_clip(tmp_path):
    _write_video(tmp_path / "v.mkv", 20)
    dataset = _scan(tmp_path, num_frames=4, stride=3)
    _write_video(tmp_path / "v.mkv", 12)
    with pytest.raises(DataError, match="v.mkv ended after 12 frames, the scan counted 20"):
        dataset.read_clip(0, 10)
    _write_video(tmp_path / "v.mkv", 20, rate=5)
    with pytest.raises(DataError, match="v.mkv changed since the scan: frame 1 has timestamp 200, the scan saw 100"):
        dataset.read_clip(0, 0)


def test_a_vanished_dataset_stops_the_loader(tmp_path, caplog):
    _write_frames(tmp_path / "shot", 8)
    dataset = _scan(tmp_path, num_frames=2, stride=1)
    for frame in (tmp_path / "shot").iterdir():
        frame.unlink()
    # At ERROR level, so the 100 "Skipping clip" warnings before the error stay out of the report.
    with caplog.at_level(logging.ERROR, logger="jinbetween.data"), data.ClipLoader(dataset, 1) as loader:
        with pytest.raises(DataError, match="100 clips in a row could not be read .*still there"):
            next(loader)


def test_display_rotation_is_applied(tmp_path):
    _write_video(tmp_path / "phone.mp4", 6, "libx264", "yuv420p", {"crf": "10"}, rotation=90)
    dataset = _scan(tmp_path, num_frames=2, stride=2, height=W, width=H)
    clip = dataset.read_clip(0, 1)
    assert clip.shape == (2, W, H, 3)
    assert [_index(np.rot90(frame, -1)) for frame in clip] == [1, 3]


def test_worker_exceptions_reach_the_consumer(library, monkeypatch):
    dataset = _scan(library)

    def fail(self, source_index, start):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(data.VideoDataset, "read_clip", fail)
    loader = data.ClipLoader(dataset, 2, prefetch=2)
    with pytest.raises(RuntimeError, match="decoder exploded"):
        next(loader)
    assert not loader._thread.is_alive()
    with pytest.raises(StopIteration):
        next(loader)


def test_close_stops_the_prefetching_thread(library):
    dataset = _scan(library)
    before = threading.active_count()
    loader = data.ClipLoader(dataset, 1, prefetch=3)
    next(loader)
    loader.close()
    assert not loader._thread.is_alive() and threading.active_count() == before
    with pytest.raises(StopIteration):
        next(loader)
    with data.ClipLoader(dataset, 1, prefetch=1) as loader:
        next(loader)
    assert not loader._thread.is_alive()


def test_bad_specs_name_the_problem():
    with pytest.raises(DataError, match="Resize mode 'squash'"):
        data.ClipSpec(4, resize="squash")
    with pytest.raises(DataError, match="at least 1"):
        data.ClipSpec(4, stride=0)
    assert data.ClipSpec(14, stride=2).span == 27
