"""The `lowbit` flow (each page scored by its best key, keys quantized per channel on the page's
key range) against a float64 numpy version of its formula written here, through the reference
interpreter and whatever the runtime binds on this device (float64 exactly, float32 up to rounding
at the selection boundary), and its options' checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vortex_hybrid import HybridConfig, vflow
from vortex_hybrid.vflow.flows import Centroid, LowBit
from vortex_hybrid.vflow.flows.gqa import GQA

from test_vflow_gqa import assert_union, combined
from test_vflow_select import assert_selection, make_inputs, per_head_page_scores, tolerance


def decoded_keys(keys: np.ndarray, bits: int) -> np.ndarray:
    """[P, D] float64: each key decoded from its `bits`-bit code on the page's per-channel range."""
    levels = 2 ** bits - 1
    kmin, kmax = keys.min(0), keys.max(0)
    t = (keys - kmin) / np.maximum(kmax - kmin, 1e-20) * levels
    codes = sum((t >= i - 0.5).astype(np.float64) for i in range(1, levels + 1))
    return kmin + codes * ((kmax - kmin) / levels)


def head_scores(bits: int, q, k_pool, table, lens) -> np.ndarray:
    """[B, Hkv, max_pages, G] float64: max over a full page's tokens of q_j . decoded key; -inf
    where a page has no summary (past the request, or its partial last page)."""
    return per_head_page_scores(q, k_pool, table, lens,
                                lambda qg, keys: (qg @ decoded_keys(keys, bits).T).max(1))


CASES = [(seed, bits, gqa) for seed in (0, 1, 2) for bits in (1, 2, 4) for gqa in GQA]


@pytest.mark.parametrize("seed,bits,gqa", CASES)
def test_lowbit_selects_like_the_float64_formula(seed, bits, gqa):
    """Random shapes from `seed` (in the test id): GQA groups 1/3/4, pages of 4, partial last
    pages, budgets from sink + recent to more than all pages, float64 and float32."""
    rng = np.random.default_rng(seed)
    group, D, P, max_pages = int(rng.choice([1, 3, 4])), 16, 4, 11
    q, k_pool, table, lens = make_inputs(200 + seed, torch.float64, 3, 2, group, D, P, max_pages)
    obj = LowBit(bits=bits, gqa=gqa)
    per_head = head_scores(bits, q, k_pool, table, lens)
    for budget, sink, recent in ((3, 1, 2), (5, 1, 1), (7, 0, 2), (13, 1, 2)):
        for dtype in (torch.float64, torch.float32):
            sel = vflow.select_pages(obj, q.to(dtype), k_pool.to(dtype), table, lens, budget,
                                     sink, recent)
            if gqa == "union":
                assert_union(sel, per_head, lens, P, budget, sink, recent)
                continue
            want = combined(per_head, gqa, D ** -0.5)
            assert_selection(sel, want, lens, P, budget, sink, recent, tolerance(dtype, want))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lowbit_page_scores_match_the_formula(bits):
    q, k_pool, table, lens = make_inputs(7, torch.float64, 2, 2, 3, 8, 4, 7)
    got = vflow.page_scores(LowBit(bits=bits), q, k_pool, table, lens).numpy()
    want = combined(head_scores(bits, q, k_pool, table, lens), "max", 8 ** -0.5)
    scored = np.isfinite(want)
    assert (np.isfinite(got) == scored).all()
    np.testing.assert_allclose(got[scored], want[scored], rtol=1e-12, atol=1e-12)


def test_codes_are_exact_at_the_range_ends_and_a_flat_channel_codes_zero():
    """Every page's min and max key of a channel decode exactly (codes 0 and L); a channel whose
    keys are all equal (zero range) decodes to that value, not NaN."""
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((4, 8))
    keys[:, 5] = 0.75                                   # flat channel
    for bits in (1, 2, 3, 4):
        dec = decoded_keys(keys, bits)
        assert np.isfinite(dec).all()
        np.testing.assert_array_equal(dec.min(0), keys.min(0))
        np.testing.assert_allclose(dec.max(0), keys.max(0), rtol=1e-12)
        assert (np.abs(dec - keys) <= (keys.max(0) - keys.min(0)) / (2 ** bits - 1) / 2
                + 1e-12).all()
    # through the flow: a query on the flat channel alone scores 0.75 * q on every page
    k_pool = torch.tensor(np.stack([keys, keys + 1.0])[:, None], dtype=torch.float64)  # [2, 1, 4, 8]
    q = torch.zeros(1, 1, 8, dtype=torch.float64)
    q[0, 0, 5] = 2.0
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    got = vflow.page_scores(LowBit(), q, k_pool, table, torch.tensor([8], dtype=torch.int32))
    np.testing.assert_allclose(got[0, 0].numpy(), [1.5, 3.5], rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_one_matching_key_in_one_query_head_is_found(seed):
    """The case the flow is for: one page holds a single key that one query head of the group
    matches (a retrieval head), every other key is noise. `lowbit` (gqa "max") ranks that page
    first; the page mean (centroid) dilutes the key 16 times and the group's other heads outvote
    it, so centroid ranks it lower (checks the case is not trivially easy)."""
    rng = np.random.default_rng(seed)
    D, P, n, G = 64, 16, 40, 3
    k_pool = rng.standard_normal((n, 1, P, D))
    q = rng.standard_normal((1, G, D))
    needle_page = int(rng.integers(1, n - 2))
    k_pool[needle_page, 0, int(rng.integers(0, P))] = q[0, 1] / np.linalg.norm(q[0, 1]) * \
        np.sqrt(D)
    args = (torch.tensor(q), torch.tensor(k_pool), torch.arange(n, dtype=torch.int32)[None],
            torch.tensor([n * P], dtype=torch.int32))
    ranks = {}
    for name, flow in (("lowbit", LowBit()), ("centroid", Centroid())):
        scores = vflow.page_scores(flow, *args)[0, 0]
        ranks[name] = int((scores > scores[needle_page]).sum())
    print(f"seed={seed} needle page {needle_page}: ranks {ranks}")
    assert ranks["lowbit"] == 0
    assert ranks["centroid"] > 0
    sel = vflow.select_pages(LowBit(), *args, budget=4, sink=1, recent=2)
    assert needle_page in sel[0, 0].tolist()


@pytest.mark.parametrize("bits", [0, 5, 8, -1, True, 2.0, "2", None])
def test_bad_bits_are_rejected(bits):
    with pytest.raises(ValueError, match=rf"bits={bits!r} must be one of \[1, 2, 3, 4\]"):
        LowBit(bits=bits)


def test_options_through_the_config():
    assert vflow.load_flow("lowbit").bits == 2 and vflow.load_flow("lowbit").gqa == "max"
    assert HybridConfig(flow="lowbit", extra={"bits": 3, "gqa": "sum"}).extra == \
        {"bits": 3, "gqa": "sum"}
    with pytest.raises(ValueError, match="bits=7"):
        HybridConfig(flow="lowbit", extra={"bits": 7})
    with pytest.raises(ValueError, match="gqa='mean'"):
        LowBit(gqa="mean")
    assert "lowbit" in vflow.list_flows()
    assert "arXiv:" in LowBit.__doc__
