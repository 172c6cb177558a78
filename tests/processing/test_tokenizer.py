"""The tokenizer wrapper and the demo tokenizer: deterministic, Qwen-compatible, with stop ids."""

from __future__ import annotations

import json

import pytest

from qvl_pipeline.errors import CheckpointError
from qvl_pipeline.processing import Tokenizer, read_generation_config, stop_token_ids
from qvl_pipeline.processing.demo_assets import DEMO_VOCAB_SIZE, SPECIAL_TOKENS, write_demo_tokenizer

SAMPLES = [
    "Describe this image.",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What is it?<|im_end|>\n",
    "Héllo wörld 123 4567, it's   spaced\n\n\ttabbed  ",
    "emoji 😀 and 中文 and ¡ñ!",
    "",
]


def test_write_returns_special_ids_and_is_deterministic(tmp_path):
    first = write_demo_tokenizer(tmp_path / "a")
    second = write_demo_tokenizer(tmp_path / "b")
    assert first == second
    assert list(first) == list(SPECIAL_TOKENS)
    assert sorted(first.values()) == list(range(DEMO_VOCAB_SIZE - len(SPECIAL_TOKENS), DEMO_VOCAB_SIZE))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_wrapper_basics(demo_folder):
    tok = Tokenizer.from_folder(demo_folder)
    assert tok.vocab_size == DEMO_VOCAB_SIZE
    ids = tok.encode(SAMPLES[1])
    assert ids.count(tok.token_to_id("<|image_pad|>")) == 2
    assert tok.decode(ids, skip_special_tokens=False) == SAMPLES[1]
    assert tok.decode(tok.encode(SAMPLES[2])) == SAMPLES[2]
    assert tok.token_to_id("<|im_end|>") in tok.special_ids
    assert tok.template_variables() == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def test_decode_stream(demo_folder):
    tok = Tokenizer.from_folder(demo_folder)
    stream = tok.decode_stream()
    text = "".join(piece for i in tok.encode(SAMPLES[3]) if (piece := stream.step(tok.backend, i)) is not None)
    assert text == SAMPLES[3]


def test_unknown_token(demo_folder):
    with pytest.raises(CheckpointError, match="no token"):
        Tokenizer.from_folder(demo_folder).token_to_id("<|not_there|>")


def test_ids_equal_transformers_tokenizer(demo_folder):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(demo_folder))
    assert type(reference).__name__ == "Qwen2Tokenizer"
    ours = Tokenizer.from_folder(demo_folder)
    for text in SAMPLES:
        assert ours.encode(text) == reference(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == reference.decode(reference(text)["input_ids"],
                                                                  skip_special_tokens=True)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        Tokenizer.from_folder(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="cannot be read"):
        Tokenizer.from_folder(tmp_path)


def test_config_id_disagreeing_with_tokenizer(tmp_path):
    write_demo_tokenizer(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["added_tokens_decoder"] = {"7": {"content": "<|im_end|>", "special": True}}
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="<\\|im_end\\|>"):
        Tokenizer.from_folder(tmp_path)


def test_stop_ids_from_generation_config_and_tokenizer(tmp_path):
    ids = write_demo_tokenizer(tmp_path)
    tok = Tokenizer.from_folder(tmp_path)
    assert stop_token_ids(read_generation_config(tmp_path), tok) == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert stop_token_ids({"eos_token_id": ids["<|endoftext|>"]}, tok) == [ids["<|endoftext|>"], ids["<|im_end|>"]]
    assert stop_token_ids({}, tok) == [ids["<|im_end|>"]]


def test_no_stop_id_at_all(tmp_path):
    write_demo_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="never stop"):
        stop_token_ids({}, Tokenizer.from_folder(tmp_path))


def test_generation_config_absent_or_bad(tmp_path):
    assert read_generation_config(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"generation_config\.json"):
        read_generation_config(tmp_path)
