"""Request processing: images and videos → patches, chat template → prompt ids."""

from qvl_pipeline.processing.chat_template import ChatTemplate, find_chat_template, locate_chat_template
from qvl_pipeline.processing.image import ImageProcessor, VisionInputs
from qvl_pipeline.processing.image_io import DEFAULT_MAX_IMAGE_PIXELS, load_image, to_rgb
from qvl_pipeline.processing.patchify import patchify
from qvl_pipeline.processing.prompt import Prompt, build_prompt, check_prompt_text, expand_placeholders, user_message
from qvl_pipeline.processing.request import ProcessedRequest, RequestProcessor
from qvl_pipeline.processing.smart_resize import smart_resize, smart_resize_video
from qvl_pipeline.processing.stop_tokens import read_generation_config, stop_token_ids
from qvl_pipeline.processing.template_budget import TemplateLimits
from qvl_pipeline.processing.tokenizer import Tokenizer, check_special_token_ids
from qvl_pipeline.processing.video import VideoClip, VideoInputs, VideoProcessor, frame_timestamps
from qvl_pipeline.processing.vision_config import VisionPreprocessConfig, parse_vision_config, read_vision_config

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS", "ChatTemplate", "ImageProcessor", "ProcessedRequest", "Prompt", "RequestProcessor",
    "TemplateLimits", "Tokenizer", "VideoClip", "VideoInputs",
    "VideoProcessor", "VisionInputs", "VisionPreprocessConfig", "build_prompt", "check_prompt_text",
    "check_special_token_ids", "expand_placeholders", "find_chat_template", "frame_timestamps", "load_image",
    "locate_chat_template", "parse_vision_config", "patchify", "read_generation_config", "read_vision_config",
    "smart_resize", "smart_resize_video", "stop_token_ids", "to_rgb", "user_message",
]
