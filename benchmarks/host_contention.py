"""Benchmark: what a host placement's CPU part pays per call, and why CPU attention loses bandwidth
while PCIe copies run.

Questions (issue "hybrid that pays", the CPU side):
  1. **Per-call cost.** A whole hybrid step hands the CPU one call per layer of a few MB
     (`launch_sparse_decode_attention` over the host part of the selection). How much of such a call
     is fixed cost (thread wake-up, argument views) against bytes, by thread count, back to back
     and with an idle gap between calls (the GPU's part of a layer runs between two CPU parts)?
  3. **Skew.** A step's host part is rarely even: in the sub-batch shape a few requests hold every
     host page. The same bytes, held by the first `share` of the batch's requests, with the
     kernel's two schedules (static: items in row order, split into equal blocks per thread;
     balanced: items ordered so that each thread's block holds about the same pages), by thread
     count. Bytes are the pages actually selected.
  2. **Contention.** A large call (--big-mib of selected KV) alone and while a thread keeps pinned
     H2D copies running (`cost_model.BackgroundCopy`, duty 1.0 and 0.5), by thread count, over a
     host pool in plain 4 KiB pages and one advised to use transparent huge pages (2 MiB): random
     page-head reads (4 KiB each at Llama-3-8B shapes) miss the TLB on every page with 4 KiB pages.
     Reports the CPU's GB/s, the copy's GB/s and their sum (host DRAM is one budget).

Pools are registered with `cudaHostRegister` as the runtime's host store is (`kv.page_pool`).
Without CUDA only part 1 runs (and part 2 without the copy). Times are medians (>= 5 calls,
>= 0.2 s) after a warm-up call; each call reads a fresh random set of pages.

    python benchmarks/host_contention.py [--out DIR] [--pool-gib 8] [--threads 1,2,4,8,14]
    python benchmarks/host_contention.py --pool-gib 1 --threads 1,2 --big-mib 64   # 2 cores
    python benchmarks/host_contention.py --parts skew --threads 8,14                 # skew only
    python benchmarks/host_contention.py --parts per_call --caller worker   # calls from a thread, as
                                                                            # the hand-off worker's

JSON to DIR/host_contention.json (DIR: $OUT, else the current folder); the tables are printed.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import mmap
import os
import statistics
import threading
import time

import torch

from vortex_hybrid.scheduler.cost_model import BackgroundCopy
from vortex_hybrid.cpu_kernels import launch_sparse_decode_attention, set_cpu_threads, warmup

HQ, HKV, D, PAGE = 32, 8, 128, 16
PAGE_KV = 2 * HKV * PAGE * D * 2                 # K+V bytes of one page, every KV head (bf16)
MIB, GIB = 1 << 20, 1 << 30
MADV_HUGEPAGE = 14


def thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"


def anon_huge_bytes() -> int:
    """This process's anonymous memory backed by huge pages (/proc/self/smaps_rollup)."""
    try:
        with open("/proc/self/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def host_pool(pages: int, huge: bool):
    """(k_pool, v_pool) [pages, HKV, PAGE, D] bf16 over one anonymous mapping, advised to use huge
    pages when `huge`, filled, and registered for the GPU when CUDA is present; and the mapping
    (keep it alive while the pools are used)."""
    nbytes = 2 * pages * HKV * PAGE * D * 2
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if huge:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes), MADV_HUGEPAGE) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE) failed")
    flat = torch.frombuffer(buf, dtype=torch.bfloat16)
    flat.fill_(0.01)                                   # touch every page (no shared zero page)
    if torch.cuda.is_available():
        err = torch.cuda.cudart().cudaHostRegister(addr, nbytes, 0)
        if int(getattr(err, "value", err)) != 0:
            raise RuntimeError(f"cudaHostRegister failed: {err}")
    k, v = flat.view(2, pages, HKV, PAGE, D).unbind(0)
    return k, v, buf, addr


def unregister(addr: int) -> None:
    if torch.cuda.is_available():
        torch.cuda.cudart().cudaHostUnregister(addr)


def call_sets(pages: int, batch: int, per_row: int, n: int, seed: int):
    """n argument sets of one layer's CPU part: `batch` requests, each KV head selecting `per_row`
    pages, over random pages of the pool (a request's table holds 4x the pages it selects)."""
    g = torch.Generator().manual_seed(seed)
    width = 4 * per_row
    out = []
    for _ in range(n):
        table = torch.randint(0, pages, (batch, width), generator=g, dtype=torch.int32)
        sel = torch.stack([torch.stack([torch.randperm(width, generator=g)[:per_row]
                                        for _ in range(HKV)]) for _ in range(batch)]).int()
        q = torch.randn(batch, HQ, D, generator=g)
        lens = torch.full((batch,), width * PAGE, dtype=torch.int32)
        out.append((q, table, lens, sel))
    return out, batch * HKV * per_row * PAGE_KV // HKV     # bytes read: K+V of each page-head


def skewed(sets, share: float):
    """The same argument sets with the host pages of the first `share` of the requests only, each
    of them selecting 1/share times the pages (the same bytes in total, unless that exceeds a
    request's table: then fewer)."""
    out = []
    for q, table, lens, sel in sets:
        batch, hkv, per_row = sel.shape
        busy = max(1, round(share * batch))
        width = table.shape[1]
        k = min(width, round(per_row * batch / busy))
        g = torch.Generator().manual_seed(busy * 7919 + per_row)
        s = torch.full((batch, hkv, k), -1, dtype=torch.int32)
        for b in range(busy):
            for h in range(hkv):
                s[b, h] = torch.randperm(width, generator=g)[:k].int()
        out.append((q, table, lens, s))
    return out


def timed(k, v, sets, gap_s: float, min_calls: int = 5, min_s: float = 0.2,
          schedule: str = "balanced") -> float:
    """Median seconds of one call, cycling through `sets`; gap_s: spin that long before each call
    (the threads go idle as between two layers' CPU parts)."""
    q, t, ln, s = sets[0]
    launch_sparse_decode_attention(q, k, v, t, ln, s, schedule=schedule)      # warm-up
    times, start, i = [], time.perf_counter(), 0
    while len(times) < min_calls or time.perf_counter() - start < min_s:
        q, t, ln, s = sets[i % len(sets)]
        i += 1
        if gap_s:
            end = time.perf_counter() + gap_s
            while time.perf_counter() < end:
                pass
        t0 = time.perf_counter()
        launch_sparse_decode_attention(q, k, v, t, ln, s, schedule=schedule)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > 3 and len(times) >= 3:
            break
    return statistics.median(times)


def per_call(k, v, pages, threads, sizes_mib, gaps_us, batch):
    rows = []
    for n_thr in threads:
        set_cpu_threads(n_thr)
        for mib in sizes_mib:
            heads = mib * MIB / (PAGE_KV / HKV)           # page-heads the call reads
            per_row = max(1, round(heads / (batch * HKV)))
            rows_b = max(1, min(batch, round(heads / (HKV * per_row))))   # small calls: fewer rows
            sets, nbytes = call_sets(pages, rows_b, per_row, 8, seed=n_thr * 1000 + int(mib * 16))
            for gap in gaps_us:
                sec = timed(k, v, sets, gap * 1e-6)
                rows.append(dict(threads=n_thr, mib=nbytes / MIB, requests=rows_b,
                                 pages_per_head=per_row, gap_us=gap, us=sec * 1e6,
                                 gbps=nbytes / sec / 1e9))
                print(f"  per-call threads {n_thr:2d} {nbytes / MIB:7.2f} MiB gap {gap:5d} us: "
                      f"{sec * 1e6:8.1f} us {nbytes / sec / 1e9:6.1f} GB/s", flush=True)
    return rows


def skew(k, v, pages, threads, mib, shares, batch):
    rows = []
    per_row = max(1, round(mib * MIB / (batch * HKV * PAGE_KV / HKV)))
    for n_thr in threads:
        set_cpu_threads(n_thr)
        sets, nbytes = call_sets(pages, batch, per_row, 4, seed=11 + n_thr)
        for share in shares:
            skewed_sets = skewed(sets, share)
            nbytes = int((skewed_sets[0][3] >= 0).sum()) * PAGE_KV // HKV
            row = dict(threads=n_thr, mib=nbytes / MIB, busy_share=share)
            for schedule in ("static", "balanced"):
                sec = timed(k, v, skewed_sets, 0, schedule=schedule)
                row[f"{schedule}_us"] = sec * 1e6
                row[f"{schedule}_gbps"] = nbytes / sec / 1e9
            row["balanced_x"] = row["static_us"] / row["balanced_us"]
            rows.append(row)
            print("  skew " + " ".join(f"{a}={b:.2f}" if isinstance(b, float) else f"{a}={b}"
                                       for a, b in row.items()), flush=True)
    return rows


def contention(k, v, pages, threads, big_mib, duties, batch, copy_src, label):
    rows = []
    per_row = max(1, round(big_mib * MIB / (batch * HKV * PAGE_KV / HKV)))
    for n_thr in threads:
        set_cpu_threads(n_thr)
        sets, nbytes = call_sets(pages, batch, per_row, 4, seed=7 + n_thr)
        alone = nbytes / timed(k, v, sets, 0) / 1e9
        row = dict(pool=label, threads=n_thr, mib=nbytes / MIB, cpu_alone=alone)
        for duty in duties:
            if copy_src is None:
                continue
            with BackgroundCopy(copy_src, duty=duty) as cp:
                sec = timed(k, v, sets, 0, min_s=0.5)
            row[f"cpu_d{duty}"] = nbytes / sec / 1e9
            row[f"copy_d{duty}"] = cp.share() / 1e9
        rows.append(row)
        print("  contention " + " ".join(f"{a}={b:.1f}" if isinstance(b, float) else f"{a}={b}"
                                         for a, b in row.items()), flush=True)
    return rows


def table(rows: list, cols: list) -> str:
    head = "| " + " | ".join(cols) + " |\n| " + " | ".join("---" for _ in cols) + " |\n"
    fmt = lambda x: f"{x:.1f}" if isinstance(x, float) else str(x)      # noqa: E731
    return head + "".join("| " + " | ".join(fmt(r.get(c, "-")) for c in cols) + " |\n"
                          for r in rows)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--pool-gib", type=float, default=8.0, help="each pool's K+V, GiB (>> LLC)")
    cores = os.cpu_count() or 2
    ap.add_argument("--threads", default=",".join(str(t) for t in sorted(
        {1, 2, 4, 8, max(1, cores - 2), max(1, cores - 1), cores}) if t <= cores))
    ap.add_argument("--sizes-mib", default="0.25,1,2.5,8,32", help="per-call selected KV, MiB")
    ap.add_argument("--gaps-us", default="0,500", help="idle spin before each call, us")
    ap.add_argument("--batch", type=int, default=27, help="requests per call (hybrid's batch)")
    ap.add_argument("--big-mib", type=float, default=256, help="contention call's selected KV, MiB")
    ap.add_argument("--duties", default="1.0,0.5", help="copy duty cycles while the CPU attends")
    ap.add_argument("--caller", choices=("main", "worker"), default="main",
                    help="per_call: launch from the main thread or from a second thread (the "
                         "runtime's hand-off worker calls the CPU kernels), the main one sleeping")
    ap.add_argument("--parts", default="per_call,skew,contention",
                    help="which questions to measure (comma-separated)")
    ap.add_argument("--skew-mib", type=float, default=32,
                    help="the skew calls' selected KV, MiB (a 12 GiB hybrid layer: ~32)")
    ap.add_argument("--shares", default="0.1,0.25,0.5,1.0",
                    help="shares of the batch's requests holding the skew calls' host pages")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    torch.set_num_threads(1)
    warmup()
    threads = [int(t) for t in a.threads.split(",")]
    pages = int(a.pool_gib * GIB // PAGE_KV)
    cuda = torch.cuda.is_available()
    copy_src = None
    if cuda:
        copy_src = torch.empty(1 * GIB, dtype=torch.uint8, pin_memory=True).fill_(1)
    result = dict(date=datetime.date.today().isoformat(), cores=os.cpu_count(), thp=thp_mode(),
                  caller=a.caller, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                  device=torch.cuda.get_device_name() if cuda else "cpu", pool_gib=a.pool_gib,
                  per_call=[], skew=[], contention=[])
    parts = set(a.parts.split(","))
    unknown = parts - {"per_call", "skew", "contention"}
    if unknown:
        raise SystemExit(f"--parts {a.parts!r}: unknown {sorted(unknown)}; "
                         "allowed: per_call, skew, contention")
    print(f"cores {os.cpu_count()}, transparent huge pages: {result['thp']}", flush=True)
    for huge in (False, True) if "contention" in parts else (False,):
        before = anon_huge_bytes()
        k, v, buf, addr = host_pool(pages, huge)
        got = (anon_huge_bytes() - before) / GIB
        label = "huge (madvise)" if huge else "4 KiB"
        print(f"pool {label}: {a.pool_gib} GiB, {got:.2f} GiB in huge pages", flush=True)
        result.setdefault("huge_gib", {})[label] = got
        if not huge and "per_call" in parts:
            args = (k, v, pages, threads, [float(x) for x in a.sizes_mib.split(",")],
                    [int(x) for x in a.gaps_us.split(",")], a.batch)
            if a.caller == "main":
                result["per_call"] = per_call(*args)
            else:
                worker = threading.Thread(target=lambda: result.update(per_call=per_call(*args)))
                worker.start()
                worker.join()
        if not huge and "skew" in parts:
            result["skew"] = skew(k, v, pages, threads, a.skew_mib,
                                  [float(x) for x in a.shares.split(",")], a.batch)
        if "contention" in parts:
            result["contention"] += contention(k, v, pages, threads, a.big_mib,
                                               [float(x) for x in a.duties.split(",")], a.batch,
                                               copy_src, label)
        unregister(addr)
        del k, v
        buf.close()
    sections = [("per call (4 KiB pool)", "per_call", [
                    "threads", "mib", "requests", "pages_per_head", "gap_us", "us", "gbps"]),
                ("skew (the same bytes held by a share of the requests)", "skew", [
                    "threads", "mib", "busy_share", "static_us", "static_gbps", "balanced_us",
                    "balanced_gbps", "balanced_x"]),
                ("contention (GB/s)", "contention", list(
                    dict.fromkeys(c for r in result["contention"] for c in r)))]
    text = "\n".join(f"{title}:\n" + table(result[key], cols)
                     for title, key, cols in sections if result[key])
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "host_contention.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
