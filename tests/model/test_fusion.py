"""Stage 2 behaviour: skipped vision for text, the per-image feature cache, KV-cache decoding, eos."""

from __future__ import annotations

import pytest
import torch

from qvl_pipeline.generation.greedy import greedy_generate
from qvl_pipeline.model.fusion import FeatureCache, content_key
from qvl_plugins.kv_cache.static import StaticCache
from tests.model.tiny_configs import FACTS, images, max_rel_diff, our_model, prompt, tiny_hf_dict


def _model(**kwargs):
    torch.manual_seed(0)
    model = our_model(tiny_hf_dict(init=0.1), **kwargs)
    for name, p in model.named_parameters():     # oracle-like weights without needing the oracle
        p.fill_(1.0) if "norm" in name and name.endswith("weight") else p.normal_(0.0, 0.1)
    return model


class VisionCalls:
    """Counts vision-tower calls and remembers their grids."""

    def __init__(self, model):
        self.grids: list[list[list[int]]] = []
        model.model.visual.register_forward_pre_hook(lambda _m, args: self.grids.append(args[1].tolist()))


@pytest.fixture(scope="module")
def three_images():
    pytest.importorskip("transformers")          # the reference image processor makes the pixels
    return images([(50, 70), (90, 45), (33, 100)])


def test_text_only_never_calls_the_vision_tower():
    model = _model()
    calls = VisionCalls(model)
    tokens = greedy_generate(model, prompt(), max_new_tokens=4, cache_backend=StaticCache(FACTS))
    assert len(tokens) == 4 and calls.grids == []
    fused = model.prepare(prompt())
    assert fused.visual_mask is None and fused.deepstack is None


def test_feature_cache_encodes_each_image_once(three_images):
    pv, grid = three_images
    plain = _model()
    cached = _model(feature_cache=FeatureCache())
    calls = VisionCalls(cached)
    ref = plain.encode_images(pv, grid)

    first_two = int(grid[:2].prod(-1).sum())
    first = cached.encode_images(pv[:first_two], grid[:2])        # images 0 and 1
    again = cached.encode_images(pv, grid)                        # only image 2 is new
    assert calls.grids == [grid[:2].tolist(), grid[2:].tolist()]
    assert cached.feature_cache.hits == 2 and len(cached.feature_cache) == 3
    assert max_rel_diff(again.embeds, ref.embeds) <= 1e-5
    for mine, theirs in zip(again.deepstack, ref.deepstack, strict=True):
        assert max_rel_diff(mine, theirs) <= 1e-5
    assert torch.equal(first.embeds, again.embeds[:first.embeds.shape[0]])

    cached.encode_images(pv, grid)                                # a second turn: nothing new
    assert len(calls.grids) == 2
    tokens_a = greedy_generate(plain, prompt(grid), pv, grid, max_new_tokens=6, cache_backend=StaticCache(FACTS))
    tokens_b = greedy_generate(cached, prompt(grid), pv, grid, max_new_tokens=6, cache_backend=StaticCache(FACTS))
    assert tokens_a == tokens_b and len(calls.grids) == 2


def test_feature_cache_is_keyed_by_content():
    a = torch.zeros(16, 1536)
    b = a.clone()
    b[3, 7] = 1e-3
    grid = torch.tensor([1, 4, 4])
    assert content_key(a, grid) == content_key(a.clone(), grid)
    assert content_key(a, grid) != content_key(b, grid)
    assert content_key(a, grid) != content_key(a, torch.tensor([1, 2, 8]))
    assert content_key(a, grid) != content_key(a.to(torch.bfloat16), grid)
    cache = FeatureCache(max_entries=2)
    for key in "abc":
        cache.put(key, None)
    assert len(cache) == 2 and cache.get("a") is None and cache.misses == 1


def test_cached_decoding_equals_full_recompute(three_images):
    pv, grid = three_images
    model = _model()
    ids = prompt(grid)
    tokens = greedy_generate(model, ids, pv, grid, max_new_tokens=8, cache_backend=StaticCache(FACTS))
    full = model(torch.cat([ids, torch.tensor([tokens[:-1]])], dim=1), pv, grid)        # [1, s + 7, vocab]
    assert full[0, ids.shape[1] - 1:].argmax(-1).tolist() == tokens


def test_generation_stops_at_eos(three_images):
    pv, grid = three_images
    model = _model()
    ids = prompt(grid)
    tokens = greedy_generate(model, ids, pv, grid, max_new_tokens=8, cache_backend=StaticCache(FACTS))
    stop = tokens[3]
    first = tokens.index(stop)
    assert greedy_generate(model, ids, pv, grid, max_new_tokens=8, cache_backend=StaticCache(FACTS),
                           eos_token_ids=[stop]) == tokens[:first + 1]
