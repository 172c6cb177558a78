"""Every way a checkpoint folder can be wrong gives a CheckpointError that names the problem and a fix."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from qvl_pipeline.checkpoint import load_checkpoint, save_checkpoint
from qvl_pipeline.errors import CheckpointError, ConfigError


def _load_error(folder, module) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder, module, progress=False)
    assert info.value.hint, "every error carries a fix"
    return info.value


@pytest.fixture
def sharded(tmp_path, state, tiny_config):
    save_checkpoint(tmp_path, state, tiny_config(), max_shard_size=1000)
    assert len(_shards(tmp_path)) >= 4
    return tmp_path


def _shards(folder):
    return sorted(folder.glob("model-*.safetensors"))


def test_missing_folder(tmp_path, shapes, module_like):
    err = _load_error(tmp_path / "nope", module_like(shapes))
    assert "does not exist" in err.message and str(tmp_path / "nope") in err.message


def test_path_is_a_file(tmp_path, shapes, module_like):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    err = _load_error(tmp_path / "model.safetensors", module_like(shapes))
    assert "not a folder" in err.message


def test_missing_config(sharded, shapes, module_like):
    (sharded / "config.json").unlink()
    assert "config.json" in _load_error(sharded, module_like(shapes)).message


def test_config_not_json(sharded, shapes, module_like):
    (sharded / "config.json").write_text("{not json")
    assert "not valid JSON" in _load_error(sharded, module_like(shapes)).message


def test_config_with_bad_dtype(tmp_path, state, shapes, module_like, tiny_config):
    save_checkpoint(tmp_path, state, tiny_config(dtype="int7"))
    assert "int7" in _load_error(tmp_path, module_like(shapes)).message


def test_bad_dtype_override(sharded, shapes, module_like):
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_checkpoint(sharded, module_like(shapes), dtype="float99", progress=False)


def test_truncated_shard(sharded, shapes, module_like):
    shard = _shards(sharded)[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    err = _load_error(sharded, module_like(shapes))
    assert shard.name in err.message and "truncated" in err.message
    assert "download" in err.hint


def test_shard_cut_inside_header(sharded, shapes, module_like):
    shard = _shards(sharded)[0]
    shard.write_bytes(shard.read_bytes()[:20])
    err = _load_error(sharded, module_like(shapes))
    assert shard.name in err.message and "truncated" in err.message


def test_shard_that_is_not_safetensors(sharded, shapes, module_like):
    shard = _shards(sharded)[2]
    shard.write_bytes(b"<html>404 not found</html>" * 4)
    err = _load_error(sharded, module_like(shapes))
    assert shard.name in err.message


def test_corrupt_header_json(sharded, shapes, module_like):
    shard = _shards(sharded)[0]
    data = bytearray(shard.read_bytes())
    data[9] = ord("!")            # inside the JSON header
    shard.write_bytes(bytes(data))
    err = _load_error(sharded, module_like(shapes))
    assert "corrupt header" in err.message and shard.name in err.message


def test_deleted_shard(sharded, shapes, module_like):
    shard = _shards(sharded)[2]
    shard.unlink()
    err = _load_error(sharded, module_like(shapes))
    assert shard.name in err.message and "missing" in err.message


def test_corrupt_index(sharded, shapes, module_like):
    index = sharded / "model.safetensors.index.json"
    index.write_text(index.read_text()[:40])
    err = _load_error(sharded, module_like(shapes))
    assert "model.safetensors.index.json" in err.message and "corrupt" in err.message


def test_index_without_weight_map(sharded, shapes, module_like):
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    assert "corrupt" in _load_error(sharded, module_like(shapes)).message


def test_index_points_at_wrong_shard(sharded, shapes, module_like):
    path = sharded / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    name = "model.language_model.norm.weight"
    index["weight_map"][name] = next(f for f in sorted(set(index["weight_map"].values()))
                                     if f != index["weight_map"][name])
    path.write_text(json.dumps(index))
    err = _load_error(sharded, module_like(shapes))
    assert name in err.message


def test_missing_tensor(tmp_path, state, shapes, module_like, tiny_config):
    dropped = "model.language_model.layers.0.mlp.gate_proj.weight"
    save_checkpoint(tmp_path, {k: v for k, v in state.items() if k != dropped}, tiny_config())
    err = _load_error(tmp_path, module_like(shapes))
    assert "missing" in err.message and dropped in err.message


def test_untied_config_needs_head(tmp_path, state, shapes, module_like, tiny_config):
    save_checkpoint(tmp_path, {k: v for k, v in state.items() if k != "lm_head.weight"}, tiny_config(tie=False))
    assert "lm_head.weight" in _load_error(tmp_path, module_like(shapes)).message


def test_unexpected_tensor(tmp_path, state, shapes, module_like, tiny_config):
    extra = "model.language_model.layers.1.self_attn.q_proj.weight"
    save_checkpoint(tmp_path, {**state, extra: torch.zeros(8, 8)}, tiny_config())
    err = _load_error(tmp_path, module_like(shapes))
    assert "unexpected" in err.message and extra in err.message


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, state, shapes, module_like, tiny_config):
    name = "model.visual.blocks.0.attn.qkv.weight"
    save_checkpoint(tmp_path, {**state, name: torch.zeros(48, 8)}, tiny_config())
    module = module_like(shapes)
    err = _load_error(tmp_path, module)
    assert name in err.message and "[48, 8]" in err.message and "[24, 8]" in err.message
    # nothing was loaded: the checks run before any tensor is read
    assert all(torch.count_nonzero(p) == 0 for p in module.parameters())


class _Trap:
    """Unpickling this writes a marker file: proof that a loader ran pickle code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickled_weights_are_refused_unopened(tmp_path, shapes, module_like, tiny_config, name):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    marker = tmp_path / "unpickled"
    (tmp_path / name).write_bytes(pickle.dumps(_Trap(str(marker))))
    err = _load_error(tmp_path, module_like(shapes))
    assert name in err.message and "unpickle" in err.message
    assert "safetensors" in err.hint
    assert not marker.exists()


def test_no_weights_at_all(tmp_path, shapes, module_like, tiny_config):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    assert "no *.safetensors" in _load_error(tmp_path, module_like(shapes)).message


def test_tensor_in_two_unindexed_shards(sharded, state, shapes, module_like):
    (sharded / "model.safetensors.index.json").unlink()
    from safetensors.torch import save_file
    save_file({"lm_head.weight": state["lm_head.weight"]}, str(sharded / "extra.safetensors"))
    err = _load_error(sharded, module_like(shapes))
    assert "lm_head.weight" in err.message and "extra.safetensors" in err.message
