"""Hostile checkpoint files: wrong dtypes, lying headers, pathological JSON and config.json values each give one
CheckpointError (exit code 5) naming the file, the field or tensor, and the fix, before any tensor is read."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from qvl_pipeline.checkpoint import load_checkpoint, read_config, save_checkpoint
from qvl_pipeline.checkpoint.config import read_model_config
from qvl_pipeline.errors import CheckpointError, ConfigError
from qvl_pipeline.model.config import ModelConfig, TextConfig, VisionConfig
from qvl_pipeline.processing.demo_assets import write_demo_tokenizer
from qvl_pipeline.processing.tokenizer import Tokenizer, check_special_token_ids

DEEP = "[" * 100_000 + "]" * 100_000          # RecursionError in json.loads


def _load_error(folder, module) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder, module, progress=False)
    assert info.value.hint and info.value.exit_code == 5
    return info.value


def _untouched(module) -> bool:
    return all(torch.count_nonzero(t) == 0 for t in module.state_dict().values())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.int64, torch.bool])
def test_integer_weights_for_a_floating_model(tmp_path, state, shapes, module_like, tiny_config, dtype):
    name = "model.language_model.layers.0.mlp.gate_proj.weight"
    save_checkpoint(tmp_path, {**state, name: state[name].to(dtype)}, tiny_config())
    module = module_like(shapes)
    err = _load_error(tmp_path, module)
    assert name in err.message and "floating-point" in err.message
    assert "bfloat16/float16/float32" in err.hint
    assert _untouched(module), "refused from the headers, before any tensor was read"


def test_every_mistyped_tensor_is_named(tmp_path, state, shapes, module_like, tiny_config):
    save_checkpoint(tmp_path, {n: t.to(torch.int16) for n, t in state.items()}, tiny_config())
    err = _load_error(tmp_path, module_like(shapes))
    assert "more dtype mismatches" in err.message and "I16" in err.message


def test_integer_buffer_stored_as_float(tmp_path, tiny_config):
    module = nn.Module()
    module.register_buffer("model.positions".replace(".", "_"), torch.zeros(4, dtype=torch.long))
    save_checkpoint(tmp_path, {"model_positions": torch.arange(4.0)}, tiny_config())
    err = _load_error(tmp_path, module)
    assert "model_positions" in err.message and "F32" in err.message and "int64" in err.message


def _patch_header(path, edit) -> None:
    """Rewrite a safetensors file's JSON header with `edit(header)` (data untouched)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])


@pytest.mark.parametrize(("edit", "words"), [
    (lambda h: h["w"].update(dtype="Q7"), ["'Q7'", "cannot read"]),
    (lambda h: h["w"].update(shape=[8, 8]), ["tensor w", "256"]),
    (lambda h: h["w"].update(shape=[-4, -4]), ["'w'", "shape"]),
    (lambda h: h["w"].update(data_offsets=[64, 0]), ["'w'", "byte range"]),
    (lambda h: h["w"].update(dtype=["F32"]), ["tensor w", "cannot read"]),
], ids=["unknown dtype", "too few bytes for the shape", "negative shape", "reversed offsets", "dtype not a string"])
def test_lying_header_entries(tmp_path, edit, words):
    (tmp_path / "config.json").write_text("{}")
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(path))
    _patch_header(path, edit)
    module = nn.Module()
    module.w = nn.Parameter(torch.zeros(4, 4))
    err = _load_error(tmp_path, module)
    assert path.name in err.message and all(w in err.message for w in words), err.message


def test_header_json_nested_too_deeply(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    raw = DEEP.encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert "nested too deeply" in _load_error(tmp_path, nn.Linear(1, 1)).message


@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json"])
def test_json_nested_too_deeply(tmp_path, state, shapes, module_like, tiny_config, file):
    save_checkpoint(tmp_path, state, tiny_config(), max_shard_size=1000)
    (tmp_path / file).write_text(DEEP)
    err = _load_error(tmp_path, module_like(shapes))
    assert file in err.message and "nested too deeply" in err.message


def test_config_json_that_is_not_utf8(tmp_path, state, shapes, module_like, tiny_config):
    save_checkpoint(tmp_path, state, tiny_config())
    (tmp_path / "config.json").write_bytes(b'{"model_type": "qwen3_vl\xff"}')
    err = _load_error(tmp_path, module_like(shapes))
    assert "config.json is not UTF-8 text (byte 0xff at offset 24)" in err.message


def test_config_json_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "config.json").write_bytes(b'\xef\xbb\xbf{"model_type": "qwen3_vl"}')
    assert read_config(tmp_path) == {"model_type": "qwen3_vl"}


def test_index_naming_a_shard_with_a_nul_byte(tmp_path, state, shapes, module_like, tiny_config):
    save_checkpoint(tmp_path, state, tiny_config(), max_shard_size=1000)
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["lm_head.weight"] = "model\0.safetensors"
    index.write_text(json.dumps(data))
    assert "outside the folder" in _load_error(tmp_path, module_like(shapes)).message


@pytest.mark.parametrize("text_config", [[1, 2], "big"])
def test_text_config_that_is_not_an_object(tmp_path, state, shapes, module_like, tiny_config, text_config):
    save_checkpoint(tmp_path, state, tiny_config())
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config(), "text_config": text_config}))
    assert "text_config" in _load_error(tmp_path, module_like(shapes)).message


def test_tie_word_embeddings_written_as_a_string(tmp_path, state, shapes, module_like, tiny_config):
    save_checkpoint(tmp_path, state, tiny_config())
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config(), "tie_word_embeddings": "false"}))
    err = _load_error(tmp_path, module_like(shapes))
    assert "tie_word_embeddings" in err.message and "'false'" in err.message


# ---- config.json values the model is built from -------------------------------------------------------------
def _valid_hf() -> dict:
    text = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, mrope_section=(4, 2, 2))
    vision = VisionConfig(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                          num_position_embeddings=16, deepstack_visual_indexes=(0,))
    return ModelConfig(text=text, vision=vision, image_token_id=60, video_token_id=61, vision_start_token_id=62,
                       vision_end_token_id=63).to_hf_dict()


def test_valid_config_reads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_valid_hf()))
    assert read_model_config(tmp_path).text.num_hidden_layers == 2


@pytest.mark.parametrize(("section", "key", "value", "words"), [
    ("text_config", "num_hidden_layers", "28", ["text_config.num_hidden_layers", "integer", "'28'"]),
    ("text_config", "hidden_size", [32], ["text_config.hidden_size", "integer"]),
    ("text_config", "rms_norm_eps", "1e-6", ["text_config.rms_norm_eps", "number"]),
    ("text_config", "rms_norm_eps", 0, ["rms_norm_eps=0", "positive"]),
    ("text_config", "attention_bias", "false", ["text_config.attention_bias", "true or false"]),
    ("text_config", "hidden_act", ["silu"], ["text_config.hidden_act", "string"]),
    ("text_config", "rope_parameters", [1], ["text_config.rope_parameters", "mapping"]),
    ("vision_config", "rope_parameters", [1], ["vision_config.rope_parameters", "mapping"]),
    (None, "image_token_id", "60", ["image_token_id", "integer"]),
    (None, "tie_word_embeddings", "false", ["tie_word_embeddings", "true or false"]),
    (None, "vision_config", [], ["vision_config", "mapping"]),
], ids=lambda v: str(v)[:24])
def test_config_json_value_errors_are_checkpoint_errors(tmp_path, section, key, value, words):
    hf = _valid_hf()
    (hf[section] if section else hf)[key] = value
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError) as info:
        read_model_config(tmp_path)
    err = info.value
    assert err.exit_code == 5 and str(tmp_path / "config.json") in err.message
    assert all(w in err.message for w in words), err.message
    assert "config.json" in err.hint or key in err.hint


def test_model_config_from_json_reading_errors(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="cannot be read"):
        ModelConfig.from_json(path)
    path.write_text(DEEP)
    with pytest.raises(ConfigError, match="nested too deeply"):
        ModelConfig.from_json(path)


# ---- config.json's token ids against the tokenizer --------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    ids = write_demo_tokenizer(folder)
    return Tokenizer.from_folder(folder), ids


def _ids(ids, **changes):
    values = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}
    return {**values, **changes}


def test_matching_token_ids_pass(tokenizer):
    tok, ids = tokenizer
    check_special_token_ids(tok, **_ids(ids), vocab_size=tok.vocab_size)


def test_wrong_image_token_id_is_named_at_load(tokenizer):
    tok, ids = tokenizer
    with pytest.raises(CheckpointError) as info:
        check_special_token_ids(tok, **_ids(ids, image_token_id=5, vision_end_token_id=7))
    err = info.value
    assert "image_token_id=5" in err.message and f"<|image_pad|> is {ids['<|image_pad|>']}" in err.message
    assert "vision_end_token_id=7" in err.message
    assert f"image_token_id: {ids['<|image_pad|>']}" in err.hint


def test_tokenizer_larger_than_the_embedding(tokenizer):
    tok, ids = tokenizer
    with pytest.raises(CheckpointError, match="vocab_size is 100"):
        check_special_token_ids(tok, **_ids(ids), vocab_size=100)
