"""task=chat: an interactive multi-turn conversation that keeps the KV cache and image features."""

from __future__ import annotations

import sys
from pathlib import Path

from qvl_pipeline.config.schema import RootConfig
from qvl_pipeline.container import RootContainer
from qvl_pipeline.errors import InputError
from qvl_pipeline.runtime.pipeline import Conversation, Pipeline
from qvl_pipeline.tasks.generate import request_images
from qvl_pipeline.tasks.results import save_results

HELP = "type a message; '/image PATH' attaches an image to your next message; '/quit' (or end of input) ends"


def run(config: RootConfig, container: RootContainer, results_dir: Path | None = None) -> int:
    pipe = Pipeline.from_container(container)
    conversation = Conversation()
    pending = request_images(config) or pipe.demo_images()
    print(f"qvl-pipeline chat ({'demo weights' if pipe.is_demo else pipe.folder}): {HELP}", file=sys.stderr)
    turn = 0
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/image "):
            pending.append(line.removeprefix("/image ").strip())
            print(f"(attached {pending[-1]})", file=sys.stderr)
            continue
        try:
            result = pipe.chat_turn(conversation, line, pending,
                                    on_text=lambda piece: print(piece, end="", flush=True))
        except InputError as exc:             # a bad image or an over-long turn loses nothing said before
            conversation.messages = conversation.messages[:-1] if conversation.messages and \
                conversation.messages[-1]["role"] == "user" else conversation.messages
            print(f"\nqvl-pipeline: error: {exc}", file=sys.stderr)
            pending = []
            continue
        pending = []
        turn += 1
        print("", flush=True)
        print(f"(turn {turn}: {len(result['token_ids'])} tokens, {result['cached_prompt_tokens']} of "
              f"{result['prompt_tokens']} prompt tokens reused from the cache)", file=sys.stderr)
        if results_dir is not None:
            save_results(results_dir, result, name=f"turn{turn:03d}.json")
    return 0
