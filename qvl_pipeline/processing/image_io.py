"""Open an image as upright 8-bit RGB, refusing unreadable files and decompression bombs with a clear error."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qvl_pipeline.errors import InputError

# Pixels (width × height) an input may have before it is decoded; ~100 MP decodes to ~300 MB of RGB.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000

ImageSource = str | Path | Image.Image


def _bomb_error(where: str, width: int, height: int, limit: int) -> InputError:
    return InputError(
        f"image {where} is {width}×{height} = {width * height:,} pixels, over the limit of {limit:,} pixels "
        "(a guard against decompression bombs)",
        "downscale the image first, or raise the limit with max_image_pixels (e.g. processing.max_image_pixels="
        f"{width * height})")


def _open(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise InputError(f"image file {path} does not exist", "check the path (relative paths start at the "
                         "current directory)")
    if not path.is_file():
        raise InputError(f"image path {path} is not a file", "pass the path of an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {path} is too large for Pillow to open safely ({exc})",
                         "downscale the image first; Pillow refuses images over twice Image.MAX_IMAGE_PIXELS "
                         "whatever max_image_pixels says") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{path} is not an image Pillow can read",
                         "pass a JPEG, PNG, WebP, GIF, BMP or TIFF file") from exc
    except OSError as exc:
        raise InputError(f"cannot open image {path}: {exc}", "check the file is readable") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise _bomb_error(str(path), width, height, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"image {path} is truncated or corrupt ({exc})",
                         "re-save or download the image again") from exc
    return image


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
    """An upright 8-bit RGB Pillow image from a path or an opened image; bad input raises InputError."""
    if isinstance(source, Image.Image):
        width, height = source.size
        if width * height > max_image_pixels:
            raise _bomb_error("(in memory)", width, height, max_image_pixels)
        return to_rgb(source)
    if not isinstance(source, (str, Path)):
        raise InputError(f"cannot read an image from a {type(source).__name__}",
                         "pass a file path or a PIL.Image.Image")
    path = Path(source).expanduser()
    with _open(path, max_image_pixels) as image:
        return to_rgb(image)
