"""gpu_kernels.topk_pages against vortex_hybrid.reference.topk_pages: exact selections, with ties.

Runs under TRITON_INTERPRET=1 on the CPU (small rows) and natively on a GPU (plus real row sizes).
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import test_seed

from vortex_hybrid import reference
from vortex_hybrid.gpu_kernels.topk_pages import MAX_REGISTER_ROW, launch_topk_pages, topk_pages

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
POISON = 123456


def random_case(rng: random.Random, max_pages: int, B: int = 3, H: int = 2, ties: bool = False):
    """Fresh scores float32 [B, H, max_pages] (from {0..3} when ties), num_pages int32 [B], k,
    sink, recent."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    if ties:
        scores = torch.randint(0, 4, (B, H, max_pages), generator=g).float()
    else:
        scores = torch.randn(B, H, max_pages, generator=g)
    num_pages = torch.tensor([rng.choice([0, 1, max_pages, rng.randint(0, max_pages)])
                              for _ in range(B)], dtype=torch.int32)
    sink, recent = rng.randint(0, 3), rng.randint(0, 3)
    k = sink + recent + rng.randint(0, max_pages)
    return scores, num_pages, k, sink, recent


def assert_same_selection(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.int32 and got.shape == want.shape
    got = torch.sort(got.cpu(), dim=-1).values
    want = torch.sort(want.cpu(), dim=-1).values
    bad = (got != want).any(-1).nonzero()
    if bad.numel():
        row = tuple(bad[0].tolist())
        raise AssertionError(f"rows {bad.tolist()[:4]} differ: {got[row]} vs {want[row]}")


def run_and_compare(scores, num_pages, k, sink, recent, **config):
    want = reference.topk_pages(scores.double(), k, num_pages, sink, recent)
    s, n = scores.to(DEVICE), num_pages.to(DEVICE)
    out = torch.full((*scores.shape[:2], k), POISON, dtype=torch.int32, device=DEVICE)
    launch_topk_pages(s, k, n, sink, recent, out, **config)
    assert not (out == POISON).any(), "output not fully written"
    assert_same_selection(out, want)
    assert_same_selection(topk_pages(s, k, n, sink, recent), want)


@pytest.mark.parametrize("small", [0, 16, 256], ids=lambda v: f"compact{v}")
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_topk_matches_reference_on_rows_held_in_registers(ties, small):
    rng = random.Random(test_seed())
    for _ in range(3):
        run_and_compare(*random_case(rng, rng.randint(1, 300), ties=ties), small=small)


@pytest.mark.parametrize("digit_bits,small", [(1, 0), (2, 32), (4, 0), (8, 32)])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_topk_matches_reference_on_streamed_rows(digit_bits, small, ties):
    rng = random.Random(test_seed())
    for _ in range(2):
        run_and_compare(*random_case(rng, rng.randint(65, 300), ties=ties), block=64,
                        digit_bits=digit_bits, num_warps=4, small=small)


def test_topk_orders_nan_inf_and_signed_zero_like_torch_sort():
    """NaN counts as the largest score, -0.0 ties with +0.0 (lower index wins), as in torch.sort."""
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0])
    rng = random.Random(test_seed())
    for _ in range(4):
        scores = specials[torch.randint(0, len(specials), (2, 2, 40))]
        num_pages = torch.tensor([40, rng.randint(10, 40)], dtype=torch.int32)
        run_and_compare(scores, num_pages, rng.randint(2, 30), 1, 1)


def test_topk_keeps_only_forced_pages_when_k_equals_sink_plus_recent():
    scores, num_pages = torch.randn(2, 3, 50), torch.tensor([50, 37], dtype=torch.int32)
    run_and_compare(scores, num_pages, 5, 2, 3)
    run_and_compare(scores, num_pages, 0, 0, 0)


def test_topk_with_k_zero_returns_empty_rows():
    sel = topk_pages(torch.randn(2, 3, 10, device=DEVICE), 0,
                     torch.tensor([10, 4], dtype=torch.int32, device=DEVICE), 0, 0)
    assert sel.shape == (2, 3, 0) and sel.dtype == torch.int32


def test_topk_rejects_bad_arguments():
    s = torch.randn(2, 2, 8, device=DEVICE)
    n = torch.tensor([8, 3], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="GPU top-k takes float32"):
        topk_pages(s.double(), 3, n, 1, 1)
    with pytest.raises(ValueError, match="scores dtype torch.float16"):
        topk_pages(s.half(), 3, n, 1, 1)
    with pytest.raises(ValueError, match="k=2 must be >= sink \\+ recent = 3"):
        topk_pages(s, 2, n, 1, 2)
    with pytest.raises(ValueError, match="num_pages must lie in"):
        topk_pages(s, 3, n + 5, 1, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real row sizes only natively on a GPU")
@pytest.mark.parametrize("max_pages", [256, 8192, MAX_REGISTER_ROW, 20000, 65536])
def test_topk_matches_reference_at_real_row_sizes(max_pages):
    rng = random.Random(test_seed())
    for ties in (False, True):
        scores, num_pages, _, sink, recent = random_case(rng, max_pages, B=4, H=8, ties=ties)
        for frac in (0.01, 0.1):
            run_and_compare(scores, num_pages, sink + recent + int(frac * max_pages), sink, recent)
