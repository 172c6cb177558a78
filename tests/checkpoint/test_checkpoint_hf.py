"""Oracle: checkpoints written by transformers' save_pretrained load exactly, and ours load in transformers."""

from __future__ import annotations

import json

import pytest
import torch

from qvl_pipeline.checkpoint import load_checkpoint, read_config, save_checkpoint

transformers = pytest.importorskip("transformers")


def _tiny_model(tie: bool, seed: int = 0):
    config = transformers.Qwen3VLConfig(
        text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [1, 1, 2],
                                         "mrope_interleaved": True}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": 16, "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
                       "num_position_embeddings": 16, "deepstack_visual_indexes": [0]},
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return transformers.Qwen3VLForConditionalGeneration(config).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_shards_load_exactly(tmp_path, tie):
    source = _tiny_model(tie)
    source.save_pretrained(tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) >= 3
    assert ("lm_head.weight" in index["weight_map"]) is not tie

    with torch.device("meta"):
        target = transformers.Qwen3VLForConditionalGeneration(source.config)
    report = load_checkpoint(tmp_path, target, progress=False)

    assert report.files == tuple(shard_files)
    assert report.bytes == index["metadata"]["total_size"]
    assert report.dtype == torch.float32
    expected = source.state_dict()
    loaded = target.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    head, embed = target.lm_head.weight, target.model.language_model.embed_tokens.weight
    assert (head is embed) is tie


def test_save_pretrained_into_standin_module(tmp_path, module_like):
    source = _tiny_model(tie=True)
    source.save_pretrained(tmp_path, max_shard_size="60KB")
    shapes = {name: tuple(t.shape) for name, t in source.state_dict().items()}
    module = module_like(shapes)
    load_checkpoint(tmp_path, module, dtype="bfloat16", progress=False)
    for name, tensor in source.state_dict().items():
        assert torch.equal(module.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_our_writer_output_loads_in_transformers(tmp_path):
    source = _tiny_model(tie=True, seed=1)
    config = source.config.to_dict()
    save_checkpoint(tmp_path, source.state_dict(), config, max_shard_size="50KB")
    assert read_config(tmp_path)["tie_word_embeddings"] is True
    reloaded = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp_path)
    for name, tensor in source.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
