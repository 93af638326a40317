"""Token-granularity selection vs an independent brute-force NumPy implementation (float64).

Every token of the candidate pages is scored by the max over the KV head's query heads of the scaled
dot product; the k best (ties toward the lower token position) are attended. Checked: the chosen
token positions exactly, the state to float32 rounding, chunked work items, partial tail pages,
-1 padding, k = 0, more k than tokens, and that the state merges with a page-level state.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_cases import assert_state_close, make_case, new_seed, poisoned, reference_state
from test_cpu_attention import TOL
from vortex_hybrid.cpu_kernels import (merge_states, launch_token_topk_attention, select_tokens,
                                       sparse_decode_attention, token_topk_attention)


def brute_force(q, k_pool, v_pool, page_table, seq_lens, cand, k_tokens, scale):
    """(o [B, Hq, D], lse [B, Hq], tokens [B, Hkv, k_tokens]) in float64 NumPy, token by token."""
    B, hq, D = q.shape
    _, hkv, P, _ = k_pool.shape
    G = hq // hkv
    qs = q.double().numpy() * scale
    kp, vp = k_pool.double().numpy(), v_pool.double().numpy()
    o = np.zeros((B, hq, D))
    lse = np.full((B, hq), -np.inf)
    tokens = np.full((B, hkv, k_tokens), -1)
    for b in range(B):
        for h in range(hkv):
            pos = sorted(int(p) * P + t for p in cand[b, h].tolist() if p >= 0 for t in range(P)
                         if int(p) * P + t < int(seq_lens[b]))
            if not pos:
                continue
            phys = [int(page_table[b, x // P]) for x in pos]
            keys = np.stack([kp[ph, h, x % P] for ph, x in zip(phys, pos)])
            vals = np.stack([vp[ph, h, x % P] for ph, x in zip(phys, pos)])
            s = qs[b, h * G:(h + 1) * G] @ keys.T                       # [G, T]
            best = s.max(axis=0)
            keep = sorted(sorted(range(len(pos)), key=lambda i: (-best[i], i))[:k_tokens])
            tokens[b, h, :len(keep)] = [pos[i] for i in keep]
            if not keep:
                continue
            sk = s[:, keep]
            m = sk.max(axis=1, keepdims=True)
            l_ = m[:, 0] + np.log(np.exp(sk - m).sum(axis=1))
            o[b, h * G:(h + 1) * G] = np.exp(sk - l_[:, None]) @ vals[keep]
            lse[b, h * G:(h + 1) * G] = l_
    return torch.from_numpy(o), torch.from_numpy(lse), torch.from_numpy(tokens).to(torch.int32)


@pytest.mark.parametrize("k_tokens", [0, 1, 7, 30, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tokens_and_state_match_brute_force(dtype, k_tokens):
    seed = new_seed()
    q, k, v, pt, sl, cand = make_case(seed, dtype, 4, 64, batch=3, page_size=4, max_pages=10,
                                      num_sel=7)
    out = poisoned(q)
    o, lse, tokens = launch_token_topk_attention(q, k, v, pt, sl, cand, k_tokens, out=out)
    ref_o, ref_lse, ref_tokens = brute_force(q, k, v, pt, sl, cand, k_tokens, 64 ** -0.5)
    assert torch.equal(tokens, ref_tokens), f"seed {seed}: chosen tokens differ"
    assert_state_close(o, lse, ref_o, ref_lse, TOL[dtype], seed)


@pytest.mark.parametrize("chunk_slots,chunk_tokens", [(1, 1), (2, 3), (5, 64)])
def test_chunked_work_items_give_the_same_result(chunk_slots, chunk_tokens):
    seed = new_seed()
    q, k, v, pt, sl, cand = make_case(seed, torch.bfloat16, 8, 64, batch=1, page_size=8,
                                      max_pages=12, num_sel=10)
    o, lse, tokens = launch_token_topk_attention(q, k, v, pt, sl, cand, 20, chunk_slots=chunk_slots,
                                              chunk_tokens=chunk_tokens, out=poisoned(q))
    ref_o, ref_lse, ref_tokens = brute_force(q, k, v, pt, sl, cand, 20, 64 ** -0.5)
    assert torch.equal(tokens, ref_tokens), f"seed {seed}"
    assert_state_close(o, lse, ref_o, ref_lse, TOL[torch.bfloat16], seed)


def test_all_tokens_kept_equals_page_attention_and_merges():
    """k >= every candidate token: the state equals sparse attention over the candidate pages, and
    merging it with the state of the other selected pages gives the union's state."""
    seed = new_seed()
    q, k, v, pt, sl, sel = make_case(seed, torch.bfloat16, 4, 64, page_size=4, max_pages=12,
                                     num_sel=11)
    cand, rest = sel.clone(), sel.clone()
    cand[..., 6:] = -1
    rest[..., :6] = -1
    o_t, lse_t = token_topk_attention(q, k, v, pt, sl, cand, 10 ** 6, out=poisoned(q))
    assert_state_close(o_t, lse_t, *reference_state(q, k, v, pt, sl, cand), 1e-5, seed)
    o_p, lse_p = sparse_decode_attention(q, k, v, pt, sl, rest)
    o, lse = merge_states(o_t, lse_t, o_p, lse_p)
    assert_state_close(o, lse, *reference_state(q, k, v, pt, sl, sel), 1e-5, seed)


def test_ties_go_to_the_lower_token_position():
    """Identical keys everywhere: every score ties, so the first k positions are kept."""
    q, k, v, pt, sl, cand = make_case(new_seed(), torch.float32, 2, 64, batch=1, page_size=4,
                                      max_pages=6, num_sel=6)
    k[:] = 0.25
    sl[0] = 22
    cand[0, :] = torch.tensor([5, 3, -1, 0, 4, -1], dtype=torch.int32)
    tokens = select_tokens(q, k, v, pt, sl, cand, 6)
    assert tokens[0, 0].tolist() == [0, 1, 2, 3, 12, 13]


def test_bad_k_tokens_is_rejected():
    q, k, v, pt, sl, cand = make_case(new_seed(), torch.float32, 2, 64)
    with pytest.raises(ValueError, match="k_tokens=-1 must be a non-negative integer"):
        token_topk_attention(q, k, v, pt, sl, cand, -1)
