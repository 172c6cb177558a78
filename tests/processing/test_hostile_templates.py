"""A checkpoint's chat template is code: a hostile or broken one stops fast with one CheckpointError naming the
template file and the fix, never hangs, never exhausts memory, never leaves a thread running."""

from __future__ import annotations

import threading
import time

import pytest

from qvl_pipeline.errors import CheckpointError, InputError
from qvl_pipeline.processing import ChatTemplate, build_prompt, user_message
from qvl_pipeline.processing.demo_assets import DEMO_CHAT_TEMPLATE
from qvl_pipeline.processing.template_budget import TemplateLimits
from qvl_pipeline.processing.tokenizer import Tokenizer

WATCHDOG_S = 30.0     # far above what a stopped template takes (well under a second); only a hang reaches it


def _render(template: ChatTemplate, messages=None) -> str:
    """Render in a daemon thread so a hang fails the test instead of stalling the suite."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["text"] = template.render(user_message("hi") if messages is None else messages)
        except BaseException as exc:  # re-raised below, in the test thread
            outcome["error"] = exc
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(WATCHDOG_S)
    if worker.is_alive():
        pytest.fail(f"rendering still running after {WATCHDOG_S:.0f} s: the template hangs the process")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["text"]


def _stopped(source: str, tmp_path, **limits) -> CheckpointError:
    (tmp_path / "chat_template.jinja").write_text(source)
    template = ChatTemplate.from_folder(tmp_path, limits=TemplateLimits(**limits) if limits else None)
    threads, started = threading.active_count(), time.monotonic()
    with pytest.raises(CheckpointError) as info:
        _render(template)
    assert time.monotonic() - started < 15, "stopped, but far too late"
    assert threading.active_count() == threads, "no thread is left running"
    err = info.value
    assert str(tmp_path / "chat_template.jinja") in err.message, "the error names the template file"
    assert err.hint
    return err


@pytest.mark.parametrize("source", [
    "{% for a in range(10**6) %}{% for b in range(10**6) %}x{% endfor %}{% endfor %}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",   # under Jinja's range cap
    "{% for a in range(99999) %}{% for b in range(99999) %}{% for c in range(99999) %}{{ c }}{% endfor %}"
    "{% endfor %}{% endfor %}",
    "{% for x in [1] recursive %}{{ loop(range(99999)) }}{% endfor %}",
    "{% macro f(n) %}{% for i in range(50) %}{{ f(n) }}{% endfor %}{% endmacro %}{{ f(0) }}",
], ids=["range 10**6 nested", "range 10**5 nested", "three deep", "recursive loop", "macro fan-out"])
def test_endless_loops_are_stopped(source, tmp_path):
    err = _stopped(source, tmp_path)
    assert "stopped" in err.message or "recursed" in err.message or "range" in err.message


@pytest.mark.parametrize("source", [
    "{{ 'x' * 10**10 }}",
    "{{ ['x'] * 10**10 }}",
    "{{ 'x'|center(10**10) }}",
    "{{ 'x'.ljust(10**10) }}",
    "{{ '{:10000000000}'.format(1) }}",
    "{{ '{:{}}'.format(1, 10**10) }}",
    "{{ '%10000000000d' % 1 }}",
    "{{ '%*d'|format(10**10, 1) }}",
    "{{ ('a' * 1000)|replace('a', 'b' * 100000) }}",
    "{{ ('x\n' * 100000)|indent(100000) }}",
    "{{ ('a' * 100000)|wordwrap(1, wrapstring='x' * 100000) }}",
    "{{ 2 ** (10 ** 10) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
    "{{ ns.l }}",
    "{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n }}",
    "{% set big = ['x' * 100000] * 100000 %}{{ big|join }}",
    "{% set big = ['x' * 100000] * 100000 %}{{ big|tojson }}",
    "{% set big = ['x' * 100000] * 100000 %}{{ big }}",
    "{% set big = ['x' * 100000] * 100000 %}{{ ''.join(big) }}",
    "{% set big = [['x' * 100000] * 100] * 1000 %}{{ big|sum(start=[])|length }}",
    "{% macro f(s, n) %}{{ f(s ~ s, n - 1) if n else s|length }}{% endmacro %}{{ f('x', 60) }}",
    "{% for i in range(99999) %}{% set s %}{{ 'y' * 99999 }}{% endset %}{% endfor %}",
    "{% for i in range(99999) %}{{ 'y' * 99999 }}{% endfor %}",
    "{{ lipsum(10**7) }}",
], ids=lambda s: s[:40])
def test_runaway_sizes_are_refused_before_allocating(source, tmp_path):
    _stopped(source, tmp_path)


@pytest.mark.parametrize(("source", "words"), [
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply"),
    ("{{ 10.0 ** 400 }}", "OverflowError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ '%d' % 'x' }}", "TypeError"),
    ("{{ undefined_function() }}", "undefined"),
    ("{{ 'x'.translate({120: 'y' * 1000}) }}", "unsafe"),
    ("{{ 'x'.encode() }}", "unsafe"),
])
def test_errors_inside_a_template_are_one_clear_error(source, words, tmp_path):
    assert words in _stopped(source, tmp_path).message


def test_time_limit_backs_up_the_counts(tmp_path):
    slow = "{% for a in range(99999) %}{{ (range(99999)|list|sort)|length }}{% endfor %}"
    err = _stopped(slow, tmp_path, max_seconds=0.5, max_steps=10**9, max_chars=10**9)
    assert "seconds" in err.message


def test_deeply_nested_template_source(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{{ " + "(" * 20000 + "1" + ")" * 20000 + " }}")
    with pytest.raises(CheckpointError) as info:
        ChatTemplate.from_folder(tmp_path)
    assert str(tmp_path / "chat_template.jinja") in info.value.message and "does not compile" in info.value.message


def test_template_file_that_is_not_utf8(tmp_path):
    (tmp_path / "chat_template.jinja").write_bytes(b"\xff\xfe<|im_start|>{{ messages }}")
    with pytest.raises(CheckpointError) as info:
        ChatTemplate.from_folder(tmp_path)
    err = info.value
    assert str(tmp_path / "chat_template.jinja") in err.message and "UTF-8" in err.message and err.hint


@pytest.mark.parametrize("name", ["chat_template.json", "tokenizer_config.json"])
def test_template_json_that_is_not_utf8_or_nested_too_deeply(tmp_path, name):
    (tmp_path / name).write_bytes(b'{"chat_template": "\xff"}')
    with pytest.raises(CheckpointError, match="UTF-8"):
        ChatTemplate.from_folder(tmp_path)
    (tmp_path / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        ChatTemplate.from_folder(tmp_path)


def test_template_rendering_nothing(tmp_path, demo_folder):
    (tmp_path / "chat_template.jinja").write_text("{% if false %}never{% endif %}")
    tokenizer = Tokenizer.from_folder(demo_folder)
    with pytest.raises(CheckpointError) as info:
        build_prompt(tokenizer, ChatTemplate.from_folder(tmp_path), "Hello")
    assert "empty" in info.value.message and str(tmp_path / "chat_template.jinja") in info.value.message
    assert info.value.hint


def test_the_template_refusing_the_conversation_is_an_input_error(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InputError, match="roles must alternate"):
        _render(ChatTemplate.from_folder(tmp_path))


def test_real_templates_are_within_the_limits():
    long_text = "word " * 200_000                               # a long document is not refused for its size
    messages = [*user_message(long_text, num_images=2)] + [
        m for i in range(500) for m in ({"role": "user", "content": f"question {i}"},
                                        {"role": "assistant", "content": f"answer {i}"})]
    text = _render(ChatTemplate(DEMO_CHAT_TEMPLATE), messages)
    assert long_text in text and text.endswith("<|im_start|>assistant\n")


def test_limits_do_not_leak_between_renderings():
    template = ChatTemplate("{% for i in range(900) %}.{% endfor %}", limits=TemplateLimits(max_steps=1000))
    for _ in range(5):                                          # each rendering gets a fresh budget
        assert _render(template) == "." * 900
