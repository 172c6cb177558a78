"""The generated demo checkpoint in the cache: a damaged copy is detected and rebuilt, never loaded half."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from qvl_pipeline.errors import CheckpointError
from qvl_pipeline.runtime.demo import COMPLETE_MARK, demo_damage, ensure_demo_checkpoint

HF = {"model_type": "qwen3_vl", "tie_word_embeddings": False, "text_config": {"vocab_size": 16, "dtype": "float32"}}


def _build(config: dict) -> nn.Module:
    return nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 200), nn.Linear(200, 200))   # 3 shards of 256 KB


def _demo() -> Path:
    return ensure_demo_checkpoint(HF, 0, _build)


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != COMPLETE_MARK}


@pytest.mark.parametrize("damage", ["delete shard", "truncate shard", "delete tokenizer", "edit config"])
def test_damaged_demo_is_rebuilt(damage, capsys):
    folder = _demo()
    assert len(_shards(folder)) >= 3
    original = _snapshot(folder)
    if damage == "delete shard":
        _shards(folder)[1].unlink()
    elif damage == "truncate shard":
        shard = _shards(folder)[0]
        shard.write_bytes(shard.read_bytes()[:-16])
    elif damage == "delete tokenizer":
        (folder / "tokenizer.json").unlink()
    else:
        (folder / "config.json").write_text(json.dumps({"model_type": "other"}) + " " * 400)
    assert demo_damage(folder) is not None
    assert _demo() == folder
    assert _snapshot(folder) == original and demo_damage(folder) is None
    assert "rebuilding" in capsys.readouterr().err
    assert not list(folder.parent.glob("*.damaged*")) and not list(folder.parent.glob("*.tmp*"))


@pytest.mark.parametrize("mark", [None, "ok\n", "{not json"], ids=["no mark", "old mark", "broken mark"])
def test_folder_without_a_valid_mark_is_rebuilt(mark):
    folder = _demo()
    original = _snapshot(folder)
    _shards(folder)[-1].unlink()
    if mark is None:
        (folder / COMPLETE_MARK).unlink()
    else:
        (folder / COMPLETE_MARK).write_text(mark)
    assert _demo() == folder and _snapshot(folder) == original


def test_intact_demo_is_reused(capsys):
    folder = _demo()
    stamp = (folder / COMPLETE_MARK).stat().st_mtime_ns
    assert _demo() == folder
    assert (folder / COMPLETE_MARK).stat().st_mtime_ns == stamp and "rebuilding" not in capsys.readouterr().err


def test_damaged_demo_that_cannot_be_moved(monkeypatch):
    folder = _demo()
    _shards(folder)[0].unlink()
    real_rename = Path.rename

    def refuse(self, target):
        if self == folder:
            raise PermissionError(13, "Permission denied")
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", refuse)
    with pytest.raises(CheckpointError) as info:
        _demo()
    assert str(folder) in info.value.message and "damaged" in info.value.message
    assert info.value.hint == f"delete {folder} to rebuild the demo"
