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

from qvl_pipeline.checkpoint.jsonfile import read_json, read_text
from qvl_pipeline.errors import CheckpointError, InputError
from qvl_pipeline.processing.template_budget import (
    CHECK_FILTER,
    ITERATE_FILTER,
    Budget,
    Instrument,
    TemplateBudgetExceeded,
    TemplateLimits,
    budget_scope,
    budgeted_filter,
    check_binop,
    check_filter,
    current_budget,
    iterate_filter,
    precall,
    write_finalize,
)

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_JSON_FILE = "chat_template.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

_FIX_TEMPLATE = "restore the model's chat_template.jinja (or chat_template.json) from its repository"


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


def locate_chat_template(folder: str | Path) -> tuple[str, Path]:
    """The template source and the file it came from: `chat_template.jinja`, else `chat_template.json`, else
    `tokenizer_config.json`."""
    base = Path(folder)
    if (base / TEMPLATE_FILE).is_file():
        return read_text(base / TEMPLATE_FILE, _FIX_TEMPLATE), base / TEMPLATE_FILE
    for name in (TEMPLATE_JSON_FILE, TOKENIZER_CONFIG_FILE):
        path = base / name
        if path.is_file():
            data = read_json(path, _FIX_TEMPLATE)
            if isinstance(data, dict) and data.get("chat_template") is not None:
                return _pick(data["chat_template"], path), path
    raise CheckpointError(f"checkpoint folder {base} has no chat template ({TEMPLATE_FILE}, {TEMPLATE_JSON_FILE} "
                          f"or a chat_template entry in {TOKENIZER_CONFIG_FILE})",
                          "copy chat_template.jinja or chat_template.json from the model's repository")


def find_chat_template(folder: str | Path) -> str:
    """The template source: `chat_template.jinja`, else `chat_template.json`, else `tokenizer_config.json`."""
    return locate_chat_template(folder)[0]


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


class TemplateRaised(jinja2.exceptions.TemplateError):
    """The template's own `raise_exception(...)`: it refuses the conversation."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


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


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every loop, call, filter, operator and output counted against the current
    `Budget` (see template_budget)."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = Instrument().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = current_budget()
        budget.step()
        check_binop(budget, operator, left, right)
        return budget.check(super().call_binop(context, operator, left, right), f"the result of {operator!r}")

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        budget = current_budget()
        budget.step()
        args = precall(budget, obj, args, kwargs)
        return budget.check(super().call(context, obj, *args, **kwargs), "the result of a call")


def _range(*args: int) -> range:
    return current_budget().range(*args)


def sandbox_environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment chat templates run in (render them inside `budget_scope`)."""
    env = _BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols],
                           finalize=write_finalize)
    env.filters["tojson"] = _tojson
    env.filters = {name: budgeted_filter(name, func) for name, func in env.filters.items()}
    env.filters[ITERATE_FILTER] = iterate_filter
    env.filters[CHECK_FILTER] = check_filter
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["range"] = _range
    env.globals.pop("lipsum", None)      # lorem-ipsum generator: no use in a chat template, output unbounded
    return env


class ChatTemplate:
    """A compiled chat template. Rendering runs in the sandbox within `limits`; a template that is unsafe,
    broken or over its limits raises CheckpointError naming `origin` (the file it came from)."""

    def __init__(self, source: str, *, origin: str | Path | None = None, limits: TemplateLimits | None = None) -> None:
        self.source = source
        self.origin = str(origin) if origin is not None else "(given as a string)"
        self.limits = limits or TemplateLimits()
        try:
            self._template = sandbox_environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise CheckpointError(f"chat template {self.origin} does not compile: {exc.message} (line {exc.lineno})",
                                  _FIX_TEMPLATE) from exc
        except (RecursionError, MemoryError, SyntaxError, ValueError, OverflowError) as exc:
            raise CheckpointError(f"chat template {self.origin} does not compile: {_describe(exc)}",
                                  _FIX_TEMPLATE) from exc

    @classmethod
    def from_folder(cls, folder: str | Path, *, limits: TemplateLimits | None = None) -> ChatTemplate:
        """The template a checkpoint folder ships."""
        source, path = locate_chat_template(folder)
        return cls(source, origin=path, limits=limits)

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               **variables: Any) -> str:
        """The prompt text for `messages` (HF message format); extra variables (special tokens, tools) pass
        through to the template."""
        context = {key: _plain(value) for key, value in variables.items()}
        conversation = _plain(list(messages))
        budget = Budget(self.limits, [conversation, context])
        where = f"chat template {self.origin}"
        try:
            with budget_scope(budget):
                return budget.output(self._template.generate(messages=conversation,
                                                             add_generation_prompt=add_generation_prompt, **context))
        except TemplateBudgetExceeded as exc:
            raise CheckpointError(f"{where} was stopped: it needed {exc}",
                                  "use the chat template from the model's repository; this one runs without "
                                  "bound (an endless loop or a runaway string)") from exc
        except jinja2.exceptions.SecurityError as exc:
            raise CheckpointError(f"{where} attempted an unsafe operation and was stopped: {exc}",
                                  "use the model's original chat template; this one may be malicious") from exc
        except TemplateRaised as exc:
            raise InputError(f"{where} rejected the conversation: {exc}",
                             "change the messages to what the model's template accepts") from exc
        except Exception as exc:  # anything else raised by template code is the template's fault
            raise CheckpointError(f"{where} failed while rendering: {_describe(exc)}", _FIX_TEMPLATE) from exc


def _describe(exc: BaseException) -> str:
    """One line for an exception raised by template code."""
    if isinstance(exc, RecursionError):
        return "it recursed too deeply (RecursionError)"
    if isinstance(exc, MemoryError):
        return "it ran out of memory (MemoryError)"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
