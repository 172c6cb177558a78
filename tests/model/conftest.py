"""Model tests: tiny random configs, fixed seeds, no autograd."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
