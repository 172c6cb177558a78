"""CachedRotary: bit-equal tables and rotation vs ReferenceRotary, table caching and growth, self-test, faults."""

from __future__ import annotations

import pytest
import torch

from qvl_pipeline.slots.base import NoOptions, SelfTestError
from qvl_plugins.rotary.cached import CachedRotary
from qvl_plugins.rotary.reference import ReferenceRotary
from tests.conftest import AMPERE, make_facts

FACTS = make_facts()
REF = ReferenceRotary(FACTS)
SECTION = (24, 20, 20)
TEXT_INV = 1.0 / (5e6 ** (torch.arange(0, 128, 2).float() / 128))     # Qwen3-VL decoder: head_dim 128
VISION_INV = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))   # vision: head_dim 64 -> 16 per axis


@pytest.mark.parametrize("top", [1, 200, 5000, 70000])
def test_text_tables_bit_equal(top):
    gen = torch.Generator().manual_seed(top)
    pos = torch.randint(0, top, (3, 2, 33), generator=gen)
    rotary = CachedRotary(FACTS)
    got, want = rotary.text_tables(pos, TEXT_INV, SECTION), REF.text_tables(pos, TEXT_INV, SECTION)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape == (2, 33, 128) and g.dtype == torch.float32
        assert torch.equal(g, w)                          # measured: bit-equal (max |diff| 0)


def test_decode_steps_bit_equal_while_the_table_grows():
    rotary = CachedRotary(FACTS)
    for p in [*range(0, 300, 13), 511, 512, 1025]:
        pos = torch.full((3, 1, 1), p)
        for g, w in zip(rotary.text_tables(pos, TEXT_INV, SECTION), REF.text_tables(pos, TEXT_INV, SECTION),
                        strict=True):
            assert torch.equal(g, w), p


def test_vision_tables_bit_equal():
    pos = torch.randint(0, 48, (300, 2), generator=torch.Generator().manual_seed(2))
    for g, w in zip(CachedRotary(FACTS).vision_tables(pos, VISION_INV), REF.vision_tables(pos, VISION_INV),
                    strict=True):
        assert g.shape == w.shape == (300, 64)
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("upcast", [True, False])
def test_apply_equals_reference(dtype, upcast):
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 6, 128, generator=gen).to(dtype), torch.randn(1, 2, 6, 128, generator=gen).to(dtype)
    cos, sin = REF.text_tables(torch.arange(6).expand(3, 1, 6), TEXT_INV, SECTION)
    got = CachedRotary(FACTS).apply(q, k, cos[:, None], sin[:, None], upcast=upcast)
    want = REF.apply(q, k, cos[:, None], sin[:, None], upcast=upcast)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and torch.equal(g, w)


def test_tables_are_built_once_per_inv_freq_and_grow_by_doubling():
    rotary = CachedRotary(FACTS)
    rotary.text_tables(torch.zeros(3, 1, 4, dtype=torch.long), TEXT_INV, SECTION)
    (table,) = rotary._tables
    assert table.cos.shape == (256, 64)                    # MIN_POSITIONS
    rotary.text_tables(torch.full((3, 1, 1), 255), TEXT_INV.clone(), SECTION)   # same values, new tensor
    assert len(rotary._tables) == 1 and rotary._tables[0] is table             # reused, not rebuilt
    rotary.text_tables(torch.full((3, 1, 1), 300), TEXT_INV, SECTION)
    (grown,) = rotary._tables
    assert grown.cos.shape == (512, 64)
    rotary.vision_tables(torch.zeros(2, 2, dtype=torch.long), VISION_INV)
    assert len(rotary._tables) == 2                         # one table per inv_freq
    for scale in (0.5, 0.25, 0.125, 0.0625):
        rotary.vision_tables(torch.zeros(2, 2, dtype=torch.long), VISION_INV * scale)
    assert len(rotary._tables) == 4                         # bounded


def test_in_place_change_of_inv_freq_rebuilds_the_table():
    inv = TEXT_INV.clone()
    rotary = CachedRotary(FACTS)
    pos = torch.arange(5).expand(3, 1, 5)
    rotary.text_tables(pos, inv, SECTION)
    inv.mul_(0.5)
    for g, w in zip(rotary.text_tables(pos, inv, SECTION), REF.text_tables(pos, inv, SECTION), strict=True):
        assert torch.equal(g, w)


def test_self_test_passes_and_validate_is_empty():
    CachedRotary(FACTS).self_test(REF)
    for facts in (FACTS, make_facts(gpu=AMPERE, stored_dtype="bfloat16")):
        assert CachedRotary.validate(facts, NoOptions()) == []
        assert ReferenceRotary.validate(facts, NoOptions()) == []


class OffByOneRotary(CachedRotary):
    """A plausible bug: rows gathered at position + 1."""

    def _rows(self, positions, inv_freq):
        return super()._rows(positions + 1, inv_freq)


class StaleTableRotary(CachedRotary):
    """A plausible bug: the table never grows, so large positions are clamped to its last row."""

    def _rows(self, positions, inv_freq):
        return super()._rows(positions.clamp(max=255), inv_freq)


@pytest.mark.parametrize("faulty", [OffByOneRotary, StaleTableRotary])
def test_faulty_rotary_fails_self_test(faulty):
    with pytest.raises(SelfTestError, match="relative error"):
        faulty(FACTS).self_test(REF)


# --- NativeRotary: the rotation in one native call ------------------------------------------------------------------

def _native_rotary():
    from qvl_plugins.rotary.native import NativeRotary

    if NativeRotary.validate(FACTS, NoOptions()):
        pytest.skip(f"no native library here: {NativeRotary.validate(FACTS, NoOptions())}")
    return NativeRotary(FACTS)


def _counting_native_calls(monkeypatch) -> list[int]:
    from qvl_plugins.rotary import native

    calls: list[int] = []
    real = native.rope
    monkeypatch.setattr(native, "rope", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("upcast", [True, False])
@pytest.mark.parametrize(("batch", "positions"), [(1, 1), (1, 37), (2, 1)])   # decode, prefill, batch 2 (torch)
@pytest.mark.parametrize("table_dtype", ["activations", "fp32"])
def test_native_apply_is_bit_equal_to_the_reference(monkeypatch, dtype, upcast, batch, positions, table_dtype):
    calls = _counting_native_calls(monkeypatch)
    gen = torch.Generator().manual_seed(4)
    # the decoder's layout: [b, s, h, d] projections viewed as [b, h, s, d]
    q = torch.randn(batch, positions, 4, 128, generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(batch, positions, 2, 128, generator=gen).to(dtype).transpose(1, 2)
    pos = torch.randint(0, 900, (3, batch, positions), generator=gen)
    cos, sin = (t.to(dtype if table_dtype == "activations" else torch.float32)[:, None]
                for t in REF.text_tables(pos, TEXT_INV, SECTION))
    got = _native_rotary().apply(q, k, cos, sin, upcast=upcast)
    want = REF.apply(q, k, cos, sin, upcast=upcast)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and g.shape == w.shape and torch.equal(g, w)
    work = torch.float32 if upcast else dtype
    assert len(calls) == (batch == 1 and cos.dtype == work)           # where the tables are in the working dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_vision_rotation_is_bit_equal_to_the_reference(monkeypatch, dtype):
    """The vision tower's call: q, k [patches, heads, d] strided views of the fused qkv projection, fp32 tables
    [patches, 1, d], upcast: one native call, the same bits as the reference's fp32 copies."""
    calls = _counting_native_calls(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    qkv = (torch.randn(50, 3, 4, 64, generator=gen) * 3).to(dtype)
    q, k, _ = qkv.unbind(1)
    cos, sin = REF.vision_tables(torch.randint(0, 30, (50, 2), generator=gen), VISION_INV)
    cos, sin = cos[:, None], sin[:, None]
    got = _native_rotary().apply(q, k, cos, sin, upcast=True)
    want = REF.apply(q, k, cos, sin, upcast=True)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and g.shape == w.shape and torch.equal(g, w)
    assert len(calls) == 1


def test_native_rotary_is_rejected_without_the_native_library_and_the_chain_moves_on(monkeypatch):
    from qvl_pipeline.config.load import load_config
    from qvl_pipeline.container import make_container
    from qvl_plugins.kernels import native_gemv
    from qvl_plugins.rotary.native import NativeRotary

    monkeypatch.setenv(native_gemv.DISABLE_ENV, "0")
    native_gemv.load_native.cache_clear()
    try:
        assert "QVL_NATIVE_KERNELS=0" in NativeRotary.validate(FACTS, NoOptions())[0]
        plan = make_container(load_config(["hardware=cpu_avx2", "progress=false"])).pipeline().plan
        assert plan["slots"]["rotary"]["chosen"] == "cached"
    finally:
        native_gemv.load_native.cache_clear()
