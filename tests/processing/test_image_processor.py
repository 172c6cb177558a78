"""Oracle: pixel_values and grid_thw equal the reference image processor's, for odd sizes and file formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qvl_pipeline.processing import ImageProcessor, load_image, patchify

pil_ref = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
image_utils = pytest.importorskip("transformers.image_utils")

ODD_SIZES = [(37, 53), (300, 200), (123, 457), (64, 64), (1000, 31), (513, 769), (17, 900), (5, 7)]


def _reference(config: dict):
    return pil_ref.Qwen2VLImageProcessorPil(**config)


def _assert_same(ours, ref) -> None:
    assert torch.equal(ours.grid_thw, torch.as_tensor(ref["image_grid_thw"]))
    ref_pixels = torch.as_tensor(np.asarray(ref["pixel_values"]))
    assert ours.pixel_values.dtype == torch.float32 and ours.pixel_values.shape == ref_pixels.shape
    assert (ours.pixel_values - ref_pixels).abs().max().item() == 0.0


def test_odd_sizes_batch_equal_reference(image_config, make_image):
    images = [make_image(h, w, seed=i) for i, (h, w) in enumerate(ODD_SIZES)]
    ours = ImageProcessor(image_config)(images)
    _assert_same(ours, _reference(image_config)(images=images))
    assert ours.pixel_values.shape[1] == 3 * 2 * 16 * 16
    assert ours.token_counts() == [int(t * h * w) // 4 for t, h, w in ours.grid_thw.tolist()]


def test_min_max_pixels_spelling_and_override(image_config, make_image):
    legacy = {k: v for k, v in image_config.items() if k != "size"}
    legacy.update(min_pixels=32 * 32 * 2, max_pixels=32 * 32 * 16)   # Qwen2-VL-style top-level keys
    image = make_image(400, 300)
    ours = ImageProcessor(legacy)([image])
    _assert_same(ours, _reference(legacy)(images=[image]))
    assert int(ours.grid_thw[0].prod()) // 4 <= 16
    capped = ImageProcessor(image_config, max_pixels=32 * 32 * 8)([image])
    assert int(capped.grid_thw[0].prod()) // 4 <= 8
    _assert_same(capped, _reference({**image_config, "size": {"shortest_edge": 4096,
                                                              "longest_edge": 32 * 32 * 8}})(images=[image]))


def test_exif_rotated_jpeg(tmp_path, image_config, make_image):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                         # orientation: rotate 90° clockwise to display
    make_image(40, 90).save(path, exif=exif, quality=95)
    rgb = load_image(path)
    assert rgb.size == (40, 90)              # stored 90×40, shown upright as 40 wide, 90 tall
    ours = ImageProcessor(image_config)([path])
    _assert_same(ours, _reference(image_config)(images=[image_utils.load_image(str(path))]))


def test_rgba_png_composited_on_white(tmp_path, image_config, make_image):
    rgba = make_image(50, 70).convert("RGBA")
    alpha = np.zeros((50, 70), np.uint8)
    alpha[:, 35:] = 255
    rgba.putalpha(Image.fromarray(alpha))
    path = tmp_path / "alpha.png"
    rgba.save(path)
    assert np.asarray(load_image(path))[:, :35].min() == 255     # transparent half is white
    ours = ImageProcessor(image_config)([path])
    _assert_same(ours, _reference(image_config)(images=[Image.open(path)]))


@pytest.mark.parametrize("mode", ["L", "P", "1", "CMYK", "LA"])
def test_other_modes_equal_reference(tmp_path, image_config, make_image, mode):
    image = make_image(45, 61).convert(mode)
    path = tmp_path / ("img.tiff" if mode == "CMYK" else "img.png")
    image.save(path)
    ours = ImageProcessor(image_config)([path])
    assert ours.pixel_values.shape[1] == 1536
    _assert_same(ours, _reference(image_config)(images=[Image.open(path)]))


def test_palette_with_transparency(tmp_path, image_config):
    image = Image.new("P", (40, 40))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, 20, 40))
    image.info["transparency"] = 1
    path = tmp_path / "palette.png"
    image.save(path, transparency=1)
    rgb = np.asarray(load_image(path))
    assert (rgb[:, :20] == 255).all() and (rgb[:, 20:] == [255, 0, 0]).all()
    _assert_same(ImageProcessor(image_config)([path]), _reference(image_config)(images=[Image.open(path)]))


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (4, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]


def test_patchify_order_equals_reference_patchify():
    rng = np.random.default_rng(3)
    chw = rng.standard_normal((3, 64, 96)).astype(np.float32)
    ref_rows, gh, gw = pil_ref.Qwen2VLImageProcessorPil.patchify(None, chw, 16, 2, 2)
    rows, grid = patchify(torch.from_numpy(chw)[None], 16, 2, 2)
    assert grid == (1, gh, gw) == (1, 4, 6)
    assert torch.equal(rows, torch.from_numpy(np.ascontiguousarray(ref_rows)))


def test_torch_backend_equals_torchvision_reference(image_config, make_image):
    pytest.importorskip("torchvision")
    tv_ref = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    images = [make_image(h, w, seed=i) for i, (h, w) in enumerate(ODD_SIZES)]
    ours = ImageProcessor(image_config, backend="torch")(images)
    ref = tv_ref.Qwen2VLImageProcessor(**image_config)(images=images, return_tensors="pt")
    _assert_same(ours, ref)


def test_backends_differ_by_at_most_rounding_on_smooth_images(image_config):
    yy, xx = np.mgrid[0:90, 0:130]
    smooth = Image.fromarray(np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8))
    pil = ImageProcessor(image_config, backend="pil")([smooth]).pixel_values
    tch = ImageProcessor(image_config, backend="torch")([smooth]).pixel_values
    assert (pil - tch).abs().max().item() <= 2 / 255 * 2 + 1e-6     # ≤ 1 level of 255, after /0.5


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        ImageProcessor({}, backend="cv2")
