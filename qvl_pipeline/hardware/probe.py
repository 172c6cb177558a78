"""Read this machine's facts: /proc/cpuinfo, /sys caches, psutil, torch.cuda and the model's disk."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import psutil

from qvl_pipeline.cache_root import default_cache_dir
from qvl_pipeline.hardware.profile import (
    KNOWN_ISA_FLAGS,
    CpuFacts,
    GpuFacts,
    HardwareProfile,
    StorageFacts,
)


def read_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    """(model name, known ISA flags) from the text of /proc/cpuinfo (pure)."""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    present = set(flags.group(1).split()) if flags else set()
    return (model.group(1).strip() if model else "unknown"), tuple(f for f in KNOWN_ISA_FLAGS if f in present)


def _cache_sizes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> tuple[int, int]:
    l2 = l3 = 0
    for index in sorted(root.glob("index*")):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        kb = int(size[:-1]) * (1024 if size.endswith("M") else 1) if size[-1] in "KM" else int(size) // 1024
        if level == 2:
            l2 = kb
        elif level == 3:
            l3 = kb
    return l2, l3


def probe_cpu() -> CpuFacts:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    model, isa = read_cpuinfo(text)
    l2, l3 = _cache_sizes()
    threads = psutil.cpu_count(logical=True) or 1
    cores = psutil.cpu_count(logical=False) or threads
    return CpuFacts(model=model, physical_cores=cores, threads=threads, isa=isa, l2_kb=l2, l3_kb=l3)


def torch_has_kernels_for(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build with `arch_list` runs on a GPU of `capability` (pure).

    Exact SASS (sm_XY) runs on the same major with minor ≥ Y; PTX (compute_XY) JIT-compiles for any ≥ XY.
    """
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit():
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def probe_gpu() -> tuple[GpuFacts | None, str]:
    """The first CUDA GPU torch sees, and a note when an NVIDIA GPU exists that torch cannot use."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        cap = (props.major, props.minor)
        has = torch_has_kernels_for(cap, torch.cuda.get_arch_list())
        note = "" if has else (f"torch {torch.__version__} has no kernels for sm_{cap[0]}{cap[1]} "
                               f"(built for {' '.join(torch.cuda.get_arch_list())}); CUDA entries fall back to the CPU")
        return GpuFacts(name=props.name, compute_capability=cap, vram_gb=round(props.total_memory / 1024**3, 2),
                        torch_has_kernels=has), note
    nvidia = sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))
    if nvidia:
        name = re.search(r"^Model:\s*(.+)$", nvidia[0].read_text(), re.M)
        label = name.group(1).strip() if name else "an NVIDIA GPU"
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        return None, (f"{label} is present but torch {torch.__version__} ({build}) cannot use it; for Pascal "
                      "install a CUDA 12.6 build of torch")
    return None, ""


def storage_kind(path: Path) -> str:
    """nvme | ssd | hdd | unknown for the block device holding `path`."""
    try:
        dev = os.stat(path).st_dev
        sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    except OSError:
        return "unknown"
    for node in (sys_dev, sys_dev.parent):
        rotational = node / "queue" / "rotational"
        if rotational.exists():
            if node.name.startswith("nvme"):
                return "nvme"
            return "hdd" if rotational.read_text().strip() == "1" else "ssd"
    return "unknown"


def measure_read_mb_s(files: list[Path], limit_bytes: int = 512 * 1024**2) -> float:
    """Sequential read speed over `files`, asking the kernel to drop them from the page cache first."""
    total, start = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            while total < limit_bytes:
                chunk = fh.read(16 * 1024**2)
                if not chunk:
                    break
                total += len(chunk)
        if total >= limit_bytes:
            break
    seconds = time.perf_counter() - start
    return round(total / 1024**2 / seconds, 1) if seconds > 0 and total else 0.0


def measure_memory_gb_s(size_mb: int = 256) -> float:
    """Read bandwidth of RAM in GB/s: a streaming sum over a tensor far larger than the last-level cache, on all
    the process's threads, best of 5. A decode step only reads its weights, so this (not a copy, which also writes)
    is the rate that bounds it: on the 2-core dev VM a copy counted 40.4 GB/s while the int8 decode step read
    its weights at 53 GB/s."""
    import torch

    src = torch.ones(size_mb * 1024**2 // 4, dtype=torch.float32)
    src.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - start)
    return round(src.numel() * 4 / best / 1e9, 1)


SCRATCH_BYTES = 64 * 1024**2     # the temp file measured when there are no model shards to read


def _scratch_read_mb_s(folder: Path, size: int | None = None) -> float:
    """Read speed of a temp file of `size` bytes written (and synced, and dropped from the page cache) in `folder`;
    0.0 when it cannot be written. The file is always removed."""
    import tempfile

    size = size or SCRATCH_BYTES
    try:
        fd, name = tempfile.mkstemp(prefix=".qvl-disk-speed-", suffix=".tmp", dir=folder)
    except OSError:
        return 0.0
    try:
        with os.fdopen(fd, "wb") as fh:
            block = os.urandom(1024**2)
            for _ in range(size // len(block)):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        return measure_read_mb_s([Path(name)], limit_bytes=size)
    except OSError:
        return 0.0
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def disk_speed(path: Path) -> float:
    """Cached per device: sequential read speed of the disk holding `path`. A checkpoint folder's `*.safetensors`
    shards (a file: itself) are read; a folder without shards gets a bounded temp file written in it. Never walks
    a folder tree. 0.0 = could not be measured."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return 0.0
    cache = default_cache_dir() / "disk_speed.json"
    try:
        known = json.loads(cache.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    key = f"{os.major(dev)}:{os.minor(dev)}"
    if not isinstance(known.get(key), (int, float)):
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))[:8]
            speed = measure_read_mb_s(files) if files else _scratch_read_mb_s(path)
        else:
            speed = measure_read_mb_s([path])
        if not speed:
            return 0.0
        known[key] = speed
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known))
    return float(known[key])


def probe_machine(model_path: str | None = None, measure: bool = False) -> tuple[HardwareProfile, list[str]]:
    """This machine as a HardwareProfile (without chains) and notes worth telling the user."""
    cpu = probe_cpu()
    gpu, note = probe_gpu()
    # The model's disk; without a model.path, the cache folder that holds the demo checkpoint (never the current
    # folder: measuring reads shards or one bounded temp file, and walks no tree).
    model = Path(model_path).expanduser() if model_path else None
    disk = model if model is not None and model.exists() else default_cache_dir()
    if disk == default_cache_dir() and measure:
        with contextlib.suppress(OSError):
            disk.mkdir(parents=True, exist_ok=True)
    storage = StorageFacts(kind=storage_kind(disk), read_mb_s=disk_speed(disk) if measure else 0.0)
    if measure:
        cpu = replace(cpu, memory_bandwidth_gb_s=measure_memory_gb_s())
    ram = round(psutil.virtual_memory().total / 1024**3, 1)
    profile = HardwareProfile(name="probed", cpu=cpu, ram_gb=ram, storage=storage, gpu=gpu,
                              description=f"probed on {cpu.model}", probed=True)
    return profile, [note] if note else []
