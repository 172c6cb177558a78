"""`python -m qvl_pipeline.bench`: load time, peak memory and decode speed of this project next to the
reference implementation (transformers, when installed) and the memory-bandwidth ceiling."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from qvl_pipeline.bench.random_checkpoint import preset_config, write_random_checkpoint
from qvl_pipeline.hardware.probe import measure_memory_gb_s
from qvl_pipeline.model.sizing import count_params


def measure(impl: str, folder: Path, tokens: int, overrides: list[str]) -> dict:
    run = subprocess.run([sys.executable, "-m", "qvl_pipeline.bench.worker", impl, str(folder), str(tokens),
                          *overrides], capture_output=True, text=True)
    if run.returncode:
        return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def warm_page_cache(folder: Path) -> float:
    """Read every shard once so each implementation starts from the same (warm) page cache; returns GiB read."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as fh:
            while chunk := fh.read(64 * 1024**2):
                total += len(chunk)
    return total / 1024**3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvl_pipeline.bench", description=__doc__)
    parser.add_argument("--model", default="qwen3_vl_2b", help="model preset whose shape the random checkpoint has")
    parser.add_argument("--folder", type=Path, default=None, help="checkpoint folder (written if absent); "
                        "default: a random checkpoint under /tmp")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens to decode (0: load only)")
    parser.add_argument("--no-reference", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--json", type=Path, default=Path("bench.json"), help="where to write the results")
    parser.add_argument("overrides", nargs="*", help="config overrides for our runs, e.g. opt=minimal")
    args = parser.parse_args(argv)

    folder = args.folder or Path(f"/tmp/qvl-bench-{args.model}")
    print(f"checkpoint: {write_random_checkpoint(folder, args.model)}", file=sys.stderr)
    print(f"page cache warmed: {warm_page_cache(folder):.2f} GiB read", file=sys.stderr)
    counts = count_params(preset_config(args.model))
    bandwidth = measure_memory_gb_s()
    bytes_per_token = counts.read_per_token * 2
    rows = {"ours": measure("ours", folder, args.tokens, args.overrides)}
    if not args.no_reference:
        rows["transformers"] = measure("reference", folder, args.tokens, [])
    ceiling = bandwidth * 1e9 / bytes_per_token
    report = {"model": args.model, "parameters": counts.total, "weights_gib": round(counts.total * 2 / 1024**3, 3),
              "ram_bandwidth_gb_s": bandwidth, "bf16_bytes_read_per_token": bytes_per_token,
              "decode_ceiling_tokens_per_s": round(ceiling, 3), "overrides": args.overrides, "runs": rows}
    print(f"\n{args.model}: {counts.total / 1e9:.2f} B params, {report['weights_gib']} GiB bf16; RAM copy bandwidth "
          f"{bandwidth} GB/s -> bf16 decode ceiling {ceiling:.2f} tok/s")
    print(f"{'impl':<14}{'load s':>9}{'peak RSS GiB':>14}{'prefill s':>11}{'decode tok/s':>14}{'% of ceiling':>14}")
    for impl, row in rows.items():
        if "error" in row:
            print(f"{impl:<14} failed: {row['error']}")
            continue
        tps = row.get("decode_tokens_per_s")
        print(f"{impl:<14}{row['load_s']:>9.2f}{row['peak_rss_gib']:>14.2f}{row.get('prefill_s', float('nan')):>11.2f}"
              f"{(tps or float('nan')):>14.2f}{(100 * tps / ceiling if tps else float('nan')):>13.1f}%")
    args.json.write_text(json.dumps(report, indent=2))
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
