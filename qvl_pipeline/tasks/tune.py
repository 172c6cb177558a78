"""task=tune: measure each slot's usable candidates at the model's real shapes on this machine and write a hardware
profile whose chains are ordered by measured speed: <user conf dir>/hardware/<tune.name>.yaml, the running profile's
facts with a comment block citing every measurement, and `tuned:` notes that task=plan prints.

Candidates are the entries of the running profile's chain that the opt level admits, that validate on this
machine and pass their self-test (the resolver's own screening). Measured entries are ranked fastest first into the
places measured entries held (one moves ahead of an earlier one only when faster by more than the noise margin);
every other entry keeps its place, so each chain stays a permutation of the profile's.
memory and kv_cache keep the profile's order: they trade memory, not speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from qvl_pipeline.bench.slot_speed import (
    DECODE_CONTEXT,
    DECODE_TOKENS,
    DTYPES,
    NOISE_MARGIN,
    PREFILL_ROWS,
    Measured,
    decoder_linears,
    measure_attention,
    measure_kernels,
    measure_rotary,
    ordered_chain,
)
from qvl_pipeline.config.load import user_conf_dir
from qvl_pipeline.config.schema import RootConfig
from qvl_pipeline.container import RootContainer
from qvl_pipeline.errors import ConfigError, OutputError
from qvl_pipeline.hardware.probe import measure_memory_gb_s
from qvl_pipeline.hardware.profile import profile_from_dict
from qvl_pipeline.resolver import Resolver
from qvl_pipeline.slots import SLOTS, Plugin
from qvl_pipeline.tasks.probe import profile_yaml
from qvl_pipeline.tasks.results import write_unit

MEASURED_SLOTS = ("kernels", "attention", "rotary")
PASSES = 2                      # interleaved passes over a slot's candidates; each keeps its best (contention)
KEPT = {"memory": "placement trades memory, not speed", "kv_cache": "the cache format trades memory, not speed"}
HOST_NAME_CHARS = 40


def progress(text: str) -> None:
    print(f"tune: {text}", file=sys.stderr, flush=True)


def default_name() -> str:
    """tuned_<host name> in the characters a profile name may hold."""
    host = re.sub(r"[^a-z0-9]+", "_", socket.gethostname().lower()).strip("_")[:HOST_NAME_CHARS]
    return f"tuned_{host or 'machine'}"


def profile_path(name: str) -> Path:
    return user_conf_dir() / "hardware" / f"{name}.yaml"


@dataclass
class SlotTuning:
    """One slot: the profile's chain, the tuned chain, what was measured and why the other entries were not."""

    slot: str
    chain: tuple[str, ...]
    tuned: tuple[str, ...]
    measured: list[Measured] = field(default_factory=list)
    unmeasured: dict[str, str] = field(default_factory=dict)     # plugin -> why it was not measured
    note: str = ""                                               # for a slot whose order is kept

    def to_dict(self) -> dict[str, Any]:
        return {"chain": list(self.chain), "tuned": list(self.tuned), "measured": [m.to_dict() for m in self.measured],
                "unmeasured": dict(self.unmeasured), "note": self.note}


def usable(resolver: Resolver, slot: str, self_test: bool) -> tuple[list[Plugin], dict[str, str]]:
    """The chain's entries that the opt level admits, that validate here and (when self-tests are on) pass theirs,
    as instances with their configured options; and the reason for each entry that does not."""
    plugins, reasons = [], {}
    for name in resolver.chain(slot):
        spec, options, why = resolver.screen(slot, name)     # the resolver's own screening: fidelity, validate
        if why:
            reasons[name] = "; ".join(why)
            continue
        assert spec is not None
        try:
            plugin = spec.cls(resolver.facts, options, name=name)
            if self_test:
                plugin.self_test(resolver.reference(slot))
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            reasons[name] = f"could not be built or failed its self-test: {type(exc).__name__}: {first}"
            continue
        plugins.append(plugin)
    return plugins, reasons


def tune_slot(slot: str, resolver: Resolver, measure: Callable[[Plugin], Measured], self_test: bool) -> SlotTuning:
    """Measure the slot's usable candidates in PASSES interleaved passes (each keeps its best) and rank them."""
    chain = resolver.chain(slot)
    plugins, unmeasured = usable(resolver, slot, self_test)
    best: dict[str, Measured] = {}
    for attempt in range(PASSES):
        for plugin in plugins:
            if plugin.name in unmeasured:
                continue
            progress(f"{slot}: measuring {plugin.name} (pass {attempt + 1}/{PASSES})")
            try:
                found = measure(plugin)
            except Exception as exc:        # a candidate that breaks here keeps its place and says why
                unmeasured[plugin.name] = f"failed while measuring: {type(exc).__name__}: {exc}"[:300]
                best.pop(plugin.name, None)
                continue
            if plugin.name not in best or found.score < best[plugin.name].score:
                best[plugin.name] = found
    measured = list(best.values())
    tuned = ordered_chain(chain, {m.plugin: m.score for m in measured})
    return SlotTuning(slot, chain, tuned, sorted(measured, key=lambda m: m.score), unmeasured)


def tune_all(resolver: Resolver, min_time: float, self_test: bool) -> dict[str, SlotTuning]:
    """Every slot of the running profile: the measured ones re-ordered, memory and kv_cache kept."""
    facts = resolver.facts
    stored = DTYPES[facts.model.stored_dtype]
    act = resolver.resolve("kernels").compute_dtype(stored)          # the dtype activations flow in this run
    counts, head = decoder_linears(facts, resolver.reference("kernels"), resolver.reference("attention"),
                                   resolver.reference("rotary"))
    measures: dict[str, Callable[[Any], Measured]] = {
        "kernels": lambda p: measure_kernels(p, facts, counts, head, min_time),
        "attention": lambda p: measure_attention(p, facts, act, min_time),
        "rotary": lambda p: measure_rotary(p, facts, act, min_time),
    }
    results = {}
    for slot in SLOTS:
        if slot not in facts.hardware.chains:
            continue
        if slot in measures:
            results[slot] = tune_slot(slot, resolver, measures[slot], self_test)
        else:
            chain = resolver.chain(slot)
            results[slot] = SlotTuning(slot, chain, chain, note=f"order kept: {KEPT[slot]}")
    return results


# ---- the profile's text -----------------------------------------------------------------------------------------

def _ms(value: float) -> str:
    return f"{value:.3g} ms"


def measurement_lines(result: SlotTuning) -> list[str]:
    """The comment block's lines for one slot: each measured candidate, then why the others were not."""
    if result.note:
        return [f"{result.slot}: {list(result.chain)} ({result.note})"]
    lines = [f"{result.slot}: {list(result.chain)} -> {list(result.tuned)}"]
    for m in result.measured:
        if result.slot == "kernels":
            lines.append(f"  {m.plugin}: decode {_ms(m.decode_ms)}/token ({m.detail['gb_s']:g} GB/s of "
                         f"{m.detail['weight_bytes_per_token'] / 1e9:.3g} GB weights, {m.detail['compute_dtype']}), "
                         f"prefill {_ms(m.prefill_ms)}; request {m.score:.3g} s")
            for shape, row in m.detail["shapes"].items():
                prefill = f", prefill {_ms(row['prefill_ms'])}" if row["prefill_ms"] is not None else ""
                lines.append(f"      {shape} x{row['per_token']}: decode {_ms(row['decode_ms'])} per call "
                             f"({row['gb_s']:g} GB/s){prefill}")
        else:
            lines.append(f"  {m.plugin}: decode {_ms(m.decode_ms)}, prefill {_ms(m.prefill_ms)} per {m.detail['per']} "
                         f"({m.detail['dtype']}); request {m.score:.3g} s")
    for name, why in result.unmeasured.items():
        lines.append(f"  not measured: {name}: {why}")
    return lines


def tuned_note(result: SlotTuning, date: str, shapes: str) -> str:
    """One line for the profile's `tuned:` list (task=plan prints it)."""
    ranked = " < ".join(f"{m.plugin} {m.score:.3g} s" for m in result.measured)
    what = "decode ms/token" if result.slot == "kernels" else "decode ms"
    per = ", ".join(f"{m.plugin} {m.decode_ms:.3g}" for m in result.measured)
    return (f"{result.slot}: {ranked} per request ({PREFILL_ROWS}-position prefill + {DECODE_TOKENS} tokens; {what}: "
            f"{per}); measured {date}, {shapes}")


def write_profile(path: Path, text: str, overwrite: bool) -> None:
    """Write `text` to `path` through a temp file; never replaces an existing file unless `overwrite`."""
    fix = "choose another tune.name=... or make the folder writable (QVL_CONF_DIR=... moves it)"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}", fix) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)                     # fails when the file appeared meanwhile: never overwritten
    except FileExistsError:
        raise _exists(path) from None
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}", fix) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _exists(path: Path) -> ConfigError:
    return ConfigError(f"the hardware profile {path} exists already",
                       "pass tune.overwrite=true to replace it, or tune.name=<another name>")


def run(config: RootConfig, container: RootContainer, results_dir: Path | None = None) -> int:
    name = config.tune.name or default_name()
    path = profile_path(name)
    if path.exists() and not config.tune.overwrite:
        raise _exists(path)                        # before anything is measured
    report = container.core.hardware_report()
    resolver = container.core.resolver()
    facts = container.core.facts()
    started = time.perf_counter()
    profile = report.profile
    bandwidth = profile.cpu.memory_bandwidth_gb_s
    if not bandwidth:
        progress("measuring RAM read bandwidth")
        bandwidth = measure_memory_gb_s()
    results = tune_all(resolver, config.tune.min_time, config.opt.self_test)
    date = time.strftime("%Y-%m-%d %H:%M %Z")
    model = facts.model
    decoder = f"{model.config.text.num_hidden_layers}-layer {model.config.text.hidden_size}-wide decoder"
    header = [
        f"Tuned hardware profile {name}: written by `python -m qvl_pipeline task=tune` on {date}, from "
        f"hardware={report.target} opt={config.opt.level}, at the shapes of the {decoder} of {model.source}.",
        f"Use it with hardware={name} (python -m qvl_pipeline hardware={name} task=plan shows what it chooses).",
        "Facts copied from the running profile; chains ordered by measured speed, fastest first: an entry moves "
        f"ahead of an earlier one only when more than {NOISE_MARGIN:.0%} faster; entries that were not measured keep "
        "their place.",
        f"Cost of a candidate: one request, a {PREFILL_ROWS}-position prefill plus {DECODE_TOKENS} decoded tokens "
        f"(decode attention over {DECODE_CONTEXT} keys); each measurement is the best call of "
        f"{config.tune.min_time:g} s of repeated calls, the best of {PASSES} interleaved passes.",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; RAM read bandwidth {bandwidth:g} GB/s"
        + ("" if profile.cpu.memory_bandwidth_gb_s else " (measured)") + ".",
    ]
    for result in results.values():
        header += measurement_lines(result)
    facts_dict = profile.to_dict()
    facts_dict["cpu"] = {**facts_dict["cpu"], "memory_bandwidth_gb_s": bandwidth}
    chains = {**{slot: list(chain) for slot, chain in profile.chains.items()},
              **{slot: list(r.tuned) for slot, r in results.items()}}
    notes = [tuned_note(r, date, decoder) for r in results.values() if r.measured]
    text = profile_yaml(facts_dict, chains, profile.budgets, name=name,
                        description=f"tuned on {profile.cpu.model} ({date}) from hardware={report.target}",
                        header=header, tuned=notes)
    profile_from_dict(yaml.safe_load(text))      # what is written must load (a failure here is a bug)
    write_profile(path, text, config.tune.overwrite)
    summary = {"profile": str(path), "name": name, "date": date, "hardware": report.target,
               "opt": config.opt.level, "model": model.source, "ram_bandwidth_gb_s": bandwidth,
               "seconds": round(time.perf_counter() - started, 2),
               "slots": {slot: r.to_dict() for slot, r in results.items()}}
    if config.output == "json":
        print(json.dumps(summary, indent=2))
    else:
        print("\n".join(line for r in results.values() for line in measurement_lines(r)))
        print(f"written: {path} (use it with hardware={name})")
    if results_dir is not None:
        write_unit(results_dir, {"tune.json": summary})
    return 0
