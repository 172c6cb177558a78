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


class PluginRuntimeError(RuntimeError):
    """A plugin failed while running; `slot` says which chain should move on (raised by the slot guards)."""

    def __init__(self, slot: str, plugin: str, error: BaseException) -> None:
        super().__init__(f"{slot} plugin {plugin!r} failed: {type(error).__name__}: {error}")
        self.slot, self.plugin, self.error = slot, plugin, error
