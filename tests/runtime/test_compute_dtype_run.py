"""The kernels plugin's compute dtype is what the run really computes in: hidden states, the KV cache and the vision
tower's activations (hooked on the tiny demo loaded as bf16), with the large tables kept as stored; auto on an AVX2
profile (fp32) stays within the plugin's fidelity of opt=minimal; the plan says which dtype and why."""

from __future__ import annotations

import pytest
import torch

from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.model.norms import RMSNorm
from qvl_pipeline.plan import render_plan
from qvl_pipeline.runtime.pipeline import Pipeline
from qvl_pipeline.slots.selftest import END_TO_END_TOLERANCE, relative_error
from qvl_plugins.kernels.int8_linear import Int8Linear
from qvl_plugins.kernels.native_gemv import native_for
from tests.conftest import make_facts, make_profile

# A CPU without native bf16 whatever this machine is (the profile's ISA caps the facts).
AVX2 = ["hardware=cpu_avx2", "hardware.emulate=true"]
AVX2_ISA = ("sse4_2", "avx", "avx2", "fma", "f16c")
BF16_DEMO = ["progress=false", "model.dtype=bfloat16", "generate.max_new_tokens=3"]


def loaded(*overrides: str) -> Pipeline:
    return Pipeline.from_overrides([*BF16_DEMO, *overrides]).load()


def activation_dtypes(pipe: Pipeline) -> dict[str, torch.dtype]:
    """One generate with an image; the dtype of the vision tower's block and merger outputs, the decoder layer's
    output, the logits and the KV cache the request created."""
    seen: dict[str, torch.dtype] = {}
    body = pipe.model.model

    def record(name: str):
        def hook(module, args, out) -> None:
            seen.setdefault(name, out.dtype)
        return hook

    hooks = [module.register_forward_hook(record(name))
             for name, module in (("vision block", body.visual.blocks[0]), ("vision merger", body.visual.merger),
                                  ("decoder layer", body.language_model.layers[0]))]
    create = pipe.caches.backend.create

    def recording_create(shape, dtype, devices):
        cache = create(shape, dtype, devices)
        seen["kv cache"] = cache.keys[0].dtype
        return cache

    pipe.caches.backend.create = recording_create
    try:
        pipe.generate("Describe.", pipe.demo_images())
        seen["logits"] = pipe.model.forward_decoder(*_fused(pipe), last_only=True).dtype
    finally:
        for hook in hooks:
            hook.remove()
        del pipe.caches.backend.create
    return seen


def _fused(pipe: Pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    fused = pipe.model.prepare(torch.tensor([[1, 2, 3]]))
    return fused.inputs_embeds, fused.position_ids


@pytest.mark.parametrize(("overrides", "want"), [
    ([*AVX2, "kernels=int8_weight_only"], torch.float32),                       # auto on AVX2
    ([*AVX2, "kernels=int8_weight_only", "kernels.options.int8_weight_only.compute_dtype=stored"], torch.bfloat16),
    ([*AVX2, "kernels=int8_weight_only", "kernels.options.int8_weight_only.compute_dtype=float16"], torch.float16),
    ([*AVX2, "opt=aggressive", "kernels=int4_weight_only", "kv_cache=static"], torch.float32),
    ([*AVX2, "kernels=fp16_store"], torch.float32),               # the Pascal rule; a bf16 checkpoint used to mix
    ([*AVX2, "opt=minimal"], torch.bfloat16),                     # torch_native: the stored dtype
])
def test_activations_and_kv_cache_flow_in_the_compute_dtype(overrides, want):
    pipe = loaded(*overrides)
    assert pipe.model.dtype == want
    assert activation_dtypes(pipe) == {"vision block": want, "vision merger": want, "decoder layer": want,
                                       "kv cache": want, "logits": want}


@pytest.mark.skipif(not native_for(make_facts(isa=AVX2_ISA)).available,
                    reason="needs the native int8 kernel (a C compiler)")
def test_int8_dynamic_on_avx2_keeps_the_stored_dtype():
    pipe = loaded(*AVX2, "kernels=int8_dynamic")
    assert pipe.model.dtype == torch.bfloat16
    assert set(activation_dtypes(pipe).values()) == {torch.bfloat16}


def test_large_weights_stay_stored_and_small_ones_follow():
    pipe = loaded(*AVX2, "kernels=int8_weight_only")
    body = pipe.model.model
    assert body.language_model.embed_tokens.weight.dtype == torch.bfloat16        # never an fp32 copy of the table
    assert body.visual.pos_embed.weight.dtype == torch.bfloat16
    assert body.visual.patch_embed.proj.weight.dtype == torch.float32
    norms = [m for m in pipe.model.modules() if isinstance(m, (RMSNorm, torch.nn.LayerNorm))]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    layers = [m for m in pipe.model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.weight_int8.dtype == torch.int8 for m in layers)


def test_an_unquantised_head_keeps_its_stored_weight():
    pipe = loaded(*AVX2, "kernels=int8_weight_only", "kernels.options.int8_weight_only.quantize_head=false")
    assert pipe.model.lm_head.weight.dtype == torch.bfloat16
    logits = pipe.first_logits("Describe.", pipe.demo_images())
    assert torch.isfinite(logits).all()
    assert activation_dtypes(pipe)["decoder layer"] == torch.float32


def test_auto_on_avx2_is_within_the_plugins_fidelity_of_minimal():
    mine = loaded(*AVX2, "kernels=int8_weight_only")
    reference = loaded(*AVX2, "opt=minimal")
    assert mine.model.dtype == torch.float32 and reference.model.dtype == torch.bfloat16
    images = mine.demo_images()
    for prompt in ("Describe this picture.", "Write one sentence about the sea."):
        err = relative_error(mine.first_logits(prompt, images), reference.first_logits(prompt, images))
        assert err <= END_TO_END_TOLERANCE[mine.run_plan.resolver.resolve("kernels").fidelity], (prompt, err)


@pytest.mark.parametrize(("isa", "overrides", "line"), [
    (AVX2_ISA, ["kernels=int8_weight_only"], "float32: this CPU has no native bfloat16 (no AVX512-BF16/AMX)"),
    ((*AVX2_ISA, "avx512f", "avx512_bf16"), ["kernels=int8_weight_only"],
     "bfloat16: the checkpoint's dtype, native on this CPU (AVX512-BF16)"),
    (AVX2_ISA, ["opt=minimal"], "bfloat16: the checkpoint's dtype"),
])
def test_the_plan_states_the_compute_dtype_and_why(isa, overrides, line):
    container = make_container(load_config(["model=qwen3_vl_2b", "task=plan", "hardware=auto", *overrides]))
    container.core.prober.override(lambda path, measure: (make_profile(name="probed", isa=isa), []))
    plan = container.core.plan().to_dict()
    assert any(ln.startswith(f"  compute dtype: {line}") for ln in render_plan(plan).splitlines())
    assert plan["model"]["compute"]["dtype"] == line.split(":")[0]
