"""Keyframes in, videos out: reading and fitting images, writing mp4/gif, contact sheets and frame grids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from jinbetween import atomic, checks
from jinbetween.errors import ImageError, InputShapeError

RESIZE_MODES = ("crop", "pad", "stretch")


def read_keyframe(path: str | os.PathLike) -> np.ndarray:
    """Returns the image at `path` as uint8 `[H, W, 3]`: EXIF orientation applied, alpha composited on white."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"Keyframe {path} does not exist; check the path.")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            return np.asarray(image.convert("RGB"), np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ImageError(f"Cannot read {path} as an image ({err}); use a PNG, JPEG or WebP file.") from err


def check_size(height: int, width: int, multiple: int = 64) -> None:
    """Raises InputShapeError unless both sides are positive multiples of `multiple`."""
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise InputShapeError(f"Video size {height}×{width} is not a multiple of {multiple} on both sides (the "
                              f"latent must divide by the UNet's downsampling); choose e.g. "
                              f"{max(multiple, round(height / multiple) * multiple)}×"
                              f"{max(multiple, round(width / multiple) * multiple)}.")


def fit_image(image: np.ndarray, height: int, width: int, mode: str = "crop") -> np.ndarray:
    """Returns uint8 `[height, width, 3]`: `crop` covers then centre-crops, `pad` fits then pads with black,
    `stretch` resizes without keeping the aspect ratio (Lanczos resampling)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r}; choose one of {RESIZE_MODES}.")
    pil = Image.fromarray(np.asarray(image, np.uint8))
    if pil.size == (width, height):
        return np.asarray(pil)
    if mode == "stretch":
        return np.asarray(pil.resize((width, height), Image.LANCZOS))
    if mode == "crop":
        return np.asarray(ImageOps.fit(pil, (width, height), Image.LANCZOS))
    return np.asarray(ImageOps.pad(pil, (width, height), Image.LANCZOS, color=(0, 0, 0)))


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: float = 7) -> Path:
    """Writes uint8 `frames [F, H, W, 3]` as .mp4 (H.264) or .gif, chosen by the file extension, atomically (a
    temporary file renamed onto `path`); returns `path`."""
    path = checks.output_file(path, "path", checks.VIDEO_SUFFIXES, "a video")
    checks.number(fps, "fps", "the frame rate", above=0, maximum=1000, example=7)
    frames = np.asarray(frames, np.uint8)
    with atomic.replacing(path) as temporary:
        if path.suffix.lower() == ".gif":
            images = [Image.fromarray(f) for f in frames]
            images[0].save(temporary, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        else:
            _write_mp4(frames, temporary, fps)
    return path


def _write_mp4(frames: np.ndarray, path: Path, fps: float) -> None:
    import av
    from fractions import Fraction

    # yuv420p needs even sides; pad odd ones by one edge pixel.
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Returns the frames of a video file as uint8 `[F, H, W, 3]`."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def contact_sheet(videos: Sequence[np.ndarray], path: str | os.PathLike, *, frames: Sequence[int] | None = None,
                  labels: Sequence[str] | None = None, gap: int = 4) -> Path:
    """Writes a PNG grid (atomically): one row per video (`[F, H, W, 3]` uint8), the chosen frame indices as
    columns; returns `path`."""
    count = min(len(v) for v in videos)
    frames = list(range(count)) if frames is None else list(frames)
    h, w = videos[0].shape[1:3]
    label_width = 0 if labels is None else 8 + 7 * max(len(label) for label in labels)
    sheet = Image.new("RGB", (label_width + len(frames) * (w + gap) + gap, len(videos) * (h + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for row, video in enumerate(videos):
        y = gap + row * (h + gap)
        if labels is not None:
            draw.text((4, y + h // 2 - 6), labels[row], fill="black")
        for col, index in enumerate(frames):
            sheet.paste(Image.fromarray(np.asarray(video[index], np.uint8)), (label_width + gap + col * (w + gap), y))
    path = Path(path)
    with atomic.replacing(path) as temporary:
        sheet.save(temporary)
    return path


def frame_grid(frames: np.ndarray, path: str | os.PathLike, *, columns: int = 8, thumb_width: int = 192,
               gap: int = 4, label_height: int = 14) -> Path:
    """Writes a PNG (atomically) of one video's frames (`[F, H, W, 3]` uint8) as a grid of thumbnails, `columns`
    to a row, each at most `thumb_width` wide with its frame index under it; returns `path`.

    The sheet is at most columns · (thumb_width + gap) + gap pixels wide whatever the video's length and size.
    """
    frames = np.asarray(frames, np.uint8)
    checks.integer(columns, "columns", "the thumbnails per row", minimum=1, example=8)
    checks.integer(thumb_width, "thumb_width", "the thumbnail width", minimum=8, example=192)
    h, w = frames.shape[1:3]
    tw = min(w, thumb_width)
    th = max(1, round(h * tw / w))
    columns = min(columns, len(frames))
    rows = -(-len(frames) // columns)
    cell_h = th + label_height
    sheet = Image.new("RGB", (columns * (tw + gap) + gap, rows * (cell_h + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for index, frame in enumerate(frames):
        x, y = gap + (index % columns) * (tw + gap), gap + (index // columns) * (cell_h + gap)
        sheet.paste(Image.fromarray(frame).resize((tw, th), Image.LANCZOS), (x, y))
        draw.text((x + tw // 2 - 3 * len(str(index)), y + th + 1), str(index), fill="black")
    path = Path(path)
    with atomic.replacing(path) as temporary:
        sheet.save(temporary, format="PNG")
    return path
