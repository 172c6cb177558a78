"""The fused native decode step (qvl_plugins/kernels/native_decode.py): the whole decoder stack of a decode token in
one call where every layer runs on the native kernels. It must give what the per-op path gives (teacher-forced
logits at every step, greedy tokens), be taken where the plan says it is, step aside where it does not apply
(another plugin, a streaming memory plugin, a slot moved down its chain at run time, batch > 1) and hand a failed
call back to the per-op path without losing the step."""

from __future__ import annotations

import pytest
import torch

from qvl_pipeline import Pipeline
from qvl_pipeline.generation.engine import feed
from qvl_pipeline.model.positions import decode_position_ids
from qvl_pipeline.plan import render_plan
from qvl_plugins.attention.eager import EagerAttention

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
STEPS = 12
FUSED = "the decoder stack in one native call per token"


def _pipe(*overrides: str) -> Pipeline:
    return Pipeline.from_overrides(["progress=false", "model=tiny", *overrides])


class Counting:
    """Wraps a decode step: counts the steps it took (returned a tensor) and declined."""

    def __init__(self, step):
        self.step, self.taken, self.declined = step, 0, 0

    def __call__(self, *args):
        out = self.step(*args)
        self.taken += out is not None
        self.declined += out is None
        return out


def _teacher_forced(pipe: Pipeline, with_image: bool) -> tuple[float, int, int]:
    """Per-op and fused decode over the same tokens (the per-op run's greedy choices) from two caches: the largest
    logit difference relative to the largest logit, the steps whose greedy choices agree, the steps fused."""
    text = pipe.model.model.language_model
    fused_step = Counting(text.decode_step)
    images = pipe.demo_images()[:1] if with_image else []
    vision = pipe.images(images) if images else None
    ids = pipe._prompt_ids("Describe this picture in detail." if with_image else "Tell me a story.", vision)
    fused, _ = pipe._fuse(ids, vision)
    model = pipe.model
    caches = [pipe.caches.create(len(ids) + STEPS) for _ in range(2)]
    worst, agree = 0.0, 0
    try:
        with torch.inference_mode():
            text.decode_step = None
            logits = [feed(model, fused, 0, cache).float() for cache in caches]
            for _ in range(STEPS):
                ref, got = logits
                worst = max(worst, float((got - ref).abs().max()) / float(ref.abs().max()))
                agree += int(got.argmax()) == int(ref.argmax())
                token = torch.tensor([[int(ref.argmax())]])
                text.decode_step = None
                ref = model.decode_step(token, caches[0], fused.rope_delta)[0, -1].float()
                text.decode_step = fused_step
                got = model.decode_step(token, caches[1], fused.rope_delta)[0, -1].float()
                logits = [ref, got]
    finally:
        text.decode_step = fused_step.step
    assert caches[0].length == caches[1].length == len(ids) + STEPS
    return worst, agree, fused_step.taken


@pytest.mark.parametrize("overrides", [
    ("opt=moderate", "model.dtype=float32"),
    ("opt=moderate", "model.dtype=bfloat16"),
    ("opt=aggressive", "model.dtype=float32"),
    ("opt=aggressive", "model.dtype=bfloat16"),
    ("opt=moderate", "hardware=cpu_avx2", "model.dtype=float32"),
], ids=["int8-fp32", "int8-bf16", "int4-int8kv-fp32", "int4-int8kv-bf16", "avx2-int8-fp32"])
@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_fused_step_gives_the_per_op_logits(overrides, with_image):
    """Every step is fused and its logits match the per-op path's. The kernels are the same; only SiLU's exp (the
    library's vector exp instead of torch's) may differ in the last fp32 bits, and where a quantiser follows (int8
    activations of the GEMVs, the int8 KV cache) such a bit can move one value to the neighbouring int8 step:
    measured 0 in bf16 and <= 5.9e-7 in fp32 of the largest logit (with libm's expf before: <= 3.1e-7, and 8.6e-3
    once, fp32, int4 + int8 KV, text). The bound, 2e-2, is far below what any wrong step (a norm, the rotary
    position, a residual) gives."""
    pipe = _pipe(*overrides)
    if pipe.loaded.decode_step != FUSED:
        pytest.skip(f"no fused step on this machine: {pipe.loaded.decode_step}")
    worst, agree, taken = _teacher_forced(pipe, with_image)
    assert taken == STEPS
    assert worst <= 2e-2
    assert agree >= STEPS - 1


def _next_step(pipe: Pipeline, count: int):
    """The fused step, `count` caches each prefilled per op with one prompt, and the next token's input x
    [1, 1, hidden] with its cos/sin at position `at` (the prompt's length); skips where there is no fused step.
    Call under torch.inference_mode()."""
    text = pipe.model.model.language_model
    stack = text.decode_step
    if stack is None:
        pytest.skip(f"no fused step on this machine: {pipe.loaded.decode_step}")
    ids = pipe._prompt_ids("Tell me a story.", None)
    fused, _ = pipe._fuse(ids, None)
    caches = [pipe.caches.create(len(ids) + 1) for _ in range(count)]
    text.decode_step = None
    for cache in caches:
        feed(pipe.model, fused, 0, cache)
    text.decode_step = stack
    x = pipe.model.embed(torch.tensor([[5]]))
    positions = decode_position_ids(len(ids), fused.rope_delta, 1, text.cfg.max_position_embeddings)
    cos, sin = text.rotary_tables(positions, x.dtype)
    return stack, caches, x, cos, sin, len(ids)


def _per_op(pipe: Pipeline, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
    """x [1, 1, hidden] through the decoder layers one by one, appending to `cache`."""
    for layer in pipe.model.model.language_model.layers:
        x = layer(x, cos, sin, cache)
    return x


def test_one_fused_step_is_the_per_op_step():
    """One decode step from the same cache: the stack's output and every layer's appended cache rows equal the
    per-op path's to fp32 rounding (SiLU's exp), in both weight formats and both caches."""
    for opt in ("moderate", "aggressive"):
        pipe = _pipe(f"opt={opt}", "model.dtype=float32")
        with torch.inference_mode():
            stack, (reference, mine), x, cos, sin, at = _next_step(pipe, 2)
            got = stack(x, cos, sin, mine)
            ref = _per_op(pipe, x, cos, sin, reference)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        names = ("keys", "values", "key_scales", "value_scales") if opt == "aggressive" else ("keys", "values")
        for name in names:
            for ours, theirs in zip(getattr(mine, name), getattr(reference, name), strict=True):
                torch.testing.assert_close(ours[:, :, at].float(), theirs[:, :, at].float(), rtol=1e-5,
                                           atol=1e-6 if name.endswith("scales") else 1)


def test_generation_takes_the_fused_step_and_the_plan_says_so():
    pipe = _pipe("opt=moderate")
    if pipe.loaded.decode_step != FUSED:
        pytest.skip(f"no fused step on this machine: {pipe.loaded.decode_step}")
    text = pipe.model.model.language_model
    counting = Counting(text.decode_step)
    text.decode_step = counting
    fused = pipe.generate("Tell me a story.", max_new_tokens=6)
    text.decode_step = None
    per_op = pipe.generate("Tell me a story.", max_new_tokens=6)
    text.decode_step = counting.step
    assert counting.taken == 5 and fused["text"] == per_op["text"]           # every decode step after the first token
    assert f"decode step: {FUSED}" in render_plan(pipe.plan)


@pytest.mark.parametrize(("overrides", "reason"), [
    (("opt=moderate", "attention=sdpa"), "per op (attention=sdpa, not native)"),
    (("opt=moderate", "rotary=cached"), "per op (rotary=cached, not native)"),
    (("opt=minimal",), "per op (kernels=torch_native has no fused decode step)"),
    (("opt=moderate", "memory=ssd_stream"),
     "per op (memory=ssd_stream moves weights while running)"),
])
def test_the_per_op_path_runs_where_the_fused_step_does_not_apply(overrides, reason):
    pipe = _pipe(*overrides)
    assert pipe.loaded.decode_step == reason
    assert pipe.model.model.language_model.decode_step is None
    assert f"decode step: {reason}" in render_plan(pipe.plan)


def test_a_slot_moved_down_its_chain_at_run_time_turns_the_fused_step_off():
    """An attention guard retargeted to another plugin (a runtime fallback): the fused step declines and the step
    runs per op through the new plugin."""
    pipe = _pipe("opt=moderate", "model.dtype=float32")
    text = pipe.model.model.language_model
    if text.decode_step is None:
        pytest.skip(f"no fused step on this machine: {pipe.loaded.decode_step}")
    guard = text.layers[0].self_attn._attention
    native = guard._target
    counting = Counting(text.decode_step)
    text.decode_step = counting
    try:
        guard.retarget(EagerAttention(pipe.facts, name="eager"))
        moved = pipe.generate("Tell me a story.", max_new_tokens=5)
    finally:
        guard.retarget(native)
        text.decode_step = counting.step
    assert counting.taken == 0 and counting.declined == 4
    assert moved["text"] == pipe.generate("Tell me a story.", max_new_tokens=5)["text"]


def test_a_failed_native_call_hands_the_step_back_to_the_per_op_path(monkeypatch):
    """The library reports an error: the step is redone per op from the same cache (nothing was committed), a
    warning says so, and later steps run per op."""
    pipe = _pipe("opt=moderate", "model.dtype=float32")
    text = pipe.model.model.language_model
    stack = text.decode_step
    if stack is None:
        pytest.skip(f"no fused step on this machine: {pipe.loaded.decode_step}")
    reference = pipe.generate("Tell me a story.", max_new_tokens=6)
    monkeypatch.setattr(stack.build.lib, "qvl_decode_layers", lambda *args: 7)
    with pytest.warns(RuntimeWarning, match="failed with code 7"):
        failed = pipe.generate("Tell me a story.", max_new_tokens=6)
    assert failed["text"] == reference["text"]
    assert "code 7" in stack.failure


def test_batch_of_two_runs_per_op():
    pipe = _pipe("opt=moderate", "model.dtype=float32")
    text = pipe.model.model.language_model
    if text.decode_step is None:
        pytest.skip(f"no fused step on this machine: {pipe.loaded.decode_step}")
    cfg = text.cfg
    x = torch.zeros(2, 1, cfg.hidden_size)
    cos = sin = torch.zeros(2, 1, 1, cfg.head_dim)
    with torch.inference_mode():
        assert text.decode_step(x, cos, sin, pipe.caches.create(4)) is None


def test_a_forward_hook_on_a_layer_sees_it_run():
    """A hook on a decoder layer (a user's, or the engine's non-finite diagnosis) turns the fused step off while it
    is registered: the layers run per op and the hook fires for each."""
    pipe = _pipe("opt=moderate", "model.dtype=float32")
    text = pipe.model.model.language_model
    if text.decode_step is None:
        pytest.skip(f"no fused step on this machine: {pipe.loaded.decode_step}")
    counting = Counting(text.decode_step)
    text.decode_step = counting
    seen: list[int] = []
    handle = text.layers[1].register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    try:
        hooked = pipe.generate("Tell me a story.", max_new_tokens=4)
    finally:
        handle.remove()
    plain = pipe.generate("Tell me a story.", max_new_tokens=4)
    text.decode_step = counting.step
    assert seen[1:] == [1, 1, 1] and counting.taken == 3 and counting.declined == 3
    assert hooked["text"] == plain["text"]


def test_each_request_cache_receives_its_own_rows():
    """The step writes into the cache it is given, also after another cache took a step (the table is re-pointed
    every step): both fused caches hold the per-op step's rows at the new position."""
    pipe = _pipe("opt=moderate", "model.dtype=float32")
    with torch.inference_mode():
        stack, (reference, first, second), x, cos, sin, at = _next_step(pipe, 3)
        for cache in (first, second):
            assert stack(x, cos, sin, cache) is not None
        _per_op(pipe, x, cos, sin, reference)
    for cache in (first, second):
        for mine, theirs in zip(cache.keys + cache.values, reference.keys + reference.values, strict=True):
            torch.testing.assert_close(mine[:, :, at], theirs[:, :, at], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("level", ["moderate", "aggressive"])
def test_a_projection_that_cannot_join_the_native_call_keeps_the_per_op_path(level):
    """One rule (`joins_native_call`) decides for the fused step and for the q/k/v and gate/up calls: a projection
    with a bias joins neither, and the fused step names the layer; int4 projections of another group size do not
    share the fused step."""
    from qvl_plugins.kernels.int4_linear import decode_together as int4_together
    from qvl_plugins.kernels.int8_linear import decode_together as int8_together
    from qvl_plugins.kernels.native_decode import native_decode_step

    pipe = _pipe(f"opt={level}")
    layers = list(pipe.model.model.language_model.layers)
    dtype = pipe.model.dtype
    step, why = native_decode_step(layers, dtype)
    assert step is not None and why == ""
    mlp = layers[1].mlp
    together = int4_together if level == "aggressive" else int8_together
    x = torch.randn(1, 1, mlp.gate_proj.in_features, dtype=dtype)
    assert together([mlp.gate_proj, mlp.up_proj], x) is not None
    mlp.up_proj.bias = torch.nn.Parameter(torch.zeros(mlp.up_proj.out_features, dtype=dtype), requires_grad=False)
    assert not mlp.up_proj.joins_native_call
    assert together([mlp.gate_proj, mlp.up_proj], x) is None
    kind = "Int4Linear" if level == "aggressive" else "Int8Linear"
    assert native_decode_step(layers, dtype) == (
        None, f"layer 1: a projection is not an {kind} in the native tiled layout (or has a bias)")
    mlp.up_proj.bias = None
    assert native_decode_step(layers, dtype)[1] == ""
    if level == "aggressive":
        mlp.down_proj.group *= 2
        assert native_decode_step(layers, dtype) == (None, "layer 1: the int4 projections have different group sizes")
