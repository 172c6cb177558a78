"""Hostile input in a session, in process on the demo: a chat survives any bad line and says how to go on; a
failed turn leaves the conversation as it was; NaN/Inf weights are a clear error instead of token 0 forever."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from PIL import Image

from qvl_pipeline import Pipeline
from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.errors import InputError, QvlError
from qvl_pipeline.runtime.pipeline import Conversation
from qvl_pipeline.tasks import chat

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def containers():
    made = {}

    def get(*overrides: str):
        key = tuple(overrides)
        if key not in made:
            made[key] = make_container(load_config(["progress=false", "generate.max_new_tokens=2", *overrides]))
        return made[key]
    return get


def run_chat(container, lines: bytes, capsys, monkeypatch, results_dir=None) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    code = chat.run(container.config(), container, results_dir)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "pic.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(path)
    return path


def test_a_bad_image_fails_when_attached_and_later_turns_work(containers, capsys, monkeypatch, tmp_path):
    (tmp_path / "fake.png").write_text("no image")
    code, _, err = run_chat(containers(), f"/image {tmp_path / 'missing.png'}\n/image {tmp_path / 'fake.png'}\n"
                            "hello\nand again\n".encode(), capsys, monkeypatch)
    assert "missing.png" in err and "fake.png" in err
    assert "turn 1:" in err and "turn 2:" in err and code == 0
    assert "type another message" in err


def test_a_refused_prompt_after_an_image_does_not_poison_the_conversation(containers, capsys, monkeypatch,
                                                                           picture):
    code, _, err = run_chat(containers(), f"/image {picture}\nsee <|image_pad|> here\nhello\nmore\n".encode(),
                            capsys, monkeypatch)
    assert "attached" in err and "turn 1:" in err and "turn 2:" in err and code == 0


def test_image_without_a_path_is_a_usage_line_not_a_message(containers, capsys, monkeypatch):
    code, _, err = run_chat(containers(), b"/image\n/image   \n", capsys, monkeypatch)
    assert err.count("usage: /image PATH") == 2 and "turn 1:" not in err and code == 0


def test_a_full_context_says_reset_and_reset_is_the_way_out(containers, capsys, monkeypatch):
    code, _, err = run_chat(containers("generate.max_new_tokens=8", "generate.max_context=110"),
                            b"hello\nmore words here please\nstill more\n/reset\nagain\n", capsys, monkeypatch)
    assert "the context holds 110" in err and "/reset" in err
    assert "conversation was reset" in err and "turn 2:" in err and code == 0


def test_a_session_where_every_message_failed_exits_nonzero_and_says_so(containers, capsys, monkeypatch,
                                                                         tmp_path):
    code, _, err = run_chat(containers(), f"/image {tmp_path / 'nope.png'}\n".encode(), capsys, monkeypatch)
    assert code == InputError.exit_code and "no message of this chat succeeded" in err


def test_lines_that_are_not_utf8_or_unknown_commands_are_reported_and_the_session_goes_on(containers, capsys,
                                                                                         monkeypatch):
    code, _, err = run_chat(containers(), b"caf\xe9\n/bogus\n//slash text\n/help\n", capsys, monkeypatch)
    assert "not valid UTF-8" in err and "unknown command /bogus" in err
    assert "turn 1:" in err                                         # '//slash text' was sent as '/slash text'
    assert "/reset" in err and "Exit status" in err and code == 0   # /help


def test_each_turn_is_saved_with_the_request_it_answers(containers, capsys, monkeypatch, tmp_path):
    code, _, _ = run_chat(containers(), b"first ${HOME}\nsecond\n", capsys, monkeypatch, tmp_path)
    first = json.loads((tmp_path / "turn001.json").read_text())
    assert code == 0 and first["request"]["prompt"] == "first ${HOME}" and (tmp_path / "turn002.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_turn_leaves_the_conversation_as_it_was(containers, tmp_path):
    pipe = Pipeline.from_container(containers())
    conversation = Conversation()
    pipe.chat_turn(conversation, "hello", pipe.demo_images())
    before = (list(conversation.messages), list(conversation.images), list(conversation.cached_ids))
    with pytest.raises(QvlError):
        pipe.chat_turn(conversation, "look", [str(tmp_path / "missing.png")])
    assert (conversation.messages, conversation.images, conversation.cached_ids) == before
    assert pipe.chat_turn(conversation, "and now?")["cached_prompt_tokens"] > 0


# ---- NaN / Inf in the model ------------------------------------------------------------------------------------
@pytest.fixture
def broken():
    pipe = Pipeline.from_overrides(["progress=false", "kernels=torch_native", "generate.max_new_tokens=4"])
    with torch.no_grad():
        pipe.model.model.language_model.layers[1].input_layernorm.weight[0] = float("nan")
    return pipe


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_weights_are_a_numerics_error_naming_the_layer(broken, temperature):
    with pytest.raises(QvlError) as err:                # (was: token 0 forever, or a crash in multinomial)
        broken.generate("Describe.", temperature=temperature)
    assert "non-finite" in err.value.message and "prefill" in err.value.message
    assert "decoder layer 1 " in err.value.message
    assert type(err.value).__name__ == "NumericsError" and err.value.exit_code == 7


def test_nan_embeddings_are_named_as_the_input(broken):
    with torch.no_grad():
        broken.model.model.language_model.layers[1].input_layernorm.weight[0] = 1.0
        broken.model.model.language_model.embed_tokens.weight[:] = float("inf")
    with pytest.raises(QvlError, match="input embeddings"):
        broken.generate("Describe.")
