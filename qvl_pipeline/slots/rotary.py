"""The rotary slot: cos/sin tables for the decoder's interleaved MRoPE and the vision tower's 2D rope."""

from __future__ import annotations

import torch

from qvl_pipeline.slots.base import Plugin


class RotaryBackend(Plugin):
    """Builds rotary tables and applies them.

    `text_tables(position_ids, inv_freq, mrope_section)`: position_ids [3, batch, seq] (T, H, W rows) ->
    (cos, sin) each [batch, seq, head_dim] in fp32, interleaved MRoPE layout.
    `vision_tables(hw_positions, inv_freq)`: hw_positions [patches, 2] (row, col) -> (cos, sin) each
    [patches, head_dim] in fp32.
    `apply(q, k, cos, sin, upcast=...)`: rotate q/k (cos/sin already shaped to broadcast against them by the
    caller). upcast=True computes in fp32 (the vision tower's rule); upcast=False casts the tables to q's dtype
    and computes there (the decoder's rule in the reference). Returns the inputs' dtype.
    """

    slot = "rotary"
    reference = "reference"

    def text_tables(self, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                    mrope_section: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def vision_tables(self, hw_positions: torch.Tensor,
                      inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def apply(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
              upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def self_test(self, reference: Plugin) -> None:
        from qvl_pipeline.slots.checks import check_rotary

        check_rotary(self, reference)
