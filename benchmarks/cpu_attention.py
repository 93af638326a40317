"""Benchmark: Numba CPU kernels over host-resident pages against the machine's memory read bandwidth.

Question: what fraction of the CPU's memory read bandwidth do sparse attention, summary scoring and
token selection reach on the bytes they read, and how fast is top-k over 1M scores?

In one run:
  - bandwidth: a Numba streaming read (parallel uint64 sum) over a buffer far larger than the last-level
    cache (--bw-gib, default 4 GiB; the GPU machine has a 300 MiB L3), best of 5; torch's `sum` over
    the same buffer as the peer;
  - sparse attention (`launch_sparse_decode_attention`) at Llama-3-8B shapes (32 q / 8 KV heads, D=128,
    bf16, page 16) with selected KV (K+V bytes of the selected pages) from 1 MiB to --max-mib, batch
    1/4/32; each request holds twice the pages it selects; every repetition uses a fresh random
    page table over a pool of --pool-gib (K+V), so repeated runs do not read from cache; peer: the
    same attention in torch (gather pages, float32 softmax) at batch 4;
  - summary scoring: quest page scores (`launch_page_scores`, kmin+kmax float32 summaries) over summary
    bytes from 1 MiB up, rows by random physical page of a store of --store-gib; the whole indexer
    (scores + `topk_pages`, 2% budget) beside it;
  - token selection (`launch_token_topk_attention`): candidate pages of 1 MiB .. --max-mib K+V, keep 1/8
    of the candidate tokens; bytes = all candidate keys + keys and values of the kept tokens;
  - scaling: sparse attention (64 MiB, batch 4) and the streaming read at 1, 2, 4, ... threads;
  - top-k of 1M float32 scores (k = 2%): one row of 1M (the long-row path), 8 rows of 128K, 256 rows
    of 4K.
Times are medians over repetitions (>= 5, >= 0.3 s) after a warm-up call. GB/s = bytes read / time;
"of bw" = that over the measured Numba read bandwidth.

    python benchmarks/cpu_attention.py [--out DIR] [--bw-gib 4] [--pool-gib 4] [--store-gib 2]
                                       [--max-mib 1024]
    python benchmarks/cpu_attention.py --bw-gib 1 --pool-gib 1 --store-gib 0.5 --max-mib 256  # 2 cores

JSON goes to DIR/cpu_attention.json (DIR defaults to $OUT, else the current directory); the table is
printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import numba
import numpy as np
import torch
from numba import njit, prange

from vortex_hybrid.cpu_kernels import (cpu_threads, launch_sparse_decode_attention,
                                       launch_token_topk_attention, launch_topk_pages, set_cpu_threads,
                                       warmup)
from vortex_hybrid.cpu_kernels import quest_indexer
from vortex_hybrid.cpu_kernels.page_scoring import launch_page_scores

HQ, HKV, D, PAGE = 32, 8, 128, 16
GROUP = HQ // HKV
DTYPE = torch.bfloat16
PAGE_HEAD_BYTES = PAGE * D * 2                      # one KV head's slice of one page, K or V
PAGE_KV_BYTES = 2 * HKV * PAGE_HEAD_BYTES           # K+V of one page, all KV heads: 64 KiB
SUMMARY_BYTES = 2 * D * 4                           # kmin + kmax float32 per (page, KV head)
MIB = 1 << 20
BATCHES = (1, 4, 32)


@njit(parallel=True, nogil=True, cache=True)
def _stream_read(words, n_chunks):
    """Sum of a uint64 buffer, chunked over threads: every byte read once, integer adds vectorise."""
    n = words.shape[0]
    size = (n + n_chunks - 1) // n_chunks
    part = np.zeros(n_chunks, np.uint64)
    for c in prange(n_chunks):
        acc = np.uint64(0)
        for i in range(c * size, min(n, (c + 1) * size)):
            acc += words[i]
        part[c] = acc
    return part.sum()


def timed(fn, inputs, min_reps: int = 5, min_seconds: float = 0.3) -> float:
    """Median seconds of fn(*inputs[i % len(inputs)]) after one warm-up call."""
    fn(*inputs[0])
    times, i, start = [], 0, time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        args = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
        i += 1
        if len(times) >= 200:
            break
    return statistics.median(times)


def measure_bandwidth(gib: float) -> dict:
    n = int(gib * (1 << 30)) // 8
    words = np.arange(n, dtype=np.uint64)
    chunks = 8 * numba.get_num_threads()
    _stream_read(words[:1024], chunks)
    best = min(_time_once(lambda: _stream_read(words, chunks)) for _ in range(5))
    as_torch = torch.from_numpy(words.view(np.int64))
    best_torch = min(_time_once(lambda: as_torch.sum()) for _ in range(5))
    return {"buffer_gib": gib, "numba_gbps": words.nbytes / best / 1e9,
            "torch_sum_gbps": words.nbytes / best_torch / 1e9}


def _time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _page_table(gen, B: int, n_pages: int, pool_pages: int) -> torch.Tensor:
    if B * n_pages <= pool_pages:
        return torch.randperm(pool_pages, generator=gen)[:B * n_pages].reshape(B, n_pages).to(torch.int32)
    return torch.randint(0, pool_pages, (B, n_pages), generator=gen, dtype=torch.int32)


def _selection(gen, B: int, K: int, n_pages: int) -> torch.Tensor:
    return torch.stack([torch.stack([torch.randperm(n_pages, generator=gen)[:K]
                                     for _ in range(HKV)]) for _ in range(B)]).to(torch.int32)


def _attention_inputs(gen, pool, B: int, K: int, reps: int):
    k_pool, v_pool = pool
    n_pages = min(2 * K, k_pool.shape[0])
    out = []
    for _ in range(reps):
        q = torch.randn(B, HQ, D, generator=gen)
        pt = _page_table(gen, B, n_pages, k_pool.shape[0])
        seq_lens = torch.full((B,), n_pages * PAGE, dtype=torch.int32)
        out.append((q, k_pool, v_pool, pt, seq_lens, _selection(gen, B, K, n_pages)))
    return out


def torch_peer_attention(q, k_pool, v_pool, page_table, seq_lens, sel):
    """Peer: sparse attention in plain torch (gather the selected pages, float32 softmax)."""
    B, K = sel.shape[0], sel.shape[2]
    phys = torch.gather(page_table.long()[:, None, :].expand(-1, HKV, -1), 2, sel.long())
    heads = torch.arange(HKV)[None, :, None].expand(B, -1, K)
    keys = k_pool[phys, heads].float().reshape(B, HKV, K * PAGE, D)
    vals = v_pool[phys, heads].float().reshape(B, HKV, K * PAGE, D)
    qg = q.reshape(B, HKV, GROUP, D) * D ** -0.5
    s = qg @ keys.transpose(-1, -2)
    lse = torch.logsumexp(s, dim=-1)
    return torch.softmax(s, dim=-1) @ vals, lse


def bench_sparse(gen, pool, sizes_mib, bw) -> list[dict]:
    rows = []
    for mib in sizes_mib:
        for B in BATCHES:
            K = mib * MIB // (B * PAGE_KV_BYTES)
            if K < 1 or 2 * K > pool[0].shape[0] * (1 if B == 1 else 4):
                continue
            inputs = _attention_inputs(gen, pool, B, K, reps=4)
            sec = timed(launch_sparse_decode_attention, inputs)
            nbytes = B * K * PAGE_KV_BYTES
            row = {"bench": "sparse_attention", "selected_mib": nbytes / MIB, "batch": B,
                   "pages_per_head": K, "ms": sec * 1e3, "gbps": nbytes / sec / 1e9,
                   "of_bw": nbytes / sec / 1e9 / bw}
            if B == 4 and nbytes <= 256 * MIB:
                peer = timed(torch_peer_attention, inputs[:2], min_reps=3, min_seconds=0.1)
                row["torch_peer_ms"] = peer * 1e3
                row["speedup_vs_torch"] = peer / sec
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def bench_token_selection(gen, pool, sizes_mib, bw) -> list[dict]:
    rows = []
    for mib in sizes_mib:
        for B in BATCHES:
            C = mib * MIB // (B * PAGE_KV_BYTES)
            if C < 1 or 2 * C > pool[0].shape[0] * (1 if B == 1 else 4):
                continue
            k_tokens = max(1, C * PAGE // 8)
            inputs = [args + (k_tokens,) for args in _attention_inputs(gen, pool, B, C, reps=4)]
            sec = timed(launch_token_topk_attention, inputs)
            nbytes = B * HKV * (C * PAGE_HEAD_BYTES + k_tokens * 2 * D * 2)
            row = {"bench": "token_selection", "candidate_kv_mib": B * C * PAGE_KV_BYTES / MIB,
                   "batch": B, "candidate_pages_per_head": C, "k_tokens": k_tokens,
                   "read_mib": nbytes / MIB, "ms": sec * 1e3, "gbps": nbytes / sec / 1e9,
                   "of_bw": nbytes / sec / 1e9 / bw}
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def bench_scoring(gen, store_pages: int, sizes_mib, bw) -> list[dict]:
    store = {name: torch.empty(store_pages, HKV, 1, D).normal_(generator=gen)
             for name in ("kmin", "kmax")}
    rows = []
    for mib in sizes_mib:
        for B in BATCHES:
            n = mib * MIB // (B * HKV * SUMMARY_BYTES)
            if n < 16 or B * n > 4 * store_pages:
                continue
            inputs = []
            for _ in range(4):
                q = torch.randn(B, HQ, D, generator=gen)
                pt = _page_table(gen, B, n, store_pages)
                inputs.append((q, pt, torch.full((B,), n * PAGE, dtype=torch.int32)))
            sec = timed(lambda q, pt, sl: launch_page_scores(q, store["kmax"], store["kmin"], pt, sl,
                                                             PAGE, True), inputs)
            budget = max(3, n // 50)
            sec_ix = timed(lambda q, pt, sl: quest_indexer(q, store, pt, sl, budget, 1, 2,
                                                           page_size=PAGE), inputs)
            nbytes = B * n * HKV * SUMMARY_BYTES
            row = {"bench": "quest_scoring", "summary_mib": nbytes / MIB, "batch": B,
                   "pages": n, "ms": sec * 1e3, "gbps": nbytes / sec / 1e9,
                   "of_bw": nbytes / sec / 1e9 / bw, "indexer_ms": sec_ix * 1e3,
                   "kv_pages_scored_per_s": B * n / sec}
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def bench_scaling(gen, pool, bw_gib: float) -> list[dict]:
    """Sparse attention (64 MiB selected, batch 4) and the streaming read at 1, 2, 4, ... threads:
    tells whether a shortfall is per-core compute (both scale, attention lower) or memory."""
    rows = []
    K = 64 * MIB // (4 * PAGE_KV_BYTES)
    inputs = _attention_inputs(gen, pool, 4, K, reps=4)
    words = np.arange(int(bw_gib * (1 << 30)) // 8, dtype=np.uint64)
    before = cpu_threads()
    n = 1
    try:
        while n <= set_cpu_threads(None):
            set_cpu_threads(n)
            numba.set_num_threads(n)
            sec = timed(launch_sparse_decode_attention, inputs)
            read = min(_time_once(lambda: _stream_read(words, 8 * n)) for _ in range(3))
            row = {"bench": "scaling", "threads": n, "attention_gbps": 64 * MIB / sec / 1e9,
                   "read_gbps": words.nbytes / read / 1e9}
            rows.append(row)
            print(_fmt(row), flush=True)
            n *= 2
    finally:
        set_cpu_threads(before)
        numba.set_num_threads(before)
    return rows


def bench_topk(gen) -> list[dict]:
    rows = []
    for B, H, M in ((1, 1, 1 << 20), (1, 8, 1 << 17), (32, 8, 1 << 12)):
        k = max(3, M // 50)
        inputs = [(torch.randn(B, H, M, generator=gen), k, torch.full((B,), M, dtype=torch.int32),
                   1, 2) for _ in range(3)]
        sec = timed(launch_topk_pages, inputs, min_reps=10)
        peer = timed(lambda s, k, *_: torch.topk(s, k, dim=-1), inputs, min_reps=10)
        row = {"bench": "topk", "rows": B * H, "row_len": M, "k": k, "ms": sec * 1e3,
               "torch_topk_ms": peer * 1e3, "speedup_vs_torch": peer / sec}
        rows.append(row)
        print(_fmt(row), flush=True)
    return rows


def _fmt(row: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def table(result: dict) -> str:
    bw = result["bandwidth"]
    lines = [f"memory read bandwidth: numba {bw['numba_gbps']:.1f} GB/s, torch sum "
             f"{bw['torch_sum_gbps']:.1f} GB/s ({bw['buffer_gib']} GiB buffer, {result['threads']} "
             f"threads)", "",
             "| kernel | MiB read | batch | ms | GB/s | of bw | vs torch |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if r["bench"] in ("topk", "scaling"):
            continue
        mib = r.get("selected_mib", r.get("summary_mib", r.get("read_mib")))
        extra = f"{r['speedup_vs_torch']:.1f}x" if "speedup_vs_torch" in r else ""
        if r["bench"] == "quest_scoring":
            extra = f"indexer {r['indexer_ms']:.3f} ms"
        lines.append(f"| {r['bench']} | {mib:.1f} | {r['batch']} | {r['ms']:.3f} | {r['gbps']:.1f} "
                     f"| {r['of_bw']:.0%} | {extra} |")
    lines += ["", "| threads | sparse attention GB/s (64 MiB, batch 4) | numba read GB/s |",
              "| --- | --- | --- |"]
    for r in result["rows"]:
        if r["bench"] == "scaling":
            lines.append(f"| {r['threads']} | {r['attention_gbps']:.1f} | {r['read_gbps']:.1f} |")
    lines += ["", "| top-k (k = 2%) | rows x len | ms | torch.topk ms | speedup |",
              "| --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if r["bench"] == "topk":
            lines.append(f"| top-k | {r['rows']} x {r['row_len']} | {r['ms']:.3f} | "
                         f"{r['torch_topk_ms']:.3f} | {r['speedup_vs_torch']:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for cpu_attention.json")
    ap.add_argument("--bw-gib", type=float, default=4.0, help="bandwidth buffer size, GiB (>> LLC)")
    ap.add_argument("--pool-gib", type=float, default=4.0, help="K+V pool size, GiB (>> LLC)")
    ap.add_argument("--store-gib", type=float, default=2.0, help="quest summary store size, GiB")
    ap.add_argument("--max-mib", type=int, default=1024, help="largest selected KV, MiB")
    args = ap.parse_args()
    t0 = time.perf_counter()
    compile_s = warmup()
    gen = torch.Generator().manual_seed(0)
    bw = measure_bandwidth(args.bw_gib)
    print(f"bandwidth {bw}", flush=True)
    pool_pages = int(args.pool_gib * (1 << 30)) // PAGE_KV_BYTES
    pool = tuple(torch.empty(pool_pages, HKV, PAGE, D, dtype=DTYPE).normal_(generator=gen)
                 for _ in range(2))
    store_pages = int(args.store_gib * (1 << 30)) // (HKV * SUMMARY_BYTES)
    sizes = [s for s in (1, 4, 16, 64, 256, 1024) if s <= args.max_mib]
    rows = bench_sparse(gen, pool, sizes, bw["numba_gbps"])
    rows += bench_scaling(gen, pool, min(args.bw_gib, 1.0))
    rows += bench_token_selection(gen, pool, sizes, bw["numba_gbps"])
    del pool
    rows += bench_scoring(gen, store_pages, sizes, bw["numba_gbps"])
    rows += bench_topk(gen)
    result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or
              platform.machine(), "cpu_count": os.cpu_count(), "threads": cpu_threads(),
              "numba": numba.__version__, "threading_layer": numba.threading_layer(),
              "torch": torch.__version__, "warmup_s": compile_s, "args": vars(args),
              "bandwidth": bw, "rows": rows, "wall_s": time.perf_counter() - t0}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_attention.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(table(result))


if __name__ == "__main__":
    main()
