"""task=chat: an interactive multi-turn conversation that keeps the KV cache and image features.

A session survives any bad line: a message that fails is dropped (the conversation before it is kept) and the
error says how to go on; `/image PATH` is checked when it is typed; `/reset` is the way out of a full context.
"""

from __future__ import annotations

import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any

from qvl_pipeline.config.schema import RootConfig
from qvl_pipeline.container import RootContainer
from qvl_pipeline.errors import DEBUG_ENV, ConfigError, InputError, QvlError, describe_unexpected
from qvl_pipeline.runtime.pipeline import Conversation, Pipeline
from qvl_pipeline.tasks.generate import check_images, decode_utf8, request_images
from qvl_pipeline.tasks.results import request_record, save_results

MAX_LINE_BYTES = 1024**2          # one message; a longer line is dropped whole
INTRO = "type a message; /help lists the commands; /quit or end of input (Ctrl-D) ends"
HELP = """\
commands:
  /image PATH   attach an image to your next message (checked now: it must exist and decode)
  /reset        forget the conversation (messages, images, cache) and start a new one; the way out of a full context
  /help         this text
  /quit         end the session (so does end of input, Ctrl-D); Ctrl-C ends it at once (exit status 130)
  //text        send a message that starts with '/'
A message that fails is dropped, the conversation before it is kept: type another one.
Exit status: 0 when the session ends with /quit or end of input, unless every message (and /image) failed; then
the last failure's status (4 for bad input)."""
ON_FAILURE = ("(dropped; the conversation before it is kept: type another message, or /reset to start over (the way "
              "out of a full context); /help lists the commands)")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _read_line() -> str | None:
    """One line of standard input as text: None at end of input; raises InputError for a line that is not UTF-8
    or longer than MAX_LINE_BYTES (the whole line is consumed either way)."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:                                # a text stream (tests, embedding)
        line = sys.stdin.readline()
        return line if line else None
    raw = buffer.readline(MAX_LINE_BYTES + 1)
    if not raw:
        return None
    if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
        while raw and not raw.endswith(b"\n"):
            raw = buffer.readline(MAX_LINE_BYTES)
        raise InputError(f"that line is longer than {MAX_LINE_BYTES // 1024**2} MiB",
                         "send a shorter message")
    return decode_utf8(raw, "that line", "set your terminal to UTF-8")


def _image_path(argument: str) -> str:
    """The path of `/image ARG`: as typed, or unquoted (a path pasted with quotes or backslash-escaped spaces)."""
    path = Path(argument).expanduser()
    if not path.exists():
        try:
            words = shlex.split(argument)
        except ValueError:
            words = []
        if len(words) == 1:
            return str(Path(words[0]).expanduser())
    return str(path)


class ChatSession:
    """One chat: the conversation, the images waiting for the next message, and the tally of what failed."""

    def __init__(self, pipe: Pipeline, config: RootConfig, results_dir: Path | None) -> None:
        self.pipe, self.config, self.results_dir = pipe, config, results_dir
        self.conversation = Conversation()
        self.pending: list[str] = []
        self.turns = self.failures = 0
        self.last_code = 0

    # ---- commands --------------------------------------------------------------------------------------------
    def attach(self, path: str) -> None:
        """Check the image now (it exists and decodes, within the configured limits) and keep it for the next
        message; an InputError otherwise."""
        self.pipe.images([path])
        self.pending.append(path)

    def reset(self) -> None:
        self.conversation = Conversation()
        self.pending = []

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the session should end."""
        text = line.strip()
        if not text:
            return True
        command, _, argument = text.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/help":
            _say(HELP)
        elif command == "/reset":
            self.reset()
            _say("(the conversation was reset: a new one starts with your next message)")
        elif command == "/image":
            if not argument.strip():
                _say("usage: /image PATH (attaches an image to your next message)")
                return True
            path = _image_path(argument.strip())
            self.attach(path)
            _say(f"(attached {path}: it goes with your next message)")
        elif command.startswith("//"):
            self.send(text[1:])
        elif command.startswith("/") and command[1:].isalpha():
            _say(f"unknown command {command}: /help lists the commands (start a message with // to send '/...')")
        else:
            self.send(text)
        return True

    # ---- messages --------------------------------------------------------------------------------------------
    def send(self, text: str) -> None:
        images, self.pending = self.pending, []
        try:
            result = self.pipe.chat_turn(self.conversation, text, images,
                                         on_text=lambda piece: print(piece, end="", flush=True))
        except Exception:
            print("", flush=True)
            if images:
                _say(f"(the attached image{'s' if len(images) > 1 else ''} went with it: /image again to resend)")
            raise
        self.turns += 1
        print("", flush=True)
        _say(f"(turn {self.turns}: {len(result['token_ids'])} tokens, {result['cached_prompt_tokens']} of "
             f"{result['prompt_tokens']} prompt tokens reused from the cache)")
        if result.get("stop_reason") == "context_full":
            _say("(the context is full: the answer was cut; /reset starts a new conversation)")
        self.save(result, text, images)

    def save(self, result: dict[str, Any], text: str, images: list[str]) -> None:
        if self.results_dir is None:
            return
        try:
            save_results(self.results_dir, result, name=f"turn{self.turns:03d}.json",
                         request=request_record(self.config, text, images))
        except QvlError as exc:                       # the answer is on screen; the session goes on
            _say(f"qvl-pipeline: error: {exc}")

    def failed(self, message: str, code: int) -> None:
        self.failures += 1
        self.last_code = code
        _say(f"qvl-pipeline: error: {message}")
        _say(ON_FAILURE)

    def exit_code(self) -> int:
        """0 unless something was tried and nothing succeeded (see HELP)."""
        if self.failures and not self.turns:
            _say(f"qvl-pipeline: error: no message of this chat succeeded ({self.failures} failed)")
            return self.last_code or 1
        return 0


def run(config: RootConfig, container: RootContainer, results_dir: Path | None = None) -> int:
    if config.prompt_file:
        raise ConfigError("prompt_file is for task=generate; a chat reads its messages from standard input",
                          "drop prompt_file=..., and type (or pipe in) the messages")
    check_images(config, container)                  # image=/images= on the command line: before loading
    pipe = Pipeline.from_container(container)
    session = ChatSession(pipe, config, results_dir)
    for path in request_images(config) or pipe.demo_images():
        session.attach(path)
    _say(f"qvl-pipeline chat ({'demo weights' if pipe.is_demo else pipe.folder}): {INTRO}")
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = _read_line()
            if line is None or not session.handle(line):
                break
        except QvlError as exc:
            session.failed(str(exc), exc.exit_code)
        except (KeyboardInterrupt, BrokenPipeError, SystemExit):
            raise
        except Exception as exc:                      # a bug in one turn must not end the session
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                traceback.print_exc()
            session.failed(describe_unexpected(exc), 1)
    return session.exit_code()
