"""Numba linear-time topk_pages vs `vortex_hybrid.reference.topk_pages`, exactly.

Hypothesis draws shapes, counts and scores with many ties, NaN, -0.0 and infinities; both the
row-per-thread path and the split path (rows cut into chunks over all threads) must equal the reference
element for element. Outputs are poisoned before each run.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vortex_hybrid import reference
from vortex_hybrid.cpu_kernels import launch_topk_pages, topk_pages

SPECIALS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0]


@st.composite
def topk_cases(draw):
    B = draw(st.integers(1, 3))
    H = draw(st.integers(1, 3))
    M = draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        scores = torch.randint(0, 4, (B, H, M), generator=g).float()          # many ties
    else:
        scores = torch.randn(B, H, M, generator=g)
    n_special = draw(st.integers(0, 6))
    for _ in range(n_special):
        idx = tuple(int(torch.randint(0, s, (1,), generator=g)) for s in (B, H, M))
        scores[idx] = draw(st.sampled_from(SPECIALS))
    num_pages = torch.randint(0, M + 1, (B,), generator=g, dtype=torch.int32)
    sink = draw(st.integers(0, 3))
    recent = draw(st.integers(0, 3))
    k = sink + recent + draw(st.integers(0, M))
    return scores, k, num_pages, sink, recent


def _poisoned(scores, k):
    return torch.full((scores.shape[0], scores.shape[1], k), -7, dtype=torch.int32)


@given(topk_cases())
def test_automatic_path_equals_reference(case):
    scores, k, num_pages, sink, recent = case
    out = _poisoned(scores, k)
    sel = topk_pages(scores, k, num_pages, sink, recent, out=out)
    assert sel is out
    assert torch.equal(sel, reference.topk_pages(scores, k, num_pages, sink, recent))


@given(topk_cases())
def test_row_per_thread_path_equals_reference(case):
    scores, k, num_pages, sink, recent = case
    sel = launch_topk_pages(scores, k, num_pages, sink, recent, split=False,
                         out=_poisoned(scores, k))
    assert torch.equal(sel, reference.topk_pages(scores, k, num_pages, sink, recent))


@given(topk_cases())
def test_split_rows_path_equals_reference(case):
    scores, k, num_pages, sink, recent = case
    sel = launch_topk_pages(scores, k, num_pages, sink, recent, split=True,
                         out=_poisoned(scores, k))
    assert torch.equal(sel, reference.topk_pages(scores, k, num_pages, sink, recent))


@pytest.mark.parametrize("split", [False, True])
def test_long_row_with_ties_straddling_chunks(split):
    """A tie at the threshold spread over many chunks: the lower page indices win."""
    g = torch.Generator().manual_seed(1)
    M = 5000
    scores = torch.randint(0, 3, (1, 1, M), generator=g).float()
    num_pages = torch.tensor([M - 7], dtype=torch.int32)
    for k in (3, 100, 1700, 4000):
        sel = launch_topk_pages(scores, k, num_pages, 1, 2, split=split)
        assert torch.equal(sel, reference.topk_pages(scores, k, num_pages, 1, 2)), k


def test_k_zero_and_empty_batch():
    scores = torch.randn(2, 2, 5)
    assert topk_pages(scores, 0, torch.tensor([5, 0], dtype=torch.int32), 0, 0).shape == (2, 2, 0)
    assert topk_pages(scores[:0], 3, torch.zeros(0, dtype=torch.int32), 1, 1).shape == (0, 2, 3)


@pytest.mark.parametrize("args,match", [
    (dict(k=1, sink=1, recent=1), "k=1 must be >= sink \\+ recent = 2"),
    (dict(k=2, sink=-1, recent=0), "sink=-1 must be a non-negative integer"),
    (dict(k=2, sink=0, recent=0, num_pages=torch.tensor([9], dtype=torch.int32)),
     "num_pages must lie in \\[0, 5\\]"),
])
def test_bad_arguments_name_the_value(args, match):
    num_pages = args.pop("num_pages", torch.tensor([3], dtype=torch.int32))
    with pytest.raises(ValueError, match=match):
        topk_pages(torch.randn(1, 1, 5), num_pages=num_pages, **args)
