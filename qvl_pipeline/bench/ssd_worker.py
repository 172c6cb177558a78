"""One SSD-streaming measurement in a fresh process (its peak RSS is its own): ours (the run's config with its memory
plugin and budget, e.g. memory=ssd_stream), or transformers with accelerate's disk offload (device_map with an
offload folder) under the same CPU memory budget.

Usage: python -m qvl_pipeline.bench.ssd_worker ours|accelerate SPEC.json
SPEC holds the checkpoint folder, the new tokens, the RAM budget (GiB; accelerate's max_memory for the CPU), the
drop list and, for ours, the run's typed config as plain data. The files listed (one per line) in the drop list have
their page cache dropped right before generating. Prints one JSON line.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "Write a long story about a lighthouse."


def status_mib(key: str) -> float:
    """A /proc/self/status memory line (VmHWM: peak RSS, VmRSS, RssAnon, RssFile) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drop(list_file: str) -> int:
    """Drop the page cache of every file listed (posix_fadvise DONTNEED, no root needed); returns how many."""
    from qvl_plugins.memory.paging import drop_file_cache

    paths = [p for p in Path(list_file).read_text().splitlines() if p.strip()]
    for path in paths:
        if Path(path).is_file():
            drop_file_cache(path)
    return len(paths)


def ours(config: dict, tokens: int, drop_list: str) -> dict:
    from qvl_pipeline import Pipeline
    from qvl_pipeline.bench.worker import config_from_dict
    from qvl_pipeline.container import make_container

    start = time.perf_counter()
    pipe = Pipeline.from_container(make_container(config_from_dict(config)))
    load_s = time.perf_counter() - start
    memory = pipe.run_plan.resolver.resolve("memory")
    streaming = getattr(memory, "streaming", None)
    files = sorted({e.path for u in streaming.units() for e in u.residency.extents}) if streaming else []
    drop(drop_list)
    before = streaming.stats.bytes_read if streaming else 0
    t0 = time.perf_counter()
    result = pipe.generate(PROMPT, max_new_tokens=tokens, temperature=0)
    wall = time.perf_counter() - t0
    stats = streaming.stats if streaming else None
    streamed = (stats.bytes_read - before) if stats else 0
    timings = result["timings"]
    return {"load_s": round(load_s, 2), "prefill_s": timings["prefill_s"],
            "decode_tokens_per_s": timings["decode_tokens_per_s"], "generated": len(result["token_ids"]),
            "token_ids": result["token_ids"], "placement": pipe.loaded.placement.summary(),
            "pool_mib": round(streaming.prefetcher.pool / 2**20, 1) if streaming else 0,
            "streamed_gib": round(streamed / 2**30, 3), "generate_s": round(wall, 2),
            "disk_gb_s_over_generate": round(streamed / wall / 1e9, 3) if wall else None,
            "prefetch_gb_s_while_reading": round(stats.read_gb_s, 3) if stats else None,
            "compute_waits": stats.compute_waits if stats else 0,
            "files": files}


def accelerate(folder: str, tokens: int, budget_gib: float, drop_list: str) -> dict:
    from transformers import Qwen3VLForConditionalGeneration

    from qvl_pipeline.processing.chat_template import ChatTemplate
    from qvl_pipeline.processing.prompt import build_prompt
    from qvl_pipeline.processing.tokenizer import Tokenizer

    offload = tempfile.mkdtemp(prefix="qvl-accelerate-offload-")
    start = time.perf_counter()
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        folder, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": int(budget_gib * 2**30)},
        offload_folder=offload).eval()
    load_s = time.perf_counter() - start
    devices = {}
    for device in getattr(model, "hf_device_map", {}).values():
        devices[str(device)] = devices.get(str(device), 0) + 1
    offloaded = [str(p) for p in Path(offload).rglob("*") if p.is_file()]
    Path(drop_list).write_text("\n".join([*Path(drop_list).read_text().splitlines(), *offloaded]))
    prompt = build_prompt(Tokenizer.from_folder(folder), ChatTemplate.from_folder(folder), PROMPT)
    ids = torch.tensor([prompt.input_ids])
    with torch.inference_mode():
        drop(drop_list)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - t0
        drop(drop_list)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        total = time.perf_counter() - t1
    offloaded_gib = sum(Path(p).stat().st_size for p in offloaded) / 2**30
    shutil.rmtree(offload, ignore_errors=True)
    return {"load_s": round(load_s, 2), "prefill_s": round(prefill, 3),
            "decode_tokens_per_s": round((tokens - 1) / max(total - prefill, 1e-9), 3), "generated": tokens,
            "token_ids": out[0, ids.shape[1]:].tolist(), "device_map": devices,
            "offloaded_gib": round(offloaded_gib, 3)}


if __name__ == "__main__":
    impl, spec = sys.argv[1], json.loads(Path(sys.argv[2]).read_text(encoding="utf-8"))
    row = ours(spec["config"], spec["tokens"], spec["drop_list"]) if impl == "ours" \
        else accelerate(spec["folder"], spec["tokens"], spec["budget_gib"], spec["drop_list"])
    row["peak_rss_mib"] = round(status_mib("VmHWM"), 1)
    print(json.dumps(row))
