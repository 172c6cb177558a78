"""The context budget: a request (prompt + max_new_tokens) or a chat turn (the whole conversation + max_new_tokens)
over ContextFacts.positions is refused before any compute, naming the numbers and each way out; a chat keeps its
earlier turns and cache."""

from __future__ import annotations

import pytest

from qvl_pipeline import Pipeline
from qvl_pipeline.errors import InputError
from qvl_pipeline.facts import ContextFacts
from qvl_pipeline.runtime.pipeline import Conversation, check_context

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CONTEXT = 48


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_overrides(["progress=false", f"generate.max_context={CONTEXT}"])


@pytest.fixture
def no_compute(pipe, monkeypatch):
    """Fail the test if the model computes anything (vision, embedding, decoder)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model computed before the budget check")
    for name in ("prepare", "forward_decoder", "decode_step"):
        monkeypatch.setattr(pipe.model, name, forbidden)
    monkeypatch.setattr(pipe.caches, "create", forbidden)


def test_the_budget_check_is_pure_and_names_every_number():
    facts = ContextFacts(100, "generate.max_context=100")
    check_context(60, 40, facts, 4096, chat=False)                  # exactly full is fine
    with pytest.raises(InputError) as info:
        check_context(60, 41, facts, 4096, chat=False)
    message, hint = info.value.message, info.value.hint
    assert "needs 101 positions (60 prompt tokens + generate.max_new_tokens=41)" in message
    assert "the context holds 100 (generate.max_context=100)" in message
    assert "generate.max_new_tokens=40 fits" in hint and "generate.max_context=101" in hint
    assert "shorter prompt" in hint and "/reset" not in hint


def test_a_prompt_over_the_context_suggests_no_max_new_tokens_and_the_model_limit_is_named():
    facts = ContextFacts(100, "hardware profile x budget")
    with pytest.raises(InputError) as info:
        check_context(150, 8, facts, 4096, chat=False)
    assert "max_new_tokens=" not in info.value.hint and "generate.max_context=158" in info.value.hint
    with pytest.raises(InputError) as info:
        check_context(90, 20, facts, 104, chat=False)
    assert "generate.max_context" not in info.value.hint and "the model holds at most 104" in info.value.hint


def test_a_chat_turn_over_the_context_says_reset():
    with pytest.raises(InputError) as info:
        check_context(90, 20, ContextFacts(100, "r"), 4096, chat=True)
    assert info.value.message.startswith("this turn needs 110 positions (90 tokens of conversation")
    assert info.value.hint.startswith("/reset") and "generate.max_new_tokens=10 fits" in info.value.hint


def test_generate_over_the_budget_fails_before_any_compute(pipe, no_compute):
    prompt = len(pipe._prompt_ids("hi", None))
    over = CONTEXT - prompt + 1
    with pytest.raises(InputError, match=rf"needs {CONTEXT + 1} positions \({prompt} prompt tokens \+ "
                                         rf"generate.max_new_tokens={over}\) but the context holds {CONTEXT}"):
        pipe.generate("hi", max_new_tokens=over)


def test_generate_exactly_at_the_budget_runs(pipe):
    prompt = len(pipe._prompt_ids("hi", None))
    result = pipe.generate("hi", max_new_tokens=CONTEXT - prompt)
    assert 1 <= len(result["token_ids"]) <= CONTEXT - prompt and result["stop_reason"] != "context_full"


def test_a_chat_turn_over_the_budget_keeps_the_earlier_turns_and_their_cache(pipe):
    conversation = Conversation()
    first = pipe.chat_turn(conversation, "hi", max_new_tokens=4)
    messages, cached_ids = list(conversation.messages), list(conversation.cached_ids)
    cache, length = conversation.cache, conversation.cache.length
    with pytest.raises(InputError, match=r"this turn needs \d+ positions .* holds 48") as info:
        pipe.chat_turn(conversation, "tell me much more about it please", max_new_tokens=CONTEXT)
    assert "/reset" in info.value.hint
    assert conversation.messages == messages and conversation.cached_ids == cached_ids
    assert conversation.cache is cache and cache.length == length           # nothing was computed into it
    second = pipe.chat_turn(conversation, "ok", max_new_tokens=2)
    assert second["cached_prompt_tokens"] >= first["prompt_tokens"]          # the earlier turn is still cached
