"""User flows loaded from files in a temporary folder run end to end.

1. docs/vflow.md's worked example (read from the doc, so doc and test cannot drift): select pages,
   check them against a numpy version of its formula, attend the selected pages with
   reference.sparse_decode_attention and compare with dense attention over the same pages.
2. A flow exercising the remaining ops (softmax, normalize, where, comparisons, take, constant,
   fill, relu, exp, abs, matmul, union) against numpy.
"""

from __future__ import annotations

import pathlib
import re
import textwrap

import numpy as np
import pytest
import torch

from test_vflow_select import assert_selection, brute_select, make_inputs, page_keys, tolerance
from vortex_hybrid import HybridConfig, reference, vflow

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "vflow.md"


def worked_example() -> tuple[str, str]:
    """(file name, code) of the block after `<!-- worked-example: NAME -->` in docs/vflow.md."""
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"<!-- worked-example: (\S+) -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/vflow.md lost its worked example marker"
    return m.group(1), m.group(2)


def ball_scores(q, k_pool, table, lens) -> np.ndarray:
    """sum_j (q_j . mean_p + |q_j| * max_t |k_t - mean_p|) for full pages; -inf elsewhere."""
    B, hq, _ = q.shape
    _, hkv, P, _ = k_pool.shape
    G = hq // hkv
    out = np.full((B, hkv, table.shape[1]), -np.inf)
    for b in range(B):
        for h in range(hkv):
            qg = q[b, h * G:(h + 1) * G].double().numpy()
            for p in range(int(lens[b]) // P):
                keys = page_keys(k_pool, table, lens, b, h, p)
                mean = keys.mean(0)
                radius = np.linalg.norm(keys - mean, axis=-1).max()
                out[b, h, p] = (qg @ mean + np.linalg.norm(qg, axis=-1) * radius).sum()
    return out


def dense_over_pages(q, k_pool, v_pool, table, lens, sel, scale):
    """Float64 numpy attention of each query head over the tokens of its KV head's pages in sel."""
    B, hq, D = q.shape
    _, hkv, P, _ = k_pool.shape
    G = hq // hkv
    o, lse = np.zeros((B, hq, D)), np.full((B, hq), -np.inf)
    for b in range(B):
        for h in range(hkv):
            pages = [int(p) for p in sel[b, h] if p >= 0]
            if not pages:
                continue
            keys = np.concatenate([page_keys(k_pool, table, lens, b, h, p) for p in pages])
            vals = np.concatenate([page_keys(v_pool, table, lens, b, h, p) for p in pages])
            for j in range(h * G, (h + 1) * G):
                s = keys @ q[b, j].double().numpy() * scale
                m = s.max()
                w = np.exp(s - m)
                o[b, j] = w @ vals / w.sum()
                lse[b, j] = m + np.log(w.sum())
    return o, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("group", [1, 4])
def test_doc_worked_example_runs_end_to_end(tmp_path, dtype, group):
    name, code = worked_example()
    assert len(code.strip().splitlines()) < 30
    path = tmp_path / name
    path.write_text(code, encoding="utf-8")
    spec = f"{path}:ball"
    cfg = HybridConfig(flow=spec, budget_pages=4, sink_pages=1, recent_pages=1)
    q, k_pool, table, lens = make_inputs(31 + group, dtype, 3, 2, group, 16, 4, 10)
    v_pool = torch.randn_like(k_pool)
    sel = vflow.select_pages(cfg.flow, q, k_pool, table, lens, cfg.budget_pages, cfg.sink_pages,
                             cfg.recent_pages)
    scores = ball_scores(q, k_pool, table, lens)
    assert_selection(sel, scores, lens, 4, 4, 1, 1, tolerance(dtype, scores))
    assert "ball" in vflow.list_flows()
    assert vflow.load_flow("ball") is vflow.load_flow(spec)

    o, lse = reference.sparse_decode_attention(q, k_pool, v_pool, table, lens, sel)
    o_ref, lse_ref = dense_over_pages(q, k_pool, v_pool, table, lens, sel, 16 ** -0.5)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(o.double().numpy(), o_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse.double().numpy(), lse_ref, rtol=tol, atol=tol)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()

    # With every page selected, the sparse path equals dense attention over the whole request.
    everything = vflow.select_pages(spec, q, k_pool, table, lens, 10, 1, 1)
    o_all, lse_all = reference.sparse_decode_attention(q, k_pool, v_pool, table, lens, everything)
    o_dense, lse_dense = reference.dense_decode_attention(q, k_pool, v_pool, table, lens)
    torch.testing.assert_close(o_all, o_dense, rtol=0, atol=0)
    torch.testing.assert_close(lse_all, lse_dense, rtol=0, atol=0)


OPS_FLOW = textwrap.dedent('''
    import torch
    from vortex_hybrid.vflow import Flow, ops, register

    PROJ = torch.linspace(-1.0, 1.0, 8 * 3, dtype=torch.float64).reshape(8, 3)

    @register("test_ops_tour")
    class OpsTour(Flow):
        def create_cache(self, page_size, head_dim):
            return {"mean": (1, head_dim), "spread": (1, 3), "ones": (2, 1)}

        def forward_cache(self, keys, cache):
            cache["mean"] = keys.mean(0, keepdim=True)
            proj = ops.matmul(ops.take(keys, [0, 2, 4, 6, 1, 3, 5, 7], -1), ops.constant(PROJ))
            cache["spread"] = (proj.max(0, keepdim=True) - proj.min(0, keepdim=True)).abs()
            cache["ones"] = ops.fill((2, 1), 1.0)

        def scores(self, q, cache):
            dots = ops.gemm(q, cache["mean"]).sum((-2, -1))                  # (pages,)
            soft = ops.softmax(dots, scale=0.5)
            spread = cache["spread"].sum((-2, -1)) * cache["ones"].sum((-2, -1))
            pos = ops.where(dots > 0, ops.normalize(dots), ops.relu(-dots).exp() * 0.0)
            return soft + pos, ops.minimum(spread, 100.0) / 2.0

        def forward_indexer(self, q, cache):
            first, second = self.scores(q, cache)
            return ops.union(ops.topk(first), ops.topk(second), shares=(2, 1))

    @register("test_ops_values")
    class OpsValues(OpsTour):
        def forward_indexer(self, q, cache):
            first, second = self.scores(q, cache)
            return ops.topk(first + second)

    @register("test_key_stats")
    class KeyStats(Flow):
        def forward_indexer(self, q, cache):
            keys = cache["k"]                                                  # (pages, P, D)
            centre = ops.gemm(q, keys.mean(1, keepdim=True)).sum((-2, -1))     # (pages,)
            smallest = keys.norm(-1).min(-1)                                   # (pages,)
            return ops.topk(centre + smallest - centre.mean(0) + 0.01 * keys.sum((1, 2)))
''')


def ops_tour_scores(q, k_pool, table, lens):
    """The two scores of OpsTour in numpy, each [B, Hkv, max_pages] with -inf where unscored."""
    B, hq, D = q.shape
    _, hkv, P, _ = k_pool.shape
    G = hq // hkv
    proj = np.linspace(-1.0, 1.0, 24).reshape(8, 3)
    first = np.full((B, hkv, table.shape[1]), -np.inf)
    second = first.copy()
    for b in range(B):
        full = int(lens[b]) // P
        for h in range(hkv):
            qg = q[b, h * G:(h + 1) * G].double().numpy()
            dots = np.array([(qg @ page_keys(k_pool, table, lens, b, h, p).mean(0)).sum()
                             for p in range(full)])
            if full == 0:
                continue
            e = np.exp(0.5 * (dots - dots.max()))
            pos = np.where(dots > 0, dots / np.linalg.norm(dots), 0.0)
            first[b, h, :full] = e / e.sum() + pos
            for p in range(full):
                x = page_keys(k_pool, table, lens, b, h, p)[:, [0, 2, 4, 6, 1, 3, 5, 7]] @ proj
                second[b, h, p] = min(np.abs(x.max(0) - x.min(0)).sum() * 2.0, 100.0) / 2.0
    return first, second


def test_user_flow_with_every_op_kind_matches_numpy(tmp_path):
    path = tmp_path / "ops_tour.py"
    path.write_text(OPS_FLOW, encoding="utf-8")
    q, k_pool, table, lens = make_inputs(77, torch.float64, 3, 2, 3, 8, 2, 11)
    first, second = ops_tour_scores(q, k_pool, table, lens)
    budget, sink, recent = 8, 1, 1
    sel = vflow.select_pages(f"{path}:test_ops_tour", q, k_pool, table, lens, budget, sink, recent)
    free = budget - sink - recent
    quota = int(free * 2 / 3)
    for b in range(3):
        n = -(-int(lens[b]) // 2)
        for h in range(2):
            got = {int(p) for p in sel[b, h] if p >= 0}
            if n <= budget:
                assert got == set(range(n))
                continue
            want = brute_select(first[b, h], n, sink + recent + quota, sink, recent)
            rest = second[b, h].copy()
            rest[list(want)] = np.inf
            want = brute_select(rest, n, budget, sink, recent)
            assert got == want, (b, h, sorted(got), sorted(want))
    with pytest.raises(ValueError, match="combines 2 scores with ops.union"):
        vflow.page_scores(f"{path}:test_ops_tour", q, k_pool, table, lens)
    assert any(-(-int(n) // 2) > budget for n in lens)                    # the union mattered
    got = vflow.page_scores(f"{path}:test_ops_values", q, k_pool, table, lens).numpy()
    want = first + second
    scored = np.isfinite(want)
    assert (np.isfinite(got) == scored).all() and scored.sum() > 10
    np.testing.assert_allclose(got[scored], want[scored], rtol=1e-12, atol=1e-12)


def test_masked_reductions_over_tokens_and_pages_match_numpy(tmp_path):
    path = tmp_path / "key_stats.py"
    path.write_text(OPS_FLOW, encoding="utf-8")
    q, k_pool, table, lens = make_inputs(5, torch.float64, 3, 2, 2, 8, 4, 7)
    B, hq, _ = q.shape
    G = hq // 2
    want = np.full((B, 2, 7), -np.inf)
    for b in range(B):
        n = -(-int(lens[b]) // 4)
        for h in range(2):
            qg = q[b, h * G:(h + 1) * G].double().numpy()
            keys = [page_keys(k_pool, table, lens, b, h, p) for p in range(n)]  # tail: valid tokens
            centre = np.array([(qg @ k.mean(0)).sum() for k in keys])
            smallest = np.array([np.linalg.norm(k, axis=-1).min() for k in keys])
            total = np.array([k.sum() for k in keys])
            want[b, h, :n] = centre + smallest - centre.mean() + 0.01 * total
    assert any(int(n) % 4 for n in lens)                                     # a partial tail page
    got = vflow.page_scores(f"{path}:test_key_stats", q, k_pool, table, lens).numpy()
    scored = np.isfinite(want)
    assert (np.isfinite(got) == scored).all()
    np.testing.assert_allclose(got[scored], want[scored], rtol=1e-12, atol=1e-12)


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        vflow.load_flow(str(tmp_path / "missing.py") + ":x")
    path = tmp_path / "empty_flows.py"
    path.write_text("X = 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="flow 'nothing' is not registered by"):
        vflow.load_flow(f"{path}:nothing")
    with pytest.raises(ValueError, match="options \\['channels'\\] given with a flow object"):
        vflow.load_flow(vflow.load_flow("quest"), channels=4)


def test_flow_options_reach_the_constructor():
    flow = vflow.load_flow("double_sparsity", channels=[1, 2])
    assert flow.heavy_channels(64) == [1, 2] and flow is not vflow.load_flow("double_sparsity")
