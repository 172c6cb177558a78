"""The quantised-weight cache: aligned safetensors I/O, atomic entries, keys that follow the source, damaged
entries ignored and rebuilt, and the kernels plugins' second start mapping the cache (never the checkpoint folder)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qvl_pipeline.cache_root import default_cache_dir
from qvl_pipeline.checkpoint import load_checkpoint, save_checkpoint
from qvl_pipeline.checkpoint.quant_cache import (
    MANIFEST_FILE,
    PAD_PREFIX,
    TENSORS_FILE,
    QuantCache,
    SourceCheckpoint,
    cache_key,
    read_mapped,
    write_aligned_safetensors,
)
from qvl_pipeline.facts import TINY_HF_CONFIG, RunFacts
from qvl_pipeline.model.config import ModelConfig
from qvl_pipeline.model.qwen3_vl import Qwen3VL
from qvl_pipeline.slots import AttentionBackend, KernelsBackend, RotaryBackend
from qvl_plugins.kernels.int4_linear import Int4Linear
from qvl_plugins.kernels.int4_weight_only import Int4WeightOnlyKernels
from qvl_plugins.kernels.int8_dynamic import Int8DynamicKernels
from qvl_plugins.kernels.int8_linear import Int8Linear
from qvl_plugins.kernels.int8_weight_only import Int8WeightOnlyKernels
from qvl_plugins.kernels.torch_native import TorchNativeKernels


def mixed_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"a.weight_int8": torch.randint(-127, 128, (5, 7), generator=gen, dtype=torch.int8),
            "a.weight_scale": torch.rand(5, generator=gen),
            "b.codes": torch.randint(0, 255, (3, 3), generator=gen, dtype=torch.uint8),
            "b.scale_zero": torch.randn(2, 3, 2, generator=gen).bfloat16(),
            "c.empty": torch.zeros(0, 4), "d.scalar": torch.tensor(3.5, dtype=torch.float64)}


# --- aligned safetensors ------------------------------------------------------------------------------------

def test_aligned_file_round_trips_and_every_tensor_is_aligned(tmp_path):
    tensors = mixed_tensors()
    path = tmp_path / "t.safetensors"
    size = write_aligned_safetensors(path, tensors, {"key": "k"})
    assert path.stat().st_size == size
    back = read_mapped(path)
    assert set(back) == set(tensors)                                  # padding entries are not returned
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
        if back[name].numel():
            assert back[name].data_ptr() % 64 == 0, name
            assert not back[name].untyped_storage().resizable()       # mapped, not copied
    with safe_open(str(path), framework="pt") as f:                   # a standard safetensors file
        assert f.metadata() == {"key": "k"} and any(k.startswith(PAD_PREFIX) for k in f.keys())


def test_reserved_names_and_unstorable_dtypes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        write_aligned_safetensors(tmp_path / "x", {f"{PAD_PREFIX}0": torch.zeros(1)})
    with pytest.raises(ValueError, match="dtype"):
        write_aligned_safetensors(tmp_path / "x", {"c": torch.zeros(1, dtype=torch.complex64)})


# --- entries ---------------------------------------------------------------------------------------------------

def expected_of(tensors):
    return {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}


def test_store_then_load_equals(tmp_path):
    cache, tensors = QuantCache(tmp_path), mixed_tensors()
    entry = cache.store("k1", tensors, {"note": "x"})
    assert entry == tmp_path / "quantized" / "k1" and sorted(p.name for p in entry.iterdir()) == sorted(
        [MANIFEST_FILE, TENSORS_FILE])
    for expected in (None, expected_of(tensors)):
        back = cache.load("k1", expected)
        assert back is not None and all(torch.equal(back[n], t) for n, t in tensors.items())
    assert cache.load("other") is None
    assert [p.name for p in (tmp_path / "quantized").iterdir()] == ["k1"]      # no temporary folder left


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "dtype"])
def test_load_refuses_an_entry_that_does_not_match_the_expectation(tmp_path, change):
    cache, tensors = QuantCache(tmp_path), mixed_tensors()
    cache.store("k", tensors)
    expected = expected_of(tensors)
    if change == "missing":
        expected["z"] = ((1,), torch.float32)
    elif change == "extra":
        del expected["a.weight_scale"]
    elif change == "shape":
        expected["a.weight_int8"] = ((7, 5), torch.int8)
    else:
        expected["a.weight_scale"] = ((5,), torch.float16)
    assert cache.load("k", expected) is None


def damage(entry: Path, how: str) -> None:
    if how == "truncated":
        with (entry / TENSORS_FILE).open("r+b") as fh:
            fh.truncate((entry / TENSORS_FILE).stat().st_size - 10)
    elif how == "no manifest":
        (entry / MANIFEST_FILE).unlink()
    elif how == "bad manifest":
        (entry / MANIFEST_FILE).write_text("{not json")
    elif how == "old version":
        manifest = json.loads((entry / MANIFEST_FILE).read_text())
        (entry / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 0}))
    elif how == "garbage header":
        data = bytearray((entry / TENSORS_FILE).read_bytes())
        data[8:16] = b"\xff" * 8
        (entry / TENSORS_FILE).write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "no manifest", "bad manifest", "old version", "garbage header"])
def test_a_damaged_entry_reads_as_absent_and_is_replaced(tmp_path, how):
    cache, tensors = QuantCache(tmp_path), mixed_tensors()
    entry = cache.store("k", tensors)
    damage(entry, how)
    assert cache.load("k") is None
    cache.store("k", tensors)
    back = cache.load("k", expected_of(tensors))
    assert back is not None and torch.equal(back["a.weight_int8"], tensors["a.weight_int8"])


def test_a_valid_entry_is_kept_and_stale_temporaries_removed(tmp_path):
    cache, tensors = QuantCache(tmp_path), mixed_tensors()
    entry = cache.store("k", tensors)
    stamp = (entry / TENSORS_FILE).stat().st_mtime_ns
    stale = tmp_path / "quantized" / ".k.crashed"
    stale.mkdir()
    (stale / TENSORS_FILE).write_bytes(b"partial")
    os.utime(stale, (0, 0))
    fresh = tmp_path / "quantized" / ".k.writing"                    # another process writing right now
    fresh.mkdir()
    assert cache.load("k") is not None
    cache.store("k", {"other": torch.zeros(2)})
    assert (entry / TENSORS_FILE).stat().st_mtime_ns == stamp         # a valid entry is never overwritten
    assert not stale.exists() and fresh.exists()


def test_store_refuses_when_the_disk_is_too_full(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(OSError, match="free"):
        QuantCache(tmp_path).store("k", mixed_tensors())
    assert not list((tmp_path / "quantized").iterdir())


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QVL_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("QVL_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "qvl_pipeline"


# --- keys ------------------------------------------------------------------------------------------------------

def random_checkpoint(folder: Path, seed: int = 0, tied: bool = False) -> dict:
    hf = {**TINY_HF_CONFIG, "tie_word_embeddings": tied}
    config = ModelConfig.from_hf_dict(hf)
    facts = RunFacts.example()
    with torch.device("meta"):
        shapes = Qwen3VL.build(config, attention=AttentionBackend(facts), rotary=RotaryBackend(facts),
                               kernels=KernelsBackend(facts)).state_dict()
    gen = torch.Generator().manual_seed(seed)
    state = {n: torch.randn(t.shape, generator=gen) * 0.1 for n, t in shapes.items()}
    save_checkpoint(folder, state, hf, max_shard_size="40KB")
    return hf


def test_key_follows_the_source_and_the_format(tmp_path):
    random_checkpoint(tmp_path / "a")
    first = SourceCheckpoint.read(tmp_path / "a")
    assert first.fingerprint == SourceCheckpoint.read(tmp_path / "a").fingerprint
    assert cache_key(first.fingerprint, "f", {"g": 32}) == cache_key(first.fingerprint, "f", {"g": 32})
    assert cache_key(first.fingerprint, "f", {"g": 32}) != cache_key(first.fingerprint, "f", {"g": 64})
    assert cache_key(first.fingerprint, "f", {"g": 32}) != cache_key(first.fingerprint, "h", {"g": 32})
    random_checkpoint(tmp_path / "a", seed=1)                         # same names and shapes, new data
    assert SourceCheckpoint.read(tmp_path / "a").fingerprint != first.fingerprint
    shard = sorted((tmp_path / "a").glob("*.safetensors"))[0]
    before = SourceCheckpoint.read(tmp_path / "a").fingerprint
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert SourceCheckpoint.read(tmp_path / "a").fingerprint != before  # touched: treated as changed


# --- the plugins' second start -----------------------------------------------------------------------------------

PLUGINS = {"int8": (Int8WeightOnlyKernels, Int8Linear), "int4": (Int4WeightOnlyKernels, Int4Linear),
           "int8_dynamic": (Int8DynamicKernels, Int8Linear)}   # the native GEMV's tiled layout
HEADS = {"int8": Int8Linear, "int4": Int4Linear, "int8_dynamic": Int8Linear}     # each plugin's default head


def load(folder: Path, hf: dict, plugin_cls, cache_dir: Path):
    """What the runtime does: the model on meta with the plugin's linears, the checkpoint, prepare."""
    example = RunFacts.example(hf_config=hf)
    facts = dataclasses.replace(example, model=dataclasses.replace(example.model, folder=folder))
    kernels = plugin_cls(facts, plugin_cls.Options(cache_dir=str(cache_dir)))
    with torch.device("meta"):
        model = Qwen3VL.build(ModelConfig.from_hf_dict(hf), attention=AttentionBackend(facts),
                              rotary=RotaryBackend(facts), kernels=kernels)
    load_checkpoint(folder, model, progress=False)
    return kernels, kernels.prepare(model)


def listing(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", sorted(PLUGINS))
def test_second_start_maps_the_cache_and_equals_the_first(tmp_path, monkeypatch, kind, tied):
    plugin_cls, layer_cls = PLUGINS[kind]
    folder, cache_dir = tmp_path / "ckpt", tmp_path / "cache"
    hf = random_checkpoint(folder, tied=tied)
    before = listing(folder)
    _, first = load(folder, hf, plugin_cls, cache_dir)
    entries = list((cache_dir / "quantized").iterdir())
    assert len(entries) == 1 and listing(folder) == before            # nothing written next to the checkpoint
    assert isinstance(first.lm_head, HEADS[kind])                      # the head, tied or not, quantised

    def no_quantising(*args, **kwargs):
        raise AssertionError("the second start quantised instead of mapping the cache")

    monkeypatch.setattr(layer_cls, "quantize", no_quantising)
    monkeypatch.setattr(Int8Linear, "quantize", no_quantising)
    _, second = load(folder, hf, plugin_cls, cache_dir)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    q_proj = second.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, layer_cls)
    assert not next(iter(q_proj.parameters())).untyped_storage().resizable()   # memory-mapped from the cache
    x = torch.randn(2, hf["text_config"]["hidden_size"])
    assert torch.equal(first.lm_head(x), second.lm_head(x))


def test_a_damaged_cache_is_rebuilt_and_a_changed_checkpoint_gets_a_new_entry(tmp_path):
    folder, cache_dir = tmp_path / "ckpt", tmp_path / "cache"
    hf = random_checkpoint(folder)
    load(folder, hf, Int8WeightOnlyKernels, cache_dir)
    (entry,) = (cache_dir / "quantized").iterdir()
    damage(entry, "truncated")
    calls = []
    original = Int8Linear.quantize.__func__

    def counting(cls, *args, **kwargs):
        calls.append(1)
        return original(cls, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Int8Linear, "quantize", classmethod(counting))
        load(folder, hf, Int8WeightOnlyKernels, cache_dir)
    assert calls and QuantCache(cache_dir).load(entry.name) is not None   # quantised again, entry whole again
    random_checkpoint(folder, seed=5)
    load(folder, hf, Int8WeightOnlyKernels, cache_dir)
    assert len(list((cache_dir / "quantized").iterdir())) == 2


def test_other_formats_do_not_share_an_entry(tmp_path):
    folder, cache_dir = tmp_path / "ckpt", tmp_path / "cache"
    hf = random_checkpoint(folder)
    load(folder, hf, Int8WeightOnlyKernels, cache_dir)
    load(folder, hf, Int4WeightOnlyKernels, cache_dir)
    _, dynamic = load(folder, hf, Int8DynamicKernels, cache_dir)       # int8 in tiles: another entry
    assert len(list((cache_dir / "quantized").iterdir())) == 3
    assert dynamic.model.language_model.layers[0].mlp.down_proj.layout == "tiles4x64"   # in=64: tiles


def test_a_self_test_in_a_run_with_a_checkpoint_neither_reads_nor_writes_the_cache(tmp_path):
    folder, cache_dir = tmp_path / "ckpt", tmp_path / "cache"
    hf = random_checkpoint(folder)
    example = RunFacts.example(hf_config=hf)
    facts = dataclasses.replace(example, model=dataclasses.replace(example.model, folder=folder))
    for cls in (Int8WeightOnlyKernels, Int4WeightOnlyKernels):
        cls(facts, cls.Options(cache_dir=str(cache_dir))).self_test(TorchNativeKernels(facts))
    assert not cache_dir.exists()


def test_caching_can_be_switched_off(tmp_path):
    folder, cache_dir = tmp_path / "ckpt", tmp_path / "cache"
    hf = random_checkpoint(folder)
    example = RunFacts.example(hf_config=hf)
    facts = dataclasses.replace(example, model=dataclasses.replace(example.model, folder=folder))
    kernels = Int8WeightOnlyKernels(facts, Int8WeightOnlyKernels.Options(cache=False, cache_dir=str(cache_dir)))
    with torch.device("meta"):
        model = Qwen3VL.build(ModelConfig.from_hf_dict(hf), attention=AttentionBackend(facts),
                              rotary=RotaryBackend(facts), kernels=kernels)
    load_checkpoint(folder, model, progress=False)
    kernels.prepare(model)
    assert not cache_dir.exists()


def test_the_writer_takes_tensors_in_layout_order_and_abort_leaves_nothing(tmp_path):
    cache, tensors = QuantCache(tmp_path), mixed_tensors()
    writer = cache.writer("k", expected_of(tensors))
    with pytest.raises(ValueError, match=r"expected a\.weight_int8"):
        writer.write("a.weight_scale", tensors["a.weight_scale"])
    writer.write("a.weight_int8", tensors["a.weight_int8"])
    with pytest.raises(ValueError, match="never written"):
        writer.commit()
    assert not list((tmp_path / "quantized").iterdir()) and cache.load("k") is None
    writer = cache.writer("k", expected_of(tensors))
    writer.write("a.weight_int8", tensors["a.weight_int8"])
    writer.abort()
    assert not list((tmp_path / "quantized").iterdir())


def test_first_start_already_runs_on_the_mapped_entry(tmp_path):
    folder, cache_dir = tmp_path / "ckpt", tmp_path / "cache"
    hf = random_checkpoint(folder)
    _, model = load(folder, hf, Int8WeightOnlyKernels, cache_dir)
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    assert not q_proj.weight_int8.untyped_storage().resizable()       # quantised weights live in the cache file


def test_an_unwritable_cache_leaves_the_model_quantised_in_memory(tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "ckpt"
    hf = random_checkpoint(folder)
    _, cached = load(folder, hf, Int8WeightOnlyKernels, tmp_path / "cache")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.warns(UserWarning, match="not cached"):
        _, fresh = load(folder, hf, Int8WeightOnlyKernels, tmp_path / "full")
    a, b = cached.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert fresh.model.language_model.layers[0].self_attn.q_proj.weight_int8.untyped_storage().resizable()
