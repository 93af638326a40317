"""Numba sparse/dense decode attention and merge_states vs the float64 torch reference.

Same shape sweep as the GPU kernels' tests (dtypes fp32/fp16/bf16, GQA groups 1/4/8, head_dim 64/128,
partial last pages, -1 padding anywhere, K = 0, empty requests). Every case draws fresh random inputs
(the seed is in the failure message), poisons the outputs with NaN before the launch and requires
every element written; NaN never passes.
"""

from __future__ import annotations


import pytest
import torch

from attention_cases import assert_state_close, make_case, new_seed, poisoned, reference_state
from vortex_hybrid import reference
from vortex_hybrid.cpu_kernels import (dense_decode_attention, merge_states,
                                       launch_sparse_decode_attention, sparse_decode_attention)

TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
"""Relative error vs the float64 reference on the same stored values: storage rounding is shared, so
only float32 arithmetic differs."""


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sparse_matches_reference_for_dtypes_gqa_and_head_dims(dtype, group, head_dim):
    seed = new_seed()
    q, k, v, pt, sl, sel = make_case(seed, dtype, group, head_dim)
    out = poisoned(q)
    o, lse = sparse_decode_attention(q, k, v, pt, sl, sel, out=out)
    assert o is out[0] and lse is out[1]
    assert_state_close(o, lse, *reference_state(q, k, v, pt, sl, sel), TOL[dtype], seed)


@pytest.mark.parametrize("chunk_slots", [1, 2, 3, 11])
def test_page_chunks_merge_exactly(chunk_slots):
    """Rows split into chunks of selected pages (small-batch parallelism) give the same state."""
    seed = new_seed()
    q, k, v, pt, sl, sel = make_case(seed, torch.bfloat16, 4, 64, page_size=4, max_pages=12,
                                     num_sel=11)
    o, lse = launch_sparse_decode_attention(q, k, v, pt, sl, sel, chunk_slots=chunk_slots,
                                         out=poisoned(q))
    assert_state_close(o, lse, *reference_state(q, k, v, pt, sl, sel), TOL[torch.bfloat16], seed)


@pytest.mark.parametrize("schedule", ["balanced", "static"])
@pytest.mark.parametrize("busy_rows", [1, 2, 5])
def test_skewed_selection_equals_reference_in_both_schedules(schedule, busy_rows):
    """A host part where a few requests hold every page (the sub-batch shape) and the rest select
    nothing: both schedules give the reference state, and the empty rows o = 0, lse = -inf."""
    seed = new_seed()
    q, k, v, pt, sl, sel = make_case(seed, torch.bfloat16, 4, 64, batch=6, page_size=4,
                                     max_pages=12, num_sel=9)
    sel[busy_rows:] = -1
    o, lse = launch_sparse_decode_attention(q, k, v, pt, sl, sel, out=poisoned(q), schedule=schedule)
    assert torch.all(o[busy_rows:] == 0) and torch.all(torch.isneginf(lse[busy_rows:]))
    assert_state_close(o, lse, *reference_state(q, k, v, pt, sl, sel), TOL[torch.bfloat16], seed)


def test_empty_selection_skips_the_kernel_and_bad_schedule_is_refused():
    q, k, v, pt, sl, sel = make_case(new_seed(), torch.float32, 4, 64)
    o, lse = launch_sparse_decode_attention(q, k, v, pt, sl, torch.full_like(sel, -1),
                                            out=poisoned(q))
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse))
    with pytest.raises(ValueError, match="schedule='guided' must be one of"):
        launch_sparse_decode_attention(q, k, v, pt, sl, sel, schedule="guided")


@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_query_dtypes_page_size_16_and_custom_scale(q_dtype):
    seed = new_seed()
    q, k, v, pt, sl, sel = make_case(seed, torch.bfloat16, 4, 128, batch=1, page_size=16,
                                     max_pages=5, num_sel=4, q_dtype=q_dtype)
    o, lse = sparse_decode_attention(q, k, v, pt, sl, sel, sm_scale=0.3, out=poisoned(q))
    assert_state_close(o, lse, *reference_state(q, k, v, pt, sl, sel, 0.3), TOL[torch.bfloat16],
                       seed)


def test_k_zero_gives_empty_state():
    q, k, v, pt, sl, sel = make_case(new_seed(), torch.float32, 4, 64)
    o, lse = sparse_decode_attention(q, k, v, pt, sl, sel[:, :, :0], out=poisoned(q))
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse))


def test_all_padding_and_one_token_requests():
    seed = new_seed()
    q, k, v, pt, sl, sel = make_case(seed, torch.float16, 4, 64, batch=3)
    sel[1] = -1
    sl[2] = 1
    sel[2] = -1
    sel[2, 0, 2] = 0
    o, lse = sparse_decode_attention(q, k, v, pt, sl, sel, out=poisoned(q))
    ref_o, ref_lse = reference_state(q, k, v, pt, sl, sel)
    assert torch.all(o[1] == 0) and torch.all(torch.isneginf(lse[1]))
    assert_state_close(o, lse, ref_o, ref_lse, TOL[torch.float16], seed)


def test_zero_batch_returns_empty_state():
    q, k, v, pt, sl, sel = make_case(new_seed(), torch.float32, 2, 64)
    o, lse = sparse_decode_attention(q[:0], k, v, pt[:0], sl[:0], sel[:0])
    assert o.shape == (0, q.shape[1], 64) and lse.shape == (0, q.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_equals_reference_dense(dtype):
    seed = new_seed()
    q, k, v, pt, sl, _ = make_case(seed, dtype, 4, 64, batch=3)
    o, lse = dense_decode_attention(q, k, v, pt, sl, out=poisoned(q))
    ref_o, ref_lse = reference.dense_decode_attention(q.double(), k.double(), v.double(), pt, sl)
    assert_state_close(o, lse, ref_o, ref_lse, TOL[dtype], seed)


def test_split_selection_merged_equals_whole_selection():
    """Page states over two halves of a selection merge into the state of the whole selection."""
    seed = new_seed()
    q, k, v, pt, sl, sel = make_case(seed, torch.bfloat16, 4, 64, page_size=4, max_pages=12,
                                     num_sel=11)
    a, b = sel.clone(), sel.clone()
    a[..., 5:] = -1
    b[..., :5] = -1
    o_a, lse_a = sparse_decode_attention(q, k, v, pt, sl, a)
    o_b, lse_b = sparse_decode_attention(q, k, v, pt, sl, b)
    o, lse = merge_states(o_a, lse_a, o_b, lse_b, out=poisoned(q))
    assert_state_close(o, lse, *reference_state(q, k, v, pt, sl, sel), TOL[torch.bfloat16], seed)


def test_merge_states_matches_reference_with_empty_sides():
    seed = new_seed()
    g = torch.Generator().manual_seed(seed)
    o_a, o_b = torch.randn(3, 4, 32, generator=g), torch.randn(3, 4, 32, generator=g)
    lse_a, lse_b = 5 * torch.randn(3, 4, generator=g), 5 * torch.randn(3, 4, generator=g)
    lse_a[0, :2] = float("-inf")
    lse_b[0, 1:3] = float("-inf")
    o_a[0, :2] = 0.0
    o_b[0, 1:3] = 0.0
    o, lse = merge_states(o_a, lse_a, o_b, lse_b, out=poisoned(o_a))
    ref_o, ref_lse = reference.merge_states(o_a.double(), lse_a.double(), o_b.double(),
                                            lse_b.double())
    assert_state_close(o, lse, ref_o, ref_lse, 1e-6, seed)
    assert torch.isneginf(lse[0, 1]) and torch.all(o[0, 1] == 0)


def test_merge_states_propagates_nan():
    o = torch.randn(1, 2, 8)
    lse = torch.tensor([[float("nan"), 0.0]])
    out_o, out_lse = merge_states(o, lse, o, torch.zeros(1, 2))
    assert torch.isnan(out_lse[0, 0]) and torch.isnan(out_o[0, 0]).all()


@pytest.mark.parametrize("bad,match", [
    ("out_shape", "must be a contiguous CPU torch.float32 tensor of shape"),
    ("sel_range", "is not a page of request"),
    ("kv_dtype", "k_pool dtype torch.int32 not in"),
])
def test_bad_arguments_name_the_value(bad, match):
    q, k, v, pt, sl, sel = make_case(new_seed(), torch.float32, 2, 64)
    out = None
    if bad == "out_shape":
        out = (torch.empty(1), torch.empty(1))
    elif bad == "sel_range":
        sel[0, 0, 0] = 99
    else:
        k, v = k.view(torch.int32), v.view(torch.int32)
    with pytest.raises(ValueError, match=match):
        sparse_decode_attention(q, k, v, pt, sl, sel, out=out)


@pytest.mark.parametrize("threads", [1, 3, 14])
def test_balanced_order_is_a_permutation_with_even_blocks(threads):
    """Every work item once, -1 only as padding, and each thread's block within one item's pages
    of the mean (what a static split of the loop into `threads` blocks then gives each thread)."""
    import numpy as np
    from vortex_hybrid.cpu_kernels.sparse_decode_attention import (balanced_order, item_pages,
                                                                   work_order)
    seed = new_seed()
    rng = np.random.default_rng(seed)
    sel = np.full((9, 4, 20), -1, dtype=np.int32)
    sel[:2] = rng.integers(0, 50, size=(2, 4, 20))            # two requests hold every page
    sel[5, 1, :3] = 7
    chunk = 6
    work = np.pad(sel.reshape(36, 20) >= 0, ((0, 0), (0, 4))).reshape(36, 4, chunk).sum(2).ravel()
    assert item_pages(sel, chunk).tolist() == work.tolist()
    order = balanced_order(work, threads)
    n_items = 9 * 4 * 4
    assert order.size % threads == 0
    assert sorted(order[order >= 0].tolist()) == list(range(n_items)), seed
    loads = [work[b[b >= 0]].sum() for b in order.reshape(threads, -1)]
    assert max(loads) - min(loads) <= work.max(), (seed, loads)
    # the kernel's order covers the items of the rows that select a page (rows 0..7 and 21: the
    # chunks of row 21 that hold no page included), once each: rows that select nothing get none
    busy_items = [i for i in range(n_items) if i // 4 in set(range(8)) | {21}]
    chosen = work_order(sel, chunk, threads, "balanced")       # skewed: the balanced order wins
    assert sorted(chosen[chosen >= 0].tolist()) == busy_items, seed
    sub = balanced_order(work[busy_items], threads)
    assert threads == 1 or chosen.tolist() == [busy_items[i] if i >= 0 else -1 for i in sub]
    assert work_order(sel, chunk, threads, "static").tolist() == busy_items
    even = np.tile(np.arange(20, dtype=np.int32), (threads * 4, 4, 1))   # every row alike
    assert work_order(even, chunk, threads, "balanced").tolist() == list(range(threads * 4 * 4 * 4))
