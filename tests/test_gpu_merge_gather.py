"""Triton `merge_states` / `merge_split_states` vs the float64 reference, and `gather_pages` bit-exactness.

Natively on a GPU (gather from a pinned host pool into a GPU pool), under TRITON_INTERPRET=1 on CPU
(CPU tensors on both sides). Fresh random inputs each run; outputs poisoned before each launch.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import DEVICE
from vortex_hybrid import reference
from vortex_hybrid.gpu_kernels import gather_pages, merge_split_states, merge_states

ON_GPU = DEVICE.type == "cuda"


def _gen() -> tuple[int, torch.Generator]:
    seed = random.SystemRandom().randrange(2 ** 31)
    return seed, torch.Generator().manual_seed(seed)


def _states(g: torch.Generator, shape: tuple[int, ...], d: int, p_empty: float):
    o = torch.randn(*shape, d, generator=g)
    lse = torch.randn(*shape, generator=g) * 4
    lse[torch.rand(*shape, generator=g) < p_empty] = float("-inf")
    return o, lse


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN in output"
    return (a.double().cpu() - b).norm().item() / max(b.norm().item(), 1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_merge_states_matches_reference_with_empty_sides(dtype, d):
    seed, g = _gen()
    o_a, lse_a = _states(g, (3, 8), d, 0.3)
    o_b, lse_b = _states(g, (3, 8), d, 0.3)
    lse_a[0, :2] = float("-inf")
    lse_b[0, :2] = float("-inf")                          # both sides empty
    lse_a[1, 0], lse_b[1, 0] = 30.0, -30.0                 # far apart: no overflow
    out = (torch.full((3, 8, d), float("nan"), device=DEVICE),
           torch.full((3, 8), float("nan"), device=DEVICE))
    o, lse = merge_states(o_a.to(DEVICE, dtype), lse_a.to(DEVICE), o_b.to(DEVICE, dtype),
                          lse_b.to(DEVICE), out=out)
    ref_o, ref_lse = reference.merge_states(o_a.to(dtype).double(), lse_a.double(),
                                            o_b.to(dtype).double(), lse_b.double())
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), empty), f"seed {seed}"
    assert torch.all(o.cpu()[empty] == 0)
    assert _rel(o, ref_o) < 1e-6 and _rel(lse.cpu()[~empty], ref_lse[~empty]) < 1e-6, f"seed {seed}"


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16])
def test_merge_split_states_equals_folded_pairwise_merges(num_splits):
    seed, g = _gen()
    o_part, lse_part = _states(g, (2, 4, num_splits), 64, 0.4)
    lse_part[0, 0] = float("-inf")                        # a row with every split empty
    o = torch.full((2, 4, 64), float("nan"), device=DEVICE)
    lse = torch.full((2, 4), float("nan"), device=DEVICE)
    merge_split_states(o_part.to(DEVICE), lse_part.to(DEVICE), o, lse)
    ref_o = torch.zeros(2, 4, 64, dtype=torch.float64)               # start from the empty state
    ref_lse = torch.full((2, 4), float("-inf"), dtype=torch.float64)
    for s in range(num_splits):
        ref_o, ref_lse = reference.merge_states(ref_o, ref_lse, o_part[:, :, s].double(),
                                                lse_part[:, :, s].double())
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), empty) and bool(empty[0, 0])
    assert _rel(o, ref_o) < 1e-6 and _rel(lse.cpu()[~empty], ref_lse[~empty]) < 1e-6, f"seed {seed}"


def test_merge_states_rejects_float64_and_bad_shapes():
    o = torch.zeros(1, 2, 64, device=DEVICE)
    lse = torch.zeros(1, 2, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        merge_states(o.double(), lse, o, lse)
    with pytest.raises(ValueError, match="lse_b"):
        merge_states(o, lse, o, lse[:, :1])


def _host_pool(shape, dtype, g):
    t = torch.randn(*shape, generator=g).to(dtype)
    return t.pin_memory() if ON_GPU else t


@pytest.mark.parametrize("programs", [None, 1, 3])
@pytest.mark.parametrize("layers", [None, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_pages_copies_selected_pages_bit_exactly(layers, dtype, programs):
    seed, g = _gen()
    lead = () if layers is None else (layers,)
    page = (2, 4, 64)                                       # Hkv, P, D
    src_k = _host_pool(lead + (11,) + page, dtype, g)
    src_v = _host_pool(lead + (11,) + page, dtype, g)
    dst_k = torch.randn(*lead, 7, *page, generator=g).to(dtype).to(DEVICE)
    dst_v = torch.randn(*lead, 7, *page, generator=g).to(dtype).to(DEVICE)
    before_k, before_v = dst_k.clone(), dst_v.clone()
    src_pages = torch.randperm(11, generator=g)[:5]
    dst_slots = torch.randperm(7, generator=g)[:5]          # 5 pages: programs=3 loops twice
    gather_pages(src_k, src_v, src_pages, dst_k, dst_v, dst_slots.tolist(), programs=programs)
    if ON_GPU:
        torch.cuda.synchronize()
    want_k, want_v = before_k.cpu(), before_v.cpu()
    want_k[..., dst_slots, :, :, :] = src_k[..., src_pages, :, :, :]
    want_v[..., dst_slots, :, :, :] = src_v[..., src_pages, :, :, :]
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(dst_k.cpu().view(bits), want_k.view(bits)), f"seed {seed}"
    assert torch.equal(dst_v.cpu().view(bits), want_v.view(bits)), f"seed {seed}"


def test_gather_pages_with_no_pages_changes_nothing():
    seed, g = _gen()
    src = _host_pool((4, 1, 4, 16), torch.float32, g)
    dst = torch.randn(3, 1, 4, 16, generator=g).to(DEVICE)
    before = dst.clone()
    gather_pages(src, src, [], dst, dst.clone(), [])
    assert torch.equal(dst, before)


@pytest.mark.parametrize("programs", [None, 1, 2])
def test_launch_gather_pages_skips_entries_marked_minus_one(programs):
    """The cache's fixed-size plans pad with -1: those entries copy nothing, the rest copy."""
    from vortex_hybrid.gpu_kernels.gather_pages import launch_gather_pages
    seed, g = _gen()
    src = _host_pool((5, 2, 4, 16), torch.float32, g)
    dst_k = torch.randn(4, 2, 4, 16, generator=g).to(DEVICE)
    dst_v = dst_k.clone()
    want = dst_k.cpu().clone()
    want[1] = src[3]
    idx = (lambda *v: torch.tensor(v, dtype=torch.int64, device=DEVICE))
    launch_gather_pages(src, src, idx(-1, 3, 2, -1), dst_k, dst_v, idx(0, 1, -1, -1), programs)
    assert torch.equal(dst_k.cpu(), want) and torch.equal(dst_v.cpu(), want), f"seed {seed}"


def test_gather_pages_rejects_bad_requests():
    g = torch.Generator().manual_seed(0)
    src = _host_pool((4, 1, 4, 16), torch.float32, g)
    dst = torch.zeros(3, 1, 4, 16, device=DEVICE)
    dst_v = dst.clone()
    with pytest.raises(ValueError, match="twice"):
        gather_pages(src, src, [0, 1], dst, dst_v, [2, 2])
    with pytest.raises(ValueError, match="src_pages"):
        gather_pages(src, src, [4], dst, dst_v, [0])
    with pytest.raises(ValueError, match="dtype"):
        gather_pages(src.half() if not ON_GPU else src.half().pin_memory(),
                     src.half() if not ON_GPU else src.half().pin_memory(), [0], dst, dst_v, [0])
    with pytest.raises(ValueError, match="differ only"):
        short = torch.zeros(3, 1, 2, 16, device=DEVICE)
        gather_pages(src, src, [0], short, short.clone(), [0])
    with pytest.raises(ValueError, match="contiguous"):
        gather_pages(src, src, [0], dst[:, :, :2], dst_v[:, :, :2], [0])
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"programs={bad!r} must be None or a positive int"):
            gather_pages(src, src, [0], dst, dst_v, [0], programs=bad)
    if ON_GPU:
        pageable = torch.zeros(4, 1, 4, 16)
        with pytest.raises(ValueError, match="pinned"):
            gather_pages(pageable, pageable, [0], dst, dst_v, [0])
