"""The project's own decode GEMV for int8 / int4 weights (native/qvl_gemv.c), built once per machine and ISA.

ATen's int8 GEMV converts and multiplies in a way that is compute bound on 2 threads (measured ~27-29 GB/s of
weights against ~43 GB/s of RAM read bandwidth, AVX-512 EPYC); its int4 GEMV is slower still on AVX2. This kernel
keeps four weight rows in flight with fp32 accumulation and reaches the memory bound. It is compiled with the C
compiler at first use for the vector ISA the run may use (so an emulated AVX2 run gets AVX2 code), cached under
`<cache_dir>/native/`, and called through ctypes; where no compiler works the caller keeps ATen's kernel and the
plan says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from qvl_pipeline.cache_root import default_cache_dir
from qvl_pipeline.facts import RunFacts

SOURCE = Path(__file__).with_name("native") / "qvl_gemv.c"
COMPILER_ENV = "CC"
DISABLE_ENV = "QVL_NATIVE_KERNELS"      # 0: never build or use the native kernels
DIR_ENV = "QVL_NATIVE_DIR"              # where builds are kept when the plugin names no cache_dir (default: the cache)
# Vector ISA -> compiler flags; the first the run's CPU facts admit is built.
ISA_FLAGS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("avx512_vnni", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
     ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c")),
    ("avx512", ("avx512f", "avx512bw", "avx512vl"),
     ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c")),
    ("avx2", ("avx2", "fma"), ("-mavx2", "-mfma", "-mf16c")),
    ("scalar", (), ()),
)
BASE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-ffp-contract=off")


@dataclass(frozen=True)
class NativeBuild:
    """A loaded native GEMV library (lib is None when unavailable, with the reason)."""

    isa: str
    lib: ctypes.CDLL | None
    reason: str

    @property
    def available(self) -> bool:
        return self.lib is not None

    @property
    def lanes(self) -> int:
        return int(self.lib.qvl_gemv_lanes()) if self.lib is not None else 1


def vector_isa(isa: tuple[str, ...]) -> str:
    """The widest vector ISA of ISA_FLAGS that the CPU facts (`isa`, lower-case flags) admit."""
    have = set(isa)
    return next(name for name, needs, _ in ISA_FLAGS if set(needs) <= have)


def _flags(isa_name: str) -> tuple[str, ...]:
    return next(flags for name, _, flags in ISA_FLAGS if name == isa_name)


def _compiler() -> str | None:
    return shutil.which(os.environ.get(COMPILER_ENV, "cc")) or shutil.which("gcc") or shutil.which("clang")


def _library_path(cache_dir: Path, isa_name: str, compiler: str) -> Path:
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(" ".join((compiler, *BASE_FLAGS, *_flags(isa_name))).encode())
    return cache_dir / "native" / f"qvl_gemv-{isa_name}-{digest.hexdigest()[:16]}.so"


def _compile(compiler: str, isa_name: str, target: Path) -> str:
    """Build the library into `target` (atomically); returns '' or why it failed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *BASE_FLAGS, *_flags(isa_name), str(SOURCE), "-o", str(out)]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{compiler} failed: {exc}"
        if run.returncode:
            tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
            return f"{compiler} failed ({run.returncode}): {tail}"
        os.replace(out, target)
    return ""


def _bind(lib: ctypes.CDLL) -> None:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.qvl_int8_gemv.argtypes = [ptr, ptr, ptr, i32, ptr, i32, i64, i64, i64, i32]
    lib.qvl_int8_gemv.restype = i32
    lib.qvl_int8_gemv_a8.argtypes = [ptr, ptr, ptr, i32, ptr, i32, i64, i64, i64, i32]
    lib.qvl_int8_gemv_a8.restype = i32
    lib.qvl_int8_gemv_a8_tiled.argtypes = [ptr, ptr, ptr, i32, ptr, i32, i64, i64, i64, i32]
    lib.qvl_int8_gemv_a8_tiled.restype = i32
    lib.qvl_int8_gemv_a8_tiled_many.argtypes = [i32, ptr, ptr, ptr, ptr, ptr, i32, i32, i64, i64, i32]
    lib.qvl_int8_gemv_a8_tiled_many.restype = i32
    lib.qvl_int8_gemm_a8_tiled_many.argtypes = [i32, ptr, ptr, ptr, ptr, ptr, i32, i32, i64, i64, i32]
    lib.qvl_int8_gemm_a8_tiled_many.restype = i32
    lib.qvl_int8_gemm_available.restype = i32
    lib.qvl_int8_tile.argtypes = [ptr, i64, i64, i32]
    lib.qvl_int8_tile.restype = i32
    lib.qvl_int8_untile_widen.argtypes = [ptr, i64, i64, i64, ptr, i32, i32]
    lib.qvl_int8_untile_widen.restype = i32
    lib.qvl_rms_norm.argtypes = [ptr, i32, ptr, i32, ptr, i32, i64, i64, ctypes.c_float]
    lib.qvl_rms_norm.restype = i32
    lib.qvl_rope_rows.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, i64, i64, i64, i64, i64, i64, i64, i64,
                                  i32]
    lib.qvl_rope_rows.restype = i32
    lib.qvl_gelu_tanh.argtypes = [ptr, i32, i64, i32]
    lib.qvl_gelu_tanh.restype = i32
    lib.qvl_int4_tiles_gemv.argtypes = [ptr, ptr, i64, ptr, i32, ptr, i32, i64, i64, i64, i32]
    lib.qvl_int4_tiles_gemv.restype = i32
    lib.qvl_int4_tiles_gemv_many.argtypes = [i32, ptr, ptr, ptr, ptr, i64, ptr, i32, i32, i64, i64, i32]
    lib.qvl_int4_tiles_gemv_many.restype = i32
    lib.qvl_int4_tiles_gemm_many.argtypes = [i32, ptr, ptr, ptr, ptr, i64, ptr, i32, i32, i64, i64, i32]
    lib.qvl_int4_tiles_gemm_many.restype = i32
    lib.qvl_int4_tiles_gemm_available.restype = i32
    lib.qvl_int4_tiles_widen.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, i32, i32]
    lib.qvl_int4_tiles_widen.restype = i32
    lib.qvl_int4_fit_groups.argtypes = [ptr, i64, i64, i64, i32, ptr, ptr, ptr, i32]
    lib.qvl_int4_fit_groups.restype = i32
    lib.qvl_int4_tiles_isa.restype = ctypes.c_char_p
    lib.qvl_decode_attention.argtypes = [ptr, ptr, ptr, ptr, i32, i64, i64, i64, i64, i64, ptr, ptr,
                                         ctypes.c_float, i32]
    lib.qvl_decode_attention.restype = i32
    lib.qvl_decode_attention_int8.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i32, i64, i64, i64, i64, i64, ptr, ptr,
                                              ptr, ptr, ctypes.c_float, i32]
    lib.qvl_decode_attention_int8.restype = i32
    lib.qvl_prefill_attention.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64,
                                          i64, ctypes.c_float, i32, i32]
    lib.qvl_prefill_attention.restype = i32
    lib.qvl_prefill_attention_available.restype = i32
    lib.qvl_int8_rows_quantize.argtypes = [ptr, i32, ptr, ptr, i64, i64, i64, i64, i64]
    lib.qvl_int8_rows_quantize.restype = i32
    lib.qvl_int8_rows_widen.argtypes = [ptr, ptr, ptr, i32, i64, i64, i64, i64, i64, i32]
    lib.qvl_int8_rows_widen.restype = i32
    lib.qvl_decode_layers.argtypes = [ptr, i64, ptr, ptr, ptr, ptr]      # native_decode.py's table and shape
    lib.qvl_decode_layers.restype = i32
    lib.qvl_gemv_lanes.restype = i32
    lib.qvl_a8_block.restype = i32
    lib.qvl_gemv_isa.restype = ctypes.c_char_p
    lib.qvl_a8_isa.restype = ctypes.c_char_p


@cache
def load_native(isa: tuple[str, ...], cache_dir: str) -> NativeBuild:
    """The native GEMV for a CPU with these ISA flags, built into `cache_dir` on first use (one build per
    source, compiler and ISA; later runs load it in milliseconds)."""
    isa_name = vector_isa(isa)
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return NativeBuild(isa_name, None, f"disabled by {DISABLE_ENV}=0")
    compiler = _compiler()
    if compiler is None:
        return NativeBuild(isa_name, None, "no C compiler (cc/gcc/clang) found; set CC to use one")
    import torch  # noqa: F401  (libgomp must be loaded from torch's folder before the library needs it)

    target = _library_path(Path(cache_dir), isa_name, compiler)
    if not target.exists():
        why = _compile(compiler, isa_name, target)
        if why:
            return NativeBuild(isa_name, None, why)
    try:
        lib = ctypes.CDLL(str(target))
        _bind(lib)
    except OSError as exc:
        return NativeBuild(isa_name, None, f"cannot load {target.name}: {exc}")
    return NativeBuild(isa_name, lib, f"built for {isa_name} with {Path(compiler).name}")


def native_for(facts: RunFacts, cache_dir: str = "") -> NativeBuild:
    """The native library for a run's CPU facts (the emulated ISA when emulating), built under `cache_dir`
    ("" = $QVL_NATIVE_DIR, else the project's cache folder) on first use."""
    return load_native(tuple(facts.hardware.cpu.isa), cache_dir or os.environ.get(DIR_ENV) or str(default_cache_dir()))


class UsesNativeLibrary:
    """Mixin for a plugin that runs on the native library: it validates only where the library builds for the run's
    CPU facts, and holds the build as `self._build`."""

    def __init__(self, facts: RunFacts, options: object = None, *, name: str = "") -> None:
        super().__init__(facts, options, name=name)
        self._build: NativeBuild = native_for(facts)

    @classmethod
    def validate(cls, facts: RunFacts, options: object) -> list[str]:
        build = native_for(facts)
        return [] if build.available else [f"native library unavailable: {build.reason}"]


_DTYPE_FLAG = {torch.bfloat16: 1, torch.float32: 0}


def native_dtype_ok(dtype: torch.dtype) -> bool:
    """Whether the kernel takes activations / writes results of this dtype."""
    return dtype in _DTYPE_FLAG


def as_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [..., width] as the contiguous [rows, width] the native kernels take (a view where x already is one)."""
    a = x.reshape(x.numel() // width, width)
    return a if a.is_contiguous() else a.contiguous()


def int8_gemv(build: NativeBuild, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
              threads: int, a8: bool = False, tiled: bool = False) -> torch.Tensor:
    """x [M, K] bf16|fp32 contiguous, weight [N, K] int8 (`tiled`: in TILED layout, a8 only), scale [N] fp32 ->
    [M, N] in x's dtype; `a8`: the activations quantised to int8 per block of 64 columns (integer dot products)."""
    assert build.lib is not None and (a8 or not tiled)
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    flag = _DTYPE_FLAG[x.dtype]
    if a8:
        gemv = build.lib.qvl_int8_gemv_a8_tiled if tiled else build.lib.qvl_int8_gemv_a8
    else:
        gemv = build.lib.qvl_int8_gemv
    rc = gemv(weight.data_ptr(), scale.data_ptr(), x.data_ptr(), flag, y.data_ptr(), flag, m, n, k, threads)
    if rc:
        raise RuntimeError(f"native int8{' x int8' if a8 else ''} GEMV failed with code {rc} "
                           f"(shape {m}x{k} · {n}x{k})")
    return y


def int8_gemv_many(build: NativeBuild, x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor],
                   threads: int, gemm: bool = False) -> list[torch.Tensor]:
    """x [M, K] bf16|fp32 contiguous against several TILED int8 weights [N_i, K] (scales [N_i] fp32) -> [M, N_i]
    each, in x's dtype: the activations quantised once (int8 per block of 64), one parallel range of row blocks;
    `gemm`: the prefill GEMM (AVX512-VNNI builds, `has_int8_gemm`) instead of the decode GEMV, the same product."""
    assert build.lib is not None and 1 <= len(weights) <= 8
    m, k = x.shape
    count = len(weights)
    ys = [torch.empty(m, w.shape[0], dtype=x.dtype) for w in weights]
    ptrs = ctypes.c_void_p * count
    kernel = build.lib.qvl_int8_gemm_a8_tiled_many if gemm else build.lib.qvl_int8_gemv_a8_tiled_many
    rc = kernel(
        count, ptrs(*(w.data_ptr() for w in weights)), ptrs(*(s.data_ptr() for s in scales)),
        (ctypes.c_int64 * count)(*(w.shape[0] for w in weights)), ptrs(*(y.data_ptr() for y in ys)),
        x.data_ptr(), _DTYPE_FLAG[x.dtype], _DTYPE_FLAG[x.dtype], m, k, threads)
    if rc:
        raise RuntimeError(f"native int8 x int8 {'GEMM' if gemm else 'GEMV'} of {count} weights failed with code {rc} "
                           f"(shapes {[tuple(w.shape) for w in weights]}, x {m}x{k})")
    return ys


# Options `prefill_kernel` of the quantised plugins: auto = the native integer GEMM where the build has it, widen =
# the widened weights in the activations' dtype.
PREFILL_KERNELS = ("auto", "widen")


def check_prefill_kernel(value: str) -> None:
    """ValueError unless `value` is one of PREFILL_KERNELS."""
    if value not in PREFILL_KERNELS:
        raise ValueError(f"prefill_kernel must be one of {', '.join(PREFILL_KERNELS)}, not {value!r}")


def has_int4_gemm(build: NativeBuild) -> bool:
    """Whether the build has the int4 x int8 prefill GEMM over INT4_TILED weights (AVX512-VNNI builds)."""
    return build.lib is not None and bool(build.lib.qvl_int4_tiles_gemm_available())


def has_int8_gemm(build: NativeBuild) -> bool:
    """Whether the build has the int8 x int8 prefill GEMM (AVX512-VNNI builds)."""
    return build.lib is not None and bool(build.lib.qvl_int8_gemm_available())


# The int8 decode layout: each group of TILE_ROWS weight rows [TILE_ROWS, K] stored as [K / 64, TILE_ROWS, 64], so
# the GEMV reads one sequential stream per thread (qvl_int8_tile). Every group keeps its own TILE_ROWS * K bytes:
# slices of whole groups of rows stay valid.
TILED = "tiles4x64"
ROWS = "rows"
TILE_ROWS = 4
TILE_BLOCK = 64


def tileable(out_features: int, in_features: int) -> bool:
    """Whether a weight of this shape can be stored TILED."""
    return out_features % TILE_ROWS == 0 and in_features % TILE_BLOCK == 0


def tile_(build: NativeBuild, weight: torch.Tensor, threads: int) -> torch.Tensor:
    """weight [N, K] int8 contiguous, row-major -> the same tensor in TILED layout (in place)."""
    assert build.lib is not None and weight.is_contiguous() and weight.dtype == torch.int8
    n, k = weight.shape
    rc = build.lib.qvl_int8_tile(weight.data_ptr(), n, k, threads)
    if rc:
        raise RuntimeError(f"native int8 tiling failed with code {rc} (shape {n}x{k})")
    return weight


def untile_widen(build: NativeBuild, weight: torch.Tensor, row0: int, out: torch.Tensor, threads: int) -> torch.Tensor:
    """Rows [row0, row0 + out.shape[0]) of a TILED int8 weight [N, K], widened exactly into out [rows, K]
    (bf16|fp32, contiguous), row-major."""
    assert build.lib is not None and out.is_contiguous()
    rows, k = out.shape
    rc = build.lib.qvl_int8_untile_widen(weight.data_ptr(), row0, rows, k, out.data_ptr(), _DTYPE_FLAG[out.dtype],
                                         threads)
    if rc:
        raise RuntimeError(f"native int8 untiling failed with code {rc} (rows {row0}+{rows} of {k} columns)")
    return out


@dataclass(frozen=True)
class Int8Decode:
    """The native int8 decode GEMV a layer calls for inputs of a few rows: int8 × int8 integer dot products with
    the activations quantised per block of `block` columns (`a8`, over weights in TILED layout where the shape
    allows), or fp32 accumulation of the widened weight. `prefill_gemm`: larger inputs of TILED weights run the
    same int8 × int8 product as a GEMM (int8 activations only; the build must have it, see has_int8_gemm)."""

    build: NativeBuild
    activations: str = "int8"             # int8 | exact
    prefill_gemm: bool = False

    def __post_init__(self) -> None:
        if self.prefill_gemm and (self.activations != "int8" or not has_int8_gemm(self.build)):
            raise ValueError(f"no int8 prefill GEMM for {self.activations} activations in a {self.build.isa} build")

    @property
    def name(self) -> str:
        isa = (self.build.lib.qvl_a8_isa() if self.activations == "int8" else self.build.lib.qvl_gemv_isa()).decode()
        return f"native_{'w8a8' if self.activations == 'int8' else 'w8'}_{isa}"

    @property
    def block(self) -> int:
        return int(self.build.lib.qvl_a8_block()) if self.activations == "int8" else self.build.lanes

    def usable(self, in_features: int) -> bool:
        return in_features % self.block == 0

    def layout(self, out_features: int, in_features: int) -> str:
        """How a weight of this shape is stored for this GEMV: TILED (int8 activations) or ROWS."""
        tiles = self.activations == "int8" and tileable(out_features, in_features) and self.usable(in_features)
        return TILED if tiles else ROWS

    def tile_(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [N, K] int8 row-major -> TILED, in place."""
        return tile_(self.build, weight, torch.get_num_threads())

    def widen_into(self, weight: torch.Tensor, row0: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [row0, row0 + len(out)) of a TILED weight widened exactly into out (bf16|fp32), row-major."""
        return untile_widen(self.build, weight, row0, out, torch.get_num_threads())

    def many(self, x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor],
             gemm: bool = False) -> list[torch.Tensor]:
        """x [M, K] contiguous bf16|fp32 against several TILED weights of the same input -> [M, N_i] each; `gemm`:
        through the prefill GEMM (only with prefill_gemm)."""
        assert self.prefill_gemm or not gemm
        return int8_gemv_many(self.build, x, weights, scales, torch.get_num_threads(), gemm=gemm)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, layout: str = ROWS) -> torch.Tensor:
        """x [M, K] contiguous bf16|fp32, weight [N, K] int8 in `layout` -> [M, N] in x's dtype."""
        return int8_gemv(self.build, x, weight, scale, torch.get_num_threads(), a8=self.activations == "int8",
                         tiled=layout == TILED)


def untile(weight: torch.Tensor) -> torch.Tensor:
    """A TILED int8 weight [N, K] (any device) -> a row-major copy [N, K]; the torch path where the native
    library does not run (a GPU, autograd)."""
    n, k = weight.shape
    return weight.view(n // TILE_ROWS, k // TILE_BLOCK, TILE_ROWS, TILE_BLOCK).permute(0, 2, 1, 3).reshape(n, k)


# The int4 decode layout (qvl_gemv.c, "int4 weights in tiles"): tiles of Q4_TILE_ROWS output rows, codes
# [N / 16, K / 8, 16, 4] bytes (byte (o, r, i): column 8o + i of row r in the low nibble, 8o + 4 + i in the high)
# and scale_zero [N / 16, K / group, 16, 2]. Activations are quantised per block of Q4_BLOCK columns.
INT4_TILED = "tiles16x8"
Q4_TILE_ROWS = 16
Q4_BLOCK = 32


def int4_tileable(out_features: int, in_features: int, group: int) -> bool:
    """Whether an int4 weight of this shape and group size can be stored INT4_TILED."""
    return out_features % Q4_TILE_ROWS == 0 and group % Q4_BLOCK == 0 and in_features % group == 0


def tile_int4_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes [rows, in] (0..15, any int dtype; rows % 16 == 0) -> INT4_TILED bytes [rows, in / 2] uint8."""
    rows, in_f = codes.shape
    c = codes.to(torch.uint8).view(rows // Q4_TILE_ROWS, Q4_TILE_ROWS, in_f // 8, 2, 4).permute(0, 2, 1, 4, 3)
    return (c[..., 0] | (c[..., 1] << 4)).reshape(rows, in_f // 2)         # [tiles, in / 8, 16, 4] in order


def untile_int4_codes(tiled: torch.Tensor) -> torch.Tensor:
    """INT4_TILED bytes [rows, in / 2] -> codes [rows, in] uint8 (the inverse of tile_int4_codes)."""
    rows, half = tiled.shape
    b = tiled.view(rows // Q4_TILE_ROWS, half // 4, Q4_TILE_ROWS, 4)                   # [tiles, in / 8, 16, 4]
    c = torch.stack([b & 0xF, b >> 4], dim=-1)                                          # [tiles, in / 8, 16, 4, 2]
    return c.permute(0, 2, 1, 4, 3).reshape(rows, half * 2)


def tile_scale_zero(scale_zero: torch.Tensor) -> torch.Tensor:
    """scale_zero [in / group, out, 2] -> INT4_TILED order [out / 16, in / group, 16, 2] (contiguous)."""
    groups, out_f, _ = scale_zero.shape
    return scale_zero.view(groups, out_f // Q4_TILE_ROWS, Q4_TILE_ROWS, 2).transpose(0, 1).contiguous()


def untile_scale_zero(tiled: torch.Tensor) -> torch.Tensor:
    """INT4_TILED scale_zero [out / 16, in / group, 16, 2] -> [in / group, out, 2] (contiguous)."""
    tiles, groups = tiled.shape[:2]
    return tiled.transpose(0, 1).reshape(groups, tiles * Q4_TILE_ROWS, 2).contiguous()


INT4_DECODE_ROWS = 32       # inputs of more rows take a layer's GEMM path, where that is the faster one


@dataclass(frozen=True)
class Int4Decode:
    """The native int4 decode GEMV over INT4_TILED weights: int4 × int8 integer dot products (AVX512-VNNI
    vpdpbusd, AVX2 vpmaddubsw or plain C), the activations quantised per block of 32 columns; also widens tiled
    weights for the prefill GEMM."""

    build: NativeBuild
    max_rows: int = INT4_DECODE_ROWS        # inputs of more rows (prefill) take the layer's GEMM path
    prefill_gemm: bool = False              # that path: the int4 x int8 GEMM over the tiles (has_int4_gemm builds)

    def __post_init__(self) -> None:
        if self.prefill_gemm and not has_int4_gemm(self.build):
            raise ValueError(f"no int4 prefill GEMM in a {self.build.isa} build")

    @property
    def name(self) -> str:
        return f"native_w4a8_{self.build.lib.qvl_int4_tiles_isa().decode()}"

    def usable(self, in_features: int, group: int) -> bool:
        return group % Q4_BLOCK == 0 and in_features % group == 0

    def __call__(self, x: torch.Tensor, codes: torch.Tensor, scale_zero: torch.Tensor, group: int) -> torch.Tensor:
        """x [M, K] contiguous bf16|fp32, codes and scale_zero INT4_TILED -> [M, N] in x's dtype."""
        m, k = x.shape
        n = codes.shape[0]
        y = torch.empty(m, n, dtype=x.dtype)
        flag = _DTYPE_FLAG[x.dtype]
        rc = self.build.lib.qvl_int4_tiles_gemv(codes.data_ptr(), scale_zero.data_ptr(), group, x.data_ptr(), flag,
                                                y.data_ptr(), flag, m, n, k, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"native int4 GEMV failed with code {rc} (shape {m}x{k} · {n}x{k}, group {group})")
        return y

    def many(self, x: torch.Tensor, codes: list[torch.Tensor], scale_zero: list[torch.Tensor],
             group: int, gemm: bool = False) -> list[torch.Tensor]:
        """x [M, K] contiguous bf16|fp32 against several INT4_TILED weights of the same input and group size ->
        [M, N_i] each: one activation quantisation, one parallel range (bit-equal to one call per weight); `gemm`:
        through the prefill GEMM (only with prefill_gemm; the same product)."""
        assert self.prefill_gemm or not gemm
        m, k = x.shape
        count = len(codes)
        assert 1 <= count <= 8 and len(scale_zero) == count
        ys = [torch.empty(m, c.shape[0], dtype=x.dtype) for c in codes]
        ptrs = ctypes.c_void_p * count
        flag = _DTYPE_FLAG[x.dtype]
        kernel = self.build.lib.qvl_int4_tiles_gemm_many if gemm else self.build.lib.qvl_int4_tiles_gemv_many
        rc = kernel(
            count, ptrs(*(c.data_ptr() for c in codes)), ptrs(*(s.data_ptr() for s in scale_zero)),
            (ctypes.c_int64 * count)(*(c.shape[0] for c in codes)), ptrs(*(y.data_ptr() for y in ys)), group,
            x.data_ptr(), flag, flag, m, k, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"native int4 {'GEMM' if gemm else 'GEMV'} of {count} weights failed with code {rc} "
                               f"(shapes {[tuple(c.shape) for c in codes]}, x {m}x{k}, group {group})")
        return ys

    def fit_groups(self, g: torch.Tensor, refit_rounds: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """quantize.fit_int4_groups in C (a GroupFit): g [rows, groups, group] fp32 contiguous -> (scale, zero
        [rows, groups] bf16, centred codes [rows, groups, group] int8)."""
        rows, groups, group = g.shape
        centred = torch.empty(rows, groups, group, dtype=torch.int8)
        scale, zero = (torch.empty(rows, groups, dtype=torch.bfloat16) for _ in range(2))
        rc = self.build.lib.qvl_int4_fit_groups(g.data_ptr(), rows, groups * group, group, refit_rounds,
                                                centred.data_ptr(), scale.data_ptr(), zero.data_ptr(),
                                                torch.get_num_threads())
        if rc:
            raise RuntimeError(f"native int4 quantiser failed with code {rc} (group {group})")
        return scale, zero, centred

    def widen_into(self, codes: torch.Tensor, scale_zero: torch.Tensor, group: int, row0: int,
                   out: torch.Tensor) -> torch.Tensor:
        """Rows [row0, row0 + rows) of an INT4_TILED weight dequantised into out [in, rows] (bf16|fp32, contiguous;
        transposed) -> the weight rows as a view [rows, in]: z + (q − 8) · s rounded once, as
        dequantize_int4_plain."""
        k, rows = out.shape
        rc = self.build.lib.qvl_int4_tiles_widen(codes.data_ptr(), scale_zero.data_ptr(), group, row0, rows, k,
                                                 out.data_ptr(), _DTYPE_FLAG[out.dtype], torch.get_num_threads())
        if rc:
            raise RuntimeError(f"native int4 widening failed with code {rc} (rows {row0}+{rows} of {k} columns)")
        return out.T


def rms_norm(build: NativeBuild, x: torch.Tensor, weight: torch.Tensor, eps: float,
             out_dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm of x [..., size] contiguous (bf16|fp32) with weight [size] (bf16|fp32) -> [..., size] in out_dtype
    (the promoted dtype of the two), as qvl_pipeline/model/norms.py computes it but for the order of the sum of
    squares."""
    size = x.shape[-1]
    y = torch.empty(x.shape, dtype=out_dtype)
    rc = build.lib.qvl_rms_norm(x.data_ptr(), _DTYPE_FLAG[x.dtype], weight.data_ptr(), _DTYPE_FLAG[weight.dtype],
                                y.data_ptr(), _DTYPE_FLAG[out_dtype], x.numel() // size, size, eps)
    if rc:
        raise RuntimeError(f"native RMSNorm failed with code {rc} (shape {list(x.shape)})")
    return y


def gelu_tanh_(build: NativeBuild, x: torch.Tensor) -> torch.Tensor:
    """x (contiguous, bf16|fp32, CPU) <- gelu(x, approximate="tanh") in place, computed in fp32 as torch orders it
    and rounded once; it may differ from torch's by one unit of the dtype's last place (or ~1e-7 |x| where 1 + tanh
    cancels). Returns x."""
    rc = build.lib.qvl_gelu_tanh(x.data_ptr(), _DTYPE_FLAG[x.dtype], x.numel(), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"native GELU failed with code {rc} (shape {list(x.shape)})")
    return x


def rope(build: NativeBuild, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary of q and k, bit-equal to rotary/cached.py's apply, in one call: q [tokens, hq, d] and k [tokens, hk, d]
    (any token and head strides, d contiguous; bf16|fp32), cos/sin [tokens, d] contiguous (fp32 with upcast, else
    q's dtype) -> rotated [tokens, h, d] contiguous copies in q's dtype. upcast: computed in fp32 and rounded once;
    else each product and the sum rounded to q's dtype."""
    tokens, hq, d = q.shape
    qo, ko = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype)
    rc = build.lib.qvl_rope_rows(q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), qo.data_ptr(),
                                 ko.data_ptr(), _DTYPE_FLAG[q.dtype], int(upcast), tokens, hq, k.shape[1], d,
                                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"native rotary failed with code {rc} (q {list(q.shape)}, k {list(k.shape)})")
    return qo, ko


def decode_attention(build: NativeBuild, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query position over the whole cache: q [b, h, 1, d], k/v [b, kvh, n, d] (any strides, the
    last dimension contiguous; a view of a preallocated cache), one dtype (bf16|fp32) -> [b, 1, h, d] in it, with
    fp32 scores, softmax and sums rounded once.

    With k_scale and v_scale (fp32 [b, kvh, n, 1], any strides), k and v are an int8 cache's rows, read as
    int8_rows_widen(k, k_scale, q.dtype) (and v) would widen them, bit-equal, without widening the cache first."""
    b, h, _, d = q.shape
    qc = q if q.is_contiguous() else q.contiguous()
    out = torch.empty(b, 1, h, d, dtype=q.dtype)
    common = (_DTYPE_FLAG[q.dtype], b, h, k.shape[1], k.shape[2], d)
    if k_scale is None:
        strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (k, v)]
        rc = build.lib.qvl_decode_attention(qc.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), *common,
                                            *strides, scale, torch.get_num_threads())
    else:
        strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (k, k_scale, v, v_scale)]
        rc = build.lib.qvl_decode_attention_int8(qc.data_ptr(), k.data_ptr(), k_scale.data_ptr(), v.data_ptr(),
                                                 v_scale.data_ptr(), out.data_ptr(), *common, *strides, scale,
                                                 torch.get_num_threads())
    if rc:
        kind = "" if k_scale is None else "int8 "
        raise RuntimeError(f"native {kind}decode attention failed with code {rc} (q {list(q.shape)}, "
                           f"k {list(k.shape)})")
    return out


PREFILL_ATTENTION_MAX_DIM = 256
ELEM_MAX = 8192          # qvl_gemv.c's ELEM_MAX: the longest row its norms, rotary and decode attention take


def has_prefill_attention(build: NativeBuild, isa: tuple[str, ...]) -> bool:
    """Whether the build has the bf16 prefill attention and the run's CPU (ISA flags) the AVX512-BF16 it needs."""
    return build.lib is not None and bool(build.lib.qvl_prefill_attention_available()) and "avx512_bf16" in isa


def prefill_attention(build: NativeBuild, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      causal: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of many query positions: q [heads, L, d], k, v [kv_heads, Lk, d] bf16 (any strides, d contiguous,
    d even and at most PREFILL_ATTENTION_MAX_DIM, heads a multiple of kv_heads, Lk >= L) -> [L, heads, d] bf16.
    causal: the queries are the last L of the Lk positions and each sees the keys up to its own; else every key.
    fp32 scores and softmax, p rounded to bf16 for p · v (as torch's flash kernel), fp32 sums rounded once. Only
    where has_prefill_attention. `out`: a contiguous [L, heads, d] bf16 tensor to write into (default: a new one)."""
    h, n, d = q.shape
    kvh, n_keys = k.shape[:2]
    out = torch.empty(n, h, d, dtype=torch.bfloat16) if out is None else out
    rc = build.lib.qvl_prefill_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), n, n_keys, h, kvh,
                                         d, q.stride(1), q.stride(0), k.stride(1), k.stride(0), v.stride(1),
                                         v.stride(0), scale, int(causal), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"native prefill attention failed with code {rc} (q {list(q.shape)}, k {list(k.shape)})")
    return out


def int8_rows_quantize(build: NativeBuild, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """x [b, h, n, d] bf16|fp32 quantised per row into q [b, h, n, d] int8 and scale [b, h, n, 1] fp32 (views of a
    cache: rows contiguous, the batch and head blocks evenly strided), bit-equal to kv_cache/int8.py's quantize_rows."""
    b, h, n, d = x.shape
    if q.stride(0) != h * q.stride(1) or scale.stride(0) != h * scale.stride(1) or q.stride(2) != d \
            or q.stride(3) != 1 or scale.stride(2) != 1:
        raise ValueError("int8 rows: the cache slots must be rows of d values, evenly strided blocks")
    xc = x if x.is_contiguous() else x.contiguous()
    rc = build.lib.qvl_int8_rows_quantize(xc.data_ptr(), _DTYPE_FLAG[x.dtype], q.data_ptr(), scale.data_ptr(), b * h,
                                          n, d, q.stride(1), scale.stride(1))
    if rc:
        raise RuntimeError(f"native int8 row quantisation failed with code {rc} (shape {list(x.shape)})")


def int8_rows_widen(build: NativeBuild, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [b, h, n, d] int8 and scale [b, h, n, 1] fp32 (views of a cache: rows contiguous, each [n, d] block
    contiguous) -> (q * scale).to(dtype) [b, h, n, d] contiguous, bit-equal, in one pass (dtype bf16|fp32)."""
    b, h, n, d = q.shape
    out = torch.empty(b, h, n, d, dtype=dtype)
    if q.stride(0) != h * q.stride(1) or scale.stride(0) != h * scale.stride(1):
        raise ValueError("int8 rows: the batch and head blocks must be evenly strided")
    rc = build.lib.qvl_int8_rows_widen(q.data_ptr(), scale.data_ptr(), out.data_ptr(), _DTYPE_FLAG[dtype], b * h, n,
                                       d, q.stride(1), scale.stride(1), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"native int8 row widening failed with code {rc} (shape {list(q.shape)})")
    return out
