"""Predictors: the vectorised selection equals the reference top-k; on planted heads (a needle
head, a local head, a diffuse head) the measured properties and the selector's budgets come out in
the right order and meet the output-error target; the selector against brute force; the head
predictor recovers a planted relation and beats a constant on held-out rows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from vortex_hybrid import reference
from vortex_hybrid.predictors import HeadPredictor, LADDER, measure_layer, select_budgets, \
    uniform_for
from vortex_hybrid.predictors.head_predictor import needed_log2
from vortex_hybrid.predictors.head_properties import selection_mask

P, D, T, M = 16, 32, 2048, 4


@pytest.mark.parametrize("seed", range(4))
def test_selection_mask_is_the_reference_topk(seed):
    gen = torch.Generator().manual_seed(seed)
    B, H, S = 5, 3, 60
    n = torch.randint(1, S + 1, (B,), generator=gen)
    scores = torch.randn(B, H, S, generator=gen).round(decimals=1)     # ties
    budgets = torch.randint(3, 30, (B,), generator=gen)
    mask = selection_mask(scores, n, budgets, 1, 2)
    for b in range(B):
        sel = reference.topk_pages(scores[b:b + 1], int(budgets[b]), n[b:b + 1].to(torch.int32),
                                   1, 2)[0]
        for h in range(H):
            want = sorted(p for p in sel[h].tolist() if p >= 0)
            assert mask[b, h].nonzero().flatten().tolist() == want, (seed, b, h)


def planted_heads(seed: int):
    """q [M, 4, D], k, v [T, 4, D]: head 0 a needle (one page far back holds keys aligned with
    the query), head 1 local (the last 20 tokens aligned), head 2 diffuse (a near-zero query), head
    3 scattered (single aligned tokens in 24 pages spread over the prompt)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(4, D, generator=gen)
    u = u / u.norm(dim=-1, keepdim=True) * D ** 0.5
    k = 0.3 * torch.randn(T, 4, D, generator=gen)
    v = 0.3 + torch.randn(T, 4, D, generator=gen)     # a common mean: dense outputs are not ~0
    needle = 50 * P
    k[needle:needle + P, 0] += 2.0 * u[0]
    k[T - 20:, 1] += 2.0 * u[1]
    for i in range(24):
        k[(4 + 5 * i) * P + (7 * i) % P, 3] += 2.0 * u[3]
    q = u[None].repeat(M, 1, 1) + 0.05 * torch.randn(M, 4, D, generator=gen)
    q[:, 2] = 0.01 * torch.randn(M, D, generator=gen)
    return q, k, v


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_heads_get_budgets_in_order_and_meet_the_target(seed):
    print(f"seed={seed}")
    q, k, v = planted_heads(seed)
    props = measure_layer(q, k, v, "centroid", P, 1, 2)
    c, loc = props.concentration, props.locality
    assert c[0] < c[2] and c[1] < c[2]                 # needle and local heads need few pages
    assert loc[1] > 0.9 and loc[0] < 0.5 and loc[2] < 0.2
    target = 0.05
    E, pages = props.error.numpy()[:3], props.pages.numpy()
    choice = select_budgets(E, pages, target)
    ratio = np.asarray(LADDER)[choice.index]
    assert ratio[1] < ratio[0] < ratio[2], ratio
    assert choice.met and choice.mean_error <= target
    got = E[np.arange(3), choice.index].mean()
    assert got == pytest.approx(choice.mean_error)
    uniform = uniform_for(E, pages, target)
    assert props.pages[uniform] > choice.pages         # one budget for all pays for the diffuse


@pytest.mark.parametrize("seed", [0, 1])
def test_granularity_goes_to_tokens_for_scattered_heads_and_pages_for_a_needle_page(seed):
    """Options per head: the page ladder, then the token ladder at token_cost of its bytes. The
    needle head's whole page matters (token granularity keeps a quarter of it): pages. The
    scattered head's 24 single tokens fit in a quarter of its pages' tokens: tokens, cheaper."""
    from vortex_hybrid.predictors.head_properties import TOKEN_SHARE, token_cost
    print(f"seed={seed}")
    q, k, v = planted_heads(seed)
    p = measure_layer(q, k, v, "centroid", P, 1, 2)
    R = len(LADDER)
    E = np.concatenate([p.error.numpy(), p.error_token.numpy()], 1)
    pages = np.concatenate([p.pages.numpy(), p.pages.numpy() * token_cost(TOKEN_SHARE)])
    # judged head by head: each must meet the target alone
    for head, want in ((0, "page"), (3, "token")):
        c = select_budgets(E[head:head + 1], pages, 0.02)
        assert c.met
        assert ("token" if c.index[0] >= R else "page") == want, (head, c.index[0], E[head])


def test_selector_matches_brute_force_on_small_problems():
    """Never above the exact optimum for a 1% tighter target (the DP rounds errors up)."""
    rng = np.random.default_rng(7)
    for trial in range(40):
        N, R = 4, 5
        pages = np.sort(rng.uniform(0.01, 1, R))
        error = np.sort(rng.uniform(0, 0.5, (N, R)), axis=1)[:, ::-1].copy()
        target = float(rng.uniform(0.05, 0.3))
        combos = np.array(list(itertools.product(range(R), repeat=N)))
        e = error[np.arange(N), combos].mean(1)
        p = pages[combos].mean(1)
        c = select_budgets(error, pages, target)
        if not (e <= target).any():
            assert not c.met
            continue
        assert c.met and c.mean_error <= target + 1e-12
        tight = e <= 0.99 * target
        if tight.any():
            assert c.pages <= p[tight].min() + 1e-12, (trial, c.pages, p[tight].min())


def test_selector_refuses_bad_input_and_honours_a_cap():
    with pytest.raises(ValueError, match="target"):
        select_budgets(np.zeros((2, 3)), np.ones(3), 0)
    with pytest.raises(ValueError, match="finite"):
        select_budgets(np.full((2, 3), np.nan), np.ones(3), 0.1)
    error = np.array([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]])
    c = select_budgets(error, np.array([0.1, 0.2, 0.5]), 0.01, max_pages=0.3)
    assert c.pages <= 0.3 and not c.met


def test_predictor_recovers_a_planted_relation_and_beats_a_constant():
    rng = np.random.default_rng(3)
    ladder = np.asarray(LADDER)
    n = 400
    feats = rng.normal(size=(n, 3))
    depth = rng.uniform(size=n)
    truth = -4.0 - 0.8 * feats[:, 0] + 0.5 * feats[:, 1]             # log2 of the needed ratio
    need = np.clip(np.searchsorted(np.log2(ladder), truth), 0, len(ladder) - 1)
    error = np.where(np.arange(len(ladder))[None, :] >= need[:, None], 0.01, 0.5)
    y = needed_log2(error, ladder, 0.1)
    pred = HeadPredictor.fit(feats[:300], depth[:300], y[:300])
    held = pred.evaluate(feats[300:], depth[300:], error[300:], ladder, 0.1)
    const = HeadPredictor(np.r_[y[:300].mean(), 0, 0, 0, 0])
    base = const.evaluate(feats[300:], depth[300:], error[300:], ladder, 0.1)
    assert held["mae_log2"] < 0.5 * base["mae_log2"], (held, base)
    assert pred.coef[1] < 0 < pred.coef[2]
    again = HeadPredictor.from_dict(pred.to_dict())
    assert np.allclose(again.coef, pred.coef)


@pytest.mark.parametrize("seed", [0, 1])
def test_selection_reuse_counts_shared_pages(seed):
    from vortex_hybrid.predictors.head_properties import selection_reuse
    gen = torch.Generator().manual_seed(seed)
    B, H, K, S = 3, 2, 6, 20
    prev = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(B * H)]).view(B, H, K)
    sel = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(B * H)]).view(B, H, K)
    prev[0, 0, -2:] = -1                       # padding counts for nothing
    sel[1, 1, -1] = -1
    got = selection_reuse(prev.int(), sel.int(), S)
    for b in range(B):
        for h in range(H):
            a = {p for p in prev[b, h].tolist() if p >= 0}
            c = [p for p in sel[b, h].tolist() if p >= 0]
            assert got[b, h].item() == pytest.approx(sum(p in a for p in c) / len(c))


def test_uniform_pages_at_interpolates_in_log_pages_and_held_out_judgement():
    from vortex_hybrid.profile.calibrate import Curves, judge_heldout, uniform_pages_at
    err, pages = np.array([0.4, 0.2, 0.1]), np.array([0.01, 0.02, 0.04])
    assert uniform_pages_at(err, pages, 0.15) == pytest.approx((0.02 * 0.04) ** 0.5)
    assert uniform_pages_at(err, pages, 0.5) == 0.01 and uniform_pages_at(err, pages, 0.05) == 0.04
    # two heads: the first needs the last option, the second the first one
    E = np.array([[[0.4, 0.2, 0.1], [0.2, 0.2, 0.2]]])                  # [L=1, H=2, R=3]
    held = Curves(E, E, pages)
    j = judge_heldout(np.array([[2, 0]]), held, "page")
    assert j["per_head_mean_error"] == pytest.approx(0.15)
    assert j["per_head_pages"] == pytest.approx(0.025)
    uni = uniform_pages_at(E.mean((0, 1)), pages, 0.15)                 # mean curve .3 .2 .15
    assert j["uniform_pages_at_equal_error"] == pytest.approx(uni) and uni == pytest.approx(0.04)
    assert j["pages_ratio"] == pytest.approx(0.025 / 0.04)
