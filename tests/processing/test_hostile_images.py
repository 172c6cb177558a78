"""Hostile image files: every Pillow failure, a size lie, a truncation, animation and URLs each give one
InputError naming the image and the fix; nothing is decoded past the pixel guard."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from qvl_pipeline.errors import InputError
from qvl_pipeline.processing import DEFAULT_MAX_IMAGE_PIXELS, VideoProcessor, load_image


def _error(source, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        load_image(source, **kwargs)
    assert info.value.hint
    return info.value


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with(chunk: bytes, *, after_pixels: bool = False) -> bytes:
    """A valid 4×4 RGB PNG with `chunk` before or after its pixel data."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
    pixels = _chunk(b"IDAT", zlib.compress(b"".join(b"\0" + b"\x80" * 12 for _ in range(4))))
    body = header + pixels + chunk if after_pixels else header + chunk + pixels
    return b"\x89PNG\r\n\x1a\n" + body + _chunk(b"IEND", b"")


_HUGE = zlib.compress(b"A" * (2 * 2**20))     # 2 MiB of text in ~2 KB: over Pillow's MAX_TEXT_CHUNK


@pytest.mark.parametrize(("chunk", "after"), [
    (_chunk(b"zTXt", b"comment\0\0" + _HUGE), False),
    (_chunk(b"zTXt", b"comment\0\0" + _HUGE), True),
    (_chunk(b"iTXt", b"comment\0\1\0\0\0" + _HUGE), False),
    (_chunk(b"iTXt", b"comment\0\1\0\0\0" + _HUGE), True),
    (_chunk(b"iCCP", b"icc\0\0" + _HUGE), False),
], ids=["zTXt", "zTXt after pixels", "iTXt", "iTXt after pixels", "iCCP"])
def test_oversized_metadata_chunk(tmp_path, chunk, after):
    path = tmp_path / "small.png"
    path.write_bytes(_png_with(chunk, after_pixels=after))
    assert path.stat().st_size < 3000
    err = _error(path)
    assert str(path) in err.message and "MAX_TEXT_CHUNK" in err.message


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real 16×16 JPEG (~700 bytes) whose frame header is patched to claim width×height."""
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=50)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if any image data is decoded."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("pixel data was decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_size_lie_refused_before_decoding(tmp_path, no_decoding):
    path = tmp_path / "lie.jpg"
    path.write_bytes(_jpeg_claiming(9000, 9000))       # 81 MP claimed in ~700 bytes
    err = _error(path)
    assert "9000×9000" in err.message and f"{DEFAULT_MAX_IMAGE_PIXELS:,}" in err.message


def test_default_guard_protects_a_16_gb_laptop():
    # ~24 bytes per pixel at peak for an RGBA input (see image_io): the default must stay under ~2 GiB
    assert 50_000_000 <= DEFAULT_MAX_IMAGE_PIXELS and DEFAULT_MAX_IMAGE_PIXELS * 24 < 2 * 2**30


@pytest.mark.parametrize("size", [(2000, 1500), (640, 480)])
def test_jpeg_too_small_for_its_header_is_not_decoded_as_grey(tmp_path, size, no_decoding):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(_jpeg_claiming(*size))
    err = _error(path)
    assert str(path) in err.message and "corrupt" in err.message and f"{size[0]}×{size[1]}" in err.message


@pytest.mark.parametrize("options", [{}, {"progressive": True, "optimize": True}, {"optimize": True, "quality": 5}])
@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_legitimate_flat_jpegs_still_load(tmp_path, mode, options):
    path = tmp_path / "flat.jpg"
    Image.new(mode, (1200, 900), 200 if mode == "L" else (200,) * len(mode)).save(path, "JPEG", **options)
    assert load_image(path).size == (1200, 900)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_truncated_image_errors_even_if_someone_allowed_truncation(tmp_path, make_image, fmt, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)     # as some other library might
    path = tmp_path / f"cut.{fmt.lower()}"
    make_image(120, 160).save(path, format=fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    assert "truncated" in _error(path).message
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True                     # left as it was found


def _frames(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (32, 24), (40 * i, 100, 200)) for i in range(count)]


@pytest.mark.parametrize(("fmt", "suffix", "kind"), [
    ("GIF", "gif", "animated GIF"), ("PNG", "png", "animated PNG"), ("WEBP", "webp", "animated WebP"),
    ("TIFF", "tiff", "multi-page TIFF"),
])
def test_animated_and_multi_page_files_are_refused(tmp_path, fmt, suffix, kind):
    path = tmp_path / f"clip.{suffix}"
    first, *rest = _frames(3)
    first.save(path, format=fmt, save_all=True, append_images=rest, duration=100)
    err = _error(path)
    assert str(path) in err.message and "3 frames" in err.message and kind in err.message
    assert "video=" in err.hint


def test_animated_image_in_memory_and_as_video_frame(tmp_path):
    path = tmp_path / "clip.gif"
    first, *rest = _frames(2)
    first.save(path, save_all=True, append_images=rest)
    with Image.open(path) as opened:
        assert "2 frames" in _error(opened).message
    with pytest.raises(InputError, match="2 frames"):
        VideoProcessor({"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2})([[path, path]])


def test_multi_picture_jpeg_is_one_photo(tmp_path):
    path = tmp_path / "stereo.mpo"
    first, *rest = _frames(2)
    first.save(path, format="MPO", save_all=True, append_images=rest)
    assert load_image(path).size == (32, 24)


@pytest.mark.parametrize("url", [
    "https://example.com/cats/cat.jpg", "http://example.com/a.png", "HTTPS://EXAMPLE.COM/A.PNG",
    "ftp://example.com/a.png", "s3://bucket/key.jpg",
])
def test_urls_are_not_fetched(url):
    err = _error(url)
    assert url in err.message and "URL" in err.message and "download" in err.hint


def test_data_and_file_urls():
    err = _error("data:image/png;base64," + "iVBORw0KGgo" * 100)
    assert "data: URL" in err.message and len(err.message) < 200
    assert "without file://" in _error("file:///tmp/a.png").hint


def test_file_named_like_a_url_is_read(tmp_path, monkeypatch, make_image):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data:x.png").write_bytes(b"")
    make_image(8, 8).save(tmp_path / "data:x.png", format="PNG")
    assert load_image("data:x.png").size == (8, 8)


def test_path_with_nul_character():
    assert "NUL" in _error("photo\0.jpg").message


def test_video_frames_are_decoded_one_at_a_time(monkeypatch, make_image):
    """A long clip of large frames must not hold every full-size frame in memory at once."""
    import weakref

    import qvl_pipeline.processing.video as video

    alive: list[weakref.ref] = []
    most = 0

    def tracked(source, limit):
        nonlocal most
        most = max(most, sum(ref() is not None for ref in alive))
        image = load_image(source, limit)
        alive.append(weakref.ref(image))
        return image
    monkeypatch.setattr(video, "load_image", tracked)
    frames = [make_image(96, 128, seed=i) for i in range(8)]
    out = VideoProcessor({"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2})([frames])
    assert out.grid_thw.shape == (1, 3) and most <= 1
