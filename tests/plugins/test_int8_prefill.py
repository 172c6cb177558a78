"""Int8 prefill: inputs above pack_max_rows rows widen the int8 weight exactly into a reused per-thread buffer and
run one native GEMM (a block of rows at a time only for huge layers). Exactness, blocks, buffer reuse, threads,
autograd."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from qvl_pipeline.slots.selftest import relative_error
from qvl_plugins.kernels import scratch
from qvl_plugins.kernels.int8_linear import Int8Linear


def layer(out_f: int = 96, in_f: int = 64, seed: int = 0, bias: bool = True) -> Int8Linear:
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(out_f, generator=gen) if bias else None
    return Int8Linear.quantize(torch.randn(out_f, in_f, generator=gen), b, pack_cpu=True, pack_max_rows=0)


def exact(mine: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """x · (q · scale)ᵀ + bias in fp32."""
    w = mine.weight_int8.float() * mine.weight_scale[:, None]
    return F.linear(x.float(), w, None if mine.bias is None else mine.bias.float())


def test_prefill_equals_the_dequantised_weights():
    mine = layer()
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    got = mine(x)
    assert got.shape == (2, 7, 96) and relative_error(got, exact(mine, x)) < 1e-6      # fp32: summation order only
    bf16 = mine(x.bfloat16())
    assert bf16.dtype == torch.bfloat16 and relative_error(bf16, exact(mine, x)) < 1e-2


def test_huge_layers_go_a_block_of_rows_at_a_time(monkeypatch):
    mine = layer()
    x = torch.randn(5, 64)
    whole = mine(x)
    monkeypatch.setattr(scratch, "MAX_ELEMENTS", 40 * 64)
    mine._select_kernel()
    assert mine._dequant_rows == 40                                             # 40 + 40 + 16 rows
    assert relative_error(mine(x), whole) < 1e-6


def test_the_widened_weight_is_reused_and_outputs_are_not():
    a, b = layer(seed=0), layer(seed=1)
    x = torch.randn(4, 64)
    ya = a(x)
    buffer = scratch.scratch((96, 64), torch.float32, torch.device("cpu")).data_ptr()
    yb = b(x)
    assert scratch.scratch((96, 64), torch.float32, torch.device("cpu")).data_ptr() == buffer
    assert torch.equal(ya, a(x)) and not torch.equal(ya, yb)                   # outputs own their memory


def test_threads_get_their_own_buffer():
    pointers = []

    def grab() -> None:
        pointers.append(scratch.scratch((8,), torch.float32, torch.device("cpu")).data_ptr())

    grab()
    thread = threading.Thread(target=grab)
    thread.start()
    thread.join()
    assert len(set(pointers)) == 2


def test_prefill_under_autograd_keeps_its_own_weights():
    mine, other = layer(seed=0, bias=False), layer(seed=1, bias=False)
    x = torch.randn(6, 64, requires_grad=True)
    y = mine(x)
    other(torch.randn(6, 64))                                                   # overwrites the scratch buffer
    y.sum().backward()
    w = mine.weight_int8.float() * mine.weight_scale[:, None]
    assert torch.allclose(x.grad, w.sum(0).expand(6, 64), rtol=1e-5, atol=1e-5)


def test_a_scratch_buffer_first_made_in_inference_mode_is_writable_outside_it():
    """The widening buffer outlives the call that made it: one made during a generation (inference mode) must
    still take writes outside it, where a later pipeline's self-tests widen weights (an inference tensor refused
    them, so a second Pipeline in the same process lost int8_weight_only to its self-test)."""
    from qvl_plugins.kernels.scratch import scratch

    with torch.inference_mode():
        scratch((3, 5), torch.float32, torch.device("cpu"), "inference-mode test").fill_(1.0)
    out = scratch((3, 5), torch.float32, torch.device("cpu"), "inference-mode test").fill_(2.0)
    assert float(out.sum()) == 30.0 and not out.is_inference()
