"""Random paged-attention cases and state checks shared by the CPU and GPU kernel tests."""

from __future__ import annotations

import random

import torch

from vortex_hybrid import reference


def new_seed() -> int:
    """A fresh seed per case (print it in failure messages to replay the case)."""
    return random.SystemRandom().randrange(2 ** 31)


def make_case(seed: int, dtype: torch.dtype, group: int, head_dim: int, batch: int = 2,
              num_kv_heads: int = 2, page_size: int = 8, max_pages: int = 6, num_sel: int = 5,
              q_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Random pools, a shuffled page table, a partial last page and -1-padded shuffled selections:
    (q [B, Hkv*group, D], k_pool, v_pool [N, Hkv, P, D] dtype, page_table int32 [B, max_pages],
    seq_lens int32 [B], sel int32 [B, Hkv, num_sel]) on `device`."""
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
    return [t.to(device) for t in (q, k_pool, v_pool, page_table, seq_lens, sel)]


def poisoned(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-filled (o, lse) output buffers shaped for q, on q's device."""
    B, hq, d = q.shape
    return (torch.full((B, hq, d), float("nan"), device=q.device),
            torch.full((B, hq), float("nan"), device=q.device))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU; NaN in `out` fails."""
    assert not torch.isnan(out).any(), "output holds NaN (unwritten or wrong)"
    den = ref.norm().item()
    return (out.double().cpu() - ref.double().cpu()).norm().item() / (den if den > 0 else 1.0)


def assert_state_close(o, lse, ref_o, ref_lse, tol: float, seed: int) -> None:
    """float32 state equal to the reference state: same empty (-inf) rows with o = 0 there, and
    relative error of o and of the finite lse under `tol`."""
    o, lse, ref_o, ref_lse = (t.cpu() for t in (o, lse, ref_o, ref_lse))
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert not torch.isnan(lse).any(), f"seed {seed}: lse holds NaN"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), f"seed {seed}: -inf pattern differs"
    assert torch.all(o[empty] == 0), f"seed {seed}: an empty state must give o = 0"
    err_o = rel_err(o, ref_o)
    err_l = rel_err(lse[~empty], ref_lse[~empty])
    assert err_o < tol and err_l < tol, f"seed {seed}: rel err o {err_o:.2e}, lse {err_l:.2e}"


def reference_state(q, k_pool, v_pool, page_table, seq_lens, sel, sm_scale=None):
    """The float64 reference state of a case (inputs upcast, same stored values)."""
    return reference.sparse_decode_attention(q.double(), k_pool.double(), v_pool.double(),
                                             page_table, seq_lens, sel, sm_scale)
