"""Loading checkpoints written by our writer: round trip, shards, tying, dtype, zero-copy, progress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qvl_pipeline.checkpoint import find_weight_files, load_checkpoint, parse_size, save_checkpoint


def _assert_loaded(module, state, skip=()):
    loaded = module.state_dict()
    for name, tensor in state.items():
        if name not in skip:
            assert torch.equal(loaded[name], tensor), name


def test_single_file_round_trip(tmp_path, state, shapes, module_like, tiny_config):
    files = save_checkpoint(tmp_path, state, tiny_config())
    assert [f.name for f in files] == ["config.json", "model.safetensors"]
    module = module_like(shapes)
    report = load_checkpoint(tmp_path, module, progress=False)
    _assert_loaded(module, state)
    assert report.files == ("model.safetensors",)
    assert report.tensors == len(state)
    assert report.bytes == sum(t.numel() * 4 for t in state.values())
    assert report.dtype == torch.float32 and report.tied == () and report.converted == 0


def test_sharded_round_trip_respects_max_size(tmp_path, state, shapes, module_like, tiny_config):
    files = save_checkpoint(tmp_path, state, tiny_config(), max_shard_size=600)
    shards = sorted(p for p in files if p.suffix == ".safetensors")
    assert len(shards) > 3
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    for shard in shards:   # a shard over the limit holds a single tensor larger than the limit
        info = find_weight_files(tmp_path)
        in_shard = [n for n, p in info.location.items() if p == shard]
        assert len(in_shard) == 1 or sum(info.tensors[n].nbytes for n in in_shard) <= 600
    module = module_like(shapes)
    report = load_checkpoint(tmp_path, module, progress=False)
    _assert_loaded(module, state)
    assert len(report.files) == len(shards)


def test_metadata_format_pt(tmp_path, state, tiny_config):
    save_checkpoint(tmp_path, state, tiny_config(), max_shard_size="1KB")
    for shard in find_weight_files(tmp_path).shards:
        assert shard.metadata == {"format": "pt"}


def test_tied_head_is_not_stored_and_is_tied_on_load(tmp_path, state, shapes, module_like, tiny_config):
    save_checkpoint(tmp_path, state, tiny_config(tie=True), max_shard_size=1000)
    assert "lm_head.weight" not in find_weight_files(tmp_path).location
    module = module_like(shapes)
    report = load_checkpoint(tmp_path, module, progress=False)
    assert report.tied == ("lm_head.weight",)
    assert module.lm_head.weight is module.model.language_model.embed_tokens.weight
    _assert_loaded(module, state, skip={"lm_head.weight"})


def test_dtype_from_config_and_override(tmp_path, state, shapes, module_like, tiny_config):
    save_checkpoint(tmp_path, state, tiny_config(dtype="bfloat16"))
    module = module_like(shapes)
    report = load_checkpoint(tmp_path, module, progress=False)
    assert report.dtype == torch.bfloat16 and report.converted == len(state)
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    assert torch.equal(module.model.language_model.norm.weight,
                       state["model.language_model.norm.weight"].to(torch.bfloat16))
    module = module_like(shapes)
    report = load_checkpoint(tmp_path, module, dtype="float32", progress=False)
    assert report.dtype == torch.float32 and report.converted == 0


def test_torch_dtype_spelling(tmp_path, state, shapes, module_like, tiny_config):
    save_checkpoint(tmp_path, state, tiny_config(torch_dtype="float16"))
    module = module_like(shapes)
    assert load_checkpoint(tmp_path, module, progress=False).dtype == torch.float16
    assert module.lm_head.weight.dtype == torch.float16


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see memory maps")
def test_matching_dtype_is_memory_mapped_not_copied(tmp_path, state, shapes, module_like, tiny_config):
    save_checkpoint(tmp_path, state, tiny_config())
    module = module_like(shapes)
    report = load_checkpoint(tmp_path, module, progress=False)
    assert report.converted == 0
    ranges = _mapped_ranges((tmp_path / "model.safetensors").resolve())
    assert ranges, "the shard is not memory-mapped"
    for name, param in module.named_parameters():
        assert any(lo <= param.data_ptr() < hi for lo, hi in ranges), f"{name} was copied"


def test_loads_into_meta_module(tmp_path, state, shapes, module_like, tiny_config):
    save_checkpoint(tmp_path, state, tiny_config(tie=True))
    module = module_like(shapes, device="meta")
    load_checkpoint(tmp_path, module, progress=False)
    assert not any(p.is_meta for p in module.parameters())
    _assert_loaded(module, state, skip={"lm_head.weight"})


def test_progress_bar_on_stderr_and_disable(tmp_path, state, shapes, module_like, tiny_config, capsys):
    save_checkpoint(tmp_path, state, tiny_config(), max_shard_size=1000)
    load_checkpoint(tmp_path, module_like(shapes), progress=True)
    captured = capsys.readouterr()
    assert f"loading {tmp_path.name}" in captured.err and captured.out == ""
    load_checkpoint(tmp_path, module_like(shapes), progress=False)
    assert capsys.readouterr().err == ""


def test_report_reads_well(tmp_path, state, shapes, module_like, tiny_config):
    save_checkpoint(tmp_path, state, tiny_config())
    text = str(load_checkpoint(tmp_path, module_like(shapes), progress=False))
    assert text.startswith(f"loaded {len(state)} tensors") and "float32" in text


def test_unindexed_shards_are_all_read(tmp_path, state, shapes, module_like, tiny_config):
    save_checkpoint(tmp_path, state, tiny_config(), max_shard_size=1000)
    (tmp_path / "model.safetensors.index.json").unlink()
    module = module_like(shapes)
    load_checkpoint(tmp_path, module, progress=False)
    _assert_loaded(module, state)


def test_writer_clones_shared_storage(tmp_path, shapes, module_like, tiny_config):
    base = torch.arange(32 * 8, dtype=torch.float32).reshape(32, 8)
    state = {n: torch.zeros(s) for n, s in shapes.items()}
    state["model.language_model.embed_tokens.weight"] = base
    state["lm_head.weight"] = base          # shared but untied in config: stored twice
    save_checkpoint(tmp_path, state, tiny_config(tie=False))
    module = module_like(shapes)
    load_checkpoint(tmp_path, module, progress=False)
    assert torch.equal(module.lm_head.weight, base)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("100KB") == 100_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="2GB"):
        parse_size("lots")
