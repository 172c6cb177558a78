"""Model tests: tiny random configs, fixed seeds, no autograd, one intra-op thread.

Tiny matrices gain nothing from threads, and on a shared 2-core machine OpenMP spinning makes them 10–50×
slower; the previous thread count is restored after each test.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _tiny_model_mode():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)
