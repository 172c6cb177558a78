"""`python -m qvl_pipeline.bench.kernels`: speed of every CPU linear kernel torch offers at the 2B decoder's shapes;
`python -m qvl_pipeline.bench.kernels load`: load time and peak memory of a kernels plugin, first and second start.

Decode (batch 1) is bandwidth bound: reported as GB/s of weight bytes read per call (higher is better; compare with
the machine's RAM read bandwidth). Prefill (256 rows) is compute bound: reported as GFLOP/s. Each row also gives the
kernel's relative error against the fp32 product on the same weights, so a fast but wrong kernel is visible.
`--isa both` repeats the run in a child process emulating an AVX2-only CPU (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA
and MKL_ENABLE_INSTRUCTIONS set before torch is imported).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# The 2B text decoder's linears: (in_features, out_features).
SHAPES: dict[str, tuple[int, int]] = {
    "q/o 2048x2048": (2048, 2048),
    "k/v 2048x1024": (2048, 1024),
    "gate/up 2048x6144": (2048, 6144),
    "down 6144x2048": (6144, 2048),
    "head 2048x151936": (2048, 151936),
}
PREFILL_SKIP = {"head 2048x151936"}     # prefill sends only the last row through the head
# Decode reads every weight once per token, from RAM: each measurement cycles through enough copies of the weights
# to overflow the last-level cache, so small matrices do not report cache bandwidth.
ROTATE_BYTES = 256 * 2**20
MAX_COPIES = 64
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

Op = Callable[[], torch.Tensor]


@dataclass
class Prepared:
    """A ready-to-time kernel call, the bytes of weight storage it reads, and its result's dtype."""

    call: Op
    weight_bytes: int


def _int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # w: [out, in] fp32 -> int8 [out, in], fp32 scale [out]
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def _int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # w: [out, in] -> codes int32 [out, in] in 0..15, scale and min [out, in / group]
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
    return q.reshape(out_f, in_f), scale, lo


def _dequant_blocked(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The current Int8Linear dequant path: int8 rows widened 1M elements at a time, fp32 GEMM per block.
    rows = max(1, (1 << 20) // q.shape[1])
    y = x.new_empty(x.shape[0], q.shape[0])
    for s in range(0, q.shape[0], rows):
        y[:, s:s + rows] = F.linear(x, q[s:s + rows].to(x.dtype))
    return y * scale


def kernels(w: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], Prepared]]:
    """name -> builder of the timed call, all multiplying x [rows, in] fp32 by the same w [out, in] fp32."""
    aten = torch.ops.aten
    out_f, in_f = w.shape

    def dense(dtype: torch.dtype) -> Prepared:
        wd, xd = w.to(dtype, copy=True), x.to(dtype)
        return Prepared(lambda: F.linear(xd, wd), wd.nbytes)

    def int8pack(act: torch.dtype) -> Prepared:
        q, scale = _int8_per_channel(w)
        s, xa = scale.to(act), x.to(act)
        return Prepared(lambda: aten._weight_int8pack_mm(xa, q, s), q.nbytes + s.nbytes)

    def int8_dequant() -> Prepared:
        q, scale = _int8_per_channel(w)
        return Prepared(lambda: _dequant_blocked(x, q, scale), q.nbytes + scale.nbytes)

    def int4pack(group: int, act: torch.dtype) -> Prepared:
        q, scale, lo = _int4_groups(w, group)
        packed = aten._convert_weight_to_int4pack_for_cpu(q, 2)          # [out, in / 2] uint8
        zero = lo + 8 * scale                                            # kernel computes (q - 8) * scale + zero
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(act)   # [in / group, out, 2]
        xa = x.to(act)
        return Prepared(lambda: aten._weight_int4pack_mm_for_cpu(xa, packed, group, sz), packed.nbytes + sz.nbytes)

    def dyn_quant_4bit(group: int) -> Prepared:
        # Symmetric 4-bit codes (q - 8) · scale; ATen's x86 path without KleidiAI is a scalar reference loop.
        g = w.reshape(out_f, in_f // group, group)
        scale = (g.abs().amax(-1) / 7).clamp_min(1e-12)                  # [out, in / group]
        q = (torch.round(g / scale[..., None]).clamp_(-8, 7) + 8).to(torch.uint8).reshape(out_f, in_f)
        packed_codes = (q[:, 1::2] << 4) | q[:, 0::2]                    # [out, in / 2]
        packed = aten._dyn_quant_pack_4bit_weight(packed_codes, scale.bfloat16(), torch.zeros(out_f), group,
                                                  in_f, out_f)
        return Prepared(lambda: aten._dyn_quant_matmul_4bit(x, packed, group, in_f, out_f), packed.nbytes)

    def fbgemm_dynamic() -> Prepared:
        # torch.ao dynamic quantisation: activations to uint8 per tensor at each call, int8 per-channel weights.
        q, scale = _int8_per_channel(w)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(out_f, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        return Prepared(lambda: torch.ops.quantized.linear_dynamic(x, packed), q.nbytes + scale.nbytes)

    def onednn_int8() -> Prepared:
        # oneDNN int8 GEMM: activations quantised per tensor (uint8) at each call, int8 per-channel weights.
        q, scale = _int8_per_channel(w)
        packed = torch.ops.onednn.qlinear_prepack(q, list(x.shape))
        zp = torch.zeros(out_f, dtype=torch.int64)

        def call() -> torch.Tensor:
            lo, hi = x.aminmax()
            xs = max((hi - lo).item() / 255, 1e-12)
            xz = round(-lo.item() / xs)
            qx = torch.clamp(torch.round(x / xs) + xz, 0, 255).to(torch.uint8)
            return torch.ops.onednn.qlinear_pointwise(qx, xs, xz, packed, scale, zp, None, 1.0, 0, torch.float32,
                                                      "none", [], "")
        return Prepared(call, q.nbytes + scale.nbytes)

    def read_ceiling() -> Prepared:
        wd = w.clone()
        return Prepared(lambda: wd.amax(), wd.nbytes)

    table: dict[str, Callable[[], Prepared]] = {
        "read fp32 (amax)": read_ceiling,
        "fp32 linear": lambda: dense(torch.float32),
        "bf16 linear": lambda: dense(torch.bfloat16),
        "int8pack_mm bf16": lambda: int8pack(torch.bfloat16),
        "int8pack_mm fp32": lambda: int8pack(torch.float32),
        "int8 dequant fp32": int8_dequant,
    }
    for group in (32, 64, 128):
        table[f"int4pack g{group} bf16"] = lambda g=group: int4pack(g, torch.bfloat16)
        table[f"int4pack g{group} fp32"] = lambda g=group: int4pack(g, torch.float32)
    table["dyn_quant_4bit g32"] = lambda: dyn_quant_4bit(32)
    table["fbgemm dynamic int8"] = fbgemm_dynamic
    table["onednn int8 (dyn act)"] = onednn_int8
    return table


def time_calls(calls: list[Op], min_time: float, max_iters: int) -> tuple[float, float, int]:
    """(best, median) seconds of one call, each call timed on its own, cycling through `calls` (copies of the
    same product on distinct weights) for at least `min_time` seconds after one warm-up round. On a shared machine
    the best is the uncontended time, the median what contention left."""
    for call in calls:
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters * len(calls) and (time.perf_counter() - start < min_time or len(times) < 3):
        call = calls[len(times) % len(calls)]
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if times[-1] > 2.0:               # a scalar fallback: one measurement is enough
            break
    return min(times), statistics.median(times), len(times)


def run(threads: int, rows_list: list[int], min_time: float, only: set[str] | None) -> list[dict]:
    """Measure every kernel at every shape and row count; one dict per measurement."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape, (in_f, out_f) in SHAPES.items():
        w = torch.randn(out_f, in_f, generator=gen) * 0.02                   # [out, in] fp32
        for rows in rows_list:
            if rows > 1 and shape in PREFILL_SKIP:
                continue
            x = torch.randn(rows, in_f, generator=gen)                        # [rows, in] fp32
            want = F.linear(x, w)
            for name, build in kernels(w, x).items():
                if only and not any(o in name for o in only):
                    continue
                if name.startswith("dyn_quant") and rows > 1:
                    continue                       # scalar reference loop on x86: minutes per prefill call
                row = {"shape": shape, "in": in_f, "out": out_f, "rows": rows, "kernel": name}
                try:
                    prepared = build()
                    got = prepared.call().float()
                    copies = min(MAX_COPIES, -(-ROTATE_BYTES // prepared.weight_bytes)) if rows == 1 else 1
                    calls = [prepared.call] + [build().call for _ in range(copies - 1)]
                    best, median, n = time_calls(calls, min_time, 200)
                except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
                    results.append(row)
                    print(f"  {shape:<18} rows={rows:<4} {name:<22} unavailable: {row['error']}", file=sys.stderr)
                    continue
                err = ((got - want).norm() / want.norm()).item() if got.shape == want.shape else float("nan")
                row.update(best_ms=round(best * 1e3, 4), median_ms=round(median * 1e3, 4), iters=n,
                           weight_bytes=prepared.weight_bytes, rel_err=float(f"{err:.3g}"),
                           gb_s=round(prepared.weight_bytes / best / 1e9, 2),
                           gflop_s=round(2 * rows * in_f * out_f / best / 1e9, 1))
                results.append(row)
                print(f"  {shape:<18} rows={rows:<4} {name:<22} {row['best_ms']:>9.3f} ms  {row['gb_s']:>7.2f} GB/s "
                      f"{row['gflop_s']:>8.1f} GFLOP/s  err {row['rel_err']:.2g}", file=sys.stderr)
                del prepared, calls
    return results


def print_table(label: str, results: list[dict], rows: int, metric: str) -> None:
    shapes = [s for s in SHAPES if any(r["shape"] == s and r["rows"] == rows for r in results)]
    names = list(dict.fromkeys(r["kernel"] for r in results if r["rows"] == rows))
    if not shapes:
        return
    unit = "GB/s of weights (best)" if metric == "gb_s" else "GFLOP/s (best)"
    print(f"\n{label}: rows={rows}, {unit}")
    print(f"{'kernel':<24}" + "".join(f"{s.split()[0]:>11}" for s in shapes) + f"{'rel err':>10}")
    for name in names:
        cells, errs = [], []
        for s in shapes:
            hit = [r for r in results if r["shape"] == s and r["rows"] == rows and r["kernel"] == name]
            if not hit or "error" in hit[0]:
                cells.append(f"{'n/a':>11}")
            else:
                cells.append(f"{hit[0][metric]:>11.2f}" if metric == "gb_s" else f"{hit[0][metric]:>11.1f}")
                errs.append(hit[0]["rel_err"])
        print(f"{name:<24}" + "".join(cells) + (f"{max(errs):>10.2g}" if errs else ""))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:
        return load_main(argv[1:])
    if argv[:1] == ["_load_worker"]:
        print(json.dumps(load_worker(json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m qvl_pipeline.bench.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 256], help="activation rows (1: decode)")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of repeats per measurement")
    parser.add_argument("--only", nargs="*", help="measure only kernels whose name contains one of these")
    parser.add_argument("--isa", choices=["native", "avx2", "both"], default="native",
                        help="native: this CPU's best; avx2: emulate an AVX2-only CPU (child process)")
    parser.add_argument("--json", type=Path, default=Path("bench-kernels.json"), help="where to write results")
    args = parser.parse_args(argv)

    runs: dict[str, list[dict]] = {}
    if args.isa in ("native", "both"):
        print(f"native ISA ({torch.backends.cpu.get_cpu_capability()}), {args.threads} threads", file=sys.stderr)
        runs["native"] = run(args.threads, args.rows, args.min_time, set(args.only) if args.only else None)
    if args.isa in ("avx2", "both"):
        if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
            runs["avx2"] = run(args.threads, args.rows, args.min_time, set(args.only) if args.only else None)
        else:
            child_json = args.json.with_suffix(".avx2.json")
            cmd = [sys.executable, "-m", "qvl_pipeline.bench.kernels", "--isa", "avx2", "--threads",
                   str(args.threads), "--min-time", str(args.min_time), "--json", str(child_json),
                   "--rows", *map(str, args.rows), *(["--only", *args.only] if args.only else [])]
            print("avx2 emulation (child process)", file=sys.stderr)
            subprocess.run(cmd, env={**os.environ, **AVX2_ENV}, check=True, stdout=subprocess.DEVNULL)
            runs["avx2"] = json.loads(child_json.read_text())["runs"]["avx2"]
            child_json.unlink()
    for label, results in runs.items():
        for rows in args.rows:
            print_table(label, results, rows, "gb_s" if rows == 1 else "gflop_s")
    report = {"threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "torch": torch.__version__, "runs": runs}
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {args.json}")
    return 0


# --- load: time and memory of loading a checkpoint through a kernels plugin ---------------------------------------

def _peak_rss_gib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)


def _current_rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024**2, 3)
    except OSError:
        pass
    return float("nan")


def load_worker(spec: dict) -> dict:
    """In a fresh process: build the model on meta with the plugin, load the checkpoint, prepare; optionally
    prefill a random prompt and decode greedily. Times, peak and current RSS."""
    import importlib

    from qvl_pipeline.checkpoint import load_checkpoint, read_config
    from qvl_pipeline.facts import ContextFacts, ModelFacts, RunFacts
    from qvl_pipeline.hardware.probe import probe_cpu
    from qvl_pipeline.hardware.profile import HardwareProfile, StorageFacts
    from qvl_pipeline.model.config import ModelConfig
    from qvl_pipeline.model.qwen3_vl import Qwen3VL
    from qvl_pipeline.options import build_options
    from qvl_pipeline.registry import BUILTIN
    from qvl_plugins.attention.sdpa import SdpaAttention
    from qvl_plugins.kv_cache.dynamic import DynamicCache
    from qvl_plugins.rotary.cached import CachedRotary

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    folder = Path(spec["folder"])
    hf = read_config(folder)
    config = ModelConfig.from_hf_dict(hf)
    hw = HardwareProfile(name="bench", cpu=probe_cpu(), ram_gb=16.0, storage=StorageFacts())
    facts = RunFacts(hw, ModelFacts(config, hf, "bfloat16", f"checkpoint {folder}", folder),
                     ContextFacts(4096, "bench"))
    module, _, cls_name = BUILTIN["kernels"][spec["kernels"]].partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    plugin = cls(facts, build_options(cls.Options, spec["options"], f"kernels.options.{spec['kernels']}"))
    with torch.device("meta"):
        model = Qwen3VL.build(config, attention=SdpaAttention(facts), rotary=CachedRotary(facts), kernels=plugin)
    load_checkpoint(folder, model, progress=False)
    loaded = time.perf_counter()
    model = plugin.prepare(model).eval()
    prepared = time.perf_counter()
    out = {"load_s": round(prepared - start, 3), "read_s": round(loaded - start, 3),
           "prepare_s": round(prepared - loaded, 3), "rss_after_load_gib": _current_rss_gib(),
           "peak_rss_after_load_gib": _peak_rss_gib()}
    tokens = spec["decode"]
    if tokens:
        cache = DynamicCache(facts).create(model.cache_shape(1, 4096), model.dtype,
                                           [torch.device("cpu")] * config.text.num_hidden_layers)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.text.vocab_size, (1, spec["prompt"]), generator=gen)
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits = model.forward(ids, cache=cache, last_only=True)
            prefill = time.perf_counter() - t0
            token = logits[:, -1:].argmax(-1)
            steps = []
            for _ in range(tokens):
                t1 = time.perf_counter()
                logits = model.decode_step(token, cache, torch.zeros(1, dtype=torch.long))
                token = logits[:, -1:].argmax(-1)
                steps.append(time.perf_counter() - t1)
            if spec.get("profile"):
                out["profile"] = _profile_steps(model, cache, token, spec["profile"])
        out.update(prefill_s=round(prefill, 3), prompt_tokens=spec["prompt"],
                   decode_tokens_per_s=round(len(steps) / sum(steps), 3),
                   decode_best_step_ms=round(min(steps) * 1e3, 2),
                   decode_median_step_ms=round(statistics.median(steps) * 1e3, 2))
    out.update(peak_rss_gib=_peak_rss_gib(), rss_gib=_current_rss_gib())
    return out


def _profile_steps(model: torch.nn.Module, cache: object, token: torch.Tensor, steps: int) -> list[dict]:
    """torch.profiler over `steps` decode steps: per op, calls and self CPU time per step (printed to stderr)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            logits = model.decode_step(token, cache, torch.zeros(1, dtype=torch.long))
            token = logits[:, -1:].argmax(-1)
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
    rows = sorted(table, key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": round(e.self_cpu_time_total / 1e3
             / steps, 3)} for e in rows[:40]]


def load_main(argv: list[str]) -> int:
    import shutil
    import tempfile

    from qvl_pipeline.bench.random_checkpoint import write_random_checkpoint

    parser = argparse.ArgumentParser(prog="python -m qvl_pipeline.bench.kernels load",
                                     description="first start (quantise, write the cache) and second start (map the "
                                                 "cache) of a kernels plugin, each in a fresh process")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/q2b-ckpt"),
                        help="checkpoint (a random one of --model's shape is written there if absent)")
    parser.add_argument("--model", default="qwen3_vl_2b")
    parser.add_argument("--kernels", default="int8_weight_only", help="kernels plugin name")
    parser.add_argument("--option", action="append", default=[], help="plugin option key=value (JSON value)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument("--starts", type=int, default=2, help="starts to measure (the first one is cold)")
    parser.add_argument("--decode", type=int, default=0, help="tokens to decode after loading")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    parser.add_argument("--profile", type=int, default=0, help="profile this many extra decode steps (last start)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("bench-load.json"))
    args = parser.parse_args(argv)

    write_random_checkpoint(args.folder, args.model)
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="qvl-bench-cache-"))
    if args.kernels.endswith("_weight_only"):              # the quantising plugins take a cache folder
        options.setdefault("cache_dir", str(cache_dir))
    spec = {"folder": str(args.folder), "kernels": args.kernels, "options": options, "decode": args.decode,
            "prompt": args.prompt, "threads": args.threads}
    runs = []
    try:
        for i in range(args.starts):
            last = {"profile": args.profile} if i == args.starts - 1 and args.profile and args.decode else {}
            run_ = subprocess.run([sys.executable, "-m", "qvl_pipeline.bench.kernels", "_load_worker",
                                   json.dumps({**spec, **last})], capture_output=True, text=True)
            if run_.returncode:
                print(run_.stderr, file=sys.stderr)
                return run_.returncode
            runs.append(json.loads(run_.stdout.strip().splitlines()[-1]))
            if last:
                print(run_.stderr, file=sys.stderr)
            print(f"start {i + 1}: { {k: v for k, v in runs[-1].items() if k != 'profile'} }", file=sys.stderr)
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"\n{args.kernels} {options}: {args.folder}")
    print(f"{'start':<8}{'load s':>9}{'prepare s':>11}{'RSS GiB':>9}{'peak RSS GiB':>14}{'decode tok/s':>14}")
    for i, r in enumerate(runs):
        print(f"{i + 1:<8}{r['load_s']:>9.2f}{r['prepare_s']:>11.2f}{r['rss_gib']:>9.2f}{r['peak_rss_gib']:>14.2f}"
              f"{r.get('decode_tokens_per_s', float('nan')):>14.2f}")
    args.json.write_text(json.dumps({"spec": spec, "runs": runs}, indent=2))
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
