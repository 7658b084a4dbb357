"""Training clips from a folder of videos and frame folders: scanning, a resumable clip order, prefetched batches.

A source is a video file (decoded with PyAV) or a frame folder (a directory's image files in natural order). A clip
is `num_frames` frames `stride` apart, each fitted to height×width. Clip `index` of the order is a pure function of
`(seed, index)`, so a loader restarted at `start=k` yields exactly what an uninterrupted one yields from clip k on.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import os
import queue
import re
import threading
import weakref
from pathlib import Path
from typing import Sequence

try:
    import av
except ImportError:  # frame folders need no PyAV, video files do: `_require_av` says so where they are opened
    av = None
import numpy as np

from jinbetween import video
from jinbetween.errors import DataError, ImageError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# Streams of the two generators behind the order, so the permutation of epoch e and the start of clip e never share
# a seed.
_PERMUTATION_STREAM, _START_STREAM = 0, 1
# This many unreadable clips in a row means the data is gone (unmounted disk, deleted folder), not a bad file or two.
_MAX_CONSECUTIVE_FAILURES = 100


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """What one clip is: `num_frames` frames, `stride` source frames apart, fitted to `height`×`width` by `resize`
    (a `video.RESIZE_MODES` mode; `crop` covers then centre-crops)."""

    num_frames: int
    stride: int = 1
    height: int = 576
    width: int = 1024
    resize: str = "crop"

    def __post_init__(self):
        if self.num_frames < 1 or self.stride < 1:
            raise DataError(f"A clip of {self.num_frames} frames at stride {self.stride}: both must be at least 1.")
        if self.height < 1 or self.width < 1:
            raise DataError(f"Clip size {self.height}×{self.width}: both sides must be positive.")
        if self.resize not in video.RESIZE_MODES:
            raise DataError(f"Resize mode {self.resize!r}; choose one of {video.RESIZE_MODES}.")

    @property
    def span(self) -> int:
        """Returns how many consecutive source frames one clip covers: `(num_frames - 1) * stride + 1`."""
        return (self.num_frames - 1) * self.stride + 1


@dataclasses.dataclass(frozen=True)
class Source:
    """One video file or frame folder holding `num_frames` frames, counted exactly as reading yields them.

    `files`: a frame folder's images in natural order (empty for a video file). `pts`: a video's frame timestamps in
    output order, strictly increasing (None where the container does not give them; then no seeking). `keys`: the
    indices of key frames, where decoding may start after a seek.
    """

    path: Path
    num_frames: int
    files: tuple[Path, ...] = dataclasses.field(default=(), repr=False)
    pts: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)
    keys: tuple[int, ...] = dataclasses.field(default=(0,), repr=False)

    @functools.cached_property
    def _frame_at_pts(self) -> dict[int, int]:
        """Returns the frame index of each timestamp in `pts`."""
        return {pts: index for index, pts in enumerate(self.pts or ())}


@dataclasses.dataclass(frozen=True, eq=False)
class Clips:
    """A batch of clips: `frames` uint8 `[B, F, H, W, 3]`; `index`, the order position of the first clip;
    `sources`, each clip's (path, start frame)."""

    frames: np.ndarray
    index: int
    sources: tuple[tuple[Path, int], ...]


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    """Returns the order `[count]` in which epoch `epoch` of the order drawn by `seed` visits the sources."""
    return np.random.default_rng([seed, _PERMUTATION_STREAM, epoch]).permutation(count)


@dataclasses.dataclass(frozen=True)
class VideoDataset:
    """The usable sources under `root` for clips of `spec`, and the (path, reason) of each skipped one."""

    root: Path
    spec: ClipSpec
    sources: tuple[Source, ...]
    skipped: tuple[tuple[Path, str], ...] = ()

    @classmethod
    def scan(cls, root: str | os.PathLike, spec: ClipSpec, *, workers: int | None = None) -> VideoDataset:
        """Returns the dataset of every video file and frame folder under `root` (recursive, sorted paths, hidden
        entries ignored) with at least `spec.span` frames; logs a warning for each source it skips.

        Frame counts are exact: demuxed packets where every packet is a key frame (one packet, one frame), else a
        full decode, run on `workers` threads. Frame folders are counted without opening their images; frames of
        different sizes are each fitted to the clip size on their own.
        """
        root = Path(root)
        if not root.exists():
            raise DataError(f"Training data folder {root} does not exist; check the path.")
        if not root.is_dir():
            raise DataError(f"Training data {root} is a file; pass the folder that holds the videos.")
        candidates = _find_sources(root)
        if not candidates:
            raise DataError(f"{root} holds no videos ({', '.join(VIDEO_SUFFIXES)}) and no frame folders (folders of "
                            f"{', '.join(IMAGE_SUFFIXES)} images); add some.")
        workers = workers or min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            probed = list(pool.map(_probe, candidates))
        sources, skipped = [], []
        for (path, _), found in zip(candidates, probed):
            if isinstance(found, str):
                reason = found
            elif found.num_frames < spec.span:
                reason = f"too short ({found.num_frames} frames < {spec.span} needed)"
            else:
                sources.append(found)
                continue
            log.warning("Skipping %s: %s.", path, reason)
            skipped.append((path, reason))
        if not sources:
            raise DataError(f"No usable source in {root}: {len(skipped)} found, all skipped: "
                            f"{_summary(root, skipped)}. A clip of {spec.num_frames} frames at stride {spec.stride} "
                            f"needs {spec.span} frames: use fewer frames or a smaller stride, re-encode unreadable "
                            f"files, or add longer videos.")
        dataset = cls(root, spec, tuple(sources), tuple(skipped))
        log.info("%d clip sources in %s (%d frames), %d skipped.", len(sources), root,
                 sum(s.num_frames for s in sources), len(skipped))
        return dataset

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def fingerprint(self) -> str:
        """Returns a short hash of the sources (paths relative to `root`, frame counts) and the spec: the clip order
        depends on all of them, so a resumed run should check it against the one it checkpointed."""
        listing = "\n".join(f"{s.path.relative_to(self.root).as_posix()}\t{s.num_frames}" for s in self.sources)
        return hashlib.sha256(f"{self.spec}\n{listing}".encode()).hexdigest()[:16]

    def clip_at(self, seed: int, index: int) -> tuple[int, int]:
        """Returns (source index, start frame) of clip `index` of the order drawn by `seed`.

        Epoch `index // len(self)` visits every source once, in a permutation drawn from `(seed, epoch)`; the start
        is uniform over the source's valid starts, drawn from `(seed, index)`. Nothing else is read, so any clip of
        the order can be found without the ones before it.
        """
        if seed < 0 or index < 0:
            raise ValueError(f"seed {seed} and clip index {index} must both be non-negative.")
        epoch, slot = divmod(index, len(self.sources))
        source = int(_permutation(seed, epoch, len(self.sources))[slot])
        starts = self.sources[source].num_frames - self.spec.span + 1
        return source, int(np.random.default_rng([seed, _START_STREAM, index]).integers(starts))

    def read_clip(self, source_index: int, start: int) -> np.ndarray:
        """Returns uint8 `[F, H, W, 3]`: frames `start, start + stride, …` of source `source_index`, RGB, fitted to
        the spec's size. Raises DataError when the source cannot be read or no longer matches the scan."""
        source = self.sources[source_index]
        if not 0 <= start <= source.num_frames - self.spec.span:
            raise ValueError(f"Start frame {start} of {source.path}: a clip of {self.spec.span} frames fits at "
                             f"0…{source.num_frames - self.spec.span}.")
        wanted = range(start, start + self.spec.span, self.spec.stride)
        frames = _read_folder(source, wanted) if source.files else _read_video(source, wanted)
        return np.stack([video.fit_image(f, self.spec.height, self.spec.width, self.spec.resize) for f in frames])


class ClipLoader:
    """Iterates forever over batches of `batch_size` consecutive clips of `dataset`'s order for `seed`, from clip
    `start` on; a background thread keeps up to `prefetch` batches ready (0: read on demand).

    A clip whose source fails to read is logged and replaced by the next clip of the order, so a resumed run skips
    the same ones. `position` counts the clips consumed (skipped ones included): pass it back as `start` to resume.
    Exceptions other than unreadable sources reach the consumer from `next()`. Use as a context manager or `close()`.
    """

    def __init__(self, dataset: VideoDataset, batch_size: int, seed: int = 0, start: int = 0, prefetch: int = 2):
        if batch_size < 1 or seed < 0 or start < 0 or prefetch < 0:
            raise ValueError(f"batch_size {batch_size} must be positive; seed {seed}, start {start} and prefetch "
                             f"{prefetch} non-negative.")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self._position = start
        self._closed = False
        self._thread = None
        if prefetch:
            self._queue = queue.Queue(prefetch)
            self._stop = threading.Event()
            # Started now, so the first batches are read while the training step compiles. The worker holds no
            # reference to the loader, so a loader that is dropped without close() is still collected and stops it.
            self._thread = threading.Thread(target=_prefetch, name="ClipLoader", daemon=True,
                                            args=(dataset, batch_size, seed, start, self._queue, self._stop))
            self._thread.start()
            weakref.finalize(self, self._stop.set)

    @property
    def position(self) -> int:
        """Returns the number of clips of the order consumed so far (from 0, not from `start`)."""
        return self._position

    def __iter__(self) -> ClipLoader:
        return self

    def __next__(self) -> Clips:
        if self._closed:
            raise StopIteration
        if self._thread is None:
            batch, self._position = _read_batch(self.dataset, self.batch_size, self.seed, self._position)
            return batch
        item = self._take()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._position = item
        return batch

    def _take(self):
        """Returns the next item the worker put, waiting for as long as the worker lives."""
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive():
                    break
        # The worker puts its exception before it exits, so a dead worker with nothing left was stopped.
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            self._closed = True
            raise StopIteration from None

    def close(self) -> None:
        """Stops the prefetching thread (after the clip it is reading) and ends the iteration."""
        self._closed = True
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def __enter__(self) -> ClipLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prefetch(dataset: VideoDataset, batch_size: int, seed: int, position: int, out: queue.Queue,
              stop: threading.Event) -> None:
    """Puts (batch, next position) items on `out` until `stop` is set; on an exception, puts it and returns."""
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        while not stop.is_set():
            batch, position = _read_batch(dataset, batch_size, seed, position)
            if not put((batch, position)):
                return
    except BaseException as err:  # whatever it is, the consumer must see it rather than wait forever
        put(err)


def _read_batch(dataset: VideoDataset, batch_size: int, seed: int, position: int) -> tuple[Clips, int]:
    """Returns the next `batch_size` readable clips from order position `position` on, and the position after them."""
    frames, sources, first, failures = [], [], None, 0
    while len(frames) < batch_size:
        source_index, start = dataset.clip_at(seed, position)
        path = dataset.sources[source_index].path
        try:
            frames.append(dataset.read_clip(source_index, start))
        except DataError as err:
            failures += 1
            log.warning("Skipping clip %d (%s from frame %d): %s", position, path, start, err)
            if failures >= _MAX_CONSECUTIVE_FAILURES:
                raise DataError(f"{failures} clips in a row could not be read (last: {err}); check that the "
                                f"training data in {dataset.root} is still there and rescan.") from err
        else:
            failures = 0
            sources.append((path, start))
            first = position if first is None else first
        position += 1
    return Clips(np.stack(frames), first, tuple(sources)), position


def _natural_key(name: str) -> tuple:
    """Returns a sort key that orders digit runs by value (frame2 before frame10), ties broken by the name itself."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


def _find_sources(root: Path) -> list[tuple[Path, tuple[Path, ...] | None]]:
    """Returns (path, images) for each source under `root`, sorted by path: a frame folder (a directory with image
    files among its children) with its images in natural order, or a video file with None."""
    found = []
    for folder, dirs, files in os.walk(root):
        # Hidden entries are tool leftovers (.DS_Store, macOS ._name.mp4 resource forks, .git), never training data.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files = sorted((f for f in files if not f.startswith(".")), key=_natural_key)
        images = tuple(Path(folder, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES))
        if images:
            found.append((Path(folder), images))
        found.extend((Path(folder, f), None) for f in files if f.lower().endswith(VIDEO_SUFFIXES))
    return sorted(found, key=lambda item: item[0].relative_to(root).parts)


def _probe(candidate: tuple[Path, tuple[Path, ...] | None]) -> Source | str:
    """Returns the Source of a `_find_sources` entry with its exact frame count, or the reason it cannot be used."""
    path, images = candidate
    if images is not None:
        return Source(path, len(images), files=images)
    try:
        source = _count_packets(path) or _count_decoded(path)
    except DataError as err:
        return str(err)
    except (av.FFmpegError, OSError) as err:
        return f"unreadable ({getattr(err, 'strerror', None) or err})"
    return source if source.num_frames else "no frames"


def _video_stream(container) -> av.video.stream.VideoStream:
    """Returns the first video stream that is not a cover image."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise DataError("no video stream")


def _increasing(pts: Sequence[int | None]) -> tuple[int, ...] | None:
    """Returns `pts` as a tuple when every timestamp is known and they strictly increase, else None."""
    if any(p is None for p in pts) or any(a >= b for a, b in zip(pts, pts[1:])):
        return None
    return tuple(pts)


def _count_packets(path: Path) -> Source | None:
    """Returns the Source counted from demuxed packets when that count is exact, else None.

    It is exact when every packet is an intact key frame in presentation order: the decoder then emits one frame per
    packet, with no reordering, no dropped leading frames and no hidden frames. Container frame counts are not used:
    they are missing (WebM, GIF) or wrong (edit lists, muxers that write the bitrate) too often.
    """
    _require_av()
    with av.open(str(path)) as container:
        stream = _video_stream(container)
        pts = []
        for packet in container.demux(stream):
            if not packet.size or packet.is_discard:
                continue
            if not packet.is_keyframe or packet.is_corrupt:
                return None
            pts.append(packet.pts)
    pts = _increasing(pts)
    if pts is None:
        return None
    return Source(path, len(pts), pts=pts, keys=tuple(range(len(pts))))


def _count_decoded(path: Path) -> Source:
    """Returns the Source counted by decoding every frame."""
    with av.open(str(path)) as container:
        stream = _video_stream(container)
        stream.thread_type = "AUTO"
        pts, keys = [], []
        try:
            for frame in container.decode(stream):
                if frame.key_frame:
                    keys.append(len(pts))
                pts.append(frame.pts)
        except av.FFmpegError as err:
            raise DataError(f"unreadable after {len(pts)} frames ({err.strerror or err})") from err
    # Frame 0 is where decoding without a seek starts, so it counts as a key frame whatever its flag says.
    return Source(path, len(pts), pts=_increasing(pts), keys=tuple(sorted({0, *keys})))


def _summary(root: Path, skipped: Sequence[tuple[Path, str]], shown: int = 5) -> str:
    """Returns '<path> <reason>, …' for the first `shown` skipped sources and how many more there are."""
    text = ", ".join(f"{p.relative_to(root).as_posix() if p != root else root} {reason}"
                     for p, reason in skipped[:shown])
    return text + (f" and {len(skipped) - shown} more" if len(skipped) > shown else "")


def _read_folder(source: Source, wanted: Sequence[int]) -> list[np.ndarray]:
    """Returns the images of a frame folder at the indices `wanted` as uint8 `[h, w, 3]` arrays."""
    frames = []
    for i in wanted:
        try:
            frames.append(video.read_keyframe(source.files[i]))
        except ImageError as err:
            raise DataError(f"Cannot read frame {i} of {source.path}: {err}") from err
    return frames


def _read_video(source: Source, wanted: Sequence[int]) -> list[np.ndarray]:
    """Returns the frames of a video at the increasing indices `wanted` as uint8 `[h, w, 3]` arrays.

    Decoding starts at the last key frame at or before the first wanted frame when the scan recorded timestamps (a
    seek), else at frame 0, and stops after the last wanted frame. Every decoded frame's timestamp is checked against
    the scan, so a seek that lands elsewhere falls back to decoding from the start, and a changed file is an error
    rather than a clip with missing or repeated frames.
    """
    key = source.keys[bisect.bisect_right(source.keys, wanted[0]) - 1] if source.pts else 0
    try:
        if key:
            try:
                frames = _decode(source, wanted, key)
            except av.FFmpegError:
                frames = None
            if frames is not None:
                return frames
            log.debug("Seeking %s to frame %d landed elsewhere; decoding from the start.", source.path, key)
        return _decode(source, wanted, 0)
    except (av.FFmpegError, OSError) as err:
        raise DataError(f"Cannot read {source.path} ({err}); it changed or was damaged since the scan.") from err


def _decode(source: Source, wanted: Sequence[int], key: int) -> list[np.ndarray] | None:
    """Returns the frames at `wanted`, decoding from frame 0 or after a seek to key frame `key`; None when the seek
    did not land on a key frame the scan knows at or before the first wanted frame, or decoding then diverged."""
    wanted_set, last, frames = set(wanted), wanted[-1], []
    with av.open(str(source.path)) as container:
        stream = _video_stream(container)
        stream.thread_type = "AUTO"
        if key:
            container.seek(source.pts[key], stream=stream, backward=True)
        index = None
        for frame in container.decode(stream):
            if index is not None:
                index += 1
            elif key:
                index = source._frame_at_pts.get(frame.pts)
                if index is None or index > wanted[0] or not frame.key_frame:
                    return None
            else:
                index = 0
            if source.pts and (index >= source.num_frames or frame.pts != source.pts[index]):
                if key:
                    return None
                raise DataError(f"{source.path} changed since the scan: frame {index} has timestamp {frame.pts}, "
                                f"the scan saw {source.pts[index] if index < source.num_frames else 'no such frame'}"
                                f"; rescan the training data.")
            if index in wanted_set:
                frames.append(_rgb(frame))
                if index == last:
                    return frames
    if key:
        return None
    raise DataError(f"{source.path} ended after {0 if index is None else index + 1} frames, the scan counted "
                    f"{source.num_frames}; it changed or was damaged since the scan.")


def _require_av() -> None:
    if av is None:
        raise DataError("Reading video files needs PyAV, which is not installed: `pip install av` (frame folders "
                        "work without it).")


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    """Returns a decoded frame as uint8 `[h, w, 3]` RGB, turned upright by its display rotation."""
    image = frame.to_ndarray(format="rgb24")
    # Phones store portrait video sideways with a display rotation that players apply; so do we, as ffmpeg does.
    # (PyAV before 14 does not expose the rotation.)
    turns = round(getattr(frame, "rotation", 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image
