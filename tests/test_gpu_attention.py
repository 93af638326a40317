"""Triton sparse/dense paged decode attention vs the float64 torch reference.

Runs natively on a GPU and under TRITON_INTERPRET=1 on CPU (tests/conftest.py), so shapes stay tiny.
Every case draws fresh random inputs (the seed is in the failure message), poisons the outputs with
NaN before the launch and requires every element written; NaN never passes.
"""

from __future__ import annotations


import pytest
import torch

from attention_cases import assert_state_close, make_case, new_seed, poisoned, reference_state
from conftest import DEVICE
from vortex_hybrid import reference
from vortex_hybrid.gpu_kernels import (dense_decode_attention, launch_sparse_decode_attention,
                                       sparse_decode_attention)
from vortex_hybrid.gpu_kernels.sparse_decode_attention import LaunchConfig

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _case(*args, **kwargs):
    return make_case(*args, device=DEVICE, **kwargs)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sparse_matches_reference_for_dtypes_gqa_and_head_dims(dtype, group, head_dim):
    seed = new_seed()
    q, k, v, pt, sl, sel = _case(seed, dtype, group, head_dim)
    out = poisoned(q)
    o, lse = sparse_decode_attention(q, k, v, pt, sl, sel, out=out)
    assert o is out[0] and lse is out[1]
    ref_o, ref_lse = reference_state(q, k, v, pt, sl, sel)
    assert_state_close(o, lse, ref_o, ref_lse, TOL[dtype], seed)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("block_t", [16, 64])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_split_counts_and_loop_blocks_give_the_same_state(num_splits, block_t, prefetch):
    """Several loop iterations per split (online softmax rescaling, with and without prefetching
    the next block's page indices) and several splits (the split merge)."""
    seed = new_seed()
    q, k, v, pt, sl, sel = _case(seed, torch.float32, 4, 64, page_size=4, max_pages=12, num_sel=11)
    out = poisoned(q)
    o, lse = launch_sparse_decode_attention(q, k, v, pt, sl, sel, out=out, num_splits=num_splits,
                                            config=LaunchConfig(block_t=block_t,
                                                                prefetch_indices=prefetch))
    ref_o, ref_lse = reference_state(q, k, v, pt, sl, sel)
    assert_state_close(o, lse, ref_o, ref_lse, TOL[torch.float32], seed)


@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_queries_and_page_size_16(q_dtype):
    seed = new_seed()
    q, k, v, pt, sl, sel = _case(seed, torch.bfloat16, 4, 128, batch=1, page_size=16,
                                 max_pages=5, num_sel=4, q_dtype=q_dtype)
    o, lse = sparse_decode_attention(q, k, v, pt, sl, sel, out=poisoned(q))
    ref_o, ref_lse = reference_state(q, k, v, pt, sl, sel)
    assert_state_close(o, lse, ref_o, ref_lse, TOL[torch.bfloat16], seed)


def test_k_zero_gives_empty_state():
    q, k, v, pt, sl, sel = _case(new_seed(), torch.float32, 4, 64)
    o, lse = sparse_decode_attention(q, k, v, pt, sl, sel[:, :, :0], out=poisoned(q))
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse))


def test_all_padding_and_empty_requests_give_empty_state():
    seed = new_seed()
    q, k, v, pt, sl, sel = _case(seed, torch.float32, 4, 64, batch=3)
    sel[1] = -1                                        # request 1 selects nothing
    sl[2] = 0                                          # request 2 holds no token
    sel[2] = -1
    o, lse = sparse_decode_attention(q, k, v, pt, sl, sel, out=poisoned(q))
    ref_o, ref_lse = reference_state(q, k, v, pt, sl, sel)
    assert torch.all(torch.isneginf(lse[1:])) and torch.all(o[1:] == 0)
    assert_state_close(o, lse, ref_o, ref_lse, TOL[torch.float32], seed)


def test_dense_matches_reference_dense():
    seed = new_seed()
    q, k, v, pt, sl, _ = _case(seed, torch.bfloat16, 8, 64, batch=2, page_size=4, max_pages=7)
    o, lse = dense_decode_attention(q, k, v, pt, sl, out=poisoned(q))
    ref_o, ref_lse = reference.dense_decode_attention(q.double(), k, v, pt, sl)
    assert_state_close(o, lse, ref_o, ref_lse, TOL[torch.bfloat16], seed)


def test_custom_scale_and_strided_query():
    seed = new_seed()
    q, k, v, pt, sl, sel = _case(seed, torch.float32, 4, 64)
    q_strided = torch.stack([q, -q], dim=-1)[..., 0]    # q's values, last-dim stride 2
    assert q_strided.stride(-1) == 2
    o, lse = sparse_decode_attention(q_strided, k, v, pt, sl, sel, sm_scale=0.3)
    ref_o, ref_lse = reference.sparse_decode_attention(q_strided.double(), k, v, pt, sl, sel,
                                                       sm_scale=0.3)
    assert_state_close(o, lse, ref_o, ref_lse, TOL[torch.float32], seed)


def test_rejects_bad_input_with_named_values():
    q, k, v, pt, sl, sel = _case(new_seed(), torch.float32, 4, 64)
    with pytest.raises(ValueError, match="float64"):
        sparse_decode_attention(q, k.double(), v.double(), pt, sl, sel)
    with pytest.raises(ValueError, match="out must be"):
        sparse_decode_attention(q, k, v, pt, sl, sel, out=(q.clone(), q[..., 0].clone()[:1]))
    bad = sel.clone()
    bad[0, 0, 0] = 99
    with pytest.raises(ValueError, match="sel"):
        sparse_decode_attention(q, k, v, pt, sl, bad)
