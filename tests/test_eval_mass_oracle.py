"""The eval's mass oracle (`--flow mass`, `vortex_hybrid.eval.mass_oracle`): its pages are the top-k
of the true attention mass, computed independently here in float64 (a loop over heads, pages and
tokens), on small random shapes, per step through `MassOracle` (keys appended as decoding goes on)
and end to end in the eval against a float64 model attending those pages; bad inputs are refused
at the boundary."""

from __future__ import annotations

import math

import pytest
import torch

from vortex_hybrid import HybridConfig
from vortex_hybrid.eval.mass_oracle import MASS_FLOW, MassOracle, mass_selection, page_mass


def true_pages(q: torch.Tensor, keys: torch.Tensor, cfg: HybridConfig) -> list[list[int]]:
    """Per KV head, the sorted pages of the most attention mass, from first principles in float64:
    each query head's softmax over every key, summed over the KV head's query heads and by page;
    sink and recent pages forced; every page when the request holds no more than the budget."""
    q, keys = q.double(), keys.double()
    hq, D = q.shape
    T, hkv, _ = keys.shape
    G, P = hq // hkv, cfg.page_size
    n = math.ceil(T / P)
    budget = cfg.budget_for(n)
    out = []
    for h in range(hkv):
        mass = [0.0] * n
        for j in range(h * G, (h + 1) * G):
            logits = [float(q[j] @ keys[t, h]) / math.sqrt(D) for t in range(T)]
            top = max(logits)
            w = [math.exp(x - top) for x in logits]
            for t in range(T):
                mass[t // P] += w[t] / sum(w)
        if n <= budget:
            out.append(list(range(n)))
            continue
        forced = set(range(min(cfg.sink_pages, n))) | set(range(n - cfg.recent_pages, n))
        rest = sorted((p for p in range(n) if p not in forced), key=lambda p: (-mass[p], p))
        out.append(sorted(forced | set(rest[:budget - len(forced)])))
    return out


def as_lists(sel: torch.Tensor) -> list[list[int]]:
    return [[p for p in row if p >= 0] for row in sel.tolist()]


@pytest.mark.parametrize("hq, hkv, D, T, P, budget", [
    (4, 2, 8, 100, 4, dict(budget_ratio=0.2)),
    (6, 2, 16, 161, 16, dict(budget_pages=5)),          # partial tail page
    (3, 3, 8, 37, 8, dict(budget_tokens=24)),           # no GQA; budget = sink + recent
    (8, 1, 4, 20, 4, dict(budget_ratio=1.0)),           # every page
    (4, 2, 8, 1, 16, dict(budget_pages=3)),             # one token
])
def test_pages_are_the_top_k_of_the_true_mass(hq, hkv, D, T, P, budget):
    for trial in range(3):
        cfg = HybridConfig(page_size=P, placement="gpu", **budget)
        q, keys = torch.randn(hq, D) * 2, torch.randn(T, hkv, D)
        sel = mass_selection(q, keys, cfg)
        n = math.ceil(T / P)
        assert sel.shape == (hkv, cfg.budget_for(n)) and sel.dtype == torch.int32
        assert as_lists(sel) == true_pages(q, keys, cfg), (trial, sel)
        mass = page_mass(q, keys, P)
        assert mass.shape == (hkv, n) and torch.allclose(
            mass.sum(1), torch.full((hkv,), float(hq // hkv), dtype=torch.float64))


def test_the_oracle_selects_per_step_over_every_key_so_far():
    """Two requests of different lengths, 2 layers: the oracle's selection at each layer of each
    step is the true top-k over the request's keys with every step's new key appended (past the
    first buffer's capacity, so it grows); a batch row pads to the widest budget."""
    L, hq, hkv, D, P = 2, 4, 2, 8, 4
    cfg = HybridConfig(page_size=P, placement="gpu", budget_ratio=0.25)
    oracle = MassOracle(cfg, L)
    keys = [torch.randn(L, 7, hkv, D), torch.randn(L, 90, hkv, D)]
    for k in keys:
        oracle.admit(k)
    for step in range(70):                       # row 0 grows past its first 64 slots
        new = []
        for layer in range(L):
            q, k_new = torch.randn(2, hq, D), torch.randn(2, hkv, D)
            sel = oracle.select(layer, q, k_new)
            new.append(k_new)
            if step % 23 and step != 69:
                continue
            for b in range(2):
                ks = torch.cat([keys[b][layer], k_new[b][None]])
                want = true_pages(q[b], ks, cfg)
                assert as_lists(sel[b]) == want, (step, layer, b)
            widths = [cfg.budget_for(math.ceil((k.shape[1] + 1) / P)) for k in keys]
            assert sel.shape == (2, hkv, max(widths))
        keys = [torch.cat([k, torch.stack([n[b] for n in new])[:, None]], 1)
                for b, k in enumerate(keys)]


def test_bad_input_is_refused_at_the_boundary(tmp_path):
    cfg = HybridConfig(page_size=4, placement="gpu", budget_ratio=0.25)
    with pytest.raises(ValueError, match="cfg must be a HybridConfig"):
        MassOracle({"page_size": 4}, 2)
    with pytest.raises(ValueError, match="'dense'"):
        MassOracle(HybridConfig(placement="dense"), 2)
    for bad in (0, True, 1.5, "2"):
        with pytest.raises(ValueError, match="num_layers"):
            MassOracle(cfg, bad)
    oracle = MassOracle(cfg, 2)
    with pytest.raises(ValueError, match="before any request"):
        oracle.select(0, torch.randn(1, 4, 8), torch.randn(1, 2, 8))
    for bad in (torch.randn(3, 5, 2, 8), torch.randn(2, 5, 2), torch.ones(2, 5, 2, 8,
                                                                          dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"keys must be a float tensor \[2, T, Hkv, D\]"):
            oracle.admit(bad)
    oracle.admit(torch.randn(2, 5, 2, 8))
    with pytest.raises(ValueError, match=r"\(Hkv, D\)"):
        oracle.admit(torch.randn(2, 5, 3, 8))
    with pytest.raises(ValueError, match="layer 0 is next"):
        oracle.select(1, torch.randn(1, 4, 8), torch.randn(1, 2, 8))
    for q, k in ((torch.randn(1, 3, 8), torch.randn(1, 2, 8)),      # Hq not a multiple of Hkv
                 (torch.randn(2, 4, 8), torch.randn(1, 2, 8)),      # batch
                 (torch.randn(1, 4, 8), torch.randn(1, 2, 4))):     # head_dim
        with pytest.raises(ValueError, match="must be a float tensor"):
            oracle.select(0, q, k)
    oracle.select(0, torch.randn(1, 4, 8), torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="during a decode step"):
        oracle.admit(torch.randn(2, 5, 2, 8))


def test_the_cache_refuses_a_selector_it_cannot_use():
    transformers = pytest.importorskip("transformers")
    from vortex_hybrid.integrations.hf import HybridCache
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16)
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="needs admit"):
        HybridCache(model, HybridConfig(placement="gpu"), selector=object())
    with pytest.raises(ValueError, match="'dense'"):
        HybridCache(model, HybridConfig(placement="dense"),
                    selector=MassOracle(HybridConfig(placement="gpu"), 1))


def test_mass_is_not_a_registered_flow():
    """The eval reads `--flow mass` as the oracle: no vflow flow may take the name."""
    from vortex_hybrid.vflow import list_flows
    assert MASS_FLOW not in list_flows()
