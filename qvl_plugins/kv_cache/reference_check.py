"""Self-test script shared by the KV-cache plugins: the same appends/advances/truncates against StaticCache."""

from __future__ import annotations

import torch

from qvl_pipeline.slots.base import SelfTestError
from qvl_pipeline.slots.kv_cache import CacheShape, KVCacheBackend
from qvl_pipeline.slots.selftest import check_each, failures_as_selftest_error, self_test_devices

SHAPE = CacheShape(layers=2, batch=1, kv_heads=2, head_dim=8, max_len=12)
# (new positions appended by every layer, then advance?, then truncate to): prefill, decode, retry after an edit.
SCRIPT: tuple[tuple[int, bool, int | None], ...] = ((5, True, None), (1, True, None), (3, False, 4), (3, True, None))


def check_against_static(backend: KVCacheBackend, dtype: torch.dtype = torch.float32) -> float:
    """Replay SCRIPT on `backend` and on the reference cache with the same random keys/values; raise
    SelfTestError when returned keys/values or lengths disagree beyond the backend's fidelity."""
    from qvl_plugins.kv_cache.static import StaticCache  # the slot's reference plugin

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for device in self_test_devices(backend.hw):
        with failures_as_selftest_error(f"{type(backend).__name__} self-test on {device}"):
            mine = backend.create(SHAPE, dtype, device)
            ref = StaticCache(backend.hw).create(SHAPE, dtype, device)
            for step, (new, advance, truncate) in enumerate(SCRIPT):
                for layer in range(SHAPE.layers):
                    k, v = (torch.randn(SHAPE.batch, SHAPE.kv_heads, new, SHAPE.head_dim, generator=gen)
                            .to(device, dtype) for _ in range(2))
                    err = check_each(f"step {step} layer {layer}", ("keys", "values"), mine.append(layer, k, v),
                                     ref.append(layer, k, v), backend.fidelity, dtype)
                    worst = max(worst, err)
                for cache in (mine, ref):
                    if advance:
                        cache.advance(new)
                    if truncate is not None:
                        cache.truncate(truncate)
                if mine.length != ref.length:
                    raise SelfTestError(f"after step {step} length is {mine.length}, the reference's {ref.length}")
    return worst
