"""The plugin author's own tests: the slot's public checker against the reference plugin, and options."""

from __future__ import annotations

import pytest
from qvl_example_plugin.online_softmax import OnlineSoftmaxAttention, OnlineSoftmaxOptions

from qvl_pipeline.slots import RunFacts
from qvl_pipeline.slots.checks import check_attention
from qvl_plugins.attention.eager import EagerAttention


@pytest.mark.parametrize("block", [1, 2, 512])
def test_matches_the_reference_within_its_fidelity(block):
    facts = RunFacts.example()
    plugin = OnlineSoftmaxAttention(facts, OnlineSoftmaxOptions(block_size=block))
    assert check_attention(plugin, EagerAttention(facts)) < 1e-5


def test_bad_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        OnlineSoftmaxOptions(block_size=0)
