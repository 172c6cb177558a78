"""Bad image input gives an InputError that names the file (or size and limit) and says how to fix it."""

from __future__ import annotations

import struct
import zlib

import pytest

from qvl_pipeline.errors import InputError
from qvl_pipeline.processing import ImageProcessor, load_image


def _input_error(source, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        load_image(source, **kwargs)
    assert info.value.hint
    return info.value


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height (1-bit grey) but holds a single tiny data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_missing_file(tmp_path):
    err = _input_error(tmp_path / "nope.jpg")
    assert str(tmp_path / "nope.jpg") in err.message and "does not exist" in err.message


def test_directory_is_not_an_image(tmp_path):
    assert "not a file" in _input_error(tmp_path).message


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels")
    err = _input_error(path)
    assert str(path) in err.message and "not an image" in err.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, make_image, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    make_image(120, 160).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = _input_error(path)
    assert str(path) in err.message and "truncated" in err.message


def test_over_the_pixel_limit(tmp_path, make_image):
    path = tmp_path / "big.png"
    make_image(100, 120).save(path)
    err = _input_error(path, max_image_pixels=10_000)
    assert "120×100" in err.message and "12,000" in err.message and "10,000" in err.message
    assert "max_image_pixels" in err.hint
    assert load_image(path, max_image_pixels=12_000).size == (120, 100)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(12_000, 12_000))      # 144 MP claimed, ~70 bytes on disk
    err = _input_error(path)
    assert "12000×12000" in err.message and "144,000,000" in err.message and "67,108,864" in err.message


def test_pillow_own_bomb_error_is_an_input_error(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(100_000, 100_000))    # over Pillow's hard limit: refused in open()
    err = _input_error(path, max_image_pixels=10**12)
    assert str(path) in err.message and "10000000000 pixels" in err.message


def test_in_memory_image_over_limit(make_image):
    err = _input_error(make_image(50, 50), max_image_pixels=100)
    assert "2,500" in err.message


def test_wrong_type():
    assert "bytes" in _input_error(b"\x89PNG").message


def test_processor_passes_errors_through(tmp_path, image_config, make_image):
    wide = tmp_path / "wide.png"
    make_image(2, 600).save(wide)
    with pytest.raises(InputError, match="aspect ratio"):
        ImageProcessor(image_config)([wide])
    with pytest.raises(InputError, match="over the limit"):
        ImageProcessor(image_config, max_image_pixels=1000)([wide])
