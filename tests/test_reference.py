"""vortex_hybrid.reference vs naive float64 loops and the properties of docs/architecture.md."""

import math
import random

import numpy as np
import pytest
import torch

from conftest import test_seed
from vortex_hybrid import reference


def make_paged_kv(B, hq, hkv, d, page_size, seq_lens, dtype=torch.float64, extra_pages=3, seed=None):
    """Random pools with a shuffled page table: returns q, k_pool, v_pool, page_table, seq_lens.
    seed=None: the running test's seed (conftest `test_seed`, printed; replay with VH_TEST_SEED)."""
    g = torch.Generator().manual_seed(test_seed() if seed is None else seed)
    n_pages = [-(-s // page_size) for s in seq_lens]
    max_pages = max(n_pages + [1])
    total = sum(n_pages) + extra_pages
    k_pool = torch.randn(total, hkv, page_size, d, generator=g).to(dtype)
    v_pool = torch.randn(total, hkv, page_size, d, generator=g).to(dtype)
    perm = torch.randperm(total, generator=g)
    table = torch.full((B, max_pages), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(n_pages):
        table[b, :n] = perm[at:at + n].to(torch.int32)
        at += n
    q = torch.randn(B, hq, d, generator=g).to(dtype)
    return q, k_pool, v_pool, table, torch.tensor(seq_lens, dtype=torch.int32)


def naive_attention(q, k_pool, v_pool, table, seq_lens, sel, scale):
    """Token-by-token float64 loop in numpy, independent of the reference's vectorisation."""
    q, kp, vp = (t.double().numpy() for t in (q, k_pool, v_pool))
    B, hq, d = q.shape
    hkv, P = kp.shape[1], kp.shape[2]
    o = np.zeros((B, hq, d))
    lse = np.full((B, hq), -np.inf)
    for b in range(B):
        for h in range(hq):
            kvh = h // (hq // hkv)
            scores, values = [], []
            for p in sel[b, kvh].tolist():
                if p < 0:
                    continue
                for t in range(P):
                    pos = p * P + t
                    if pos < int(seq_lens[b]):
                        phys = int(table[b, p])
                        scores.append(float(q[b, h] @ kp[phys, kvh, t]) * scale)
                        values.append(vp[phys, kvh, t])
            if scores:
                m = max(scores)
                w = np.exp(np.array(scores) - m)
                o[b, h] = (w[:, None] * np.array(values)).sum(0) / w.sum()
                lse[b, h] = m + math.log(w.sum())
    return torch.from_numpy(o), torch.from_numpy(lse)


def random_sel(seq_lens, hkv, k, page_size, rng):
    B = len(seq_lens)
    sel = torch.full((B, hkv, k), -1, dtype=torch.int32)
    for b, s in enumerate(seq_lens):
        n = -(-s // page_size)
        for h in range(hkv):
            pages = rng.sample(range(n), min(n, rng.randint(0, k)))
            slots = rng.sample(range(k), len(pages))
            for slot, p in zip(slots, pages):
                sel[b, h, slot] = p
    return sel


@pytest.mark.parametrize("group", [1, 3, 4])
def test_sparse_attention_matches_naive_float64_loop(group):
    rng = random.Random(test_seed())
    hkv, d, P = 2, 16, 4
    seq_lens = [rng.randint(1, 40) for _ in range(3)]
    q, kp, vp, table, lens = make_paged_kv(3, hkv * group, hkv, d, P, seq_lens)
    sel = random_sel(seq_lens, hkv, 6, P, rng)
    o, lse = reference.sparse_decode_attention(q, kp, vp, table, lens, sel)
    o_n, lse_n = naive_attention(q, kp, vp, table, lens, sel, d ** -0.5)
    assert o.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(o, o_n, rtol=1e-10, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_n))
    fin = torch.isfinite(lse_n)
    torch.testing.assert_close(lse[fin], lse_n[fin], rtol=1e-10, atol=1e-12)


def test_sparse_attention_float32_pools_give_float32_state_close_to_float64():
    rng = random.Random(test_seed())
    seq_lens = [37, 5]
    q, kp, vp, table, lens = make_paged_kv(2, 8, 2, 32, 8, seq_lens)
    sel = random_sel(seq_lens, 2, 4, 8, rng)
    o64, _ = reference.sparse_decode_attention(q, kp, vp, table, lens, sel, sm_scale=0.3)
    o32, l32 = reference.sparse_decode_attention(q.float(), kp.float(), vp.float(), table, lens, sel,
                                                 sm_scale=0.3)
    assert o32.dtype == torch.float32 and l32.dtype == torch.float32
    assert float((o32.double() - o64).norm() / o64.norm().clamp_min(1e-30)) < 1e-5


def test_empty_selection_gives_zero_output_and_neg_inf_lse():
    q, kp, vp, table, lens = make_paged_kv(2, 4, 2, 8, 4, [9, 3])
    sel = torch.full((2, 2, 3), -1, dtype=torch.int32)
    o, lse = reference.sparse_decode_attention(q, kp, vp, table, lens, sel)
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse))
    o0, lse0 = reference.sparse_decode_attention(q, kp, vp, table, lens, sel[:, :, :0])
    assert torch.all(o0 == 0) and torch.all(torch.isneginf(lse0))


def test_dense_equals_sparse_with_every_page_selected_and_naive():
    seq_lens = [1, 17, 32]
    q, kp, vp, table, lens = make_paged_kv(3, 4, 1, 8, 16, seq_lens)
    o, lse = reference.dense_decode_attention(q, kp, vp, table, lens)
    sel = reference.all_pages_sel(lens, 1, table.shape[1], 16)
    o_n, lse_n = naive_attention(q, kp, vp, table, lens, sel, 8 ** -0.5)
    torch.testing.assert_close(o, o_n, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, lse_n, rtol=1e-10, atol=1e-12)


def test_merge_of_disjoint_selections_equals_attention_over_union():
    rng = random.Random(test_seed())
    P = 4
    seq_lens = [rng.randint(20, 60) for _ in range(3)]
    q, kp, vp, table, lens = make_paged_kv(3, 6, 3, 16, P, seq_lens)
    sel_a = torch.full((3, 3, 16), -1, dtype=torch.int32)
    sel_b = sel_a.clone()
    for b, s in enumerate(seq_lens):
        n = -(-s // P)
        for h in range(3):
            pages = list(range(n))
            rng.shuffle(pages)
            cut = rng.randint(0, n)
            sel_a[b, h, :cut] = torch.tensor(pages[:cut], dtype=torch.int32)
            sel_b[b, h, :n - cut] = torch.tensor(pages[cut:], dtype=torch.int32)
    o_a, l_a = reference.sparse_decode_attention(q, kp, vp, table, lens, sel_a)
    o_b, l_b = reference.sparse_decode_attention(q, kp, vp, table, lens, sel_b)
    o, lse = reference.merge_states(o_a, l_a, o_b, l_b)
    o_d, lse_d = reference.dense_decode_attention(q, kp, vp, table, lens)
    torch.testing.assert_close(o, o_d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, lse_d, rtol=1e-10, atol=1e-12)


def test_merge_handles_empty_sides():
    o = torch.randn(2, 3, 4, dtype=torch.float64)
    lse = torch.randn(2, 3, dtype=torch.float64)
    empty_o, empty_l = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    for args, (exp_o, exp_l) in [((o, lse, empty_o, empty_l), (o, lse)),
                                 ((empty_o, empty_l, o, lse), (o, lse)),
                                 ((empty_o, empty_l, empty_o, empty_l), (empty_o, empty_l))]:
        mo, ml = reference.merge_states(*args)
        assert not torch.isnan(mo).any() and not torch.isnan(ml).any()
        torch.testing.assert_close(mo, exp_o)
        assert torch.equal(torch.isneginf(ml), torch.isneginf(exp_l))
        torch.testing.assert_close(ml[torch.isfinite(ml)], exp_l[torch.isfinite(exp_l)])


def brute_topk(scores, k, n, sink, recent):
    """Independent top-k: Python sort by (-score, index) over the non-forced pages."""
    if n <= k:
        return list(range(n))
    forced = set(range(min(sink, n))) | set(range(max(0, n - recent), n))
    rest = sorted((p for p in range(n) if p not in forced), key=lambda p: (-scores[p], p))
    return sorted(forced | set(rest[:k - len(forced)]))


@pytest.mark.parametrize("trial", range(5))
def test_topk_matches_brute_force_with_ties(trial):
    rng = random.Random(test_seed())
    B, H, M = 3, 2, rng.randint(1, 40)
    scores = torch.randint(0, 4, (B, H, M)).float()          # many ties on purpose
    num_pages = torch.tensor([rng.randint(0, M) for _ in range(B)], dtype=torch.int32)
    sink, recent = rng.randint(0, 3), rng.randint(0, 3)
    k = sink + recent + rng.randint(0, 6)
    sel = reference.topk_pages(scores, k, num_pages, sink, recent)
    assert sel.shape == (B, H, k) and sel.dtype == torch.int32
    for b in range(B):
        for h in range(H):
            row = [p for p in sel[b, h].tolist() if p >= 0]
            assert row == brute_topk(scores[b, h].tolist(), k, int(num_pages[b]), sink, recent)
            assert sel[b, h, len(row):].eq(-1).all()


def test_topk_keeps_sink_and_recent_even_when_they_score_lowest():
    scores = torch.arange(20, dtype=torch.float32).flip(0)[None, None].repeat(1, 1, 1)
    scores[0, 0, 0] = -1e9
    scores[0, 0, 19] = -1e9
    sel = reference.topk_pages(scores, 4, torch.tensor([20], dtype=torch.int32), sink=1, recent=1)
    assert sel[0, 0].tolist() == [0, 1, 2, 19]


def test_topk_selects_all_pages_when_budget_covers_them_and_short_sequences():
    scores = torch.randn(2, 3, 10)
    sel = reference.topk_pages(scores, 10, torch.tensor([10, 1], dtype=torch.int32), 1, 1)
    assert sel[0].tolist() == [list(range(10))] * 3
    assert sel[1].tolist() == [[0] + [-1] * 9] * 3        # a sequence shorter than one page


def test_topk_rejects_budget_below_sink_plus_recent():
    with pytest.raises(ValueError, match="k=2 must be >= sink \\+ recent = 3"):
        reference.topk_pages(torch.randn(1, 1, 8), 2, torch.tensor([8], dtype=torch.int32), 1, 2)


def test_attention_rejects_bad_input_with_named_values():
    q, kp, vp, table, lens = make_paged_kv(1, 4, 2, 8, 4, [10])
    sel = torch.tensor([[[0, 5], [1, -1]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"sel\[0, 0, 1\]=5 is not a page of request 0"):
        reference.sparse_decode_attention(q, kp, vp, table, lens, sel)
    sel = torch.tensor([[[1, 1], [0, -1]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="lists a page twice"):
        reference.sparse_decode_attention(q, kp, vp, table, lens, sel)
    with pytest.raises(ValueError, match="num_q_heads=3 must be a positive multiple"):
        reference.sparse_decode_attention(q[:, :3], kp, vp, table, lens, sel)
    bad_table = table.clone()
    bad_table[0, 0] = 999
    with pytest.raises(ValueError, match="physical page 999"):
        reference.dense_decode_attention(q, kp, vp, bad_table, lens)
