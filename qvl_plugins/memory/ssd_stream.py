"""Decoder layers (and, if need be, the head, the vision tower and the embedding table) beyond the RAM budget stay on
disk and are streamed ahead of compute: the SSD as the last tier.

The planner (qvl_pipeline.memory_plan) keeps resident what the RAM budget holds — first the output head and the
leading layers, the vision tower and the embedding table only when there is room — and leaves the rest on disk,
in the files the weights are mapped from: the quantised cache for int8/int4 (fewer bytes to read), the checkpoint's
safetensors for an unquantised run. A background thread reads the next units into a small fixed pool while the
current one computes and each unit's pages are given back after use (MADV_DONTNEED, and POSIX_FADV_DONTNEED for the
page cache), so the process stays within memory.ram_budget_gb. The weights are the same tensors as in a resident run:
outputs are identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from qvl_pipeline.errors import ConfigError
from qvl_pipeline.memory_plan import STREAM_AHEAD, head_pieces
from qvl_pipeline.slots import Fidelity, RunFacts
from qvl_pipeline.slots.memory import MemoryManager, ModelParts, Placement, fits, plan_for
from qvl_plugins.memory.paging import supported
from qvl_plugins.memory.row_chunks import split_head
from qvl_plugins.memory.streaming import Streaming, attach_streaming


@dataclass(frozen=True)
class SsdStreamOptions:
    ahead: int = STREAM_AHEAD              # units read ahead of the one computing (the pool holds this many + 1)
    resident_layers: int | None = None     # null: as many leading decoder layers as the RAM budget holds
    drop_page_cache: bool = False          # true: also evict streamed pages from the page cache after use, so the
                                           # budget holds system-wide and every token reads the disk; false: the
                                           # kernel keeps them while RAM is free and reclaims them under pressure,
                                           # as for any mapped file (2B, 30 % budget, dev VM: 11.2 vs 1.0 tok/s,
                                           # the same peak RSS)

    def __post_init__(self) -> None:
        if self.ahead < 1:
            raise ValueError(f"ahead must be ≥ 1, got {self.ahead}")
        if self.resident_layers is not None and self.resident_layers < 0:
            raise ValueError(f"resident_layers must be ≥ 0 or null, got {self.resident_layers}")


class SsdStreamMemory(MemoryManager):
    fidelity = Fidelity.EXACT
    summary = ("what the RAM budget cannot hold stays on disk (quantised cache or checkpoint files) and is read "
               "ahead of compute into a small pool, then given back: runs any model size within memory.ram_budget_gb")
    Options = SsdStreamOptions
    mode = "ssd_stream"

    def __init__(self, facts: RunFacts, options: SsdStreamOptions | None = None, *, name: str = "") -> None:
        super().__init__(facts, options, name=name)
        self.streaming: Streaming | None = None
        self._replaced_head: tuple[Callable[[nn.Module | None], None], nn.Module | None] | None = None

    @classmethod
    def validate(cls, facts: RunFacts, options: SsdStreamOptions) -> list[str]:
        """Usable on Linux when the plan fits the budgets and, if it leaves anything on disk, the weights are read
        from files as they are used (a quantised format with its cache, or the checkpoint's own dtype)."""
        reasons = supported() or fits(facts, "ssd_stream", ahead=options.ahead,
                                      resident_layers=options.resident_layers)
        if reasons:
            return reasons
        plan = plan_for(facts, "ssd_stream", ahead=options.ahead, resident_layers=options.resident_layers)
        if Placement.from_plan(plan).on_disk and not facts.weight_format.file_backed:
            return [f"the {facts.weight_format.name} weights are converted in memory while loading, so nothing can "
                    "stay on disk; use a quantised kernels plugin with its cache on, or kernels=torch_native"]
        return []

    def planner_options(self) -> dict[str, object]:
        return {"ahead": self.options.ahead, "resident_layers": self.options.resident_layers}

    def attach(self, layers: Sequence[nn.Module], placement: Placement) -> Placement:
        """Hook the prefetcher onto the parts the placement leaves on disk (`layers` is the assembly's ModelParts);
        a head on disk is split into row ranges of about a decoder layer's bytes each (streamed whole when its
        kernels do not split exactly). The parts compute where the placement says."""
        self.detach(layers)
        if not placement.on_disk:
            return placement
        if not isinstance(layers, ModelParts):
            raise ConfigError("memory=ssd_stream needs the model's parts (vision tower, embeddings, head) to stream "
                              "them; it was handed the decoder layers only", "use memory=cpu")
        parts, plan = layers, placement.plan
        assert plan is not None and plan.model is not None and parts.embed is not None and parts.norm is not None
        head: list[nn.Module] = []
        tied = None
        if "head" in placement.on_disk:
            split = split_head(parts.head, parts.embed, head_pieces(plan.model.head_unit, plan.model.layers))
            if split is not None and parts.replace_head is not None:
                parts.replace_head(split)
                self._replaced_head = (parts.replace_head, parts.head)
                head = list(split.pieces)
            elif parts.head is not None:
                head = [parts.head]
            else:
                tied = (parts.embed, parts.norm)
        vision = parts.vision if "vision" in placement.on_disk else None
        self.streaming = attach_streaming(
            layers=[(i, parts.layers[i]) for i in placement.streamed_layers], head=head, tied_head=tied,
            vision=vision, vision_blocks=list(parts.vision_blocks), pool=plan.pool, ahead=self.options.ahead,
            drop_page_cache=self.options.drop_page_cache)
        return placement

    def detach(self, layers: Sequence[nn.Module]) -> None:
        """Stop streaming: hooks removed, the thread stopped, the head back as it was loaded (pages already given
        back are read again on use, from the same files)."""
        if self.streaming is not None:
            self.streaming.close()
            self.streaming = None
        if self._replaced_head is not None:
            replace_head, original = self._replaced_head
            replace_head(original)
            self._replaced_head = None
