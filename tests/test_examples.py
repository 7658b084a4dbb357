"""The README's smoke command runs as a new user runs it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_unet_roundtrip(tmp_path):
    out = tmp_path / "tiny-random"
    done = subprocess.run([sys.executable, "examples/tiny_unet_roundtrip.py", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "max|jinbetween - diffusers|" in done.stdout
    assert (out / "manifest.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "unet"]
