"""Benchmark: the CPU (Numba) indexers of the quest and lowbit flows for one layer.

Question: what does one layer's page scoring (`launch_page_scores`) and whole indexer (scores +
`topk_pages`, `launch_indexer`) cost on the CPU for quest and for lowbit (2-bit codes, gqa max)?

Llama-3-8B shapes (32 q / 8 KV heads, D=128, page 16), --batch requests of --context tokens (32K:
2048 full pages each), summaries in --dtype (bf16 by default, as the runtime stores them): quest's
kmin/kmax; lowbit's kmin/kmax plus packed codes (random 2-bit codes, `vortex_hybrid.packed_codes`).
Each request's logical pages map to random rows of a store twice the pages used (summary rows are
not contiguous in a real store). Budget: --budget pages (sink 1, recent 2). Times are medians
over --reps calls after 3 warm-up calls, per thread count of --threads.

    python benchmarks/cpu_indexer.py [--threads 1,2] [--batch 1] [--context 32768]
                                     [--dtype bf16] [--bits 2] [--reps 30] [--out DIR]

The table is printed; with --out, JSON goes to DIR/cpu_indexer.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

from vortex_hybrid.cpu_kernels import set_cpu_threads
from vortex_hybrid.cpu_kernels.page_scoring import launch_indexer, launch_page_scores
from vortex_hybrid.packed_codes import packed_width

HQ, HKV, D, PAGE = 32, 8, 128, 16
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def inputs(batch: int, context: int, dtype: torch.dtype, bits: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pages = context // PAGE
    rows = 2 * batch * pages
    q = torch.randn(batch, HQ, D, generator=gen)
    kmin = torch.randn(rows, HKV, 1, D, generator=gen)
    kmax = kmin + torch.rand(rows, HKV, 1, D, generator=gen) * 2
    codes = torch.randint(0, 256, (rows, HKV, PAGE, packed_width(D, bits)), generator=gen,
                          dtype=torch.uint8)
    table = torch.randperm(rows, generator=gen)[:batch * pages].reshape(batch, pages)
    lens = torch.full((batch,), context, dtype=torch.int32)
    return q, kmax.to(dtype), kmin.to(dtype), codes, table.to(torch.int32).contiguous(), lens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="CPU kernel threads to try, comma-separated")
    ap.add_argument("--batch", type=int, default=1, help="requests")
    ap.add_argument("--context", type=int, default=32768, help="tokens per request")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="summary dtype")
    ap.add_argument("--bits", type=int, default=2, help="lowbit code width")
    ap.add_argument("--budget", type=int, default=102, help="pages selected per KV head")
    ap.add_argument("--reps", type=int, default=30, help="timed calls per cell")
    ap.add_argument("--out", default=None, help="folder for cpu_indexer.json (none: no JSON)")
    args = ap.parse_args()

    q, kmax, kmin, codes, table, lens = inputs(args.batch, args.context, DTYPES[args.dtype],
                                               args.bits)
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        set_cpu_threads(threads)
        for flow in ("quest", "lowbit"):
            c = codes if flow == "lowbit" else None
            scores = median_ms(lambda: launch_page_scores(q, kmax, kmin, table, lens, PAGE, True,
                                                          c), args.reps)
            indexer = median_ms(lambda: launch_indexer(q, kmax, kmin, table, lens, args.budget, 1,
                                                       2, PAGE, True, codes=c), args.reps)
            rows.append(dict(threads=threads, flow=flow, scores_ms=scores, indexer_ms=indexer))

    print(f"B={args.batch} context={args.context} ({args.context // PAGE} pages) Hq={HQ} Hkv={HKV} "
          f"D={D} page={PAGE} summaries {args.dtype}, lowbit {args.bits} bits, budget "
          f"{args.budget} pages; median of {args.reps}")
    print(f"{'threads':>7} {'flow':>7} {'scores ms':>10} {'indexer ms':>11}")
    for r in rows:
        print(f"{r['threads']:>7} {r['flow']:>7} {r['scores_ms']:>10.3f} {r['indexer_ms']:>11.3f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                    machine=platform.machine(), cpu_count=os.cpu_count(), batch=args.batch,
                    context=args.context, dtype=args.dtype, bits=args.bits, budget=args.budget,
                    reps=args.reps)
        with open(os.path.join(args.out, "cpu_indexer.json"), "w", encoding="utf-8") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
