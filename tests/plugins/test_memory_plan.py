"""The memory planner (pure) and the weight-format sizes it plans with: hand-made numbers, then the real 2B/4B/8B
shapes on the reference laptop's budgets."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from qvl_pipeline.errors import ConfigError
from qvl_pipeline.memory_plan import (
    GIB,
    Bandwidths,
    Budgets,
    DoesNotFit,
    MemoryKnobs,
    ModelBytes,
    derive_budgets,
    head_pieces,
    plan,
    plan_or_refuse,
    stream_pool,
    window_bytes,
    workspace_bytes,
)
from qvl_pipeline.model.sizing import count_params
from qvl_pipeline.weight_format import (
    Coding,
    WeightFormat,
    builtin_format,
    int4_suggestion,
    int8_suggestion,
    kv_bytes_per_position,
    part_sizes,
)

MIB = 2 ** 20
CONF = Path(__file__).resolve().parents[2] / "qvl_pipeline" / "conf" / "model"
W = workspace_bytes()


def hf(size: str) -> dict:
    return yaml.safe_load((CONF / f"qwen3_vl_{size}.yaml").read_text())["hf_config"]


def budgets(ram_mib: float, vram_mib: float = 0) -> Budgets:
    """Budgets of the runtime plus `ram_mib` MiB, and `vram_mib` MiB of VRAM."""
    return Budgets(W + int(ram_mib * MIB), int(vram_mib * MIB), "test ram", "test vram")


# Hand-made model: 4 layers of 100 MiB, vision 60 MiB in 3 blocks of 10 MiB, embedding 50, head 80, KV 1 KiB per
# position per layer.
TOY = ModelBytes(layers=(100 * MIB,) * 4, vision=60 * MIB, vision_block=10 * MIB, vision_depth=3, embed=50 * MIB,
                 head=80 * MIB, kv_per_position=1024, label="toy")
BW = Bandwidths(ram=10.0, disk=1.0, gpu=40.0, pcie=4.0)
POSITIONS = 1024                     # 1 MiB of KV per layer


# --- sizes in a weight format -----------------------------------------------------------------------------------

def test_codings_count_bytes_as_the_kernels_store_them():
    assert Coding("float", 2).linear_bytes(8, 64) == 8 * 64 * 2
    assert Coding("int8").linear_bytes(8, 64) == 8 * 64 + 4 * 8                      # + fp32 scale per row
    assert Coding("int4", group=32).linear_bytes(8, 64) == 8 * 32 + 2 * 8 * 4       # nibbles + bf16 scale/zero
    assert Coding("int4", group=32).linear_bytes(8, 48) == Coding("int8").linear_bytes(8, 48)  # 48 % 32: int8


@pytest.mark.parametrize("size", ["2b", "4b", "8b"])
def test_part_sizes_at_one_byte_per_parameter_are_the_parameter_counts(size):
    one = WeightFormat("1 byte", Coding("float", 1), Coding("float", 1), 1)
    config, counts = hf(size), count_params(hf(size))
    parts = part_sizes(config, one)
    assert parts.total == counts.total
    assert (parts.vision, parts.layer, parts.embed) == (counts.vision, counts.per_layer, counts.embed)
    assert parts.vision_block * parts.vision_depth < parts.vision


def test_formats_of_the_builtin_kernels_plugins():
    int8 = builtin_format("int8_weight_only", SimpleNamespace(quantize_head=True, cache=True), "bfloat16")
    assert (int8.linear.kind, int8.head.kind, int8.other_bytes, int8.file_backed) == ("int8", "int8", 2, True)
    no_head = builtin_format("int8_weight_only", SimpleNamespace(quantize_head=False, cache=False), "bfloat16")
    assert no_head.head.kind == "float" and not no_head.file_backed
    int4 = builtin_format("int4_weight_only", SimpleNamespace(group_size=64, head_bits=8, vision_bits=8, cache=True),
                          "bfloat16")
    assert (int4.linear.group, int4.head.kind, int4.vision.kind) == (64, "int8", "int8")
    all4 = builtin_format("int4_weight_only", SimpleNamespace(group_size=32, head_bits=4, vision_bits=4, cache=True),
                          "bfloat16")
    assert (all4.head.kind, all4.vision.kind) == ("int4", "int4")
    config = hf("2b")                                  # the int8 tower is ~2x the int4 one, the decoder unchanged
    eight, four = part_sizes(config, int4), part_sizes(config, replace(int4, vision=int4.linear))
    assert 1.7 < eight.vision / four.vision < 2.0 and eight.layer == four.layer
    assert builtin_format("fp32_compute", None, "bfloat16").linear.float_bytes == 4
    assert not builtin_format("fp32_compute", None, "bfloat16").file_backed
    assert builtin_format("fp32_compute", None, "float32").file_backed
    assert builtin_format("torch_native", None, "bfloat16") == WeightFormat.stored("bfloat16")
    assert builtin_format("someone_elses", None, "float16") == WeightFormat.stored("float16")


def test_a_tied_head_costs_bytes_only_when_quantised():
    config = hf("2b")                                            # tie_word_embeddings: true
    assert part_sizes(config, WeightFormat.stored("bfloat16")).head == 0
    assert part_sizes(config, int8_suggestion("bfloat16")).head == 151936 * 2048 + 4 * 151936
    assert part_sizes(hf("8b"), WeightFormat.stored("bfloat16")).head == 151936 * 4096 * 2


def test_kv_bytes_per_position_of_one_layer():
    assert kv_bytes_per_position(hf("8b"), 2) == 2 * 8 * 128 * 2


# --- budgets --------------------------------------------------------------------------------------------------------

def test_budgets_from_the_machine_and_the_knobs():
    b = derive_budgets(16.0, 2.0)
    assert (b.ram, b.vram) == (int(14.5 * GIB), int(1.5 * GIB))
    assert "reserve_gb=1.5" in b.ram_source and "CUDA context" in b.vram_source
    b = derive_budgets(16.0, 2.0, MemoryKnobs(ram_budget_gb=4.0, vram_budget_gb=8.0, reserve_gb=3.0))
    assert (b.ram, b.vram) == (4 * GIB, 2 * GIB)                 # never more VRAM than the GPU has
    assert derive_budgets(16.0, None, MemoryKnobs(reserve_gb=3.0)).ram == 13 * GIB
    assert derive_budgets(16.0, None).vram == 0


# --- modes on hand-made numbers -------------------------------------------------------------------------------------

def test_cpu_counts_weights_kv_and_runtime():
    p = plan("cpu", TOY, POSITIONS, budgets(1000), BW)
    assert p.ram == W + (400 + 60 + 50 + 80) * MIB + 4 * MIB
    assert (p.vision, p.embed, p.head, p.layers) == ("cpu", "cpu", "cpu", ("cpu",) * 4)
    assert p.read_per_token["cpu"] == 480 * MIB                 # layers + head (the embedding: one row)
    assert p.ceiling == pytest.approx(10e9 / (480 * MIB))
    with pytest.raises(DoesNotFit) as exc:
        plan("cpu", TOY, POSITIONS, budgets(500), BW)
    assert exc.value.memory == "ram" and exc.value.need == W + 594 * MIB


def test_cuda_partial_puts_vision_then_leading_layers_with_their_kv_on_the_gpu():
    p = plan("cuda_partial", TOY, POSITIONS, budgets(1000, vram_mib=265), BW)
    # vision 60 + two layers with 1 MiB KV each = 262 MiB of 265; the head waits for all layers.
    assert p.vision == "gpu" and p.layers == ("gpu", "gpu", "cpu", "cpu") and p.head == "cpu" and p.embed == "cpu"
    assert p.vram == (60 + 200 + 2) * MIB
    assert p.kv == {"gpu": 2 * MIB, "cpu": 2 * MIB, "disk": 0}
    t = 200 * MIB / 40e9 + 280 * MIB / 10e9
    assert p.ceiling == pytest.approx(1 / t)
    forced = plan("cuda_partial", TOY, POSITIONS, budgets(1000, vram_mib=2000), BW, gpu_layers=1)
    assert forced.layers == ("gpu", "cpu", "cpu", "cpu") and forced.head == "cpu"
    everything = plan("cuda_partial", TOY, POSITIONS, budgets(1000, vram_mib=2000), BW)
    assert everything.head == "gpu" and set(everything.layers) == {"gpu"}
    assert plan("cuda_partial", TOY, POSITIONS, budgets(1000, vram_mib=2000), BW, gpu_layers=9).layers \
        == ("gpu",) * 4                                                    # a forced count beyond the model clamps
    with pytest.raises(DoesNotFit) as exc:
        plan("cuda_partial", TOY, POSITIONS, budgets(1000, vram_mib=100), BW, gpu_layers=4)
    assert exc.value.memory == "vram"


def test_ssd_stream_gives_up_residency_in_order():
    # Enough for everything: nothing on disk.
    assert not {"disk"} & {plan("ssd_stream", TOY, POSITIONS, budgets(1000), BW).head}
    # 594 MiB resident would need; 560: the embedding table goes first (rows on demand, no pool).
    p = plan("ssd_stream", TOY, POSITIONS, budgets(560), BW)
    assert (p.embed, p.vision, p.head, set(p.layers)) == ("disk", "cpu", "cpu", {"cpu"}) and p.pool == 0
    # 540: then the vision tower (its pool: rest 30 + two blocks = 50 MiB; 400 + 80 + 4 + 50 = 534).
    p = plan("ssd_stream", TOY, POSITIONS, budgets(540), BW)
    assert (p.embed, p.vision) == ("disk", "disk") and p.pool == 50 * MIB
    # 450: then decoder layers from the last one back; the pool holds two consecutive units (200 MiB).
    p = plan("ssd_stream", TOY, POSITIONS, budgets(450), BW)
    assert p.layers == ("cpu", "disk", "disk", "disk") and p.head == "cpu" and p.pool == 200 * MIB
    assert p.ram == W + 4 * MIB + (100 + 80) * MIB + 200 * MIB
    assert p.read_per_token == {"gpu": 0, "cpu": 180 * MIB, "disk": 300 * MIB}
    t_disk, t_cpu = 300 * MIB / 1e9, 480 * MIB / 10e9
    assert p.ceiling == pytest.approx(1 / max(t_disk, t_cpu))
    assert p.ceilings["disk"] == pytest.approx(1e9 / (300 * MIB))
    # 300: every layer (80 + 4 + 200); 250: at last the head too (in one piece: it is smaller than a layer).
    p = plan("ssd_stream", TOY, POSITIONS, budgets(300), BW)
    assert set(p.layers) == {"disk"} and p.head == "cpu"
    p = plan("ssd_stream", TOY, POSITIONS, budgets(250), BW)
    assert set(p.layers) == {"disk"} and p.head == "disk" and p.pool == 200 * MIB
    with pytest.raises(DoesNotFit):
        plan("ssd_stream", TOY, POSITIONS, budgets(150), BW)


def test_ssd_stream_keeps_the_requested_resident_layers():
    p = plan("ssd_stream", TOY, POSITIONS, budgets(2000), BW, resident_layers=1)
    assert p.layers == ("cpu", "disk", "disk", "disk") and p.head == "cpu"


def test_a_head_bigger_than_a_layer_streams_in_row_ranges():
    big_head = ModelBytes(layers=(10 * MIB,) * 4, vision=0, vision_block=0, vision_depth=0, embed=8 * MIB,
                          head=35 * MIB, kv_per_position=0, label="toy")
    assert head_pieces(big_head.head_unit, big_head.layers) == 4
    disk = ("disk",) * 4
    assert stream_pool(big_head, disk, "disk", "cpu") == 20 * MIB          # two layers; a head piece is 8.75
    one_layer = ModelBytes(layers=(10 * MIB,), vision=0, vision_block=0, vision_depth=0, embed=0, head=35 * MIB,
                           kv_per_position=0, label="toy")
    assert stream_pool(one_layer, ("disk",), "disk", "cpu") == 10 * MIB + math.ceil(35 * MIB / 4)
    tied = ModelBytes(layers=(10 * MIB,) * 2, vision=0, vision_block=0, vision_depth=0, embed=20 * MIB, head=0,
                      kv_per_position=0, label="toy")
    assert tied.head_unit == 20 * MIB and head_pieces(tied.head_unit, tied.layers) == 2


def test_window_bytes():
    assert window_bytes([1, 5, 2, 7], 1, cyclic=True) == 9              # 2 + 7
    assert window_bytes([7, 1, 1, 5], 1, cyclic=True) == 12             # 5 + 7 across the end
    assert window_bytes([7, 1, 1, 5], 1, cyclic=False) == 8
    assert window_bytes([3], 2, cyclic=True) == 3 and window_bytes([], 1, cyclic=True) == 0


def test_a_refusal_names_the_smallest_fix_first():
    int4 = ModelBytes(layers=(30 * MIB,) * 4, vision=20 * MIB, vision_block=5 * MIB, vision_depth=3,
                      embed=50 * MIB, head=25 * MIB, kv_per_position=1024, label="int4")
    with pytest.raises(ConfigError) as exc:
        plan_or_refuse("cpu", TOY, POSITIONS, budgets(300), BW, alternatives={"int4 weights (opt=aggressive)": int4})
    assert "memory=cpu does not fit" in exc.value.message and "test ram" in exc.value.message
    fixes = exc.value.hint.split("; or ")
    assert fixes[0].startswith("use int4 weights (opt=aggressive): 215.0 MiB of weights")
    assert fixes[1].startswith("use memory=ssd_stream (~")
    assert fixes[-1].startswith("free memory or raise memory.ram_budget_gb to")
    assert "\n" not in exc.value.message and "\n" not in exc.value.hint


def test_a_context_too_long_for_the_budget_suggests_a_shorter_one():
    kv_heavy = ModelBytes(layers=(10 * MIB,) * 4, vision=0, vision_block=0, vision_depth=0, embed=MIB,
                          head=MIB, kv_per_position=16 * 1024, label="toy")
    # 8192 positions: 128 MiB of KV per layer, 512 in all; 100 MiB left after the weights holds 1024 positions.
    with pytest.raises(ConfigError) as exc:
        plan_or_refuse("cpu", kv_heavy, 8192, budgets(150), BW)
    assert exc.value.hint.startswith("lower generate.max_context to 1024")


def test_an_unknown_bandwidth_leaves_the_ceiling_unstated():
    p = plan("cpu", TOY, POSITIONS, budgets(1000), Bandwidths())
    assert p.ceiling is None and p.ceilings == {"cpu": None}


# --- the real shapes on the reference laptop (16 GiB RAM, MX250 2 GiB, DDR4 42.7 GB/s, NVMe 2 GB/s) -----------------

LAPTOP_BW = Bandwidths(ram=42.7, disk=2.0, gpu=48.0, pcie=3.9)


def laptop(size: str, fmt: WeightFormat, positions: int = 8192) -> tuple[ModelBytes, int]:
    config = hf(size)
    s = part_sizes(config, fmt)
    return ModelBytes((s.layer,) * s.layers, s.vision, s.vision_block, s.vision_depth, s.embed, s.head,
                      kv_bytes_per_position(config, 2), fmt.name), positions


@pytest.mark.parametrize("size", ["2b", "4b", "8b"])
@pytest.mark.parametrize("fmt", [int8_suggestion("bfloat16"), int4_suggestion("bfloat16")], ids=["int8", "int4"])
def test_every_size_fits_the_laptop_quantised(size, fmt):
    model, positions = laptop(size, fmt)
    with_gpu = derive_budgets(16.0, 2.0)
    assert plan("cpu", model, positions, derive_budgets(16.0, None), LAPTOP_BW).ram <= with_gpu.ram
    partial = plan("cuda_partial", model, positions, with_gpu, LAPTOP_BW)
    assert partial.vram <= with_gpu.vram and "gpu" in partial.layers and partial.vision == "gpu"


def test_8b_bf16_does_not_fit_16_gib_and_says_use_int8_first():
    model, positions = laptop("8b", WeightFormat.stored("bfloat16"))
    alternatives = {"int8 weights": laptop("8b", int8_suggestion("bfloat16"))[0],
                    "int4 weights": laptop("8b", int4_suggestion("bfloat16"))[0]}
    with pytest.raises(ConfigError) as exc:
        plan_or_refuse("cpu", model, positions, derive_budgets(16.0, None), LAPTOP_BW, alternatives=alternatives)
    assert exc.value.hint.startswith("use int8 weights: 8.76 GiB of weights")
    assert "memory=ssd_stream" in exc.value.hint
    streamed = plan("ssd_stream", model, positions, derive_budgets(16.0, None), LAPTOP_BW)
    assert "disk" in streamed.layers and streamed.ram <= derive_budgets(16.0, None).ram
    assert 0 < streamed.ceiling < plan("cpu", *laptop("8b", int8_suggestion("bfloat16")),
                                       derive_budgets(16.0, None), LAPTOP_BW).ceiling


def test_8b_int8_decode_ceiling_on_the_laptop():
    model, positions = laptop("8b", int8_suggestion("bfloat16"))
    p = plan("cpu", model, positions, derive_budgets(16.0, None), LAPTOP_BW)
    per_token = sum(model.layers) + model.head
    assert p.ceiling == pytest.approx(42.7e9 / per_token)
    assert 5.0 < p.ceiling < 6.5                       # ~7.5 GB of int8 weights per token at 42.7 GB/s
