"""gpu_kernels.append_tokens: one launch writes each row's K/V token into its page and slot (in the
pool's dtype) and raises the row's flag when it holds NaN or inf, against the eager torch writes and
`torch.isfinite`; flags already set stay set; bad arguments are refused naming the value."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE
from vortex_hybrid.gpu_kernels.append_tokens import append_tokens


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv,d", [(2, 16), (3, 24)])
def test_append_writes_the_tokens_and_flags_exactly_the_bad_rows(seed, pool_dtype, hkv, d):
    g = torch.Generator().manual_seed(seed)
    B, N, P = 5, 7, 4
    k_new = torch.randn(B, hkv, d, generator=g).to(pool_dtype)
    v_new = torch.randn(B, hkv, d, generator=g).to(pool_dtype)
    bad_rows = {1: ("k", float("nan")), 3: ("v", float("inf")), 4: ("k", float("-inf"))}
    for b, (which, value) in bad_rows.items():
        (k_new if which == "k" else v_new)[b, hkv - 1, d // 2] = value
    pages = torch.randperm(N, generator=g)[:B]
    offs = torch.randint(0, P, (B,), generator=g)
    k_pool = torch.randn(N, hkv, P, d, generator=g).to(pool_dtype)
    v_pool = torch.randn(N, hkv, P, d, generator=g).to(pool_dtype)
    want_k, want_v = k_pool.clone(), v_pool.clone()
    want_k[pages, :, offs] = k_new
    want_v[pages, :, offs] = v_new
    flags = torch.zeros(B, dtype=torch.bool)
    flags[0] = True                                         # set before: stays set
    want_flags = flags | ~(torch.isfinite(k_new).flatten(1).all(1) &
                           torch.isfinite(v_new).flatten(1).all(1))
    args = [t.to(DEVICE) for t in (k_new, v_new, k_pool, v_pool, pages, offs, flags)]
    append_tokens(*args)
    for got, want in ((args[2], want_k), (args[3], want_v)):    # bit-exact, NaN where NaN was
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)
    assert args[6].cpu().tolist() == want_flags.tolist() == [True, True, False, True, True]


def test_bad_arguments_are_refused_naming_the_value():
    k = torch.zeros(2, 2, 8, device=DEVICE)
    pool = torch.zeros(3, 2, 4, 8, device=DEVICE)
    ok = dict(pages=torch.tensor([0, 1], device=DEVICE), offs=torch.tensor([0, 3], device=DEVICE),
              flags=torch.zeros(2, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="pages must lie in \\[0, 3\\) and offs in \\[0, 4\\)"):
        append_tokens(k, k, pool, pool.clone(), **dict(ok, offs=torch.tensor([0, 4], device=DEVICE)))
    with pytest.raises(ValueError, match="flags must be a bool tensor \\[2\\]"):
        append_tokens(k, k, pool, pool.clone(), **dict(ok, flags=torch.zeros(2, device=DEVICE)))
    with pytest.raises(ValueError, match="k_pool and v_pool must be \\[N, 2, P, 8\\] alike"):
        append_tokens(k, k, pool[:, :1], pool.clone(), **ok)
    with pytest.raises(ValueError, match="must share one dtype"):
        append_tokens(k, k, pool.bfloat16(), pool.bfloat16(), **ok)
