"""The facts of one machine: the contract between probing, profiles, resolution and plugins."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Instruction-set flags the profiles and plugins speak about (names as in /proc/cpuinfo).
KNOWN_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                   "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


# Keys of the hardware config group that steer a run rather than describe the machine.
RUN_SWITCHES = frozenset({"probe", "emulate", "measure", "threads", "pin_threads"})


class ProfileError(ValueError):
    """A hardware profile is malformed; the message names the field."""


# The budgets a profile may set, each an integer ≥ 1 (a run's request limits).
BUDGET_KEYS = ("max_pixels", "max_context")
STORAGE_KINDS = ("nvme", "ssd", "hdd", "unknown")
# Ranges of the numeric facts, (low, high, low_inclusive): a machine has at least one core and some memory; sizes
# and bandwidths are never negative (0 = unknown where the field says so).
_RANGES: dict[str, tuple[float, float | None, bool]] = {
    "CpuFacts.physical_cores": (1, None, True), "CpuFacts.threads": (1, None, True),
    "CpuFacts.l2_kb": (0, None, True), "CpuFacts.l3_kb": (0, None, True),
    "CpuFacts.memory_bandwidth_gb_s": (0, None, True),
    "GpuFacts.vram_gb": (0, None, False), "GpuFacts.memory_bandwidth_gb_s": (0, None, True),
    "GpuFacts.pcie_gb_s": (0, None, True), "StorageFacts.read_mb_s": (0, None, True),
    "HardwareProfile.ram_gb": (0, None, False),
}


def _check_range(owner: str, name: str, value: Any, where: str) -> None:
    """Raise ProfileError when a numeric fact is NaN/inf or outside its range (see _RANGES)."""
    rule = _RANGES.get(f"{owner}.{name}")
    if rule is None or not isinstance(value, (int, float)):
        return
    low, high, inclusive = rule
    ok = math.isfinite(value) and (value >= low if inclusive else value > low) and (high is None or value <= high)
    if not ok:
        bound = f"{'≥' if inclusive else '>'} {low:g}"
        raise ProfileError(f"{where}: must be a number {bound}, got {value!r}")


def check_budgets(budgets: Any, where: str = "hardware.budgets") -> dict[str, int]:
    """The budgets mapping validated: known keys only, each an integer ≥ 1 (null entries dropped)."""
    if budgets is None:
        return {}
    if not isinstance(budgets, dict):
        raise ProfileError(f"{where}: expected a mapping such as {{max_pixels: 1003520}}")
    checked = {}
    for key, value in budgets.items():
        if key not in BUDGET_KEYS:
            raise ProfileError(f"{where}.{key}: unknown budget; known budgets are {list(BUDGET_KEYS)}")
        if value is None:
            continue
        value = _coerce(value, "int", f"{where}.{key}")
        if value < 1:
            raise ProfileError(f"{where}.{key}: must be an integer ≥ 1, got {value}")
        checked[key] = value
    return checked


@dataclass(frozen=True)
class CpuFacts:
    model: str = "unknown"
    physical_cores: int = 1
    threads: int = 1
    isa: tuple[str, ...] = ()
    l2_kb: int = 0            # per core
    l3_kb: int = 0            # shared
    memory_bandwidth_gb_s: float = 0.0   # sustained DRAM bandwidth; 0 = unknown


@dataclass(frozen=True)
class GpuFacts:
    name: str = ""
    compute_capability: tuple[int, int] = (0, 0)
    vram_gb: float = 0.0
    memory_bandwidth_gb_s: float = 0.0
    pcie_gb_s: float = 0.0            # host↔device bandwidth
    # Whether the installed torch build ships kernels for this GPU; None for a profile that describes
    # a target machine (unknown until run there).
    torch_has_kernels: bool | None = None

    @property
    def sm(self) -> int:
        return self.compute_capability[0] * 10 + self.compute_capability[1]


@dataclass(frozen=True)
class StorageFacts:
    kind: str = "unknown"             # nvme | ssd | hdd | unknown
    read_mb_s: float = 0.0            # sequential read of the model's disk; 0 = not measured


@dataclass(frozen=True)
class HardwareProfile:
    """One machine. `gpu` is None for a machine without a (usable) NVIDIA GPU."""

    name: str
    cpu: CpuFacts
    ram_gb: float
    storage: StorageFacts
    gpu: GpuFacts | None = None
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Per-machine request budgets (max_pixels, max_context); opt=minimal ignores them.
    budgets: dict[str, int] = field(default_factory=dict)
    description: str = ""
    # True when the facts were measured on this machine (hardware=auto), False for a named target.
    probed: bool = False
    # task=tune: one line per measured slot citing the measurements that ordered its chain (and when).
    tuned: tuple[str, ...] = ()

    def has_isa(self, flag: str) -> bool:
        return flag in self.cpu.isa

    def cuda_reasons(self, min_cc: tuple[int, int] = (0, 0), feature: str = "") -> list[str]:
        """Why CUDA (at compute capability ≥ min_cc, for `feature`) cannot be used here; empty when it can."""
        if self.gpu is None:
            return ["needs a CUDA GPU; this machine has none"]
        reasons = []
        if self.gpu.torch_has_kernels is False:
            reasons.append(f"needs CUDA kernels for sm_{self.gpu.sm} ({self.gpu.name}); the installed torch build "
                           "has none (for Pascal install a CUDA 12.6 build, cu126: 12.8+ builds dropped sm_60/61)")
        if self.gpu.compute_capability < min_cc:
            reasons.append(f"needs compute capability ≥ {min_cc[0]}.{min_cc[1]} ({feature}); GPU is sm_{self.gpu.sm}")
        return reasons

    @property
    def cuda_usable(self) -> bool:
        """A GPU is present and the installed torch can run kernels on it."""
        return self.gpu is not None and self.gpu.torch_has_kernels is not False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu"]["isa"] = list(self.cpu.isa)
        if self.gpu is not None:
            data["gpu"]["compute_capability"] = list(self.gpu.compute_capability)
        data["chains"] = {slot: list(chain) for slot, chain in self.chains.items()}
        data["tuned"] = list(self.tuned)
        return data


def _build(cls: type, data: Any, where: str) -> Any:
    """Build a facts dataclass from a mapping, naming the exact field that is wrong."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ProfileError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, known[name].type, f"{where}.{name}")
        _check_range(cls.__name__, name, kwargs[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is absent
        raise ProfileError(f"{where}: {exc}") from None


def _coerce(value: Any, type_name: Any, where: str) -> Any:
    text = str(type_name)
    if text.startswith("tuple[int, int]"):
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)):
            raise ProfileError(f"{where}: expected [major, minor] integers, got {value!r}")
        return tuple(value)
    if text.startswith("tuple[str"):
        if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            raise ProfileError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if text == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(f"{where}: expected an integer, got {value!r}")
        return value
    if text == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if text == "str":
        if not isinstance(value, str):
            raise ProfileError(f"{where}: expected a string, got {value!r}")
        return value
    if text.startswith("bool"):
        if value is not None and not isinstance(value, bool):
            raise ProfileError(f"{where}: expected true/false, got {value!r}")
        return value
    return value


def profile_from_dict(data: dict[str, Any]) -> HardwareProfile:
    """Validate a plain mapping (a profile YAML) into a HardwareProfile; errors name the field."""
    if not isinstance(data, dict):
        raise ProfileError(f"hardware: expected a mapping, got {type(data).__name__}")
    required = ("name", "cpu", "ram_gb", "storage")
    missing = [key for key in required if data.get(key) is None]
    if missing:
        raise ProfileError(f"hardware: missing field(s) {missing}")
    allowed = {f.name for f in fields(HardwareProfile)} | RUN_SWITCHES
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ProfileError(f"hardware: unknown field(s) {unknown}; known fields are {sorted(allowed)}")
    chains_raw = data.get("chains") or {}
    if not isinstance(chains_raw, dict):
        raise ProfileError("hardware.chains: expected a mapping of slot -> list of plugin names")
    chains: dict[str, tuple[str, ...]] = {}
    for slot, chain in chains_raw.items():
        if not (isinstance(chain, (list, tuple)) and chain and all(isinstance(c, str) for c in chain)):
            raise ProfileError(f"hardware.chains.{slot}: expected a non-empty list of plugin names, got {chain!r}")
        chains[slot] = tuple(chain)
    budgets = check_budgets(data.get("budgets") or {})
    ram = _coerce(data["ram_gb"], "float", "hardware.ram_gb")
    _check_range("HardwareProfile", "ram_gb", ram, "hardware.ram_gb")
    gpu_raw = data.get("gpu")
    cpu = _build(CpuFacts, data["cpu"], "hardware.cpu")
    if cpu.threads < cpu.physical_cores:
        raise ProfileError(f"hardware.cpu.threads: a CPU has at least one thread per core, got {cpu.threads} threads "
                           f"for {cpu.physical_cores} cores")
    storage = _build(StorageFacts, data["storage"], "hardware.storage")
    if storage.kind not in STORAGE_KINDS:
        raise ProfileError(f"hardware.storage.kind: expected one of {list(STORAGE_KINDS)}, got {storage.kind!r}")
    gpu = None if gpu_raw is None else _build(GpuFacts, gpu_raw, "hardware.gpu")
    if gpu is not None and (gpu.compute_capability[0] < 1 or gpu.compute_capability[1] < 0):
        raise ProfileError(f"hardware.gpu.compute_capability: expected [major ≥ 1, minor ≥ 0], got "
                           f"{list(gpu.compute_capability)}")
    return HardwareProfile(
        name=_coerce(data["name"], "str", "hardware.name"),
        cpu=cpu,
        ram_gb=ram,
        storage=storage,
        gpu=gpu,
        chains=chains,
        budgets=budgets,
        description=_coerce(data.get("description", ""), "str", "hardware.description"),
        probed=bool(data.get("probed", False)),
        tuned=_coerce(data.get("tuned") or (), "tuple[str, ...]", "hardware.tuned"),
    )
