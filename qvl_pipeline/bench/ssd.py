"""`python -m qvl_pipeline.bench.ssd`: decoding with weights streamed from disk under a RAM budget.

On a GPU-less machine: a RAM budget of a share (default 30%) of the quantised weights, memory=ssd_stream against
transformers + accelerate's disk offload (device_map="auto", max_memory={"cpu": the same budget}, an offload
folder), each in a fresh process, interleaved over repetitions. Before each run the page cache of every file the
run reads (checkpoint shards, quantised cache entry, accelerate's offload folder) is dropped with
posix_fadvise(POSIX_FADV_DONTNEED) per file (no root needed), and the sequential read speed of the streamed file is
measured the same way, so "disk bandwidth reached" is a share of what this disk delivers. ssd_stream runs twice:
drop_page_cache=true (streamed pages leave the page cache after use: the budget holds system-wide, every token reads
from the disk) and false (the kernel may keep them while RAM is free, as accelerate's memory-mapped offload does);
a resident run without a budget (memory=cpu) shows what streaming costs against the same kernels.

Prints a table and writes JSON. accelerate is optional: --accelerate-path adds a folder holding it to the worker's
import path; without it the row is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qvl_pipeline.memory_plan import GIB

READ_CHUNK = 16 * 2**20
READ_LIMIT = 2 * GIB


def sequential_read_mb_s(path: str, limit: int = READ_LIMIT) -> float:
    """MB/s of one sequential read (16 MiB preads) of up to `limit` bytes of `path`, page cache dropped before
    and after."""
    from qvl_plugins.memory.paging import drop_file_cache

    drop_file_cache(path)
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        size, done = min(os.fstat(fd).st_size, limit), 0
        start = time.perf_counter()
        while done < size:
            n = os.preadv(fd, [view], done)
            if n <= 0:
                break
            done += n
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
        drop_file_cache(path)
    return done / seconds / 1e6


def quantised_weights_gib(folder: Path, overrides: list[str]) -> tuple[float, str]:
    """Bytes of the run's weights in the chosen kernels plugin's format (the planner's estimate), and its name."""
    from qvl_pipeline.config.load import load_config
    from qvl_pipeline.container import make_container
    from qvl_pipeline.slots.memory import model_bytes

    facts = make_container(load_config([f"model.path={folder}", *overrides])).core.resolver().facts_for("memory")
    model = model_bytes(facts)
    return model.weights / GIB, model.label


def worker(impl: str, folder: Path, tokens: int, budget: float, drop_list: Path, overrides: list[str],
           accelerate_path: str | None) -> dict:
    env = dict(os.environ)
    if accelerate_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (accelerate_path, env.get("PYTHONPATH", "")) if p)
    run = subprocess.run([sys.executable, "-m", "qvl_pipeline.bench.ssd_worker", impl, str(folder), str(tokens),
                          f"{budget:.4f}", str(drop_list), *overrides], capture_output=True, text=True, env=env)
    if run.returncode:
        lines = run.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {run.returncode}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def accelerate_available(path: str | None) -> bool:
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", "import accelerate"], env=env, capture_output=True).returncode == 0


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and "error" not in r]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvl_pipeline.bench.ssd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="checkpoint folder (e.g. a random 2B-shaped one "
                        "from python -m qvl_pipeline.bench --no-reference --tokens 0)")
    parser.add_argument("--share", type=float, default=0.3, help="RAM budget as a share of the quantised weights")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per run")
    parser.add_argument("--reps", type=int, default=2, help="repetitions (interleaved)")
    parser.add_argument("--accelerate-path", default=None, help="a folder holding accelerate (pip install --target)")
    parser.add_argument("--json", type=Path, default=Path("bench_ssd.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides for our runs "
                        "(default: kernels=int8_weight_only generate.max_context=512 hardware=auto)")
    args = parser.parse_args(argv)
    overrides = args.overrides or ["kernels=int8_weight_only", "generate.max_context=512", "hardware=auto"]

    weights_gib, fmt = quantised_weights_gib(args.folder, overrides)
    budget = args.share * weights_gib
    print(f"{fmt} weights {weights_gib:.2f} GiB; RAM budget {args.share:.0%} = {budget:.3f} GiB", file=sys.stderr)
    drop_list = Path(tempfile.mkstemp(prefix="qvl-ssd-drop-", suffix=".txt")[1])
    shards = sorted(str(p) for p in args.folder.glob("*.safetensors"))
    drop_list.write_text("\n".join(shards))
    streamed = [*overrides, "memory=ssd_stream", f"memory.ram_budget_gb={budget:.4f}"]
    warm = worker("ours", args.folder, 1, budget, drop_list, streamed, None)     # quantises on a first start
    if "error" in warm:
        print(f"ssd_stream failed: {warm['error']}", file=sys.stderr)
        return 1
    streamed_files = warm["files"]
    drop_list.write_text("\n".join(sorted(set(shards) | set(streamed_files))))
    biggest = max(streamed_files, key=lambda p: Path(p).stat().st_size)
    impls = {"ssd_stream": [*streamed, "memory.options.ssd_stream.drop_page_cache=true"],
             "ssd_stream (page cache kept)": [*streamed, "memory.options.ssd_stream.drop_page_cache=false"],
             "resident (memory=cpu, no budget)": [*overrides, "memory=cpu"]}
    have_accelerate = accelerate_available(args.accelerate_path)
    runs: dict[str, list[dict]] = {name: [] for name in impls}
    runs["transformers + accelerate disk offload"] = []
    reads = []
    for rep in range(args.reps):
        reads.append(sequential_read_mb_s(biggest))
        for name, extra in impls.items():
            runs[name].append(worker("ours", args.folder, args.tokens, budget, drop_list, extra, None))
            print(f"rep {rep} {name}: {runs[name][-1].get('decode_tokens_per_s', runs[name][-1].get('error'))}",
                  file=sys.stderr)
        if have_accelerate:
            name = "transformers + accelerate disk offload"
            runs[name].append(worker("accelerate", args.folder, args.tokens, budget, drop_list, [],
                                     args.accelerate_path))
            print(f"rep {rep} {name}: {runs[name][-1].get('decode_tokens_per_s', runs[name][-1].get('error'))}",
                  file=sys.stderr)
    seq = statistics.median(reads)
    report = {"folder": str(args.folder), "weights": fmt, "weights_gib": round(weights_gib, 3),
              "ram_budget_gib": round(budget, 3), "share": args.share, "tokens": args.tokens, "reps": args.reps,
              "sequential_read_mb_s": [round(r) for r in reads], "streamed_file": biggest,
              "accelerate": "used" if have_accelerate else "not installed: row skipped", "runs": runs}
    print(f"\nRAM budget {budget:.3f} GiB ({args.share:.0%} of {weights_gib:.2f} GiB {fmt} weights); sequential read "
          f"of {Path(biggest).name} with the page cache dropped: median {seq:.0f} MB/s "
          f"({', '.join(f'{r:.0f}' for r in reads)})")
    print(f"{'run':<42}{'decode tok/s':>13}{'peak RSS MiB':>14}{'RSS/budget':>11}{'disk GB/s':>10}{'% of seq':>9}")
    base = median(runs["transformers + accelerate disk offload"], "decode_tokens_per_s")
    for name, rows in runs.items():
        if not rows:
            print(f"{name:<42} skipped: accelerate is not installed (pass --accelerate-path)")
            continue
        errors = [r["error"] for r in rows if "error" in r]
        if errors:
            print(f"{name:<42} failed: {errors[0]}")
            continue
        tps, rss = median(rows, "decode_tokens_per_s"), median(rows, "peak_rss_mib")
        disk = median(rows, "disk_gb_s_over_generate")
        disk_text = f"{disk:>10.2f}{100 * disk * 1000 / seq:>8.0f}%" if disk else f"{'-':>10}{'-':>9}"
        ratio = f"  ({tps / base:.2f}x accelerate)" if base and not name.startswith("transformers") else ""
        print(f"{name:<42}{tps:>13.3f}{rss:>14.0f}{rss / 1024 / budget:>10.2f}x{disk_text}{ratio}")
    same = {json.dumps(r.get("token_ids")) for rows in runs.values() for r in rows if "token_ids" in r and
            not r.get("device_map")}
    print(f"our runs (streamed and resident) produced {'identical' if len(same) == 1 else 'DIFFERENT'} greedy tokens")
    report["identical_tokens_ours"] = len(same) == 1
    args.json.write_text(json.dumps(report, indent=2))
    drop_list.unlink(missing_ok=True)
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
