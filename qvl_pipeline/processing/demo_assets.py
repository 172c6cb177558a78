"""The embedded demo model's text assets: a small byte-level BPE tokenizer with the Qwen special tokens, built
deterministically from a fixed corpus, and a Qwen-style (ChatML) chat template."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from qvl_pipeline.processing.chat_template import TEMPLATE_FILE

# Qwen's pre-tokenizer pattern (tokenizer.json of every Qwen2/2.5/3 model).
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# In Qwen's own order (ids 151643..151656 there); here they are the last ids of the demo vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
DEMO_VOCAB_SIZE = 512

_CORPUS = """\
The picture shows a red square on a white background. A blue circle sits next to a green triangle.
Describe this image. What is in the picture? There is a cat on the table, and a dog under the chair.
The sky is blue and the grass is green. The sun is yellow; the night is dark. Colours: red, green, blue,
yellow, black, white, orange, purple, brown, grey. Shapes: square, circle, triangle, line, dot, star.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 20 32 64 100 2024. How many objects are there? I count three.
The image is small. The photo was taken outside in the morning. A person is walking with an umbrella.
Question: what colour is the car? Answer: the car is red. The text says "hello world".
You are a helpful assistant. Please answer the question about the video in one sentence.
In the video, a ball rolls from the left to the right, then it stops near the wall.
It's a nice day, isn't it? We'll see. They're here, you've seen them, I'd say so, I'm sure.
"""


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2's mapping), by byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _learn_merges(corpus: str, new_tokens: int) -> list[tuple[str, str]]:
    """BPE merges until `new_tokens` distinct tokens exist: most frequent pair first, ties broken by the
    pair's text, so the result never depends on hashing or library versions."""
    words = Counter(piece for piece, _ in _pre_tokenizer().pre_tokenize_str(corpus))
    split = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    made: set[str] = set()
    while len(made) < new_tokens:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            symbols = split[word]
            for pair in pairwise(symbols):
                pairs[pair] += freq
        if not pairs:
            raise RuntimeError("demo corpus too small for the requested number of merges")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        made.add(best[0] + best[1])
        for word, symbols in split.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            split[word] = merged
    return merges


def build_demo_tokenizer() -> Tokenizer:
    """The demo tokenizer: Qwen's normaliser, pre-tokenizer and decoder over a 512-token vocabulary."""
    alphabet = _byte_alphabet()
    merges = _learn_merges(_CORPUS, DEMO_VOCAB_SIZE - len(alphabet) - len(SPECIAL_TOKENS))
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                     byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


# Qwen ChatML: optional system turn, user/assistant turns, images and videos as vision placeholders.
DEMO_CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unsupported role: ' ~ message.role) }}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.content is string %}
        {{- message.content }}
    {%- else %}
        {%- for item in message.content %}
            {%- if item.type == 'image' or 'image' in item or 'image_url' in item %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif item.type == 'video' or 'video' in item %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def _tokenizer_config(ids: dict[str, int]) -> dict[str, Any]:
    decoder = {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    return {
        "add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 4096, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }


def write_demo_tokenizer(folder: str | Path) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (and a generation_config.json if
    none exists) into `folder`; return the id of each special token."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_demo_tokenizer()
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(ids), indent=2) + "\n", encoding="utf-8")
    (out / TEMPLATE_FILE).write_text(DEMO_CHAT_TEMPLATE, encoding="utf-8")
    generation = out / "generation_config.json"
    if not generation.exists():
        config = {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": False,
                  "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}
        generation.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return ids


def write_demo_processor_configs(folder: str | Path, *, min_pixels: int = 32 * 32 * 4,
                                 max_pixels: int = 32 * 32 * 64) -> None:
    """Write Qwen3-VL-style preprocessor_config.json and video_preprocessor_config.json (patch 16, merge 2,
    temporal 2, mean = std = 0.5) with a small pixel budget suited to the demo model."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor"}
    image = {**common, "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
             "image_processor_type": "Qwen2VLImageProcessorFast"}
    video = {**common, "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels * 4},
             "video_processor_type": "Qwen3VLVideoProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n", encoding="utf-8")
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n", encoding="utf-8")
