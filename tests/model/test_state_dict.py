"""Weight names and shapes are one-to-one with the checkpoint transformers saves; every linear is the plugin's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qvl_pipeline.model.config import ModelConfig
from qvl_pipeline.model.qwen3_vl import Qwen3VL, output_head
from qvl_pipeline.model.sizing import count_params
from qvl_pipeline.model.text import TextModel
from qvl_pipeline.model.vision import VisionTower
from qvl_plugins.attention.eager import EagerAttention
from qvl_plugins.kernels.torch_native import TorchNativeKernels
from qvl_plugins.rotary.reference import ReferenceRotary
from tests.model.tiny_configs import hf_model, max_rel_diff, model_facts, our_model, tiny_hf_dict


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in state.items()}


@pytest.mark.parametrize("tied", [False, True])
def test_keys_and_shapes_equal_saved_checkpoint(tied, tmp_path):
    pytest.importorskip("transformers")
    from safetensors import safe_open
    hf = tiny_hf_dict(tied=tied)
    hf_model(hf).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    ours = _shapes(our_model(hf).state_dict())
    assert ours == saved
    assert ("lm_head.weight" in ours) is (not tied)


@pytest.mark.parametrize("tied", [False, True])
def test_saved_checkpoint_loads_strictly_and_computes_the_same(tied, tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file
    hf = tiny_hf_dict(tied=tied, init=0.1)
    oracle = hf_model(hf, seed=3)
    oracle.save_pretrained(tmp_path)
    model = our_model(hf)
    model.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    ids = torch.tensor([[5, 17, 99, 3, 42, 8]])
    assert max_rel_diff(model(ids), oracle(input_ids=ids).logits) <= 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_matches_sizing(tied):
    hf = tiny_hf_dict(tied=tied)
    model = our_model(hf)
    assert sum(p.numel() for p in model.parameters()) == count_params(hf).total


class RecordingKernels(TorchNativeKernels):
    """Native linears, remembering each one it made."""

    def __init__(self, facts):
        super().__init__(facts)
        self.made: list[nn.Module] = []

    def linear(self, in_features, out_features, bias):
        module = super().linear(in_features, out_features, bias)
        self.made.append(module)
        return module


@pytest.mark.parametrize("tied", [False, True])
def test_every_linear_comes_from_the_kernels_slot(tied):
    hf = tiny_hf_dict(tied=tied)
    facts = model_facts(hf)
    kernels = RecordingKernels(facts)
    model = Qwen3VL.build(ModelConfig.from_hf_dict(hf), attention=EagerAttention(facts), rotary=ReferenceRotary(facts),
                          kernels=kernels)
    linears = {id(m) for m in model.modules() if isinstance(m, nn.Linear)}
    assert linears == {id(m) for m in kernels.made}
    assert len(linears) > 0


@pytest.mark.parametrize("tied", [False, True])
def test_model_assembled_from_its_stages_equals_build(tied):
    """Qwen3VL takes its built sub-modules (the container builds the stages separately); build() is the shortcut."""
    hf = tiny_hf_dict(tied=tied, init=0.1)
    config = ModelConfig.from_hf_dict(hf)
    facts = model_facts(hf)
    slots = dict(attention=EagerAttention(facts), rotary=ReferenceRotary(facts), kernels=TorchNativeKernels(facts))
    torch.manual_seed(0)
    built = Qwen3VL.build(config, **slots).eval()
    parts = Qwen3VL(config, visual=VisionTower(config.vision, **slots), language_model=TextModel(config.text, **slots),
                    lm_head=output_head(config, slots["kernels"])).eval()
    assert (parts.lm_head is None) is tied and parts.feature_cache is None
    assert _shapes(parts.state_dict()) == _shapes(built.state_dict())
    parts.load_state_dict(built.state_dict(), strict=True)
    ids = torch.tensor([[5, 17, 99, 3, 42, 8]])
    assert torch.equal(parts(ids), built(ids))


def test_inverse_frequencies_survive_dtype_casts():
    model = our_model(tiny_hf_dict()).to(torch.bfloat16)
    assert model.model.language_model._inv_freq.dtype == torch.float32
    assert model.model.visual._inv_freq.dtype == torch.float32
    assert all(not name.endswith("inv_freq") for name in model.state_dict())
