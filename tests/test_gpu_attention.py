"""Triton sparse/dense paged decode attention vs the float64 torch reference.

Runs natively on a GPU and under TRITON_INTERPRET=1 on CPU (tests/conftest.py), so shapes stay tiny.
Every case draws fresh random inputs (the seed is in the failure message), poisons the outputs with
NaN before the launch and requires every element written; NaN never passes.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import DEVICE
from vortex_hybrid import reference
from vortex_hybrid.gpu_kernels import (dense_decode_attention, launch_sparse_decode_attention,
                                       sparse_decode_attention)
from vortex_hybrid.gpu_kernels.sparse_decode_attention import LaunchConfig

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _seed() -> int:
    return random.SystemRandom().randrange(2 ** 31)


def _case(seed: int, dtype: torch.dtype, group: int, head_dim: int, batch: int = 2,
          num_kv_heads: int = 2, page_size: int = 8, max_pages: int = 6, num_sel: int = 5,
          q_dtype: torch.dtype = torch.float32):
    """Random pools, a shuffled page table, partial last pages and -1-padded shuffled selections."""
    g = torch.Generator().manual_seed(seed)
    hq = num_kv_heads * group
    n_phys = batch * max_pages + 3
    k_pool = torch.randn(n_phys, num_kv_heads, page_size, head_dim, generator=g).to(dtype)
    v_pool = torch.randn(n_phys, num_kv_heads, page_size, head_dim, generator=g).to(dtype)
    q = torch.randn(batch, hq, head_dim, generator=g).to(q_dtype)
    page_table = torch.randperm(n_phys, generator=g)[:batch * max_pages]
    page_table = page_table.reshape(batch, max_pages).to(torch.int32)
    seq_lens = torch.randint(1, max_pages * page_size + 1, (batch,), generator=g, dtype=torch.int32)
    seq_lens[0] = (max_pages - 1) * page_size + 3                  # a partial last page for sure
    n_pages = (seq_lens + page_size - 1) // page_size
    sel = torch.full((batch, num_kv_heads, num_sel), -1, dtype=torch.int32)
    for b in range(batch):
        for h in range(num_kv_heads):
            take = int(torch.randint(0, min(num_sel, int(n_pages[b])) + 1, (1,), generator=g))
            pages = torch.randperm(int(n_pages[b]), generator=g)[:take]
            slots = torch.randperm(num_sel, generator=g)[:take]      # -1 padding anywhere
            sel[b, h, slots] = pages.to(torch.int32)
    return [t.to(DEVICE) for t in (q, k_pool, v_pool, page_table, seq_lens, sel)]


def _poisoned(q: torch.Tensor):
    B, hq, d = q.shape
    return (torch.full((B, hq, d), float("nan"), device=q.device),
            torch.full((B, hq), float("nan"), device=q.device))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "output holds NaN (unwritten or wrong)"
    den = ref.norm().item()
    return (out.double().cpu() - ref.cpu()).norm().item() / (den if den > 0 else 1.0)


def _assert_state_close(o, lse, ref_o, ref_lse, tol: float, seed: int) -> None:
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    empty = torch.isneginf(ref_lse).cpu()
    assert torch.equal(torch.isneginf(lse).cpu(), empty), f"seed {seed}: -inf pattern differs"
    assert torch.all(o.cpu()[empty] == 0), f"seed {seed}: empty state must give o = 0"
    err_o = _rel_err(o, ref_o)
    err_l = _rel_err(lse.cpu()[~empty], ref_lse.cpu()[~empty])
    assert err_o < tol and err_l < tol, f"seed {seed}: rel err o {err_o:.2e}, lse {err_l:.2e}"


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sparse_matches_reference_for_dtypes_gqa_and_head_dims(dtype, group, head_dim):
    seed = _seed()
    q, k, v, pt, sl, sel = _case(seed, dtype, group, head_dim)
    out = _poisoned(q)
    o, lse = sparse_decode_attention(q, k, v, pt, sl, sel, out=out)
    assert o is out[0] and lse is out[1]
    ref_o, ref_lse = reference.sparse_decode_attention(q.double(), k, v, pt, sl, sel)
    _assert_state_close(o, lse, ref_o, ref_lse, TOL[dtype], seed)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("block_t", [16, 64])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_split_counts_and_loop_blocks_give_the_same_state(num_splits, block_t, prefetch):
    """Several loop iterations per split (online softmax rescaling, with and without prefetching
    the next block's page indices) and several splits (the split merge)."""
    seed = _seed()
    q, k, v, pt, sl, sel = _case(seed, torch.float32, 4, 64, page_size=4, max_pages=12, num_sel=11)
    out = _poisoned(q)
    o, lse = launch_sparse_decode_attention(q, k, v, pt, sl, sel, out=out, num_splits=num_splits,
                                            config=LaunchConfig(block_t=block_t,
                                                                prefetch_indices=prefetch))
    ref_o, ref_lse = reference.sparse_decode_attention(q.double(), k, v, pt, sl, sel)
    _assert_state_close(o, lse, ref_o, ref_lse, TOL[torch.float32], seed)


@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_queries_and_page_size_16(q_dtype):
    seed = _seed()
    q, k, v, pt, sl, sel = _case(seed, torch.bfloat16, 4, 128, batch=1, page_size=16,
                                 max_pages=5, num_sel=4, q_dtype=q_dtype)
    o, lse = sparse_decode_attention(q, k, v, pt, sl, sel, out=_poisoned(q))
    ref_o, ref_lse = reference.sparse_decode_attention(q.double(), k, v, pt, sl, sel)
    _assert_state_close(o, lse, ref_o, ref_lse, TOL[torch.bfloat16], seed)


def test_k_zero_gives_empty_state():
    q, k, v, pt, sl, sel = _case(_seed(), torch.float32, 4, 64)
    o, lse = sparse_decode_attention(q, k, v, pt, sl, sel[:, :, :0], out=_poisoned(q))
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse))


def test_all_padding_and_empty_requests_give_empty_state():
    seed = _seed()
    q, k, v, pt, sl, sel = _case(seed, torch.float32, 4, 64, batch=3)
    sel[1] = -1                                        # request 1 selects nothing
    sl[2] = 0                                          # request 2 holds no token
    sel[2] = -1
    o, lse = sparse_decode_attention(q, k, v, pt, sl, sel, out=_poisoned(q))
    ref_o, ref_lse = reference.sparse_decode_attention(q.double(), k, v, pt, sl, sel)
    assert torch.all(torch.isneginf(lse[1:])) and torch.all(o[1:] == 0)
    _assert_state_close(o, lse, ref_o, ref_lse, TOL[torch.float32], seed)


def test_dense_matches_reference_dense():
    seed = _seed()
    q, k, v, pt, sl, _ = _case(seed, torch.bfloat16, 8, 64, batch=2, page_size=4, max_pages=7)
    o, lse = dense_decode_attention(q, k, v, pt, sl, out=_poisoned(q))
    ref_o, ref_lse = reference.dense_decode_attention(q.double(), k, v, pt, sl)
    _assert_state_close(o, lse, ref_o, ref_lse, TOL[torch.bfloat16], seed)


def test_custom_scale_and_strided_query():
    seed = _seed()
    q, k, v, pt, sl, sel = _case(seed, torch.float32, 4, 64)
    q_strided = torch.stack([q, -q], dim=-1)[..., 0]    # q's values, last-dim stride 2
    assert q_strided.stride(-1) == 2
    o, lse = sparse_decode_attention(q_strided, k, v, pt, sl, sel, sm_scale=0.3)
    ref_o, ref_lse = reference.sparse_decode_attention(q_strided.double(), k, v, pt, sl, sel,
                                                       sm_scale=0.3)
    _assert_state_close(o, lse, ref_o, ref_lse, TOL[torch.float32], seed)


def test_rejects_bad_input_with_named_values():
    q, k, v, pt, sl, sel = _case(_seed(), torch.float32, 4, 64)
    with pytest.raises(ValueError, match="float64"):
        sparse_decode_attention(q, k.double(), v.double(), pt, sl, sel)
    with pytest.raises(ValueError, match="out must be"):
        sparse_decode_attention(q, k, v, pt, sl, sel, out=(q.clone(), q[..., 0].clone()[:1]))
    bad = sel.clone()
    bad[0, 0, 0] = 99
    with pytest.raises(ValueError, match="sel"):
        sparse_decode_attention(q, k, v, pt, sl, bad)
