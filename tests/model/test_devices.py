"""Decoder layers split across devices give the same tokens as one device; the KV cache follows the layers."""

from __future__ import annotations

import pytest
import torch

from qvl_pipeline.generation.greedy import greedy_generate
from qvl_plugins.kv_cache.static import StaticCache
from tests.model.tiny_configs import FACTS, max_rel_diff, our_model, prompt, tiny_hf_dict


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a usable CUDA GPU")
def test_layers_split_between_cuda_and_cpu():
    torch.manual_seed(0)
    model = our_model(tiny_hf_dict(text_layers=4))
    ids = prompt()
    ref_logits = model(ids)
    ref_tokens = greedy_generate(model, ids, max_new_tokens=8, cache_backend=StaticCache(FACTS))

    body = model.model
    body.language_model.embed_tokens.to("cuda")          # requests start on the GPU
    for layer in body.language_model.layers[:2]:
        layer.to("cuda")                                  # first layers on the GPU, the rest stay on the CPU
    logits = model(ids)
    assert logits.device.type == "cpu"                    # untied head and final norm stayed on the CPU
    assert max_rel_diff(logits.cpu(), ref_logits) <= 1e-4
    assert greedy_generate(model, ids, max_new_tokens=8, cache_backend=StaticCache(FACTS)) == ref_tokens


class RecordingCache(StaticCache):
    """The reference cache, remembering the devices each cache was created with."""

    def __init__(self, facts):
        super().__init__(facts)
        self.devices: list[tuple] = []

    def create(self, shape, dtype, devices):
        self.devices.append(tuple(devices))
        return super().create(shape, dtype, devices)


def test_greedy_generation_creates_its_cache_with_one_device_per_decoder_layer():
    torch.manual_seed(0)
    model = our_model(tiny_hf_dict(text_layers=4))
    backend = RecordingCache(FACTS)
    tokens = greedy_generate(model, prompt(), max_new_tokens=3, cache_backend=backend)
    assert len(tokens) == 3
    assert [tuple(torch.device(d) for d in devices) for devices in backend.devices] == [(torch.device("cpu"),) * 4]
