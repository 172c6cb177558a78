"""The embedded demo: a deterministic random tiny checkpoint, bundled tokenizer and a generated image,
written once in the HF layout and then loaded through the same path as a real checkpoint."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

from qvl_pipeline.checkpoint import save_checkpoint
from qvl_pipeline.errors import CheckpointError
from qvl_pipeline.processing.demo_assets import write_demo_processor_configs, write_demo_tokenizer

DEMO_VERSION = 1
DEMO_IMAGE = "demo.png"
COMPLETE_MARK = ".complete"


def cache_root() -> Path:
    return Path(os.environ.get("QVL_CACHE_DIR", Path.home() / ".cache" / "qvl_pipeline"))


def demo_key(hf_config: Mapping[str, Any], seed: int) -> str:
    blob = json.dumps({"config": hf_config, "seed": seed, "version": DEMO_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def draw_demo_image(path: Path) -> None:
    """A 320×240 picture: sky gradient, green ground, a red house with a window, a yellow sun."""
    image = Image.new("RGB", (320, 240))
    pixels = image.load()
    for y in range(240):
        for x in range(320):
            pixels[x, y] = (90 + y // 4, 150 + y // 5, 235) if y < 160 else (40, 140 + (x + y) % 30, 60)
    draw = ImageDraw.Draw(image)
    draw.rectangle((110, 100, 210, 170), fill=(190, 40, 40))
    draw.polygon(((100, 100), (160, 55), (220, 100)), fill=(120, 60, 30))
    draw.rectangle((145, 120, 175, 145), fill=(250, 250, 210))
    draw.ellipse((250, 20, 295, 65), fill=(250, 220, 40))
    image.save(path)


def init_demo_weights(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights for every entry of `module`'s state dict: N(0, 0.02) matrices, unit norms,
    zero biases (by name, so the result does not depend on construction order)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sorted(module.state_dict().items()):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(hashlib.md5(name.encode()).hexdigest()[:8], 16))
        if name.endswith("bias"):
            value = torch.zeros(tensor.shape)
        elif tensor.dim() == 1 and "norm" in name:
            value = torch.ones(tensor.shape)
        else:
            value = torch.randn(tensor.shape, generator=gen) * 0.02
        out[name] = value.to(tensor.dtype if tensor.dtype.is_floating_point else torch.float32)
    return out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(folder: Path) -> dict[str, list[Any]]:
    """Name -> [size, sha256] of every file the demo folder was written with."""
    return {p.name: [p.stat().st_size, _digest(p)] for p in sorted(folder.iterdir())
            if p.is_file() and p.name != COMPLETE_MARK}


def demo_damage(folder: Path) -> str | None:
    """Why a cached demo folder cannot be used (a file missing, resized or changed since it was written, no or an
    unreadable completion mark), or None when it is intact."""
    try:
        recorded = json.loads((folder / COMPLETE_MARK).read_text(encoding="utf-8"))["files"]
        entries = [(str(name), int(size), str(digest)) for name, (size, digest) in recorded.items()]
    except FileNotFoundError:
        return "it has no completion mark"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "its completion mark is unreadable or from an older version"
    for name, size, digest in entries:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size or _digest(path) != digest:
            return f"{name} was changed or damaged"
    return None


def _set_aside(folder: Path, why: str) -> None:
    """Move a damaged demo folder out of the way (then delete it), so it can be rebuilt."""
    aside = folder.with_name(f"{folder.name}.damaged{os.getpid()}")
    try:
        folder.rename(aside)
    except FileNotFoundError:
        return                          # another process already moved it
    except OSError as exc:
        raise CheckpointError(f"the cached demo checkpoint {folder} is damaged ({why}) and cannot be replaced: "
                              f"{exc.strerror or exc}", f"delete {folder} to rebuild the demo") from exc
    shutil.rmtree(aside, ignore_errors=True)


def ensure_demo_checkpoint(hf_config: Mapping[str, Any], seed: int,
                           build_module: Callable[[dict[str, Any]], nn.Module]) -> Path:
    """The demo folder for this config and seed, written (atomically) on first use, and written again when the
    cached copy turns out damaged (a file missing or changed since it was written)."""
    folder = cache_root() / "demo" / demo_key(hf_config, seed)
    if folder.exists():
        why = demo_damage(folder)
        if why is None:
            return folder
        print(f"qvl-pipeline: the cached demo checkpoint {folder} is damaged ({why}); rebuilding it",
              file=sys.stderr)
        _set_aside(folder, why)
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    ids = write_demo_tokenizer(staging)
    write_demo_processor_configs(staging)
    config = copy.deepcopy(dict(hf_config))
    config.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    vocab = json.loads((staging / "tokenizer.json").read_text())
    size = len(vocab["model"]["vocab"]) + len(vocab.get("added_tokens", []))
    config["text_config"]["vocab_size"] = max(int(config["text_config"]["vocab_size"]), size)
    config.setdefault("dtype", config["text_config"].get("dtype", "float32"))
    module = build_module(config)
    save_checkpoint(staging, init_demo_weights(module, seed), config, max_shard_size="256KB")
    draw_demo_image(staging / DEMO_IMAGE)
    (staging / COMPLETE_MARK).write_text(json.dumps({"version": DEMO_VERSION, "files": _manifest(staging)}) + "\n",
                                         encoding="utf-8")
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(folder)
    except OSError:          # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
        why = demo_damage(folder)
        if why is not None:
            raise CheckpointError(f"the cached demo checkpoint {folder} is damaged ({why})",
                                  f"delete {folder} to rebuild the demo") from None
    return folder
