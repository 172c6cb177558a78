"""Oracle: prompt ids equal Qwen3VLProcessor's (demo tokenizer, demo chat template, Qwen3-VL image numbers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qvl_pipeline.errors import InputError
from qvl_pipeline.processing import (
    ChatTemplate,
    ImageProcessor,
    RequestProcessor,
    Tokenizer,
    VideoClip,
    VideoProcessor,
    build_prompt,
    expand_placeholders,
    user_message,
)
from qvl_pipeline.processing.prompt import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START

transformers = pytest.importorskip("transformers")
pil_ref = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
video_ref = pytest.importorskip("transformers.models.qwen3_vl.video_processing_qwen3_vl")
video_utils = pytest.importorskip("transformers.video_utils")
feature_utils = pytest.importorskip("transformers.feature_extraction_utils")

VIDEO_SIZE = {"shortest_edge": 4096, "longest_edge": 4 * 65536}


class _ReferenceProcessor(transformers.Qwen3VLProcessor):
    """Qwen3VLProcessor that also accepts the geometry-only video stand-in below (no torchvision here)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, _VideoGeometry):
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


class _VideoGeometry:
    """The reference's video grid and metadata without its pixels (which need torchvision): the prompt only
    reads the grid and the metadata."""

    merge_size = 2
    temporal_patch_size = 2

    def __call__(self, videos, video_metadata, **kwargs):
        grids = []
        for clip in videos:
            count, height, width = clip.shape[0], clip.shape[1], clip.shape[2]
            h, w = video_ref.smart_resize(count, height, width, temporal_factor=2, factor=32,
                                          min_pixels=VIDEO_SIZE["shortest_edge"], max_pixels=VIDEO_SIZE["longest_edge"])
            grids.append([(count + 1) // 2, h // 16, w // 16])
        metadata = [video_utils.VideoMetadata(**m) for m in video_metadata]
        return feature_utils.BatchFeature({"video_grid_thw": torch.tensor(grids), "video_metadata": metadata})


@pytest.fixture(scope="module")
def reference(demo_folder):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(demo_folder))
    config = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3,
              "image_std": [0.5] * 3}
    images = pil_ref.Qwen2VLImageProcessorPil(**config, size={"shortest_edge": 4096, "longest_edge": 65536})
    try:
        import torchvision  # noqa: F401
        videos = video_ref.Qwen3VLVideoProcessor(**config, size=VIDEO_SIZE)
    except ImportError:
        videos = _VideoGeometry()
    template = (demo_folder / "chat_template.jinja").read_text()
    return _ReferenceProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                               chat_template=template)


@pytest.fixture(scope="module")
def ours(demo_folder):
    return (Tokenizer.from_folder(demo_folder), ChatTemplate.from_folder(demo_folder),
            ImageProcessor.from_folder(demo_folder), VideoProcessor.from_folder(demo_folder))


def _reference_ids(reference, text, images):
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
    out = reference.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)
    return out


@pytest.mark.parametrize("sizes", [[(37, 53)], [(123, 457), (300, 200)], []], ids=["1 image", "2 images", "text"])
def test_image_prompts_equal_reference(reference, ours, make_image, sizes):
    tokenizer, template, images_proc, _ = ours
    images = [make_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    text = "Describe what you see, briefly."
    vision = images_proc(images)
    prompt = build_prompt(tokenizer, template, text, image_tokens=vision.token_counts())
    ref = _reference_ids(reference, text, images)
    assert prompt.input_ids == ref["input_ids"][0]
    assert prompt.input_ids.count(tokenizer.token_to_id(IMAGE_TOKEN)) == sum(vision.token_counts())
    if images:
        assert torch.equal(vision.grid_thw, torch.as_tensor(ref["image_grid_thw"]))
        assert torch.equal(vision.pixel_values, torch.as_tensor(np.asarray(ref["pixel_values"])))


def _frames(count, height, width):
    return np.random.default_rng(count).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("keep_outer", [False, True], ids=["qwen format", "transformers-5 format"])
def test_video_prompt_equals_reference(reference, ours, make_image, keep_outer):
    tokenizer, template, images_proc, video_proc = ours
    image = make_image(60, 80)
    frames = _frames(5, 70, 90)
    text = "What happens in the video?"
    vision = images_proc([image])
    clip = video_proc([VideoClip([Image.fromarray(f) for f in frames], fps=2.0)])
    per_frame = int(clip.grid_thw[0, 1:].prod()) // 4
    prompt = build_prompt(tokenizer, template, text, image_tokens=vision.token_counts(),
                          videos=[(clip.timestamps[0], per_frame)], keep_outer_video_markers=keep_outer)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": text}]}]
    rendered = reference.apply_chat_template(messages, add_generation_prompt=True)
    if not keep_outer:   # the Qwen format (transformers 4.57, qwen-vl-utils): per-frame markers replace the outer
        rendered = rendered.replace(VISION_START + VIDEO_TOKEN + VISION_END, VIDEO_TOKEN)
    ref = reference(text=rendered, images=[image], videos=[frames], do_sample_frames=False,
                    video_metadata=[{"fps": 2.0, "total_num_frames": 5, "frames_indices": [0, 1, 2, 3, 4]}])
    assert prompt.input_ids == ref["input_ids"][0]
    assert torch.equal(clip.grid_thw, torch.as_tensor(ref["video_grid_thw"]))
    assert "<0.2 seconds>" in prompt.text and "<2.0 seconds>" in prompt.text
    doubled = VISION_START + "<0.2 seconds>" + VISION_START
    assert (doubled in prompt.text) is keep_outer


def test_request_processor_equals_reference(reference, demo_folder, make_image):
    request = RequestProcessor.from_folder(demo_folder)
    images = [make_image(50, 90), make_image(33, 33, seed=1)]
    frames = _frames(4, 64, 48)
    text = "Two pictures and a clip."
    out = request(text, images=images, videos=[VideoClip([Image.fromarray(f) for f in frames], fps=4.0)])
    content = [{"type": "image"}, {"type": "image"}, {"type": "video"}, {"type": "text", "text": text}]
    rendered = reference.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    rendered = rendered.replace(VISION_START + VIDEO_TOKEN + VISION_END, VIDEO_TOKEN)
    ref = reference(text=rendered, images=images, videos=[frames], do_sample_frames=False, return_tensors="pt",
                    video_metadata=[{"fps": 4.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}])
    assert torch.equal(out.input_ids, ref["input_ids"])
    assert torch.equal(out.mm_token_type_ids, ref["mm_token_type_ids"])
    assert torch.equal(out.images.grid_thw, ref["image_grid_thw"])
    assert torch.equal(out.images.pixel_values, ref["pixel_values"])
    assert torch.equal(out.videos.grid_thw, ref["video_grid_thw"])
    if "pixel_values_videos" in ref:      # only with torchvision, which the reference video processor needs
        assert torch.equal(out.videos.pixel_values, ref["pixel_values_videos"])
    assert request.stop_ids == [request.tokenizer.token_to_id("<|im_end|>"),
                                request.tokenizer.token_to_id("<|endoftext|>")]


def test_request_processor_text_only(demo_folder):
    out = RequestProcessor.from_folder(demo_folder)("Hello")
    assert out.images is None and out.videos is None and int(out.mm_token_type_ids.sum()) == 0
    assert out.text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_expand_placeholders():
    text = f"a{VISION_START}{IMAGE_TOKEN}{VISION_END}b{VISION_START}{VIDEO_TOKEN}{VISION_END}c"
    out = expand_placeholders(text, [3], [([0.25, 1.25], 2)])
    assert out == (f"a{VISION_START}{IMAGE_TOKEN * 3}{VISION_END}b<0.2 seconds>{VISION_START}{VIDEO_TOKEN * 2}"
                   f"{VISION_END}<1.2 seconds>{VISION_START}{VIDEO_TOKEN * 2}{VISION_END}c")


@pytest.mark.parametrize(("images", "videos"), [([4, 4], []), ([], []), ([4], [([0.0], 1)])])
def test_placeholder_count_mismatch(images, videos):
    with pytest.raises(InputError, match="placeholder"):
        expand_placeholders(f"{VISION_START}{IMAGE_TOKEN}{VISION_END}", images, videos)


def test_user_message_order():
    assert user_message("hi", num_images=2, num_videos=1) == [{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "video"}, {"type": "text", "text": "hi"}]}]
