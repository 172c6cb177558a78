"""Token and position lookup tables."""

from __future__ import annotations

import torch
from torch import nn


def lookup_table(rows: int, dim: int) -> nn.Embedding:
    """nn.Embedding(rows, dim) [rows, dim], drawn from N(0, 1) as nn.Embedding draws it, except on the meta device,
    where nothing is drawn: there torch's normal_ runs as a Python decomposition that imports torch._dynamo, ~1.3 s
    of every start although the loader overwrites the table anyway."""
    weight = torch.empty(rows, dim)              # on the ambient device: meta while a skeleton is built
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(rows, dim, _weight=weight)
