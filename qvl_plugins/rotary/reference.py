"""Reference rotary: tables rebuilt for every call, in fp32, exactly as the reference model does."""

from __future__ import annotations

import torch

from qvl_pipeline.slots import Fidelity
from qvl_pipeline.slots.rotary import RotaryBackend


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def interleave_mrope(freqs: torch.Tensor, mrope_section: tuple[int, int, int]) -> torch.Tensor:
    """freqs [3, batch, seq, d/2] (T, H, W) -> [batch, seq, d/2]: index i takes H when i%3==1 and
    i < 3·section[1], W when i%3==2 and i < 3·section[2], T otherwise."""
    out = freqs[0].clone()
    for row, offset in ((1, 1), (2, 2)):
        limit = mrope_section[row] * 3
        out[..., offset:limit:3] = freqs[row, ..., offset:limit:3]
    return out


class ReferenceRotary(RotaryBackend):
    fidelity = Fidelity.REFERENCE
    summary = "fp32 tables recomputed per step, the reference"

    def text_tables(self, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                    mrope_section: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [3, batch, seq] -> freqs [3, batch, seq, d/2]
        freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)
        freqs = interleave_mrope(freqs, mrope_section)                  # [batch, seq, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)                         # [batch, seq, d]
        return emb.cos(), emb.sin()

    def vision_tables(self, hw_positions: torch.Tensor,
                      inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # hw_positions: [patches, 2] -> per-axis freqs [patches, 2, d/4] -> [patches, d/2] -> [patches, d]
        freqs = hw_positions[..., None].float() * inv_freq.float().to(hw_positions.device)
        freqs = freqs.flatten(1)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def apply(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
              upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        work = torch.float32 if upcast else q.dtype
        cos, sin = cos.to(work), sin.to(work)
        qw, kw = q.to(work), k.to(work)
        q_out = qw * cos + rotate_half(qw) * sin
        k_out = kw * cos + rotate_half(kw) * sin
        return q_out.to(q.dtype), k_out.to(k.dtype)
