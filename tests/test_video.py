"""Keyframe reading and fitting, video writing and contact sheets."""

import numpy as np
import pytest
from PIL import Image

from jinbetween import video
from jinbetween.errors import ImageError, InputShapeError


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :3, 3] = 255  # left half opaque red-ish, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = video.read_keyframe(tmp_path / "a.png")
    assert image.shape == (4, 6, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(image[0, 5], [255, 255, 255])


def test_grayscale_becomes_rgb(tmp_path):
    Image.fromarray(np.full((5, 7), 90, np.uint8), "L").save(tmp_path / "g.png")
    np.testing.assert_array_equal(video.read_keyframe(tmp_path / "g.png"), np.full((5, 7, 3), 90))


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((4, 8, 3), np.uint8)
    pixels[0, 0] = 255  # marks the top-left corner
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image.save(tmp_path / "r.jpg", exif=exif, quality=100)
    shown = video.read_keyframe(tmp_path / "r.jpg")
    assert shown.shape == (8, 4, 3)
    assert shown[0, -1].mean() > 128 and shown[0, 0].mean() < 64


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        video.read_keyframe(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="Cannot read .*notes.png as an image"):
        video.read_keyframe(tmp_path / "notes.png")


@pytest.mark.parametrize("mode", video.RESIZE_MODES)
def test_fit_image_gives_the_requested_size(mode):
    image = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    assert video.fit_image(image, 128, 192, mode).shape == (128, 192, 3)


def test_pad_keeps_the_whole_image_with_black_bars():
    image = np.full((100, 100, 3), 255, np.uint8)
    fitted = video.fit_image(image, 64, 128, "pad")
    assert fitted[:, 0].max() == 0 and fitted[:, -1].max() == 0 and fitted[32, 64].min() == 255


def test_sizes_must_be_multiples():
    video.check_size(576, 1024)
    with pytest.raises(InputShapeError, match="not a multiple of 64.*576×1024"):
        video.check_size(580, 1000)


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_written_videos_read_back(tmp_path, suffix):
    frames = np.zeros((5, 64, 96, 3), np.uint8)
    for i in range(5):
        frames[i, :, : 16 * (i + 1)] = 255  # a growing white bar
    path = video.write_video(frames, tmp_path / f"v{suffix}", fps=7)
    back = video.read_video(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 8


def test_unknown_video_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match=".mp4 or .gif"):
        video.write_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "v.avi")


def test_contact_sheet_has_one_row_per_video(tmp_path):
    videos = [np.full((6, 16, 24, 3), 40 * i, np.uint8) for i in range(3)]
    sheet = np.asarray(Image.open(video.contact_sheet(videos, tmp_path / "s.png", frames=[0, 2, 5], gap=4)))
    assert sheet.shape == (3 * (16 + 4) + 4, 3 * (24 + 4) + 4, 3)
    assert sheet[4 + 2 * 20 + 8, 4 + 12].tolist() == [80, 80, 80]
