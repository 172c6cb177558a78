"""Decoding with weights streamed from disk under a RAM budget: `python -m qvl_pipeline.bench.ssd`, or the opt-in part
of `task=bench bench.ssd=true` (its rows go into the bench table and bench.json).

On a GPU-less machine: a RAM budget of a share (default bench.ssd_share, 30%) of the weights in the kernels
plugin's format — never below the smallest budget ssd_stream admits (every part on disk: runtime, KV cache, read-ahead
pool), which a small model's share can be — memory=ssd_stream against transformers + accelerate's disk offload
(device_map="auto", max_memory={"cpu": the same budget}, an offload folder), each in a fresh process, interleaved over
repetitions. Before each run the page cache of every file the run reads (checkpoint shards, quantised cache entry,
accelerate's offload folder) is dropped with posix_fadvise(POSIX_FADV_DONTNEED) per file (no root needed), and the
sequential read speed of the largest streamed file is measured the same way, so "disk bandwidth reached" is a share
of what this disk delivers. ssd_stream runs twice: drop_page_cache=true (streamed pages leave the page cache after
use: the budget holds system-wide, every token reads from the disk) and false (the default: the kernel may keep them
while RAM is free, as accelerate's memory-mapped offload does); a resident run without a budget (memory=cpu) shows
what streaming costs against the same kernels.

Prints a table and writes JSON. accelerate is optional: --accelerate-path adds a folder holding it to the worker's
import path; without it the row is skipped and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qvl_pipeline.config.schema import BenchConfig, RootConfig
from qvl_pipeline.memory_plan import GIB, stream_pool, workspace_bytes

READ_CHUNK = 16 * 2**20
READ_LIMIT = 2 * GIB
PAGE = 4096                  # the smallest budget ssd_stream admits is planned with one page to spare
PROMPT_POSITIONS = 512       # the streamed runs' text prompt with its chat template fits in this many positions
STREAMED = "ssd_stream"                                          # the plugin
STREAMED_DROPPED = "ssd_stream (drop_page_cache=true)"           # the table's rows
STREAMED_CACHED = "ssd_stream (default: page cache kept)"
RESIDENT = "resident (memory=cpu, no budget)"
ACCELERATE = "transformers + accelerate disk offload"


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


def stream_config(config: RootConfig, tokens: int) -> RootConfig:
    """The run's config for the streamed runs: no progress bars, and a context for their work (a text prompt and
    `tokens` new tokens) unless generate.max_context is set — the KV cache of a RAM-derived context would not fit a
    streaming budget."""
    context = config.generate.max_context or PROMPT_POSITIONS + tokens
    return dataclasses.replace(config, progress=False,
                               generate=dataclasses.replace(config.generate, max_context=context))


def with_memory(config: RootConfig, choice: str, ram_budget_gb: float | None, **options: Any) -> RootConfig:
    """`config` with memory=`choice`, its RAM budget, and `options` for that plugin over the user's."""
    mine = {**(config.memory.options or {}).get(choice, {}), **options}
    memory = dataclasses.replace(config.memory, choice=choice, ram_budget_gb=ram_budget_gb,
                                 options={**(config.memory.options or {}), choice: mine})
    return dataclasses.replace(config, memory=memory)


def budget_gib(config: RootConfig, share: float) -> dict[str, Any]:
    """The RAM budget of the streamed runs: `share` of the weights in the chosen kernels plugin's format (the
    planner's estimate), or the smallest budget ssd_stream admits (runtime + KV cache + the read-ahead pool with
    every part on disk, plus a page) when that is larger; with where it came from."""
    from qvl_pipeline.container import make_container
    from qvl_pipeline.slots.memory import model_bytes

    facts = make_container(config).core.resolver().facts_for("memory")
    model = model_bytes(facts)
    disk = ("disk",) * len(model.layers)
    floor = (workspace_bytes() + model.kv(facts.context.positions) * len(model.layers)
             + stream_pool(model, disk, "disk", "disk") + PAGE) / GIB
    weights = model.weights / GIB
    chosen = max(share * weights, floor)
    source = (f"{share:.0%} of {weights:.3f} GiB of {model.label} weights" if chosen == share * weights else
              f"the smallest ssd_stream admits (runtime, KV cache for {facts.context.positions} positions and the "
              f"read-ahead pool, every part on disk); {share:.0%} of {weights:.3f} GiB of weights is less")
    return {"ram_budget_gib": chosen, "source": source, "weights": model.label, "weights_gib": round(weights, 3),
            "floor_gib": round(floor, 4), "share": share}


def worker(kind: str, spec: dict[str, Any], accelerate_path: str | None = None) -> dict[str, Any]:
    """One measurement in a fresh process (qvl_pipeline.bench.ssd_worker): its JSON row, or {"error": last line}."""
    from qvl_pipeline.bench.worker import config_to_dict

    env = dict(os.environ)
    if accelerate_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (accelerate_path, env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="qvl-ssd-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        data = {**spec, "config": config_to_dict(spec["config"])} if "config" in spec else spec
        spec_path.write_text(json.dumps(data), encoding="utf-8")
        run = subprocess.run([sys.executable, "-m", "qvl_pipeline.bench.ssd_worker", kind, str(spec_path)],
                             capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
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


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure(config: RootConfig, folder: Path, share: float, tokens: int, reps: int,
            accelerate_path: str | None = None, say: Callable[[str], None] = _say) -> dict[str, Any]:
    """The whole measurement (see the module's docstring) on `folder` with the run's `config` (model.path set to
    it); the report with every run and the summary `rows` (`summarise`). Raises RuntimeError when even the first
    streamed run fails."""
    config = stream_config(config, tokens)
    budget = budget_gib(config, share)
    gib = budget["ram_budget_gib"]
    say(f"ssd: RAM budget {gib:.3f} GiB ({budget['source']})")
    drop_list = Path(tempfile.mkstemp(prefix="qvl-ssd-drop-", suffix=".txt")[1])
    try:
        shards = sorted(str(p) for p in folder.glob("*.safetensors"))
        drop_list.write_text("\n".join(shards))
        streamed = with_memory(config, STREAMED, gib)
        base = {"folder": str(folder), "budget_gib": gib, "drop_list": str(drop_list)}
        say("ssd: a first streamed run (quantises the weights once when needed)")
        warm = worker("ours", {**base, "tokens": 1, "config": streamed})
        if "error" in warm:
            raise RuntimeError(f"memory=ssd_stream failed: {warm['error']}")
        streamed_files = warm["files"] or shards
        drop_list.write_text("\n".join(sorted(set(shards) | set(streamed_files))))
        biggest = max(streamed_files, key=lambda p: Path(p).stat().st_size)
        ours = {STREAMED_DROPPED: with_memory(config, STREAMED, gib, drop_page_cache=True),
                STREAMED_CACHED: with_memory(config, STREAMED, gib, drop_page_cache=False),
                RESIDENT: with_memory(config, "cpu", None)}
        have_accelerate = accelerate_available(accelerate_path)
        runs: dict[str, list[dict]] = {name: [] for name in (*ours, ACCELERATE)}
        reads = []
        for rep in range(reps):
            reads.append(sequential_read_mb_s(biggest))
            for name, run_config in ours.items():
                runs[name].append(worker("ours", {**base, "tokens": tokens, "config": run_config}))
                say(f"ssd: rep {rep + 1}/{reps} {name}: "
                    f"{runs[name][-1].get('decode_tokens_per_s', runs[name][-1].get('error'))}")
            if have_accelerate:
                runs[ACCELERATE].append(worker("accelerate", {**base, "tokens": tokens}, accelerate_path))
                say(f"ssd: rep {rep + 1}/{reps} {ACCELERATE}: "
                    f"{runs[ACCELERATE][-1].get('decode_tokens_per_s', runs[ACCELERATE][-1].get('error'))}")
    finally:
        drop_list.unlink(missing_ok=True)
    same = {json.dumps(r.get("token_ids")) for name, rows in runs.items() if name != ACCELERATE for r in rows
            if "token_ids" in r}
    report = {"folder": str(folder), **budget, "tokens": tokens, "reps": reps,
              "context": config.generate.max_context,
              "sequential_read_mb_s": [round(r) for r in reads], "streamed_file": biggest,
              "accelerate": "used" if have_accelerate else "not installed: row skipped",
              "identical_tokens_ours": len(same) == 1, "runs": runs}
    report["rows"] = summarise(report)
    return report


def summarise(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per run: medians of decode tok/s, peak RSS (MiB, and over the budget), the disk read rate over the generate
    and its fraction of the measured sequential read, and decode speed relative to accelerate's; or its error, or
    why it was skipped."""
    seq = statistics.median(report["sequential_read_mb_s"]) if report["sequential_read_mb_s"] else None
    base = median(report["runs"][ACCELERATE], "decode_tokens_per_s")
    rows: dict[str, dict[str, Any]] = {}
    for name, runs in report["runs"].items():
        errors = [r["error"] for r in runs if "error" in r]
        if not runs:
            rows[name] = {"skipped": "accelerate is not installed (pass --accelerate-path, or pip install it)"}
        elif errors:
            rows[name] = {"error": errors[0]}
        else:
            tps, rss = median(runs, "decode_tokens_per_s"), median(runs, "peak_rss_mib")
            disk = median(runs, "disk_gb_s_over_generate")
            rows[name] = {"decode_tokens_per_s": tps, "peak_rss_mib": rss,
                          "rss_over_budget": round(rss / 1024 / report["ram_budget_gib"], 3) if rss else None,
                          "disk_read_gb_s": disk,
                          "fraction_of_sequential_read": round(disk * 1000 / seq, 4) if disk and seq else None,
                          "vs_accelerate": round(tps / base, 3) if base and tps and name != ACCELERATE else None}
    return rows


def render(report: dict[str, Any]) -> list[str]:
    """The table of the measurement's summary rows."""
    seq = report["sequential_read_mb_s"]
    lines = [f"SSD streaming: RAM budget {report['ram_budget_gib']:.3f} GiB ({report['source']}); "
             f"{report['tokens']} new tokens, median of {report['reps']} rep(s); sequential read of "
             f"{Path(report['streamed_file']).name} with the page cache dropped: median "
             f"{statistics.median(seq):.0f} MB/s ({', '.join(str(r) for r in seq)})",
             f"{'run':<42}{'decode tok/s':>13}{'peak RSS MiB':>14}{'RSS/budget':>11}{'disk GB/s':>10}{'of seq':>8}"]
    for name, row in report["rows"].items():
        if "skipped" in row or "error" in row:
            why = f"skipped: {row['skipped']}" if "skipped" in row else f"failed: {row['error']}"
            lines.append(f"{name:<42} {why}")
            continue
        disk, frac = row["disk_read_gb_s"], row["fraction_of_sequential_read"]
        ratio = f"  ({row['vs_accelerate']:.2f}x accelerate)" if row["vs_accelerate"] else ""
        lines.append(f"{name:<42}{row['decode_tokens_per_s']:>13.3f}{row['peak_rss_mib']:>14.0f}"
                     f"{row['rss_over_budget']:>10.2f}x"
                     + (f"{disk:>10.2f}{frac:>8.0%}" if disk and frac is not None else f"{'-':>10}{'-':>8}")
                     + ratio)
    lines.append(f"our runs (streamed and resident) produced "
                 f"{'identical' if report['identical_tokens_ours'] else 'DIFFERENT'} greedy tokens")
    return lines


def main(argv: list[str] | None = None) -> int:
    from qvl_pipeline.config.load import load_config

    parser = argparse.ArgumentParser(prog="python -m qvl_pipeline.bench.ssd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="checkpoint folder (e.g. a random 2B-shaped one "
                        "from python -m qvl_pipeline.bench --no-reference --tokens 0)")
    parser.add_argument("--share", type=float, default=BenchConfig.ssd_share,
                        help="RAM budget as a share of the weights in the kernels plugin's format")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per run")
    parser.add_argument("--reps", type=int, default=2, help="repetitions (interleaved)")
    parser.add_argument("--accelerate-path", default=None, help="a folder holding accelerate (pip install --target)")
    parser.add_argument("--json", type=Path, default=Path("bench_ssd.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides for our runs "
                        "(default: kernels=int8_weight_only generate.max_context=512 hardware=auto)")
    args = parser.parse_args(argv)
    overrides = args.overrides or ["kernels=int8_weight_only", "generate.max_context=512", "hardware=auto"]
    config = load_config([f"model.path={args.folder}", *overrides])
    try:
        report = measure(config, args.folder, args.share, args.tokens, args.reps, args.accelerate_path)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print("\n".join(["", *render(report)]))
    args.json.write_text(json.dumps(report, indent=2))
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
