"""Per-(request, KV head) budgets in one indexer call (`budgets=`, `flow_kernels.keep_budgets`):
the library's indexers of both backends (Numba, and Triton under TRITON_INTERPRET=1 on the CPU)
select, for each row, exactly what a call at that row's own budget selects, score ties and NaN
scores included; bad budgets are refused with one line.
"""

from __future__ import annotations

import pytest
import torch

from conftest import test_seed

from vortex_hybrid import cpu_kernels, gpu_kernels, reference
from vortex_hybrid.flow_kernels import keep_budgets

B, HQ, HKV, D, P = 4, 4, 2, 8, 4
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = {"cpu_kernels": (cpu_kernels, torch.device("cpu")), "gpu_kernels": (gpu_kernels, DEV)}


def case(gen: torch.Generator, ties: bool, device):
    """q, quest summaries, table, lens of 4 requests (0, 1, 6 and 13 pages) and budgets."""
    pages = [0, 1, 6, 13]
    R = sum(pages) + 1
    draw = (lambda *s: torch.randint(-2, 3, s, generator=gen).float()) if ties else \
        (lambda *s: torch.randn(*s, generator=gen))
    kmax, kmin = draw(R, HKV, 1, D), draw(R, HKV, 1, D)
    table = torch.full((B, max(pages)), -1, dtype=torch.int32)
    row = 0
    for b, n in enumerate(pages):
        table[b, :n] = torch.arange(row, row + n, dtype=torch.int32)
        row += n
    lens = torch.tensor([max(n * P - 1, 0) for n in pages], dtype=torch.int32)
    q = draw(B, HQ, D)
    budgets = torch.randint(3, 9, (B, HKV), generator=gen, dtype=torch.int32)
    put = (lambda t: t.to(device))
    return put(q), {"kmax": put(kmax), "kmin": put(kmin)}, put(table), put(lens), put(budgets)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("ties", [False, True])
def test_budgets_select_what_each_rows_own_budget_selects(backend, ties):
    kernels, device = BACKENDS[backend]
    seed = test_seed()
    print("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    q, summ, table, lens, budgets = case(gen, ties, device)
    sink, recent, K = 1, 2, 8
    got = kernels.quest_indexer(q, summ, table, lens, K, sink, recent, page_size=P,
                                budgets=budgets).cpu()
    for b in range(B):
        for h in range(HKV):
            k = int(budgets[b, h])
            want = kernels.quest_indexer(q[b:b + 1], summ, table[b:b + 1], lens[b:b + 1], k,
                                         sink, recent, page_size=P)[0, h].cpu()
            assert got[b, h, :k].tolist() == want.tolist(), (seed, b, h, k)
            assert (got[b, h, k:] == -1).all(), (seed, b, h)


def test_keep_budgets_equals_the_reference_top_k_at_each_budget_nan_scores_included():
    """keep_budgets over the reference top-k at K: the reference top-k at each row's budget."""
    seed = test_seed()
    print("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (3, 2, 12), generator=gen).float()
    scores[0, 1, 5] = float("nan")
    scores[1, 0, 3] = -0.0
    num_pages = torch.tensor([12, 7, 2], dtype=torch.int32)
    sink, recent, K = 1, 1, 9
    budgets = torch.randint(2, K + 1, (3, 2), generator=gen, dtype=torch.int32)
    got = keep_budgets(reference.topk_pages(scores, K, num_pages, sink, recent), scores, budgets,
                       num_pages, sink, recent)
    for b in range(3):
        for h in range(2):
            k = int(budgets[b, h])
            want = reference.topk_pages(scores[b:b + 1], k, num_pages[b:b + 1], sink, recent)
            assert got[b, h, :k].tolist() == want[0, h].tolist(), (seed, b, h, k)
            assert (got[b, h, k:] == -1).all()


@pytest.mark.parametrize("bad, words", [
    (torch.full((B, HKV), 2, dtype=torch.int32), "budgets span 2..2"),
    (torch.full((B, HKV), 9, dtype=torch.int32), "budgets span 9..9"),
    (torch.full((B,), 4, dtype=torch.int32), "budgets must be an int32 tensor [4, 2]"),
    (torch.full((B, HKV), 4, dtype=torch.int64), "budgets must be an int32 tensor [4, 2]"),
])
def test_bad_budgets_are_refused_in_one_line(bad, words):
    q, summ, table, lens, _ = case(torch.Generator().manual_seed(0), False, torch.device("cpu"))
    with pytest.raises(ValueError) as err:
        cpu_kernels.quest_indexer(q, summ, table, lens, 8, 1, 2, page_size=P, budgets=bad)
    assert words in str(err.value) and "\n" not in str(err.value)
