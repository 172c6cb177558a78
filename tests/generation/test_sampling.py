"""Sampling: greedy is argmax, filters keep the right sets, seeds reproduce, bad values are named."""

from __future__ import annotations

import pytest
import torch

from qvl_pipeline.errors import ConfigError
from qvl_pipeline.generation.sampling import Sampler, SamplingParams, apply_repetition_penalty, filter_logits

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])


def test_greedy_is_argmax():
    assert Sampler(SamplingParams())(LOGITS, []) == 4


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    out = apply_repetition_penalty(LOGITS, [0, 3], 2.0)
    assert out.tolist() == [1.0, 1.0, 0.5, -2.0, 3.0]
    assert Sampler(SamplingParams(repetition_penalty=10.0))(LOGITS, [4]) == 0


def test_top_k_top_p_min_p_keep_expected_sets():
    finite = lambda t: torch.isfinite(t).nonzero().flatten().tolist()  # noqa: E731
    assert finite(filter_logits(LOGITS, 2, 1.0, 0.0)) == [0, 4]
    probs = torch.softmax(LOGITS, -1)
    # top_p just above the top token's probability keeps exactly the top two.
    assert finite(filter_logits(LOGITS, 0, float(probs[4]) + 1e-3, 0.0)) == [0, 4]
    assert finite(filter_logits(LOGITS, 0, 1.0, 0.3)) == [0, 4]   # e^(2-3)=0.37 ≥ 0.3 > e^(1-3)
    assert finite(filter_logits(LOGITS, 0, 1e-6, 0.0)) == [4]


def test_seeded_sampling_reproduces_and_differs_across_seeds():
    logits = torch.zeros(50)
    draw = lambda seed: [Sampler(SamplingParams(temperature=1.0, seed=seed))(logits, []) for _ in range(1)]  # noqa
    seq = lambda seed: (lambda s: [s(logits, []) for _ in range(20)])(  # noqa: E731
        Sampler(SamplingParams(temperature=1.0, seed=seed)))
    assert seq(1) == seq(1)
    assert seq(1) != seq(2)
    assert draw(3) == draw(3)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1.0),
                                 dict(top_k=-2), dict(repetition_penalty=0)])
def test_out_of_range_values_are_named(bad):
    with pytest.raises(ConfigError, match=f"generate.{next(iter(bad))}"):
        Sampler(SamplingParams(**bad))
