"""What rendering a chat template may cost: steps (loop iterations, calls, filters, operators), the size of every
value it builds and of the text it writes, and wall-clock time.

A checkpoint's chat template is code from the internet. Every place where a template can make work or memory
grow goes through one `Budget`: `for` loops count their iterations, every call, filter and arithmetic operator
is a step, and every value the template builds (literal, `~` concatenation, call/filter/operator result, output)
must stay under a size bound. Operations whose result can be much larger than their inputs (`'x' * n`,
`center(width)`, `replace`, string formatting, `join`, `tojson` of shared parts, integer powers) have their
result size estimated *before* they run. Sizes count shared parts every time they appear (a list holding the
same string a million times costs a million strings), so no value can be cheap to build and huge to print.
The checks run in the rendering thread itself: an over-budget template raises at once and leaves nothing behind.
"""

from __future__ import annotations

import contextvars
import re
import string
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.runtime import LoopContext
from jinja2.utils import _PassArg
from jinja2.visitor import NodeTransformer

# Names of the internal filters the instrumented code calls; a template cannot spell them (they hold spaces).
ITERATE_FILTER = "qvl budget iterate"
CHECK_FILTER = "qvl budget check"


@dataclass(frozen=True)
class TemplateLimits:
    """Bounds on one rendering. Both counts grow with what the template is given (4 more characters and 2 more
    steps per character of messages and variables), so a long conversation is never refused for its length."""

    max_steps: int = 1_000_000      # loop iterations + calls + filters + operators
    max_chars: int = 2_000_000      # characters (or items) of any value, and of the text written
    max_seconds: float = 10.0       # wall clock, a backstop behind the two counts above
    max_int_bits: int = 65_536      # integers the template computes (2 ** 10 ** 9 would take minutes)


class TemplateBudgetExceeded(Exception):
    """Rendering went over one of its `TemplateLimits`; the message says which."""


_CURRENT: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("qvl_template_budget", default=None)


def estimate_chars(value: Any, limit: int) -> int:
    """About how many characters `str(value)` (or tojson) produces, counting shared parts each time they occur;
    stops counting once past `limit`. Every node counts at least 1, so the walk ends even on cycles."""
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() * 3 // 10 + 2
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(item)
            stack.extend(item)
        elif isinstance(item, Mapping):
            total += 2 + 4 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, jinja2.utils.Namespace):
            attrs = object.__getattribute__(item, "_Namespace__attrs")
            total += 16 + 4 * len(attrs)
            stack.extend(attrs.values())
        else:
            total += 24
    return total


class Budget:
    """The counters of one rendering (see the module docstring); raises TemplateBudgetExceeded when one runs out."""

    def __init__(self, limits: TemplateLimits, inputs: Any = None) -> None:
        self.limits = limits
        given = estimate_chars(inputs, 2**62) if inputs is not None else 0
        self.max_steps = limits.max_steps + 2 * given
        self.max_chars = limits.max_chars + 4 * given
        self.deadline = time.monotonic() + limits.max_seconds
        self.steps = 0
        self.written = 0

    # ---- counters ----------------------------------------------------------------------------------------
    def step(self, count: int = 1) -> None:
        """Count `count` steps and check the clock."""
        self.steps += count
        if self.steps > self.max_steps:
            raise TemplateBudgetExceeded(f"more than {self.max_steps:,} steps (loop iterations, calls and "
                                         "operations)")
        if time.monotonic() > self.deadline:
            raise TemplateBudgetExceeded(f"more than {self.limits.max_seconds:g} seconds")

    def allow(self, size: int, what: str) -> None:
        """Refuse an operation whose result would be `size` characters or items."""
        if size > self.max_chars:
            raise TemplateBudgetExceeded(f"{what} of about {size:,} characters, over the limit of "
                                         f"{self.max_chars:,}")

    def check(self, value: Any, what: str = "a value") -> Any:
        """`value` if its size (and, for an int, its bit length) is within bounds."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > self.limits.max_int_bits:
                raise TemplateBudgetExceeded(f"an integer of {value.bit_length():,} bits, over the limit of "
                                             f"{self.limits.max_int_bits:,}")
            return value
        if isinstance(value, (str, list, tuple, set, frozenset, Mapping, jinja2.utils.Namespace)):
            self.allow(estimate_chars(value, self.max_chars), what)
        return value

    def write(self, value: Any) -> Any:
        """Count text written by `{{ ... }}` (also into `{% set %}` blocks and macro bodies)."""
        self.step()
        self.written += estimate_chars(value, self.max_chars)
        if self.written > self.max_chars:
            raise TemplateBudgetExceeded(f"more than {self.max_chars:,} characters of output")
        return value

    def output(self, chunks: Iterable[str]) -> str:
        """The rendered text, collected chunk by chunk with its length bounded."""
        parts, length = [], 0
        for chunk in chunks:
            length += len(chunk)
            if length > self.max_chars:
                raise TemplateBudgetExceeded(f"more than {self.max_chars:,} characters of output")
            parts.append(chunk)
        return "".join(parts)

    def iterate(self, iterable: Any) -> Iterator[Any]:
        """`iterable`, one step per item."""
        for item in iterable:
            self.step()
            yield item

    def range(self, *args: int) -> range:
        """`range()` whose length must fit in the steps left."""
        self.step()
        numbers = range(*args)
        left = self.max_steps - self.steps
        try:
            length = len(numbers)
        except OverflowError:
            length = left + 1
        if length > left:
            raise TemplateBudgetExceeded(f"range() of {length:,} items, more than the {left:,} steps left")
        return numbers


def current_budget() -> Budget:
    """The budget of the rendering in progress; outside one, nothing may run (so nothing is folded at compile
    time either)."""
    budget = _CURRENT.get()
    if budget is None:
        raise TemplateBudgetExceeded("template code ran outside a budgeted rendering")
    return budget


@contextmanager
def budget_scope(budget: Budget) -> Iterator[Budget]:
    """`with budget_scope(budget):` makes `budget` the current one."""
    token = _CURRENT.set(budget)
    try:
        yield budget
    finally:
        _CURRENT.reset(token)


# ---- result-size estimates of the operations that can amplify ------------------------------------------------
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


def _int_args(values: Iterable[Any]) -> int:
    return sum(abs(v) for v in values if isinstance(v, int) and not isinstance(v, bool))


def _arguments(args: Any) -> list[Any]:
    if isinstance(args, Mapping):
        return list(args.values())
    return list(args) if isinstance(args, tuple) else [args]


def percent_size(fmt: str, args: Any, limit: int) -> int:
    """Result size of `fmt % args`: the text, the arguments and every width/precision in the conversion specs."""
    values = _arguments(args)
    size = len(fmt) + sum(estimate_chars(v, limit) for v in values)
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for number in (width, precision):
            if number == "*":
                return size + _int_args(values)
            size += int(number) if number else 0
    return size


def format_size(fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], limit: int) -> int:
    """Result size of `fmt.format(*args, **kwargs)`, widths and precisions included."""
    values = [*args, *kwargs.values()]
    size = len(fmt) + sum(estimate_chars(v, limit) for v in values)
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return size                 # the call itself will raise
    for _, _, spec, _ in fields:
        if not spec:
            continue
        if "{" in spec:             # a width taken from the arguments
            return size + _int_args(values)
        size += sum(int(n) for n in re.findall(r"\d+", spec))
    return size


def _replace_size(text: str, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(old, str) and isinstance(new, str)):
        return len(text)
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * len(new)


def _width(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _materialise(value: Any) -> Any:
    """Generators (from map/select filters) become lists, so their items can be sized and then used."""
    return value if isinstance(value, (str, list, tuple, Mapping)) else list(value)


def _items_size(items: Any, sep: Any, limit: int) -> int:
    sep_len = len(sep) if isinstance(sep, str) else estimate_chars(sep, limit)
    return sum(estimate_chars(i, limit) for i in items) + sep_len * len(items)


# Cheap methods of built-in types a template may call; anything else (translate, encode, to_bytes, ...) is
# refused, so no built-in method runs whose cost is not known here.
_CHEAP_METHODS: dict[type, frozenset[str]] = {
    str: frozenset({
        "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha", "isascii",
        "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric", "isprintable", "isspace", "istitle",
        "isupper", "lower", "lstrip", "partition", "removeprefix", "removesuffix", "rfind", "rindex", "rpartition",
        "rsplit", "rstrip", "split", "splitlines", "startswith", "strip", "swapcase", "title", "upper"}),
    list: frozenset({"count", "index", "copy"}),
    tuple: frozenset({"count", "index"}),
    dict: frozenset({"get", "items", "keys", "values", "copy"}),
    int: frozenset({"bit_length"}),
    float: frozenset({"is_integer"}),
}


def _str_method_size(text: str, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any],
                     limit: int) -> int | None:
    """Result size of the amplifying str methods, None for any other name."""
    if name in ("center", "ljust", "rjust", "zfill"):
        return max(len(text), _width(args[0] if args else kwargs.get("width", 0)))
    if name == "expandtabs":
        return len(text) + text.count("\t") * _width(args[0] if args else kwargs.get("tabsize", 8))
    if name == "replace":
        return _replace_size(text, *args[:3])
    if name == "join":
        return 0                    # sized after materialising (see Budget.precall)
    return None


def precall(budget: Budget, func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """Check a call the template makes before it runs; returns the arguments to call with."""
    target = getattr(func, "__wrapped__", func)      # the sandbox's str.format wrapper keeps the method here
    owner = getattr(target, "__self__", None)
    if isinstance(func, LoopContext) and args:      # `loop(children)` of a recursive loop
        return (budget.iterate(args[0]), *args[1:])
    if not isinstance(target, types.BuiltinMethodType) or owner is None or isinstance(owner, types.ModuleType):
        return args
    name = target.__name__
    kind = next((t for t in _CHEAP_METHODS if isinstance(owner, t)), None)
    if kind is not None and name in _CHEAP_METHODS[kind]:
        return args
    if isinstance(owner, str):
        if name in ("format", "format_map"):
            mapping = args[0] if name == "format_map" and args and isinstance(args[0], Mapping) else {}
            budget.allow(format_size(owner, args if name == "format" else (), {**mapping, **kwargs},
                                     budget.max_chars), f"{name}()")
            return args
        if name == "join" and args:
            items = _materialise(args[0])
            budget.allow(_items_size(items, owner, budget.max_chars), "join()")
            return (items, *args[1:])
        size = _str_method_size(owner, name, args, kwargs, budget.max_chars)
        if size is not None:
            budget.allow(size, f"str.{name}()")
            return args
    raise jinja2.exceptions.SecurityError(f"templates may not call {type(owner).__name__}.{name}()")


def check_binop(budget: Budget, operator: str, left: Any, right: Any) -> None:
    """Refuse `left <operator> right` when its result would be over the bounds."""
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                budget.allow(estimate_chars(seq, budget.max_chars) * max(times, 0), "a repetition ('x' * n)")
                return
        if isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length()
            if bits > budget.limits.max_int_bits:
                raise TemplateBudgetExceeded(f"an integer product of about {bits:,} bits")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        bits = max(left.bit_length() - 1, 0) * right if abs(left) > 1 else 0
        if bits > budget.limits.max_int_bits:
            raise TemplateBudgetExceeded(f"an integer power of about {bits:,} bits")
    elif operator == "%" and isinstance(left, str):
        budget.allow(percent_size(left, right, budget.max_chars), "a %-formatting")


# ---- filters -------------------------------------------------------------------------------------------------
def _filter_size(name: str, value: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any],
                 limit: int) -> tuple[int | None, Any]:
    """(estimated result size or None, the value to filter) for the filters that can amplify."""
    text = value if isinstance(value, str) else None
    if name == "center" and text is not None:
        return max(len(text), _width(args[0] if args else kwargs.get("width", 80))), value
    if name == "indent" and text is not None:
        width = args[0] if args else kwargs.get("width", 4)
        return len(text) + (text.count("\n") + 1) * _width(width), value
    if name == "wordwrap" and text is not None:
        width = args[0] if args else kwargs.get("width", 79)
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring") or "\n"
        return len(text) + (len(text) // max(_width(width), 1) + 1) * _width(wrap), value
    if name == "replace" and text is not None:
        return _replace_size(text, *args[:3]), value
    if name == "format" and text is not None:
        return percent_size(text, kwargs or args, limit), value
    if name in ("join", "sum"):
        items = _materialise(value)
        sep = (args[0] if args else kwargs.get("d", "")) if name == "join" else kwargs.get("start", 0)
        return _items_size(items, sep, limit), items
    if name in ("batch", "slice"):
        count = args[0] if args else kwargs.get("linecount", kwargs.get("slices", 0))
        return _width(count) + estimate_chars(value, limit), value
    if name in ("tojson", "pprint", "string"):
        indent = args[1] if len(args) > 1 else kwargs.get("indent")
        separators = kwargs.get("separators") or ()
        factor = 2 + _width(indent) + sum(_width(s) for s in separators if isinstance(s, str))
        return estimate_chars(value, limit) * factor, value
    return None, value


def budgeted_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` as a filter that counts a step, sizes amplifying calls first and checks its result."""
    passes = _PassArg.from_obj(func)

    @jinja2.pass_context
    @wraps(func)
    def run(context: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = current_budget()
        budget.step()
        size, value = _filter_size(name, value, args, kwargs, budget.max_chars)
        if size is not None:
            budget.allow(size, f"the {name} filter")
        lead = {_PassArg.context: (context,), _PassArg.eval_context: (context.eval_ctx,),
                _PassArg.environment: (context.environment,)}.get(passes, ())
        return budget.check(func(*lead, value, *args, **kwargs), f"the result of the {name} filter")

    return run


@jinja2.pass_context
def iterate_filter(context: Any, iterable: Any) -> Iterator[Any]:
    """The iterable of a `for` loop, one step per item."""
    return current_budget().iterate(iterable)


@jinja2.pass_context
def check_filter(context: Any, value: Any) -> Any:
    """A value the template built (a literal, a `~` concatenation), checked for size."""
    budget = current_budget()
    budget.step()
    return budget.check(value, "a value built by the template")


@jinja2.pass_context
def write_finalize(context: Any, value: Any) -> Any:
    """Every `{{ ... }}` output passes here (the environment's finalize)."""
    return current_budget().write(value)


class Instrument(NodeTransformer):
    """Rewrites a parsed template so loops count their items and built values are size-checked."""

    def _wrap(self, node: nodes.Expr, name: str) -> nodes.Filter:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self._wrap(node.iter, ITERATE_FILTER)
        return node

    def _checked(self, node: nodes.Expr) -> nodes.Node:
        self.generic_visit(node)
        return self._wrap(node, CHECK_FILTER)

    visit_Concat = visit_List = visit_Dict = _checked

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        return self._checked(node) if node.ctx == "load" else self.generic_visit(node)
