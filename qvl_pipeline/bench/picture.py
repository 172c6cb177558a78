"""The benchmark's default picture: the demo scene drawn at 448x448 (196 image tokens for Qwen3-VL), written once."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image

from qvl_pipeline.runtime.demo import cache_root, draw_demo_image

SIZE = 448


def bench_picture() -> Path:
    """<cache>/bench/picture448.png, drawn on first use (written to a temp file, then renamed into place)."""
    path = cache_root() / "bench" / f"picture{SIZE}.png"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".picture-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        draw_demo_image(Path(name))
        with Image.open(name) as scene:
            scene.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC).save(name, format="PNG")
        os.replace(name, path)
    finally:
        if os.path.exists(name):
            os.unlink(name)
    return path
