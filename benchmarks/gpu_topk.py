"""Benchmark: Triton top-k over page scores and the quest/centroid indexers vs torch peers.

Questions: how fast is the exact `topk_pages` at rows of 256 to 64K pages (target: 256 rows x 8K
pages under 20 us), and how close do the indexers (page scoring + top-k) get to HBM bandwidth on the
summary bytes they must read?

Top-k: 256 rows (B=32 x 8 KV heads) x {256, 1K, 8K, 64K} pages, k = 1/2/5/10% of the pages (at
least sink + recent + 1), sink 1, recent 2; peer: torch.topk over scores with forced pages set to
+inf, then torch.sort of the indices (the order our kernel returns). With --tune, a sweep of
(digit_bits, num_warps, block) per row size first.
Indexers: Llama-3-8B shapes (32 query / 8 KV heads, D=128), page 16, contexts 32K / 128K, batch
1 / 8 / 32, budgets 1/2/5/10%; ours (scoring grid + top-k kernel) vs a torch peer (gathered
summaries, einsum scores, the same torch top-k); lowbit (2-bit codes, gqa max) ours only, read
against quest's row (a torch peer would decode every code of the batch). Cache kernels: quest_cache / centroid_cache over
64K full pages of a bf16 pool.
`triton.testing.do_bench` medians (L2 flushed before every call; launch overhead shows where the
GPU work is shorter than the host's launch path), and "graph": medians of CUDA-graph replays
(`do_bench_cudagraph`: no launch overhead, L2 not flushed). Bytes = the fewest bytes each call must
move (inputs read once, outputs written once), over the device-to-device copy bandwidth measured in
the same run.

    python3 benchmarks/gpu_topk.py [--tune] [--out DIR]     # GPU machine, ~3 minutes
    python3 benchmarks/gpu_topk.py --smoke                    # tiny shapes, any machine

JSON goes to DIR/gpu_topk.json (DIR defaults to $OUT, else the current directory); tables last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from gpu_attention import bench, hbm_copy_bandwidth  # noqa: E402  (sibling script: same timing)
from vortex_hybrid.gpu_kernels.page_scoring import launch_indexer  # noqa: E402
from vortex_hybrid.gpu_kernels import centroid_cache, lowbit_indexer, quest_cache  # noqa: E402
from vortex_hybrid.packed_codes import packed_width  # noqa: E402
from vortex_hybrid.gpu_kernels.topk_pages import launch_topk_pages  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HQ, HKV, D, PAGE = 32, 8, 128, 16
SINK, RECENT = 1, 2
ROWS = 256
BUDGETS = (0.01, 0.02, 0.05, 0.10)


def bench_graph(fn) -> float:
    """Median milliseconds of fn replayed in a CUDA graph (no launch overhead; L2 not flushed)."""
    if DEV.type == "cuda":
        return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    return bench(fn)


def budget_pages(n_pages: int, frac: float) -> int:
    return max(SINK + RECENT + 1, int(round(frac * n_pages)))


def torch_topk(scores: torch.Tensor, n: torch.Tensor, k: int) -> torch.Tensor:
    """Peer: forced pages to +inf, pages past n to -inf, torch.topk, sorted indices, -1 padding."""
    idx = torch.arange(scores.shape[-1], device=scores.device)
    tail = (idx[None, :] >= n[:, None] - RECENT) & (idx[None, :] < n[:, None])
    forced = (idx[None, :] < SINK) | tail
    s = torch.where(forced[:, None, :], float("inf"), scores)
    s = torch.where(idx[None, None, :] < n[:, None, None], s, float("-inf"))
    val, pos = torch.topk(s, min(k, s.shape[-1]), dim=-1, sorted=False)
    pos = torch.where(torch.isneginf(val), scores.shape[-1], pos)
    pos = torch.sort(pos, dim=-1).values
    return torch.where(pos == scores.shape[-1], -1, pos).to(torch.int32)


def topk_section(bw: float, tune: bool, sizes, n_rows: int) -> tuple[list, list]:
    rows, sweep = [], []
    B = n_rows // HKV
    for n_pages in sizes:
        scores = torch.randn(B, HKV, n_pages, device=DEV)
        n = torch.full((B,), n_pages, dtype=torch.int32, device=DEV)
        if tune:
            k = budget_pages(n_pages, 0.05)
            out = torch.empty(B, HKV, k, dtype=torch.int32, device=DEV)
            if n_pages <= 16384:
                grid = [dict(digit_bits=1, num_warps=w, small=sm)
                        for w in (2, 4, 8) for sm in (0, 256, 1024)]
                grid += [dict(digit_bits=2, num_warps=4, small=256)]
            else:
                grid = [dict(block=bl, digit_bits=db, num_warps=16, small=sm)
                        for bl in (4096, 8192) for db in (2, 4) for sm in (0, 1024, 4096)]
                grid += [dict(block=4096, digit_bits=2, num_warps=32, small=1024)]
            base_out = torch.empty(B, HKV, SINK + RECENT, dtype=torch.int32, device=DEV)
            ms = bench(lambda: launch_topk_pages(scores, SINK + RECENT, n, SINK, RECENT, base_out))
            sweep.append(dict(pages=n_pages, k=SINK + RECENT, note="no search: load + select pass",
                              us=ms * 1e3))
            print(f"tune pages={n_pages} no-search (k = sink + recent): {ms * 1e3:.1f} us", flush=True)
            for cfg in grid:
                try:
                    ms = bench(lambda: launch_topk_pages(scores, k, n, SINK, RECENT, out, **cfg))
                except Exception as exc:  # a variant that does not compile is reported, not fatal
                    ms = float("nan")
                    print(f"variant {cfg} at {n_pages} pages failed: {type(exc).__name__}: {exc}"[:300])
                sweep.append(dict(pages=n_pages, k=k, **cfg, us=ms * 1e3))
                print(f"tune pages={n_pages} k={k} {cfg}: {ms * 1e3:.1f} us", flush=True)
        for frac in BUDGETS:
            k = budget_pages(n_pages, frac)
            out = torch.empty(B, HKV, k, dtype=torch.int32, device=DEV)
            ours = bench(lambda: launch_topk_pages(scores, k, n, SINK, RECENT, out))
            ours_graph = bench_graph(lambda: launch_topk_pages(scores, k, n, SINK, RECENT, out))
            peer = bench(lambda: torch_topk(scores, n, k))
            agree = torch.equal(launch_topk_pages(scores, k, n, SINK, RECENT, out).clone(),
                                torch_topk(scores, n, k))          # distinct random scores: same set
            ties = torch.randint(0, 8, scores.shape, device=DEV).float()
            ours_ties = bench(lambda: launch_topk_pages(ties, k, n, SINK, RECENT, out))
            nbytes = n_rows * (n_pages + k) * 4
            rows.append(dict(rows=n_rows, pages=n_pages, k=k, ours_us=ours * 1e3,
                             ours_graph_us=ours_graph * 1e3,
                             ours_ties_us=ours_ties * 1e3,
                             torch_us=peer * 1e3, speedup=peer / ours, agrees_with_torch=agree,
                             hbm_frac=nbytes / (ours * 1e-3) / 1e9 / bw))
            print(f"topk pages={n_pages} k={k}: ours {ours * 1e3:.1f} us (ties {ours_ties * 1e3:.1f}),"
                  f" torch {peer * 1e3:.1f} us", flush=True)
    return rows, sweep


class IndexerSetup:
    """Summaries of B requests x ctx tokens (shuffled physical pages), queries, page table."""

    def __init__(self, B: int, ctx: int):
        self.B, self.pages = B, ctx // PAGE
        N = B * self.pages
        self.table = torch.randperm(N, device=DEV).to(torch.int32).view(B, self.pages)
        self.lens = torch.full((B,), ctx - PAGE // 2, dtype=torch.int32, device=DEV)  # partial tail
        self.q = torch.randn(B, HQ, D, device=DEV, dtype=torch.bfloat16)
        kmin = torch.randn(N, HKV, 1, D, device=DEV)
        self.summaries = {"kmin": kmin, "kmax": kmin + torch.rand_like(kmin),
                          "mean": torch.randn(N, HKV, 1, D, device=DEV),
                          "codes": torch.randint(0, 256, (N, HKV, PAGE, packed_width(D, 2)),
                                                 dtype=torch.uint8, device=DEV)}

    def ours(self, flow: str, budget: int):
        s = self.summaries
        if flow == "lowbit":                        # 2-bit codes, gqa max: the checked entry
            return lambda: lowbit_indexer(self.q, s, self.table, self.lens, budget, SINK, RECENT,
                                          page_size=PAGE, check=False)
        a, b = (s["kmax"], s["kmin"]) if flow == "quest" else (s["mean"], s["mean"])
        return lambda: launch_indexer(self.q, a, b, self.table, self.lens, budget, SINK, RECENT,
                                      PAGE, quest=flow == "quest")

    def torch_peer(self, flow: str, budget: int):
        B, pt = self.B, self.table.to(torch.int64)
        n = (self.lens.to(torch.int64) + PAGE - 1) // PAGE

        def run():
            qg = self.q.float().view(B, HKV, HQ // HKV, D)
            if flow == "quest":
                kmax = self.summaries["kmax"][pt][:, :, :, 0]              # [B, pages, Hkv, D]
                kmin = self.summaries["kmin"][pt][:, :, :, 0]
                scores = torch.einsum("bhd,bphd->bhp", qg.clamp(min=0).sum(2), kmax) + \
                    torch.einsum("bhd,bphd->bhp", qg.clamp(max=0).sum(2), kmin)
            else:
                mean = self.summaries["mean"][pt][:, :, :, 0]
                scores = torch.einsum("bhd,bphd->bhp", qg.sum(2), mean)
            return torch_topk(scores, n, budget)
        return run

    def min_bytes(self, flow: str, budget: int) -> int:
        per_page = (2 if flow in ("quest", "lowbit") else 1) * D * 4 + \
            (PAGE * packed_width(D, 2) if flow == "lowbit" else 0)
        return self.B * (HKV * self.pages * per_page + self.pages * 4 + HKV * budget * 4)


def indexer_section(bw: float, contexts, batches) -> list:
    rows = []
    for ctx in contexts:
        for B in batches:
            setup = IndexerSetup(B, ctx)
            for flow in ("quest", "centroid", "lowbit"):
                for frac in BUDGETS:
                    budget = budget_pages(setup.pages, frac)
                    ours = bench(setup.ours(flow, budget))
                    graph = bench_graph(setup.ours(flow, budget))
                    # lowbit's torch peer would decode every code of the batch (GBs): none; its
                    # row is read against quest's at the same shape
                    peer = bench(setup.torch_peer(flow, budget)) if flow != "lowbit" else None
                    nbytes = setup.min_bytes(flow, budget)
                    rows.append(dict(flow=flow, ctx=ctx, B=B, budget=budget, ours_us=ours * 1e3,
                                     ours_graph_us=graph * 1e3,
                                     torch_us=None if peer is None else peer * 1e3,
                                     speedup=None if peer is None else peer / ours,
                                     hbm_frac=nbytes / (ours * 1e-3) / 1e9 / bw))
                    print(f"{flow} ctx={ctx} B={B} budget={budget}: ours {ours * 1e3:.1f} us "
                          f"(graph {graph * 1e3:.1f}), torch "
                          f"{'-' if peer is None else f'{peer * 1e3:.1f}'} us", flush=True)
            del setup
            torch.cuda.empty_cache() if DEV.type == "cuda" else None
    return rows


def cache_section(bw: float, n_pages: int) -> list:
    k_pool = torch.randn(n_pages, HKV, PAGE, D, device=DEV, dtype=torch.bfloat16)
    pages = torch.randperm(n_pages, device=DEV)
    rows = []
    for flow, fn, names in (("quest", quest_cache, ("kmin", "kmax")),
                            ("centroid", centroid_cache, ("mean",))):
        summaries = {nm: torch.empty(n_pages, HKV, 1, D, device=DEV) for nm in names}
        ms = bench(lambda: fn(k_pool, pages, summaries))
        nbytes = k_pool.numel() * 2 + len(names) * n_pages * HKV * D * 4 + n_pages * 8
        rows.append(dict(flow=flow, pages=n_pages, us=ms * 1e3,
                         hbm_frac=nbytes / (ms * 1e-3) / 1e9 / bw))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune", action="store_true", help="sweep top-k launch choices per row size first")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (interpreter on a CPU machine)")
    ap.add_argument("--skip-indexer", action="store_true", help="top-k and cache sections only")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_topk.json")
    args = ap.parse_args()
    if args.smoke:
        n_rows, sizes, contexts, batches, cache_pages = HKV, (256,), (2048,), (1,), 64
    else:
        n_rows, sizes, contexts, batches, cache_pages = ROWS, (256, 1024, 8192, 65536), (32768, 131072), \
            (1, 8, 32), 65536
    bw = hbm_copy_bandwidth()
    print(f"HBM copy bandwidth: {bw:.0f} GB/s", flush=True)
    topk_rows, sweep = topk_section(bw, args.tune, sizes, n_rows)
    cache_rows = cache_section(bw, cache_pages)
    idx_rows = [] if args.skip_indexer else indexer_section(bw, contexts, batches)
    device = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (Triton interpreter)"
    result = dict(device=device, date=datetime.date.today().isoformat(), hbm_copy_gbps=bw,
                  command=" ".join(sys.argv), topk=topk_rows, tune=sweep, cache=cache_rows,
                  indexer=idx_rows, torch=torch.__version__, triton=triton.__version__)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_topk.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{device}, HBM copy {bw:.0f} GB/s")
    print(f"top-k over {n_rows} rows")
    print("| pages | k | ours us | ours graph us | ours (ties) us | torch.topk+sort us | speedup | "
          "HBM frac | same set |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in topk_rows:
        print(f"| {r['pages']} | {r['k']} | {r['ours_us']:.1f} | {r['ours_graph_us']:.1f} | "
              f"{r['ours_ties_us']:.1f} | {r['torch_us']:.1f} | {r['speedup']:.1f}x | "
              f"{r['hbm_frac']:.2f} | {r['agrees_with_torch']} |")
    print("\n| cache kernel | pages | us | HBM frac |\n|---|---|---|---|")
    for r in cache_rows:
        print(f"| {r['flow']} | {r['pages']} | {r['us']:.1f} | {r['hbm_frac']:.2f} |")
    print("\n| flow | ctx | B | budget | ours us | ours graph us | torch us | speedup | HBM frac |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in idx_rows:
        peer = "- | -" if r["torch_us"] is None else f"{r['torch_us']:.1f} | {r['speedup']:.1f}x"
        print(f"| {r['flow']} | {r['ctx'] // 1024}K | {r['B']} | {r['budget']} | {r['ours_us']:.1f} | "
              f"{r['ours_graph_us']:.1f} | {peer} | {r['hbm_frac']:.2f} |")


if __name__ == "__main__":
    main()
