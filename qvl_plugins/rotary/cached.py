"""Rotary with cached cos/sin tables: one [positions, freqs] table per inv_freq, rows gathered by position id."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qvl_pipeline.slots import Fidelity, NoOptions, RunFacts
from qvl_pipeline.slots.rotary import RotaryBackend
from qvl_plugins.rotary.reference import interleave_mrope, rotate_half

MIN_POSITIONS = 256
MAX_TABLES = 4            # text and vision inv_freq, on up to two devices


@dataclass
class _Table:
    freqs: torch.Tensor        # [freqs] fp32, the inv_freq the table was built from, on the table's device
    cos: torch.Tensor          # [positions, freqs] fp32
    sin: torch.Tensor          # [positions, freqs] fp32


class CachedRotary(RotaryBackend):
    fidelity = Fidelity.EXACT
    summary = ("cos/sin tables built once per inv_freq (grown by doubling) and gathered by position id; "
               "bit-equal to the reference, wins on decode where every step recomputed them")

    def __init__(self, facts: RunFacts, options: NoOptions | None = None, *, name: str = "") -> None:
        super().__init__(facts, options, name=name)
        self._tables: list[_Table] = []          # most recently built first

    def _table(self, freqs: torch.Tensor, needed: int) -> _Table:
        """The table for these inv_freq values (matched by value, so a caller that rebuilds inv_freq every
        step still hits) holding at least `needed` positions."""
        for table in self._tables:
            if table.freqs.device == freqs.device and table.freqs.shape == freqs.shape \
                    and torch.equal(table.freqs, freqs):
                if table.cos.shape[0] >= needed:
                    return table
                self._tables.remove(table)
                break
        size = max(MIN_POSITIONS, 1 << (needed - 1).bit_length())
        # The angle is the reference's own product (fp32 position × fp32 inv_freq), hence equal values.
        angles = torch.arange(size, device=freqs.device).float()[:, None] * freqs          # [size, freqs]
        table = _Table(freqs.clone(), angles.cos(), angles.sin())      # a copy: the caller's may change
        self._tables = [table, *self._tables][:MAX_TABLES]
        return table

    def _rows(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] (non-negative ints) -> cos, sin [..., freqs] in fp32."""
        needed = int(positions.max()) + 1 if positions.numel() else 1
        table = self._table(inv_freq.detach().float().to(positions.device), needed)
        return table.cos[positions], table.sin[positions]

    def text_tables(self, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                    mrope_section: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._rows(position_ids, inv_freq)                          # [3, batch, seq, d/2]
        cos = interleave_mrope(cos, mrope_section)                              # [batch, seq, d/2]
        sin = interleave_mrope(sin, mrope_section)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)     # [batch, seq, d]

    def vision_tables(self, hw_positions: torch.Tensor,
                      inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._rows(hw_positions, inv_freq)                           # [patches, 2, d/4]
        cos, sin = cos.flatten(1), sin.flatten(1)                               # [patches, d/2]
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)     # [patches, d]

    def apply(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
              upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        work = torch.float32 if upcast else q.dtype
        cos, sin = cos.to(work), sin.to(work)
        qw, kw = q.to(work), k.to(work)
        return (qw * cos + rotate_half(qw) * sin).to(q.dtype), (kw * cos + rotate_half(kw) * sin).to(k.dtype)
