"""Weight quantisation as pure functions on tensors, streamed a block of rows at a time.

Peak memory stays at the quantised result plus one block: a big weight is never copied whole to fp32, and with
`release_source` the source rows' pages are handed back to the OS after each block (a memory-mapped checkpoint
tensor then stops counting in the process's resident memory; data is never lost, see `release_pages`).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

import torch

BLOCK_ELEMENTS = 1 << 20          # source elements per block (4 MiB in fp32)
INT8_MAX = 127
INT4_LEVELS = 15                  # codes 0..15; the kernels read w ≈ (q − 8) · scale + zero
INT4_MID = 8
_PAGE = 4096
_MADV_PAGEOUT = 21                # Linux ≥ 5.4: reclaim the pages (file-backed: dropped; anonymous: swapped or kept)


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _libc_madvise()


def release_pages(tensor: torch.Tensor) -> bool:
    """Ask the OS to reclaim the whole pages inside `tensor`'s memory, when that memory is not torch's own
    (a memory-mapped checkpoint tensor: CPU, Linux; best effort). Returns whether the call was made and succeeded.

    MADV_PAGEOUT never changes data: pages of a memory-mapped file are dropped and read back from the file if
    touched again. Torch's own (resizable) allocations are skipped: they are freed when dropped, and paging them
    out would only write them to swap."""
    if (_MADVISE is None or tensor.device.type != "cpu" or tensor.numel() == 0
            or tensor.untyped_storage().resizable()):
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if last <= first:
        return False
    return _MADVISE(first, last - first, _MADV_PAGEOUT) == 0


def block_rows(in_features: int, multiple: int = 1, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Rows per block for a weight with `in_features` columns: about `block_elements`, a multiple of `multiple`."""
    return max(multiple, block_elements // max(1, in_features) // multiple * multiple)


def quantize_int8_rows(weight: torch.Tensor, *, release_source: bool = False,
                       block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (any float dtype) -> (int8 [out, in], fp32 scale [out]), symmetric per output channel:
    weight ≈ q · scale[:, None], scale = max|row| / 127."""
    out_f, in_f = weight.shape
    q = torch.empty(out_f, in_f, dtype=torch.int8)
    scale = torch.empty(out_f, dtype=torch.float32)
    step = block_rows(in_f, 1, block_elements)
    with torch.no_grad():
        for s in range(0, out_f, step):
            src = weight[s:s + step]
            w = src.to(device="cpu", dtype=torch.float32, copy=True)                   # [rows, in] fp32
            sc = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
            q[s:s + step] = w.div_(sc[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX)
            scale[s:s + step] = sc
            if release_source:
                release_pages(src)
    return q, scale


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes [rows, in] in 0..15 (any int dtype) -> uint8 [rows, in / 2]: even columns in the low nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, in / 2] -> uint8 codes [rows, in] (inverse of pack_nibbles)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def quantize_int4_groups(weight: torch.Tensor, group: int, *,
                         pack: Callable[[torch.Tensor], torch.Tensor] = pack_nibbles, row_multiple: int = 1,
                         scale_dtype: torch.dtype = torch.bfloat16,
                         release_source: bool = False,
                         block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (packed codes, scale_zero [in / group, out, 2] in `scale_dtype`), asymmetric per group of
    `group` consecutive inputs: w ≈ (q − 8) · scale + zero with q in 0..15 (the layout ATen's int4 kernels take).

    `pack` turns a block of int32 codes [rows, in] into its stored form (default: two codes per byte); blocks are
    `row_multiple` rows apart so a kernel's row-tiled packing can be applied block by block. The codes are rounded
    against the stored (rounded) scale and zero, so the rounding of those costs no extra error."""
    out_f, in_f = weight.shape
    if in_f % group:
        raise ValueError(f"in_features {in_f} is not a multiple of the group size {group}")
    groups = in_f // group
    scale_zero = torch.empty(groups, out_f, 2, dtype=scale_dtype)
    step = block_rows(in_f, row_multiple, block_elements)
    parts: list[torch.Tensor] = []
    with torch.no_grad():
        for s in range(0, out_f, step):
            src = weight[s:s + step]
            w = src.to(device="cpu", dtype=torch.float32, copy=True).view(-1, groups, group)   # [rows, groups, g]
            lo, hi = w.amin(dim=-1), w.amax(dim=-1)                                            # [rows, groups]
            sc = ((hi - lo) / INT4_LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
            zero = (lo + INT4_MID * sc).to(scale_dtype)
            sc = sc.to(scale_dtype)
            scale_zero[:, s:s + step, 0] = sc.T
            scale_zero[:, s:s + step, 1] = zero.T
            codes = w.sub_(zero.float()[..., None]).div_(sc.float()[..., None]).add_(INT4_MID).round_()
            codes = codes.clamp_(0, INT4_LEVELS).to(torch.int32).view(w.shape[0], in_f)   # [rows, in]
            parts.append(pack(codes))
            if release_source:
                release_pages(src)
    packed = parts[0] if len(parts) == 1 else torch.cat(parts)
    return packed, scale_zero


def dequantize_int4(codes: torch.Tensor, scale_zero: torch.Tensor, group: int, rows: slice,
                    dtype: torch.dtype) -> torch.Tensor:
    """Rows `rows` of the weight from codes [out, in] (0..15) and scale_zero [in / group, out, 2] -> [rows, in]."""
    c = codes[rows].to(dtype)                                                   # [r, in]
    r, in_f = c.shape
    sz = scale_zero[:, rows].to(dtype)                                          # [groups, r, 2]
    w = (c.view(r, in_f // group, group) - INT4_MID) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]
    return w.view(r, in_f)
