"""A checkpoint's chat template: found in the folder, compiled and rendered inside a Jinja2 sandbox configured
as Hugging Face templates expect (trim/lstrip blocks, tojson, raise_exception, strftime_now, loop controls)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qvl_pipeline.errors import CheckpointError, InputError

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_JSON_FILE = "chat_template.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

_FIX_TEMPLATE = "restore the model's chat_template.jinja (or chat_template.json) from its repository"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})", _FIX_TEMPLATE) from exc


def _pick(value: Any, source: Path) -> str:
    """A template string from a string, or from a list of {"name", "template"} entries (the "default" one)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {e.get("name"): e.get("template") for e in value if isinstance(e, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise CheckpointError(f"{source} holds a chat_template that is neither a string nor a named list with a "
                          "'default' entry", _FIX_TEMPLATE)


def find_chat_template(folder: str | Path) -> str:
    """The template source: `chat_template.jinja`, else `chat_template.json`, else `tokenizer_config.json`."""
    base = Path(folder)
    if (base / TEMPLATE_FILE).is_file():
        return (base / TEMPLATE_FILE).read_text(encoding="utf-8")
    for name in (TEMPLATE_JSON_FILE, TOKENIZER_CONFIG_FILE):
        path = base / name
        if path.is_file():
            data = _read_json(path)
            if isinstance(data, dict) and data.get("chat_template") is not None:
                return _pick(data["chat_template"], path)
    raise CheckpointError(f"checkpoint folder {base} has no chat template ({TEMPLATE_FILE}, {TEMPLATE_JSON_FILE} "
                          f"or a chat_template entry in {TOKENIZER_CONFIG_FILE})",
                          "copy chat_template.jinja or chat_template.json from the model's repository")


class _GenerationTag(Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used to mark assistant tokens) and renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja's API)

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes (no reaching into Python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot set underscore attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _plain(value: Any) -> Any:
    """Template data rebuilt from plain JSON types; anything else becomes an inert "<TypeName>" string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):   # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def sandbox_environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment chat templates run in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


class ChatTemplate:
    """A compiled chat template. Rendering runs in the sandbox; unsafe code raises CheckpointError."""

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._template = sandbox_environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise CheckpointError(f"chat template does not compile: {exc.message} (line {exc.lineno})",
                                  _FIX_TEMPLATE) from exc

    @classmethod
    def from_folder(cls, folder: str | Path) -> ChatTemplate:
        """The template a checkpoint folder ships."""
        return cls(find_chat_template(folder))

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               **variables: Any) -> str:
        """The prompt text for `messages` (HF message format); extra variables (special tokens, tools) pass
        through to the template."""
        context = {key: _plain(value) for key, value in variables.items()}
        try:
            return self._template.render(messages=_plain(list(messages)),
                                         add_generation_prompt=add_generation_prompt, **context)
        except jinja2.exceptions.SecurityError as exc:
            raise CheckpointError(f"chat template attempted an unsafe operation and was stopped: {exc}",
                                  "use the model's original chat template; this one may be malicious") from exc
        except jinja2.exceptions.TemplateError as exc:
            raise InputError(f"chat template rejected the conversation: {exc}",
                             "change the messages to what the model's template accepts") from exc
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            raise CheckpointError(f"chat template failed while rendering: {exc!r}", _FIX_TEMPLATE) from exc
