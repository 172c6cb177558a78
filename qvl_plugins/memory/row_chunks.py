"""The output head split by output rows, so memory=ssd_stream can stream it a piece at a time (a 150k-row head is
several decoder layers' worth of bytes; whole, it would set the size of the pool).

Each output row of a linear layer is computed on its own (a dot product per vocabulary entry), so computing rows
[a, b) from the same bytes gives the same numbers. A piece is a shallow copy of the head module whose tensors with
one entry per output row are sliced (a view: the same mapped bytes); the split is checked on a few real rows before
it is used, and a head whose kernels do not split exactly is streamed whole.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

ROW_ALIGN = 64            # pieces start at multiples of this many rows (keeps 64-byte alignment of int8 rows)
CHECK_ROWS = 128          # rows per half of the exactness check
CHECK_DTYPES = (torch.float32, torch.bfloat16)


class TiedRows(nn.Module):
    """Rows of a tied head: logits = hidden · weightᵀ over some vocabulary rows of the embedding table. Like the
    unchunked head (QuantizableLinear), it computes in the table's dtype and returns the activations' (fp32
    activations meet a bf16 table without an fp32 copy of it)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)      # [rows, hidden], a view of the table
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:             # x: [..., hidden] -> [..., rows] in x's dtype
        if x.dtype == self.weight.dtype:
            return F.linear(x, self.weight)
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


class ChunkedHead(nn.Module):
    """The head as pieces of consecutive output rows; logits are their outputs side by side."""

    def __init__(self, pieces: list[nn.Module]) -> None:
        super().__init__()
        self.pieces = nn.ModuleList(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:             # x: [..., hidden] -> [..., vocab]
        return torch.cat([piece(x) for piece in self.pieces], dim=-1)


def row_slice(module: nn.Module, start: int, stop: int) -> nn.Module | None:
    """A copy of a linear-like module (one with `out_features`) computing output rows [start, stop): parameters,
    buffers and plain tensor attributes with one entry per output row are sliced (views); None when the module has
    no `out_features` or has sub-modules."""
    out = getattr(module, "out_features", None)
    if not isinstance(out, int) or any(True for _ in module.children()):
        return None
    piece = copy.copy(module)
    for key, value in list(vars(piece).items()):
        if isinstance(value, dict):                       # own parameter/buffer/hook tables, not the original's
            piece.__dict__[key] = type(value)(value)
    for table in (piece._parameters, piece._buffers):
        for name, tensor in table.items():
            if tensor is not None and tensor.dim() and tensor.shape[0] == out:
                sliced = tensor.detach()[start:stop]
                table[name] = nn.Parameter(sliced, requires_grad=False) if isinstance(tensor, nn.Parameter) \
                    else sliced
    for name, value in list(vars(piece).items()):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == out:
            piece.__dict__[name] = value[start:stop]
    piece.out_features = stop - start
    return piece


def _splits(out: int, pieces: int) -> list[tuple[int, int]]:
    step = math.ceil(math.ceil(out / pieces) / ROW_ALIGN) * ROW_ALIGN
    return [(a, min(a + step, out)) for a in range(0, out, step)]


def splits_exactly(module: nn.Module, in_features: int, seed: int = 0) -> bool:
    """Whether computing rows [0, 2r) at once equals rows [0, r) and [r, 2r) side by side, bit for bit, for one
    and several input rows in every input dtype the module takes (reads only 2r rows of the real weights)."""
    out = module.out_features
    r = min(CHECK_ROWS, out // 2)
    if r < 1:
        return False
    whole, first, second = row_slice(module, 0, 2 * r), row_slice(module, 0, r), row_slice(module, r, 2 * r)
    if whole is None or first is None or second is None:
        return False
    gen = torch.Generator().manual_seed(seed)
    probed = 0
    with torch.inference_mode():
        for dtype in CHECK_DTYPES:
            for rows in (1, 3):
                x = torch.randn(rows, in_features, generator=gen).to(dtype)
                try:
                    want = whole(x)
                except (RuntimeError, TypeError):
                    continue                    # an input dtype this module does not take
                try:
                    got = torch.cat([first(x), second(x)], dim=-1)
                except (RuntimeError, TypeError, ValueError):
                    return False
                if not torch.equal(want, got):
                    return False
                probed += 1
    return probed > 0


def split_head(head: nn.Module | None, embedding: nn.Module, pieces: int) -> ChunkedHead | None:
    """The head (or, when `head` is None, the tied embedding table used as the head) as `pieces` row ranges; None
    when it does not split exactly (then it is streamed whole)."""
    if pieces < 2:
        return None
    base = TiedRows(embedding.weight.detach()) if head is None else head
    in_features = getattr(base, "in_features", None)
    if not isinstance(in_features, int) or not splits_exactly(base, in_features):
        return None
    found = [row_slice(base, a, b) for a, b in _splits(base.out_features, pieces)]
    return ChunkedHead([p for p in found if p is not None]) if all(p is not None for p in found) else None
