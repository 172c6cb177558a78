"""Errors a user can act on: each names the problem and the fix, and maps to a distinct exit code."""

from __future__ import annotations


class QvlError(Exception):
    """Base of every error the CLI reports without a traceback. `hint` says how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


class ConfigError(QvlError):
    """A bad override, an unknown group option, a malformed profile."""


class PluginError(QvlError):
    """An unknown plugin, an explicit plugin that cannot run here, or an exhausted fallback chain."""

    exit_code = 3


class InputError(QvlError):
    """A request the model cannot take: bad image, placeholder/feature mismatch, prompt over the context."""

    exit_code = 4


class CheckpointError(QvlError):
    """A missing, truncated or inconsistent checkpoint folder."""

    exit_code = 5


class OutputError(QvlError):
    """The results folder cannot be created or written (a file in the way, read-only, disk full)."""

    exit_code = 6


class NumericsError(QvlError):
    """The model computed NaN or Inf (broken weights, or a dtype that overflows): its output would be garbage."""

    exit_code = 7


# Exit codes of the CLI beyond the QvlErrors': an unexpected failure (a bug: the traceback with QVL_DEBUG=1),
# Ctrl-C / SIGTERM (128 + the signal's number), and a reader that closed stdout (128 + SIGPIPE).
EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_BROKEN_PIPE = 141
DEBUG_ENV = "QVL_DEBUG"


def describe_unexpected(exc: BaseException) -> str:
    """One line for an exception that is not a QvlError (a bug or an unforeseen failure), naming how to see more."""
    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > 300:
        text = text[:297] + "..."
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    return f"unexpected {type(exc).__name__}: {text}; run with {DEBUG_ENV}=1 for the traceback"


class PluginRuntimeError(RuntimeError):
    """A plugin failed while running; `slot` says which chain should move on (raised by the slot guards)."""

    def __init__(self, slot: str, plugin: str, error: BaseException) -> None:
        super().__init__(f"{slot} plugin {plugin!r} failed: {type(error).__name__}: {error}")
        self.slot, self.plugin, self.error = slot, plugin, error


class MemoryBudgetExceeded(RuntimeError):
    """A memory plugin's budget (VRAM or RAM) would be exceeded by a step. Raised while running; the runtime
    recovers from it like from a CUDA out-of-memory (a smaller GPU share, or the memory slot's next plugin)."""
