"""Dataclass schemas for the composed config: Hydra rejects unknown keys and wrong types against these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from qvl_pipeline.memory_plan import DEFAULT_RESERVE_GB


@dataclass
class HardwareConfig:
    name: str = MISSING
    description: str = ""
    probe: bool = False          # true: read the facts from this machine (hardware=auto)
    emulate: bool = False        # true: cap threads, memory budgets and CPU ISA to the profile
    measure: bool = False        # true: measure RAM and disk bandwidth (cached per disk)
    threads: int | None = None   # compute threads; null: one per physical core of the (effective) profile
    pin_threads: bool = False    # true: bind them one per physical core (OMP_PLACES=cores; the CLI restarts once)
    cpu: Any = None
    ram_gb: Any = None
    gpu: Any = None
    storage: Any = None
    budgets: dict[str, Any] = field(default_factory=dict)
    chains: dict[str, list[str]] = field(default_factory=dict)
    probed: bool = False
    tuned: list[str] = field(default_factory=list)   # task=tune: the measurements that ordered the chains


@dataclass
class OptConfig:
    level: str = MISSING
    description: str = ""
    max_fidelity: str = MISSING  # reference | exact | near | approximate
    self_test: bool = True       # run each chosen plugin's self-test during resolution
    use_budgets: bool = True     # apply the hardware profile's pixel/context budgets


@dataclass
class ModelConfig:
    name: str = MISSING
    description: str = ""
    path: str | None = None      # a Hugging Face checkpoint folder; its config.json wins over hf_config
    dtype: str = "auto"          # auto (the checkpoint's) | float32 | bfloat16 | float16
    demo: bool = False           # true: deterministic random demo weights, bundled tokenizer
    seed: int = 0                # demo weights' seed
    hf_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class SlotConfig:
    choice: str | None = None    # null (option `auto`): follow the hardware profile's chain
    # Per plugin: <slot>.options.<plugin>.<option>=value, whether the plugin is chosen explicitly or by the chain;
    # defaults live in each plugin's Options dataclass.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MemorySlotConfig(SlotConfig):
    """The memory slot with its budgets. They are typed here, not as plugin options: the planner and every memory
    plugin obey the same budgets whichever plugin the chain picks, and they read as the issue spells them
    (`memory.ram_budget_gb=4`)."""

    ram_budget_gb: float | None = None   # RAM this run may hold (weights, KV cache, stream pool, runtime); null:
                                         # the machine's RAM (the profile's, capped by hardware.emulate) − reserve_gb
    vram_budget_gb: float | None = None  # VRAM for weights + KV cache; null: the GPU's VRAM − 0.5 GiB (CUDA context)
    reserve_gb: float = DEFAULT_RESERVE_GB   # RAM left to the OS and other programs when ram_budget_gb is null


@dataclass
class TaskConfig:
    name: str = MISSING
    description: str = ""


@dataclass
class FeaturesConfig:
    max_cached_images: int = 16     # stage 2: vision outputs kept per image content (chat turns reuse them)


@dataclass
class ProcessingConfig:
    max_pixels: int | None = None   # cap on resized image area (pixels); null = checkpoint / profile
    min_pixels: int | None = None
    max_image_pixels: int = 2**26   # decompression-bomb guard on the *input* file, checked from its header (64 MP)
    allow_special_tokens: bool = False   # true: control tokens typed in the prompt act as control tokens (unsafe)


@dataclass
class GenerateConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0       # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    max_context: int | None = None  # KV-cache length; null = prompt + max_new_tokens


@dataclass
class BenchConfig:
    """task=bench: one image + the prompt, `tokens` new tokens greedy, on model.path (else a random checkpoint of
    `model`'s shape); ranges are checked in config/load.py."""

    tokens: int = 32               # new tokens per measured generate
    rounds: int = 3                # measured generates per system (after one short warm-up); medians are reported
    compare: str = "none"          # none | transformers (the reference, bf16 + sdpa, in its own process)
    model: str = "qwen3_vl_2b"     # model preset whose shape the random checkpoint has when model.path is not set
    image: str | None = None       # null: a generated 448x448 picture (written once in the cache folder)
    accuracy: bool = True          # greedy agreement and logit error vs opt=minimal (tiny config + this checkpoint)
    ssd: bool = False              # also measure memory=ssd_stream under a RAM budget (qvl_pipeline/bench/ssd.py)
    ssd_share: float = 0.3         # that budget as a share of the weights in the kernels plugin's format


@dataclass
class TuneConfig:
    """task=tune: measure each slot's usable candidates and write conf/hardware/<name>.yaml."""

    name: str | None = None        # profile name (and file name); null: tuned_<host name>
    overwrite: bool = False        # true: replace an existing conf/hardware/<name>.yaml
    min_time: float = 0.1          # seconds of repeated calls per measurement (the best call counts)


@dataclass
class RootConfig:
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    opt: OptConfig = field(default_factory=OptConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: SlotConfig = field(default_factory=SlotConfig)
    rotary: SlotConfig = field(default_factory=SlotConfig)
    kernels: SlotConfig = field(default_factory=SlotConfig)
    memory: MemorySlotConfig = field(default_factory=MemorySlotConfig)
    kv_cache: SlotConfig = field(default_factory=SlotConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    processing: ProcessingConfig = field(default_factory=ProcessingConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    prompt: str = "Describe this image."     # taken literally from the command line (never interpolated)
    prompt_file: str | None = None   # the prompt is this UTF-8 file's text (`-`: standard input); wins over prompt
    image: str | None = None
    images: list[str] = field(default_factory=list)
    video: list[str] = field(default_factory=list)   # a video given as frame image paths
    output: str = "text"          # text | json
    progress: bool = True
    results_dir: str | None = None   # where the plan and outputs are saved; null = Hydra's run dir


def register_schemas(plugin_names: dict[str, list[str]] | None = None) -> None:
    """Register the root schema and one option per plugin in each slot group (`auto` plus every built-in and
    entry-point plugin the registry knows), so `attention=<name>` works alike for all of them (idempotent)."""
    import warnings

    from hydra.core.config_store import ConfigStore

    from qvl_pipeline.registry import SLOT_NAMES, PluginRegistry

    # The user's conf/ folder is optional: Hydra warns when a search-path entry does not exist.
    warnings.filterwarnings("ignore", message=r"provider=hydra\.searchpath in main, path=.* is not available")

    store = ConfigStore.instance()
    store.store(name="qvl_schema", node=RootConfig)
    if plugin_names is None:
        registry = PluginRegistry()
        plugin_names = {slot: registry.names(slot) for slot in SLOT_NAMES}
    for slot in SLOT_NAMES:
        store.store(group=slot, name="auto", node={"choice": None})
        for name in plugin_names.get(slot, []):
            store.store(group=slot, name=name, node={"choice": name})
