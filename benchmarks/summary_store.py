"""Question: what does keeping summaries in a SummaryStore save over recomputing them per selection,
and what host time does one call of a bound lowering cost?

One layer of Llama-3-8B attention shapes (32 q / 8 KV heads, D=128, bf16 KV, page 16), batch
--batch x --context tokens, quest, budget --budget-ratio of each request's pages (sink 1, recent 2):

  stateless     vflow.select_pages: the cache stage over every full page, then the checked indexer
  store         SummaryStore.index, checked (validation syncs the GPU)
  store-unchecked   SummaryStore.index(check=False): the bound lowering with no validation
  store-graph   the unchecked call captured in a CUDA graph and replayed (GPU only)
  store-host    the store in pinned host memory: the CPU indexer scores there (q over, sel back)

Per row: wall time per selection (synchronised), and for the bound lowering its host time per
call (time to return without synchronising, averaged over --calls back-to-back calls). Also the
bulk fill: summarising every page of the batch once (what appending the prefill costs the store).
Writes summary_store.json under --out and prints the table last.

    python benchmarks/summary_store.py --out results            # GPU machine defaults
    python benchmarks/summary_store.py --batch 2 --context 8192   # a small run on a CPU machine
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch

from vortex_hybrid import PagedKVCache, vflow
from vortex_hybrid.vflow.summary_store import SummaryStore

HQ, HKV, D, P = 32, 8, 128, 16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> float:
    """Median seconds of `fn()` over `reps` synchronised runs (after two warm-up runs)."""
    for _ in range(2):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def host_time(fn, device, calls: int) -> float:
    """Seconds per call to return (enqueue only), over `calls` back-to-back calls."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = (time.perf_counter() - t0) / calls
    sync(device)
    return dt


def graph_time(fn, device, reps: int) -> float | None:
    """Median seconds of a CUDA-graph replay of `fn` (None off CUDA or when capture fails)."""
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:                    # report, do not hide: the table says why
        print(f"note: CUDA graph capture failed: {exc!r}")
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="requests (default 8)")
    ap.add_argument("--context", type=int, default=131072, help="tokens per request (default 128K)")
    ap.add_argument("--budget-ratio", type=float, default=0.02, help="fraction of pages (0.02)")
    ap.add_argument("--reps", type=int, default=20, help="timed runs per row (default 20)")
    ap.add_argument("--calls", type=int, default=200, help="calls for the host-time column")
    ap.add_argument("--out", default="results", help="folder for summary_store.json")
    args = ap.parse_args()
    if args.batch < 1 or args.context < P or not 0 < args.budget_ratio <= 1:
        ap.error("--batch >= 1, --context >= 16, --budget-ratio in (0, 1]")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pages = math.ceil(args.context / P)
    kv = PagedKVCache(1, HKV, D, P, device_pages=args.batch * pages, host_pages=16,
                      dtype=torch.bfloat16, device=dev)
    stores = {"device": SummaryStore(kv, "quest", group=HQ // HKV, location="device")}
    if dev.type == "cuda":
        stores["host"] = SummaryStore(kv, "quest", group=HQ // HKV, location="host")
    gen = torch.Generator(device=dev).manual_seed(0)
    rids = []
    fill = 0.0
    for _ in range(args.batch):
        rid = kv.create_request()
        k = torch.randn(1, args.context, HKV, D, generator=gen, device=dev, dtype=torch.bfloat16)
        sync(dev)
        t0 = time.perf_counter()
        kv.append(rid, k, k)                    # the listener summarises every full page
        sync(dev)
        fill += time.perf_counter() - t0
        rids.append(rid)
    q = torch.randn(args.batch, HQ, D, generator=gen, device=dev, dtype=torch.bfloat16)
    budget = max(3, math.ceil(args.budget_ratio * pages))
    table, lens = kv.page_table(rids)
    store = stores["device"]
    s_table, s_lens = store.table(rids)
    kv_bytes = 2 * args.batch * pages * HKV * P * D * 2
    rows = []

    def add(name, seconds, host=None, note=""):
        rows.append({"path": name, "ms": None if seconds is None else seconds * 1e3,
                     "host_us_per_call": None if host is None else host * 1e6, "note": note})

    stateless = lambda: vflow.select_pages("quest", q, kv.device_pool.k[0], table, lens,  # noqa: E731
                                           budget, 1, 2)
    checked = lambda: store.index(0, q, s_table, s_lens, budget, 1, 2)                   # noqa: E731
    unchecked = lambda: store.index(0, q, s_table, s_lens, budget, 1, 2, check=False)    # noqa: E731
    want = stateless().sort(-1).values
    assert torch.equal(unchecked().sort(-1).values, want), "store selection differs from stateless"
    add("stateless select_pages", timed(stateless, dev, args.reps), host_time(stateless, dev, 5),
        "cache stage over every page + checked indexer")
    add("store, checked", timed(checked, dev, args.reps), host_time(checked, dev, args.calls))
    add("store, unchecked (bound lowering)", timed(unchecked, dev, args.reps),
        host_time(unchecked, dev, args.calls))
    add("store, unchecked, CUDA graph", graph_time(unchecked, dev, args.reps), None,
        "GPU time of a replay")
    if "host" in stores:
        h = stores["host"]
        h_table, h_lens = h.table(rids)
        hostfn = lambda: h.index(0, q, h_table, h_lens, budget, 1, 2, check=False)      # noqa: E731
        assert torch.equal(hostfn().sort(-1).values, want), "host store selection differs"
        add("store in host memory (CPU indexer)", timed(hostfn, dev, args.reps),
            host_time(hostfn, dev, 5), "q to host, sel back")
    base = rows[0]["ms"]
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "date": time.strftime("%Y-%m-%d"), "batch": args.batch, "context": args.context,
        "pages_per_request": pages, "budget": budget, "kv_bytes_one_layer": kv_bytes,
        "summary_bytes_one_layer": store.nbytes,
        "fill_ms_all_stores": fill * 1e3, "stores": list(stores),
        "rows": [dict(r, speedup_vs_stateless=(base / r["ms"] if r["ms"] else None)) for r in rows],
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary_store.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"{result['device']}  batch {args.batch} x {args.context} tokens, {pages} pages each, "
          f"budget {budget} pages; KV {kv_bytes / 2**30:.2f} GiB, quest summaries "
          f"{store.nbytes / 2**30:.2f} GiB per layer")
    print(f"prefill append incl. summarising into {len(stores)} store(s): {fill * 1e3:.1f} ms")
    print(f"{'path':40s} {'ms/selection':>13s} {'x stateless':>12s} {'host us/call':>13s}  note")
    for r in result["rows"]:
        ms = "n/a" if r["ms"] is None else f"{r['ms']:.3f}"
        sp = "" if r["speedup_vs_stateless"] is None else f"{r['speedup_vs_stateless']:.1f}x"
        hu = "" if r["host_us_per_call"] is None else f"{r['host_us_per_call']:.0f}"
        print(f"{r['path']:40s} {ms:>13s} {sp:>12s} {hu:>13s}  {r['note']}")


if __name__ == "__main__":
    main()
