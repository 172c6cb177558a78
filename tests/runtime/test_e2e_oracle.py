"""End to end against transformers: a tiny random checkpoint written by transformers itself (several shards)
with the bundled tokenizer, run through Pipeline; the same greedy tokens as the reference's generate."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from qvl_pipeline import Pipeline
from qvl_pipeline.processing.demo_assets import write_demo_processor_configs, write_demo_tokenizer

transformers = pytest.importorskip("transformers")

STEPS = 12


def tiny_config(ids: dict[str, int], tied: bool) -> dict:
    return {
        "model_type": "qwen3_vl", "tie_word_embeddings": tied,
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "text_config": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "initializer_range": 0.5,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                            "mrope_section": [4, 2, 2], "mrope_interleaved": True}},
        "vision_config": {"depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
                          "out_hidden_size": 64, "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 2],
                          "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "initializer_range": 0.5},
    }


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    ids = write_demo_tokenizer(folder)
    write_demo_processor_configs(folder)
    config = tiny_config(ids, request.param)
    torch.manual_seed(0)
    oracle = transformers.Qwen3VLForConditionalGeneration._from_config(
        transformers.Qwen3VLConfig(**copy.deepcopy(config)), attn_implementation="eager").eval()
    oracle.save_pretrained(folder, max_shard_size="200KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder, oracle


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    paths = []
    for i, (w, h) in enumerate([(97, 61), (45, 130)]):
        g = torch.Generator().manual_seed(i)
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        path = root / f"odd{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("count", [0, 1, 2], ids=["text-only", "one-image", "two-images"])
def test_same_greedy_tokens_as_transformers(checkpoint, pictures, count):
    folder, oracle = checkpoint
    pipe = Pipeline.from_overrides([f"model.path={folder}", "opt=minimal", "progress=false",
                                    f"generate.max_new_tokens={STEPS}"])
    pipe.load()
    images = pictures[:count]
    vision = pipe.images(images) if images else None
    from qvl_pipeline.processing.prompt import build_prompt

    prompt = build_prompt(pipe.tokenizer, pipe.template, "What is here?",
                          image_tokens=vision.token_counts() if vision else ())
    ours = pipe.generate("What is here?", images)
    assert ours["prompt_tokens"] == len(prompt.input_ids)

    kwargs = {}
    if vision is not None:
        # The reference needs the token-type row (text 0, image 1) to compute its 3-D positions.
        types = (torch.tensor([prompt.input_ids]) == pipe.model.config.image_token_id).long()
        kwargs = {"pixel_values": vision.pixel_values, "image_grid_thw": vision.grid_thw, "mm_token_type_ids": types}
    with torch.inference_mode():
        ids = torch.tensor([prompt.input_ids])
        # An explicit mask: the reference derives one from pad_token_id otherwise, which corrupts its 3-D
        # positions when the prompt happens to contain that id.
        out = oracle.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False,
                              eos_token_id=None, pad_token_id=0, **kwargs)
    reference = out[0, len(prompt.input_ids):].tolist()
    stops = set(pipe.stop_ids)
    cut = next((i + 1 for i, t in enumerate(reference) if t in stops), len(reference))
    assert ours["token_ids"] == reference[:cut]
