"""Weight quantisation as pure functions on tensors, streamed a block of rows at a time.

Peak memory stays at the quantised result plus one block: a big weight is never copied whole to fp32, and with
`release_source` the source rows' pages are handed back to the OS after each block (a memory-mapped checkpoint
tensor then stops counting in the process's resident memory; see `release_pages`).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

BLOCK_ELEMENTS = 1 << 22          # source elements per block (16 MiB in fp32; fewer, larger ops: measured 5-10x
                                  # faster than 1 << 20 when other processes compete for the cores)
INT8_MAX = 127
INT4_LEVELS = 15                  # codes 0..15; the kernels read w ≈ (q − 8) · scale + zero
INT4_MID = 8
# Least-squares refits of each int4 group's (scale, zero) after the min–max start. Squared error against min–max
# (group 32, bf16 scale/zero, 2048x6144): Gaussian weights 1 round 0.917, 2 rounds 0.882, 3 rounds 0.867; Student-t(4)
# 0.921 / 0.890 / 0.875. The fit of a 2048x6144 weight, 2 threads: torch 26 ms min–max alone, 76 ms with 3 rounds;
# the native kernels' copy (qvl_int4_fit_groups, used where they build) 7 / 39 ms. The cached result is read as
# fast as before; only a first quantisation takes longer.
INT4_REFIT_ROUNDS = 3
INT4_SCALE_DTYPE = torch.bfloat16
# fit(g [rows, groups, group] fp32, refit_rounds) -> (scale, zero [rows, groups] bf16, centred codes [rows, groups,
# group]): a group quantiser (fit_int4_groups, or the native kernels' copy of it)
GroupFit = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
_TINY = torch.finfo(torch.float32).tiny
_PAGE = 4096
_MADV_DONTNEED = 4                # unmap: a file mapping's pages stay in the page cache, cheap to map again
_MADV_PAGEOUT = 21                # Linux ≥ 5.4: reclaim the pages (file-backed: dropped; anonymous: swapped or kept)
_MAPS = "/proc/self/maps"


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


def _libc_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim          # glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_MALLOC_TRIM = _libc_malloc_trim()


def trim_heap() -> None:
    """Return the C heap's free pages to the OS (glibc; no-op elsewhere). Quantising many tensors interleaves kept
    results with freed block buffers; glibc keeps those holes resident (measured ~0.4 GiB for a 2B model)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def is_file_backed(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s memory lies inside one memory-mapped file (Linux; False when it cannot tell)."""
    if tensor.device.type != "cpu" or tensor.numel() == 0 or not sys.platform.startswith("linux"):
        return False
    start, end = _byte_range(tensor)
    try:
        with open(_MAPS, encoding="ascii", errors="replace") as fh:
            for line in fh:
                # "lo-hi perms offset dev inode [path]"
                fields = line.split(maxsplit=5)
                lo, _, hi = fields[0].partition("-")
                if int(lo, 16) <= start and end <= int(hi, 16):
                    path = fields[5].strip() if len(fields) > 5 else ""
                    return fields[4] != "0" and path.startswith("/")
    except (OSError, ValueError, IndexError):
        return False
    return False


def release_pages(tensor: torch.Tensor, file_backed: bool | None = None) -> bool:
    """Hand the whole pages inside `tensor`'s memory back to the OS when it is not torch's own allocation (a
    memory-mapped checkpoint tensor; CPU, Linux, best effort). Returns whether the call was made and succeeded.

    Data is never lost: a file mapping's pages are unmapped (MADV_DONTNEED; they stay in the page cache and are
    mapped again if touched, which assumes the mapping was not written to); other external memory is paged out
    (MADV_PAGEOUT: kept, or swapped). Torch's own (resizable) allocations are skipped: they are freed when dropped.
    `file_backed` (from is_file_backed) saves re-reading the process's memory map for every block of a tensor."""
    if _MADVISE is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    if file_backed is None:
        file_backed = is_file_backed(tensor)
    if not file_backed and tensor.untyped_storage().resizable():
        return False
    start, end = _byte_range(tensor)
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if last <= first:
        return False
    return _MADVISE(first, last - first, _MADV_DONTNEED if file_backed else _MADV_PAGEOUT) == 0


_WORKSPACE: dict[tuple[torch.dtype, int], torch.Tensor] | None = None


@contextmanager
def reused_block_buffers() -> Iterator[None]:
    """Within this context the quantisers share their block buffers across calls instead of allocating fresh ones
    per tensor (fresh pages cost a page fault each: measured ~2 s over a 2B model's 300 tensors)."""
    global _WORKSPACE
    outer = _WORKSPACE
    _WORKSPACE = {} if outer is None else outer
    try:
        yield
    finally:
        _WORKSPACE = outer


def _block_buffer(rows: int, cols: int, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
    """A [rows, cols] scratch tensor: from the shared buffers inside reused_block_buffers() (one per dtype and
    `slot`), else fresh."""
    if _WORKSPACE is None:
        return torch.empty(rows, cols, dtype=dtype)
    flat = _WORKSPACE.get((dtype, slot))
    if flat is None or flat.numel() < rows * cols:
        flat = _WORKSPACE[(dtype, slot)] = torch.empty(rows * cols, dtype=dtype)
    return flat[:rows * cols].view(rows, cols)


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
    work = _block_buffer(min(step, out_f), in_f, torch.float32)        # one block, reused: no allocation churn
    backed = release_source and is_file_backed(weight)
    with torch.no_grad():
        for s in range(0, out_f, step):
            src = weight[s:s + step]
            w = work[:src.shape[0]]
            w.copy_(src)                                                                   # [rows, in] fp32
            lo, hi = w.amin(dim=1), w.amax(dim=1)             # (torch.aminmax measured 5x slower on CPU)
            sc = torch.maximum(hi, lo.neg_()).div_(INT8_MAX).clamp_min_(torch.finfo(torch.float32).tiny)
            q[s:s + step] = w.div_(sc[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX)
            scale[s:s + step] = sc
            if release_source:
                release_pages(src, backed)
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
                         release_source: bool = False, refit_rounds: int = INT4_REFIT_ROUNDS,
                         fit: GroupFit | None = None,
                         block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (packed codes, scale_zero [in / group, out, 2] bf16), asymmetric per group of `group`
    consecutive inputs: w ≈ (q − 8) · scale + zero with q in 0..15 (the layout ATen's int4 kernels take).

    Each group starts from its min–max range and then takes `refit_rounds` least-squares refits of (scale, zero) to
    its codes: `fit` (default fit_int4_groups; the native kernels bring the same quantiser in C). `pack` turns a
    block of int32 codes [rows, in] into its stored form (default: two codes per byte); blocks are `row_multiple`
    rows apart so a kernel's row-tiled packing can be applied block by block. The codes are rounded against the
    stored (rounded) scale and zero, so the rounding of those costs no extra error."""
    out_f, in_f = weight.shape
    if in_f % group:
        raise ValueError(f"in_features {in_f} is not a multiple of the group size {group}")
    groups = in_f // group
    scale_zero = torch.empty(groups, out_f, 2, dtype=INT4_SCALE_DTYPE)
    fit = fit_int4_groups if fit is None else fit
    packed = torch.empty(out_f, in_f // 2, dtype=torch.uint8)
    step = block_rows(in_f, row_multiple, block_elements)
    work = _block_buffer(min(step, out_f), in_f, torch.float32)        # one block each, reused
    codes_work = _block_buffer(min(step, out_f), in_f, torch.int32)
    backed = release_source and is_file_backed(weight)
    with torch.no_grad():
        for s in range(0, out_f, step):
            src = weight[s:s + step]
            rows = src.shape[0]
            w = work[:rows]
            w.copy_(src)
            sc, zero, centred = fit(w.view(rows, groups, group), refit_rounds)
            scale_zero[:, s:s + rows, 0] = sc.T
            scale_zero[:, s:s + rows, 1] = zero.T
            codes = codes_work[:rows]
            codes.copy_(centred.view(rows, in_f)).add_(INT4_MID)                           # [rows, in] int32
            packed[s:s + rows] = pack(codes)
            if release_source:
                release_pages(src, backed)
    return packed, scale_zero


def fit_int4_groups(g: torch.Tensor,
                    refit_rounds: int = INT4_REFIT_ROUNDS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """g [rows, groups, group] fp32 -> (scale, zero [rows, groups] bf16, centred codes u = q − 8 in −8..7
    [rows, groups, group], a float or int tensor) lowering each group's squared error of u · scale + zero against g.

    Starts from the min–max range (scale = (max − min) / 15), then each round solves least squares for (scale, zero)
    given the codes, rounds them to bf16, keeps them where they lower the group's error, and rounds the codes
    again to the nearest level (which never raises the error). The codes overwrite a block buffer (not g)."""
    rows, groups, n = g.shape
    u = _block_buffer(rows * groups, n, torch.float32, slot=1).view(rows, groups, n)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)                                                # [rows, groups]
    sc = ((hi - lo) / INT4_LEVELS).clamp_min_(_TINY)
    zero = (lo + INT4_MID * sc).to(INT4_SCALE_DTYPE).float()
    sc = sc.to(INT4_SCALE_DTYPE).float()
    _round_codes(g, sc, zero, u)
    sum_w = g.sum(dim=-1)
    for _ in range(refit_rounds):
        sum_u = u.sum(dim=-1)
        sum_uu = torch.einsum("rgk,rgk->rg", u, u)
        sum_uw = torch.einsum("rgk,rgk->rg", u, g)
        det = n * sum_uu - sum_u * sum_u                           # 0 only when every code of the group is the same
        fit_sc = torch.where(det > 0, (n * sum_uw - sum_u * sum_w) / det.clamp_min(_TINY), sc).clamp_min_(_TINY)
        fit_zero = ((sum_w - fit_sc * sum_u) / n).to(INT4_SCALE_DTYPE).float()
        fit_sc = fit_sc.to(INT4_SCALE_DTYPE).float()
        sums = (n, sum_u, sum_uu, sum_uw, sum_w)
        better = _excess_error(fit_sc, fit_zero, *sums) < _excess_error(sc, zero, *sums)
        sc, zero = torch.where(better, fit_sc, sc), torch.where(better, fit_zero, zero)
        _round_codes(g, sc, zero, u)
    return sc.to(INT4_SCALE_DTYPE), zero.to(INT4_SCALE_DTYPE), u


def _excess_error(s: torch.Tensor, z: torch.Tensor, n: int, sum_u: torch.Tensor, sum_uu: torch.Tensor,
                  sum_uw: torch.Tensor, sum_w: torch.Tensor) -> torch.Tensor:
    """Σ (u·s + z − w)² − Σ w² per group, from the groups' sums over their n codes u and weights w."""
    return s * (s * sum_uu + 2 * z * sum_u - 2 * sum_uw) + z * (n * z - 2 * sum_w)


def _round_codes(g: torch.Tensor, sc: torch.Tensor, zero: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The nearest centred code u in −8..7 of each weight for its group's (scale, zero) [rows, groups], into out."""
    torch.sub(g, zero[..., None], out=out)
    return out.div_(sc[..., None]).round_().clamp_(-INT4_MID, INT4_LEVELS - INT4_MID)


def dequantize_int4(codes: torch.Tensor, scale_zero: torch.Tensor, group: int, rows: slice,
                    dtype: torch.dtype) -> torch.Tensor:
    """Rows `rows` of the weight from codes [out, in] (0..15) and scale_zero [in / group, out, 2] -> [rows, in]."""
    c = codes[rows].to(dtype)                                                   # [r, in]
    r, in_f = c.shape
    sz = scale_zero[:, rows].to(dtype)                                          # [groups, r, 2]
    w = (c.view(r, in_f // group, group) - INT4_MID) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]
    return w.view(r, in_f)


def dequantize_int4_tiles(packed: torch.Tensor, scale_zero: torch.Tensor, group: int, tile_rows: int, halves: bool,
                          out: torch.Tensor, codes: torch.Tensor, nibbles: torch.Tensor) -> torch.Tensor:
    """Int4 codes stored in tiles of `tile_rows` output rows (ATen's CPU layouts) -> the weight, transposed and
    split into the two nibble positions, in `out`'s dtype: out [2, in, out / 2].

    packed [out, in / 2] uint8 holds [out / tile_rows, in, tile_rows / 2] bytes; a byte's low and high nibble are
    rows d and d + tile_rows / 2 of its tile (`halves`) or rows 2d and 2d + 1. scale_zero [in / group, out, 2].
    Column j = tile · tile_rows / 2 + d of out[h] is that tile's row of nibble h at byte d, so `x @ out[h]` gives
    half of the outputs, tile by tile. codes [in, out / 2] uint8 and nibbles [in, out / 2] int8 are work space
    (contiguous).
    w = (q − 8) · scale + zero, rounded once to out's dtype (the products are formed in fp32 by addcmul)."""
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    tiles, half, groups = out_f // tile_rows, tile_rows // 2, in_f // group
    codes.view(in_f, tiles, half).copy_(packed.view(tiles, in_f, half).transpose(0, 1))     # [in, tiles, half]
    # XOR 0x88 makes each nibble q the 4-bit two's complement of q − 8; an arithmetic right shift of the int8
    # (after moving the low nibble up) sign-extends it: q − 8 in −8..7, exact in any float dtype.
    codes.bitwise_xor_(0x88)
    torch.bitwise_right_shift(codes.view(torch.int8), 4, out=nibbles)
    out[1].copy_(nibbles)
    torch.bitwise_left_shift(codes, 4, out=nibbles.view(torch.uint8))
    out[0].copy_(nibbles.bitwise_right_shift_(4))
    # scale_zero rows in the order of out's columns: [2 (nibble), groups, tiles, half]
    order = (2, 0, 1, 3) if halves else (3, 0, 1, 2)
    split = (groups, tiles, 2, half) if halves else (groups, tiles, half, 2)
    scale, zero = (scale_zero[..., i].reshape(split).permute(order).reshape(2, groups, 1, out_f // 2).to(out.dtype)
                   for i in (0, 1))
    weight = out.view(2, groups, group, out_f // 2)
    return torch.addcmul(zero, weight, scale, out=weight).view(2, in_f, out_f // 2)



def dequantize_int4_plain(packed: torch.Tensor, scale_zero: torch.Tensor, group: int, out: torch.Tensor,
                          codes: torch.Tensor, nibbles: torch.Tensor) -> torch.Tensor:
    """Plain int4 codes [out, in / 2] (even input columns in the low nibble) -> the weight transposed, [in, out] in
    `out`'s dtype: w = (q − 8) · scale + zero rounded once (the products are formed in fp32 by addcmul).

    Transposed because then each group's scale and zero are constant along a contiguous row of `out` (the weight's
    own layout would change them every `group` elements, which elementwise ops run ~8x slower). scale_zero
    [in / group, out, 2]; codes [in / 2, out] uint8 and nibbles [in / 2, out] int8 are work space (contiguous)."""
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    groups = in_f // group
    codes.copy_(packed.T)                                   # [in / 2, out]: byte j holds inputs 2j and 2j + 1
    # XOR 0x88 makes each nibble q the 4-bit two's complement of q − 8; an arithmetic right shift of the int8
    # (after moving the low nibble up) sign-extends it: q − 8 in −8..7, exact in any float dtype.
    codes.bitwise_xor_(0x88)
    pairs = out.view(in_f // 2, 2, out_f)
    pairs[:, 1].copy_(torch.bitwise_right_shift(codes.view(torch.int8), 4, out=nibbles))
    torch.bitwise_left_shift(codes, 4, out=nibbles.view(torch.uint8))
    pairs[:, 0].copy_(nibbles.bitwise_right_shift_(4))
    scale, zero = (scale_zero[..., i].to(out.dtype).contiguous().view(groups, 1, out_f) for i in (0, 1))
    weight = out.view(groups, group, out_f)
    return torch.addcmul(zero, weight, scale, out=weight).view(in_f, out_f)
