"""Open an image as upright 8-bit RGB, refusing unreadable files and decompression bombs with a clear error."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from qvl_pipeline.errors import InputError

# Pixels (width × height) an input may have; larger ones are refused from the header, before decoding. The
# largest photos people take are ~45-61 MP (full-frame cameras) and ~100 MP (medium format). Turning one into
# upright RGB peaks at ~24 bytes per pixel for an RGBA PNG (Pillow keeps 4 bytes per pixel even for RGB: the
# decoded image, its RGBA copy, the white background, the composite, the RGB result) and ~12 for an RGB JPEG,
# measured. 2**26 px (8192 × 8192, 64 MP) therefore costs at most ~1.5 GiB on top of the model's weights,
# which a 16 GB laptop can spare; Pillow's own guard (179 MP, ~4 GiB) cannot protect it.
DEFAULT_MAX_IMAGE_PIXELS = 2**26

ImageSource = str | Path | Image.Image

# Formats whose extra frames are not pages or animation: MPO holds previews / other views of the photo, PSD
# holds layers under the merged picture Pillow reads.
_STILL_WITH_FRAMES = frozenset({"MPO", "PSD"})
# SOF markers of arithmetic-coded JPEG (and DAC, its conditioning table): no minimum size per 8×8 block.
_JPEG_ARITHMETIC = frozenset({0xC9, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF})
_URL = re.compile(r"^(?:([a-zA-Z][a-zA-Z0-9+.-]+)://|data:)")
_REDECODE = "re-save the image as PNG or JPEG, or download it again (it may be damaged or use a feature Pillow " \
            "cannot read)"


def _bomb_error(where: str, width: int, height: int, limit: int) -> InputError:
    return InputError(
        f"image {where} is {width}×{height} = {width * height:,} pixels, over the limit of {limit:,} pixels "
        "(a guard against decompression bombs)",
        "downscale the image first, or raise the limit with max_image_pixels (e.g. processing.max_image_pixels="
        f"{width * height})")


def _refuse_url(text: str) -> None:
    match = _URL.match(text)
    if match is None:
        return
    if match.group(1) is None:
        shown = text if len(text) <= 48 else text[:40] + "…"
        raise InputError(f"image {shown} is a data: URL, not a file path; qvl-pipeline reads images from files",
                         "decode the data URL into a file (for example an image.png) and pass its path")
    if match.group(1).lower() == "file":
        raise InputError(f"image {text} is a file:// URL, not a path", "pass the path itself, without file://")
    raise InputError(f"image {text} is a URL; qvl-pipeline does not fetch URLs",
                     f"download the file first (for example: curl -L -o image.jpg '{text}') and pass its path")


@contextmanager
def _decoding(where: str) -> Iterator[None]:
    """Any failure of Pillow on these bytes becomes one InputError naming the image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {where} is too large for Pillow to open safely ({exc})",
                         "downscale the image first; Pillow refuses images over twice Image.MAX_IMAGE_PIXELS "
                         "whatever max_image_pixels says") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{where} is not an image Pillow can read",
                         "pass a JPEG, PNG, WebP, GIF, BMP or TIFF file") from exc
    except MemoryError as exc:
        raise InputError(f"image {where} does not fit in memory while decoding",
                         "downscale the image first, or lower processing.max_image_pixels") from exc
    except (OSError, SyntaxError, EOFError) as exc:     # Pillow's "truncated", "broken PNG file", ...
        raise InputError(f"image {where} is truncated or corrupt ({exc})", _REDECODE) from exc
    except Exception as exc:  # a decoder plugin's ValueError, struct.error, IndexError ... on hostile bytes
        raise InputError(f"image {where} cannot be decoded ({type(exc).__name__}: {exc})", _REDECODE) from exc


def _check_frames(image: Image.Image, where: str) -> None:
    frames = int(getattr(image, "n_frames", 1) or 1)
    if frames > 1 and image.format not in _STILL_WITH_FRAMES:
        kind = {"GIF": "an animated GIF", "PNG": "an animated PNG", "WEBP": "an animated WebP",
                "TIFF": "a multi-page TIFF"}.get(image.format or "", f"a {frames}-frame {image.format} image")
        raise InputError(
            f"image {where} has {frames} frames ({kind}); an image input is one still picture",
            "pass the frames as a video: extract them (for example: ffmpeg -i input.gif frame_%03d.png) and give "
            "video=[frame_001.png,frame_002.png,...]; or pass a single frame saved as PNG as the image")


def _jpeg_is_arithmetic(path: Path) -> bool:
    """Whether a JPEG file's frame header (before its first scan) says arithmetic coding."""
    with path.open("rb") as fh:
        if fh.read(2) != b"\xff\xd8":
            return False
        while True:
            byte = fh.read(1)
            if not byte:
                return False
            if byte != b"\xff":
                continue
            marker = fh.read(1)
            while marker == b"\xff":
                marker = fh.read(1)
            if not marker or marker[0] in (0xDA, 0xD9):          # start of scan / end of image
                return False
            if marker[0] == 0x01 or 0xD0 <= marker[0] <= 0xD8:  # markers without a length
                continue
            if marker[0] in _JPEG_ARITHMETIC:
                return True
            length = fh.read(2)
            if len(length) < 2:
                return False
            fh.seek(int.from_bytes(length, "big") - 2, 1)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _check_jpeg_data(path: Path, image: Image.Image) -> None:
    """Refuse a JPEG whose file is too small for the size its header claims: libjpeg fills missing scan data
    with grey without an error. Every Huffman-coded 8×8 block takes at least one bit."""
    layers = getattr(image, "layer", None)
    if image.format not in ("JPEG", "MPO") or not layers:
        return
    width, height = image.size
    h_max, v_max = max(h for _, h, _, _ in layers), max(v for _, _, v, _ in layers)
    blocks = sum(_ceil(_ceil(width * h, h_max), 8) * _ceil(_ceil(height * v, v_max), 8) for _, h, v, _ in layers)
    size = path.stat().st_size
    if size < blocks // 8 and not _jpeg_is_arithmetic(path):
        raise InputError(
            f"image {path} is truncated or corrupt: its header says {width}×{height} pixels, but its {size:,} "
            f"bytes cannot hold them (at least {blocks // 8:,} are needed); decoding would fill the rest with grey",
            "re-save or download the image again")


def _open(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise InputError(f"image file {path} does not exist", "check the path (relative paths start at the "
                         "current directory)")
    if not path.is_file():
        raise InputError(f"image path {path} is not a file", "pass the path of an image file")
    with _decoding(str(path)):
        image = Image.open(path)
    try:
        width, height = image.size       # from the header: nothing is decoded yet
        if width * height > max_pixels:
            raise _bomb_error(str(path), width, height, max_pixels)
        with _decoding(str(path)):
            _check_frames(image, str(path))
            _check_jpeg_data(path, image)
            with _strict_truncation():
                image.load()
    except BaseException:
        image.close()
        raise
    return image


@contextmanager
def _strict_truncation() -> Iterator[None]:
    """Decode with Pillow's LOAD_TRUNCATED_IMAGES off (another library may have switched it on): a truncated
    file must raise, not come back padded with grey."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float greyscale, scaled into 0..255 (Pillow's convert would clip)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright (EXIF orientation applied) 8-bit RGB; transparency is composited onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_depth_to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageSource, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An upright 8-bit RGB Pillow image from a path or an opened image; bad input raises InputError.

    Refused: URLs (they are not fetched), files over `max_image_pixels` (from the header, before decoding),
    animated or multi-page files (pass their frames as a video), truncated or corrupt files.
    """
    if isinstance(source, Image.Image):
        where = f"{source.filename} (in memory)" if getattr(source, "filename", "") else "(in memory)"
        width, height = source.size
        if width * height > max_image_pixels:
            raise _bomb_error(where, width, height, max_image_pixels)
        with _decoding(where):
            _check_frames(source, where)
            with _strict_truncation():
                return to_rgb(source)
    if not isinstance(source, (str, Path)):
        raise InputError(f"cannot read an image from a {type(source).__name__}",
                         "pass a file path or a PIL.Image.Image")
    text = str(source)
    if "\0" in text:
        raise InputError(f"image path {text!r} contains a NUL character", "pass the path of an image file")
    path = Path(text).expanduser()
    if not path.exists():
        _refuse_url(text)       # before the Path mangles "https://" into "https:/"
    with _open(path, max_image_pixels) as image, _decoding(str(path)):
        return to_rgb(image)
