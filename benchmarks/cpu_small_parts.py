"""Benchmark: the cost of one CPU attention call for the small host parts of a decode step.

Question: when the GPU page cache holds most of a step's selection, each layer leaves the CPU a few
page-heads of a large batch; what does one `launch_sparse_decode_attention` call cost then, and how
far is it from the kernel's rate on a large part?

At Llama-3-8B shapes (32 q / 8 KV heads, D=128, bf16, page 16) and a decode batch of --batch
requests of --context tokens at a 5% budget (the selection tensor a step hands the CPU: [batch, 8,
K]), the host part holds N page-heads at random (request, KV head, slot) places, or with --rows R in R
(request, KV head) rows only (a step's split leaves the CPU whole rows: those whose pages are
dearest to fetch), N from 1 up to --max-heads; a call's time is the median over repetitions (>= 20 after 3 warm-up calls) per thread
count of --threads. The peer is the same kernel on a large part (--max-heads page-heads): its GB/s
is the rate a small part's call is compared with ("of large" = small part's GB/s over it).

    python benchmarks/cpu_small_parts.py [--out DIR] [--threads 1,2] [--batch 26] [--context 32768]
                                         [--max-heads 4096] [--rows R]

JSON goes to DIR/cpu_small_parts.json (DIR defaults to $OUT, else the current directory); the
table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

HQ, HKV, D, P = 32, 8, 128, 16
HEAD_BYTES = 2 * P * D * 2          # one KV head of one page, K and V, bfloat16


def time_call(args: tuple, reps: int) -> float:
    from vortex_hybrid.cpu_kernels.sparse_decode_attention import launch_sparse_decode_attention
    for _ in range(3):
        launch_sparse_decode_attention(*args)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        launch_sparse_decode_attention(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    ap.add_argument("--threads", default="1,2", help="CPU kernel threads to try, comma-separated")
    ap.add_argument("--batch", type=int, default=26, help="decode batch (requests)")
    ap.add_argument("--context", type=int, default=32768, help="tokens per request")
    ap.add_argument("--max-heads", type=int, default=4096, help="page-heads of the large part")
    ap.add_argument("--pool-pages", type=int, default=8192, help="pages of the host pool")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per cell")
    ap.add_argument("--rows", type=int, default=0,
                    help="put the page-heads in this many (request, KV head) rows (0: anywhere)")
    args = ap.parse_args()
    if args.batch < 1 or args.context < P or args.max_heads < 1 or args.pool_pages < 1 \
            or not 0 <= args.rows <= args.batch * HKV:
        ap.error("--batch, --max-heads and --pool-pages must be >= 1, --context >= 16 and --rows "
                 "in [0, batch x 8]")
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        ap.error(f"--threads={args.threads!r} must be comma-separated integers")
    from vortex_hybrid import cpu_kernels
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    B, W = args.batch, -(-args.context // P)
    K = max(3, -(-W // 20))                                      # a 5% budget
    k = torch.randn(args.pool_pages, HKV, P, D, generator=gen).to(torch.bfloat16)
    v = torch.randn(args.pool_pages, HKV, P, D, generator=gen).to(torch.bfloat16)
    table = torch.randint(0, args.pool_pages, (B, W), dtype=torch.int32, generator=gen)
    lens = torch.full((B,), args.context, dtype=torch.int32)
    q = torch.randn(B, HQ, D, generator=gen)
    out = (torch.empty(B, HQ, D), torch.empty(B, HQ))
    places = B * HKV * K if not args.rows else args.rows * K      # (row, slot) places to fill
    row_ids = rng.choice(B * HKV, size=args.rows, replace=False) if args.rows else None
    most = min(args.max_heads, places)
    sizes = sorted({n for n in (1, 8, 64, 256, most) if n <= most})
    rows = []
    for t in threads:
        cpu_kernels.set_cpu_threads(t)
        for n in sizes:
            sel = torch.full((B * HKV * K,), -1, dtype=torch.int32)
            where = rng.choice(places, size=n, replace=False)
            if row_ids is not None:                              # slot j of chosen row i
                where = row_ids[where // K] * K + where % K
            sel[torch.as_tensor(where)] = torch.as_tensor(rng.integers(0, W - 1, size=n),
                                                          dtype=torch.int32)
            sel = sel.view(B, HKV, K)
            for b in range(B):                                   # unique pages per row
                for h in range(HKV):
                    r = sel[b, h]
                    seen = set()
                    for j in range(K):
                        p = int(r[j])
                        if p >= 0:
                            while p in seen:
                                p = (p + 1) % (W - 1)
                            seen.add(p)
                            r[j] = p
            s = time_call((q, k, v, table, lens, sel, None, None, out), args.reps)
            rows.append(dict(threads=t, page_heads=n, mb=n * HEAD_BYTES / 1e6, ms=s * 1e3,
                             gb_s=n * HEAD_BYTES / s / 1e9))
            print(f"threads {t:2d}  page-heads {n:5d}  {n * HEAD_BYTES / 1e6:7.2f} MB  "
                  f"{s * 1e3:7.3f} ms", flush=True)
    for r in rows:
        large = [x for x in rows if x["threads"] == r["threads"] and x["page_heads"] == sizes[-1]]
        r["of_large"] = r["gb_s"] / large[0]["gb_s"]
    meta = dict(date=datetime.date.today().isoformat(), machine=platform.node(),
                cpus=os.cpu_count(), batch=B, context=args.context, budget_pages=K,
                pool_pages=args.pool_pages, rows=args.rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cpu_small_parts.json")
    with open(path, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"\njson: {path}\n| threads | page-heads | MB | ms a call | GB/s | of large |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['threads']} | {r['page_heads']} | {r['mb']:.2f} | {r['ms']:.3f} | "
              f"{r['gb_s']:.2f} | {r['of_large']:.2f} |")


if __name__ == "__main__":
    main()
