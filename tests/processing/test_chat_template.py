"""Chat templates: found where checkpoints keep them, rendered as transformers renders them, sandboxed."""

from __future__ import annotations

import json

import pytest

from qvl_pipeline.errors import CheckpointError, InputError
from qvl_pipeline.processing import ChatTemplate, find_chat_template, user_message
from qvl_pipeline.processing.demo_assets import DEMO_CHAT_TEMPLATE

# Exercises what Hub templates use: namespace, tojson, loop controls, raise_exception, whitespace control.
RICH_TEMPLATE = """\
{%- set ns = namespace(images=0) %}
{%- if tools %}<|im_start|>system
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{%- for message in messages %}
  {%- if message.role == 'tool' %}{% continue %}{% endif %}
  <|im_start|>{{ message.role }}
  {% if message.content is string %}{{ message.content }}{% else %}
    {%- for item in message.content %}
      {%- if item.type == 'image' %}{% set ns.images = ns.images + 1 %}Picture {{ ns.images }}: \
<|vision_start|><|image_pad|><|vision_end|>{% elif item.type == 'text' %}{{ item.text }}{% endif %}
    {%- endfor %}
  {%- endif %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CONVERSATIONS = [
    user_message("What is this?", num_images=1),
    user_message("Compare them.", num_images=2),
    user_message("Just text, with \"quotes\" and ünïcode."),
    [{"role": "system", "content": "Be brief."}, *user_message("Hi"),
     {"role": "assistant", "content": "Hello."}, *user_message("Bye")],
]


@pytest.mark.parametrize("template", [DEMO_CHAT_TEMPLATE, RICH_TEMPLATE], ids=["demo", "rich"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_renders_like_transformers(template, conversation):
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    messages = CONVERSATIONS[conversation]
    tools = [{"name": "zoom", "parameters": {"factor": "int"}}]
    for extra in ({}, {"tools": tools}):
        ours = ChatTemplate(template).render(messages, add_generation_prompt=True, **extra)
        (ref,), _ = chat_utils.render_jinja_template([messages], chat_template=template,
                                                     add_generation_prompt=True, **extra)
        assert ours == ref


def test_loop_controls_like_transformers():
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    messages = [*user_message("Hi"), {"role": "tool", "content": "skipped"}, *user_message("Bye")]
    (ref,), _ = chat_utils.render_jinja_template([messages], chat_template=RICH_TEMPLATE)
    ours = ChatTemplate(RICH_TEMPLATE).render(messages, add_generation_prompt=False)
    assert ours == ref and "skipped" not in ours


def test_demo_template_refuses_unknown_roles():
    with pytest.raises(InputError, match="Unsupported role: tool"):
        ChatTemplate(DEMO_CHAT_TEMPLATE).render([{"role": "tool", "content": "x"}])


def test_demo_template_is_qwen_chatml():
    text = ChatTemplate(DEMO_CHAT_TEMPLATE).render(user_message("Describe.", num_images=1))
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_strftime_now_and_raise_exception():
    assert ChatTemplate("{{ strftime_now('%Y') }}").render([]).isdigit()
    with pytest.raises(InputError, match="roles must alternate"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}").render([])


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch /tmp/qvl_pwned') }}",
    "{% set x = [] %}{{ x.append(1) }}",
    "{% set d = {} %}{{ d.update({'a': 1}) }}",
    "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
    "{{ namespace(_secret=1) }}",
])
def test_sandbox_escape_fails_safely(attack):
    with pytest.raises(CheckpointError) as info:
        ChatTemplate(attack).render(user_message("hi"))
    assert "unsafe" in info.value.message or "failed" in info.value.message


def test_unsafe_attribute_renders_as_nothing():
    assert ChatTemplate("[{{ messages.__class__ }}]").render(user_message("hi")) == "[]"


def test_rich_objects_reach_the_template_as_inert_strings():
    class Sneaky:
        def __str__(self) -> str:
            return "rich object"
    out = ChatTemplate("{{ messages[0].content[0].image }}").render(
        [{"role": "user", "content": [{"type": "image", "image": Sneaky()}]}])
    assert out == "<Sneaky>"


def test_syntax_error_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="does not compile"):
        ChatTemplate("{% for x in %}")


def test_generation_tag_is_accepted():
    assert ChatTemplate("{% generation %}ok{% endgeneration %}").render([]) == "ok"


def test_find_order(tmp_path):
    with pytest.raises(CheckpointError, match="no chat template"):
        find_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "C"}]}))
    assert find_chat_template(tmp_path) == "C"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "B"}))
    assert find_chat_template(tmp_path) == "B"
    (tmp_path / "chat_template.jinja").write_text("A")
    assert find_chat_template(tmp_path) == "A"
    assert ChatTemplate.from_folder(tmp_path).source == "A"


def test_bad_template_json(tmp_path):
    (tmp_path / "chat_template.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        find_chat_template(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(CheckpointError, match="neither a string"):
        find_chat_template(tmp_path)
