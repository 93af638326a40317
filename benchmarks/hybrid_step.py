"""Question: how long does one 32-layer decode step take in each placement (hybrid, cpu, offload, gpu,
dense), against a lower bound from hardware ceilings measured in the same run?

Llama-3-8B attention shapes (32 q / 8 KV heads, D=128, bf16 KV, page 16). Rows: --batch x --context
pairs x --budgets (fraction of a request's pages) x --cache-fractions (of one layer's KV, as
`gpu_cache_pages` per layer) x --reuse. --layers distinct layers stand in for 32: a 32-layer step is
32/layers plan()/run() cycles of `HybridAttention(cfg, num_layers=layers)`, each appending one token.
Prefill stops short of --context by the tokens the steps append.

Selections: a synthetic stream fed through `attn.run(..., sel=)` (attended exactly; no indexer). Per
(layer, request, KV head) each cycle keeps round(reuse * free) of the last cycle's non-forced pages and
draws the rest uniformly from pages it did not select, plus the first 1 (sink) and last 2 (recent)
pages; K = budget pages, free = K - 3; heads independent. Reuse is measured from the tensors.

`hybrid` is measured in each --step-shapes shape on the same instance (cells "hybrid/split",
"hybrid/subbatch"); a row's hybrid time is the better one, which `step_shape="auto"` keeps.

Per cell (placement x row), medians over --steps 32-layer steps after --warmup steps (up to 2x more
until the GPU cache has filled): synchronised wall time; run() host time per layer; the time the GPU
side waited for the CPU worker (`gpu_wait_s`, an upper bound on CPU-caused GPU idle) / step; cache
hit rate; page-heads attended on GPU / CPU; pages fetched; PCIe bytes; and the lower bound of the
bytes moved, max(HBM / hbm_bw, (CPU + PCIe) / best host ceiling, PCIe / h2d_bw, CPU / cpu_attn_bw),
ceilings from `cost_model.measure(quick=True)` (without CUDA its GPU fields are H100 defaults).

    python benchmarks/hybrid_step.py --out results                             # GPU machine
    python benchmarks/hybrid_step.py --batch 2 --context 4096 --layers 2       # a CPU machine

Writes hybrid_step.json (after every cell: a killed run keeps its cells) and hybrid_step.png (when
matplotlib imports) under --out; the table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import time

import psutil
import torch

from vortex_hybrid.scheduler import cost_model
from vortex_hybrid import HybridAttention, HybridConfig
from vortex_hybrid.cpu_kernels import cpu_threads, set_cpu_threads
from vortex_hybrid.runtime.memory_model import HOST_PLACEMENTS, TAIL_PAGES
from vortex_hybrid.vflow.summary_store import summary_bytes

HQ, HKV, D, P, SINK, RECENT = 32, 8, 128, 16, 1, 2
HEAD_PAGE_BYTES = 2 * P * D * 2            # K+V of one KV head of one page, bf16
PAGE_BYTES = HKV * HEAD_PAGE_BYTES         # all heads: 64 KiB
PLACEMENTS = ("hybrid", "cpu", "offload", "gpu", "dense")
SHAPES = ("split", "subbatch")             # the hybrid placement's step shapes, each measured
HOST = HOST_PLACEMENTS
GIB = 1 << 30
TARGET_SPEEDUP, TARGET_LB, TARGET_REUSE = 1.5, 1.3, 0.5


def floats(s):
    return [float(x) for x in s.split(",") if x]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def pow2ceil(n):
    return 1 << max(0, int(n - 1).bit_length())


def release_memory(host: bool):
    """Free torch's cached device blocks, and with host=True its cached pinned blocks (kept otherwise:
    the next host pool of the same size reuses them without pinning again)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        acc = getattr(torch, "accelerator", None)
        empty = [f for f in (getattr(acc, "empty_host_cache", None), getattr(torch._C, "_host_emptyCache",
                 None), getattr(getattr(acc, "memory", None), "empty_host_cache", None)) if f]
        if host and empty:
            empty[0]()
        elif host:
            print("note: this torch has no call to free cached pinned memory; host memory may stay held")


class SelStream:
    """Page selections int32 [B, HKV, K] per layer with a stated reuse between consecutive cycles."""

    def __init__(self, layers, batch, K, reuse, seed, dev, kv_heads=HKV):
        self.hkv = kv_heads
        self.R, self.K, self.free, self.reuse, self.dev = batch * kv_heads, K, K - SINK - RECENT, \
            reuse, dev
        self.gen = torch.Generator(device=dev).manual_seed(seed)
        self.prev = [None] * layers
        self.kept = self.total = 0                 # measured: previous free pages found again

    def next(self, layer, n):
        R, free, prev, dev = self.R, self.free, self.prev[layer], self.dev
        keep = 0 if prev is None else min(int(math.floor(self.reuse * free + 0.5)), free)
        score = torch.rand(R, n, generator=self.gen, device=dev)
        score[:, :SINK] = score[:, n - RECENT:] = math.inf
        parts = []
        if prev is not None:
            score.scatter_(1, prev, 2.0)           # last cycle's pages: drawn only if nothing else is left
            order = torch.rand(R, free, generator=self.gen, device=dev).argsort(1)[:, :keep]
            parts.append(prev.gather(1, order))
            score.scatter_(1, parts[0], math.inf)
        parts.append(score.topk(free - keep, dim=1, largest=False).indices)
        cur = torch.cat(parts, 1)
        if prev is not None:                       # measured reuse, from the sets themselves
            was = torch.zeros(R, n, dtype=torch.bool, device=dev).scatter_(1, prev, True)
            self.kept += int(was.gather(1, cur).sum())
            self.total += R * free
        self.prev[layer] = cur
        forced = torch.cat([torch.arange(SINK, device=dev), torch.arange(n - RECENT, n, device=dev)])
        sel = torch.cat([forced[:SINK].expand(R, -1), cur, forced[SINK:].expand(R, -1)], 1)
        return sel.view(-1, self.hkv, self.K).to(torch.int32)

    def measured(self):
        return self.kept / self.total if self.total else None


def plan_shape(args, batch, context, n_cells, dev):
    """Sizes of one batch x context row, scaled to fit host memory (batch) and HBM (device layers)."""
    pages, cycles, cuda = math.ceil(context / P), args.model_layers // args.layers, dev.type == "cuda"
    growth = n_cells * (2 * args.warmup + args.steps) * cycles
    if context - growth < 16 * P:
        raise SystemExit(f"--context {context} leaves no room for the {growth} tokens the steps "
                         "append; raise --context or lower --steps/--warmup/cells")
    per_layer = batch * context * HKV * D * 2 * 2
    avail = psutil.virtual_memory().available
    limit = 0.85 * avail - 2 * GIB - (0 if cuda else 2 * args.layers * context * HKV * D * 2)
    one = lambda b: args.layers * b * pages * PAGE_BYTES // 2        # noqa: E731  (k or v pool)
    pinned = lambda b: 2 * (pow2ceil(one(b)) if cuda else one(b))    # noqa: E731  torch: 2^n blocks
    host_b = next((b for b in range(batch, 0, -1) if pinned(b) <= limit), 0)
    print(f"row B={batch} x {context} tokens: KV {per_layer / GIB:.2f} GiB per layer; host pool of "
          f"{args.layers} layers {2 * one(batch) / GIB:.2f} GiB, " + (
              f"pinned {pinned(batch) / GIB:.2f} GiB (torch rounds pinned blocks to powers of two)"
              if cuda else "not pinned (no CUDA)") + f"; psutil available {avail / GIB:.1f} GiB, "
          f"usable {limit / GIB:.1f}; prefill {context - growth} tokens, then {cycles} cycles per "
          f"32-layer step, each appending a token")
    if host_b < batch:
        print(f"  {'REFUSED' if not host_b else 'SCALED'}: host placements " +
              (f"run batch {host_b}" if host_b else "skipped: not even batch 1 fits") +
              f" (batch {batch} needs {pinned(batch) / GIB:.1f} GiB > {limit / GIB:.1f} GiB usable)")
    free = 0.92 * torch.cuda.mem_get_info(dev)[0] if cuda else limit   # without CUDA: host memory
    need = lambda L, b: (L * b * pages * PAGE_BYTES + 2 * L * context * HKV * D * 2 +  # noqa: E731
                         summary_bytes("quest", L, b * pages, HKV, P, D))
    divs = [d for d in range(args.layers, 0, -1) if args.model_layers % d == 0]
    dev_layers = next((L for L in divs if need(L, batch) <= free), 1)
    dev_b = next((b for b in range(batch, 0, -1) if need(dev_layers, b) <= free), 0)
    print(f"  gpu/dense: {dev_layers} layers x batch {dev_b} in {'HBM' if cuda else 'host memory'} "
          f"({need(dev_layers, dev_b) / GIB:.1f} of {free / GIB:.1f} GiB usable)" +
          (" SCALED to fit" if (dev_layers, dev_b) != (args.layers, batch) else ""))
    return dict(batch=batch, context=context, pages=pages, prefill=context - growth, cycles=cycles,
                host_batch=host_b, dev_layers=dev_layers, dev_batch=dev_b,
                kv_bytes_per_layer=per_layer, pinned_host_bytes=pinned(host_b) if host_b else 0)


def build(placement, shape, cf, args, costs, dev):
    """A HybridAttention of this placement with the shape's requests prefilled."""
    host = placement in HOST
    L = args.layers if host else shape["dev_layers"]
    B = shape["host_batch"] if host else shape["dev_batch"]
    slots = int(round(cf * B * shape["pages"])) if placement in ("hybrid", "offload") else 0
    host_pages = B * shape["pages"] if host else 0
    dev_pages = slots + TAIL_PAGES + (4096 if dev.type == "cuda" else 0) if host else \
        B * (shape["pages"] + 2)
    cap = L * host_pages * PAGE_BYTES / GIB * 1.01 + 0.01 if host else None   # we checked memory
    cfg = HybridConfig(placement=placement, flow="quest", budget_ratio=0.02, sink_pages=SINK,
                       recent_pages=RECENT, gpu_cache_pages=slots, host_memory_gib=cap,
                       summary_location="device")
    split = costs if args.split_costs == "measured" else cost_model.DEFAULTS
    attn = HybridAttention(cfg, L, HQ, HKV, D, device_pages=dev_pages, host_pages=host_pages,
                           device=dev, costs=split)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    rids = []
    for _ in range(B):
        k = torch.randn(L, shape["prefill"], HKV, D, generator=gen, device=dev, dtype=torch.bfloat16)
        rids.append(attn.add_request(k, torch.randn_like(k)))
        del k
    q = torch.randn(B, HQ, D, generator=gen, device=dev, dtype=torch.bfloat16)
    kn = torch.randn(B, HKV, D, generator=gen, device=dev, dtype=torch.bfloat16)
    return attn, rids, (q, kn, torch.randn_like(kn)), slots


def run_step(attn, rids, qkv, sels, cycles, dev):
    """One 32-layer step: `cycles` plan()/run() cycles; wall s, run() host s, summed counters."""
    total, host = {}, 0.0
    sync(dev)
    t0 = time.perf_counter()
    for c in range(cycles):
        attn.plan(rids)
        for layer in range(attn.num_layers):
            t1 = time.perf_counter()
            attn.run(layer, *qkv, sel=None if sels is None else sels[c][layer], check_sel=False)
            host += time.perf_counter() - t1
        for k, v in attn.stats()["last_step"].items():
            if not isinstance(v, str):                  # step_shape is a name
                total[k] = total.get(k, 0) + v
    sync(dev)
    return time.perf_counter() - t0, host, total


def lower_bound(c, costs):
    """Seconds no placement can beat for the bytes this step moved, and the binding term."""
    hbm = c["gpu_pages"] * HEAD_PAGE_BYTES
    ceiling = max(costs.cpu_attn_bw, costs.h2d_bw, costs.cpu_attn_bw_concurrent + costs.h2d_bw_concurrent)
    terms = {"hbm": hbm / costs.hbm_bw, "host": (c["bytes_cpu"] + c["bytes_h2d"]) / ceiling,
             "pcie": c["bytes_h2d"] / costs.h2d_bw, "cpu": c["bytes_cpu"] / costs.cpu_attn_bw}
    name = max(terms, key=terms.get)
    return terms[name], name


def measure_cell(attn, rids, qkv, slots, budget, reuse, shape, args, costs, dev):
    """Warm-up, then --steps timed 32-layer steps of one (budget, reuse); medians and counters."""
    cycles, L, B = shape["cycles"], attn.num_layers, len(rids)
    K = max(SINK + RECENT, math.ceil(budget * shape["pages"])) if budget else None
    stream = SelStream(L, B, K, reuse, args.seed, dev) if budget else None

    def step():
        sels = None
        if stream is not None:
            n0 = attn.kv.seq_len(rids[0])
            sels = [[stream.next(layer, -(-(n0 + c + 1) // P)) for layer in range(L)]
                    for c in range(cycles)]
        return run_step(attn, rids, qkv, sels, cycles, dev)

    def filled():            # every slot of every layer taken once (fetches fill free slots first)
        tot = attn.stats()["totals"]
        return bool(slots) and (tot.get("evictions", 0) > 0 or tot.get("fetched_pages", 0) >= L * slots)

    n_warm = 0
    while n_warm < args.warmup or (slots and n_warm < 2 * args.warmup and not filled()):
        step()
        n_warm += 1
    if stream is not None:
        stream.kept = stream.total = 0
    rec = []
    for _ in range(args.steps):
        wall, host, c = step()
        lb, term = lower_bound(c, costs)
        looked = c["cache_hits"] + c["cache_misses"]
        rec.append(dict(ms=wall * 1e3, lb_ms=lb * 1e3, lb_term=term, host_ms_per_layer=host * 1e3 /
                        args.model_layers, cpu_wait_frac=c["gpu_wait_s"] / wall,
                        hit_rate=c["cache_hits"] / looked if looked else None,
                        gpu_page_heads=c["gpu_pages"], cpu_page_heads=c["cpu_pages"],
                        fetched_pages=c["fetched_pages"], pcie_bytes=c["bytes_h2d"],
                        cpu_bytes=c["bytes_cpu"], hbm_bytes=c["gpu_pages"] * HEAD_PAGE_BYTES))
    med = {k: statistics.median(v) if (v := [r[k] for r in rec if r[k] is not None]) else None
           for k in rec[0] if k != "lb_term"}
    med["lb_term"] = statistics.mode(r["lb_term"] for r in rec)
    med["vs_lb"] = statistics.median(r["ms"] / r["lb_ms"] for r in rec) if med["lb_ms"] else None
    return dict(med, batch=B, layers=L, warmup_steps=n_warm, cache_slots_per_layer=slots,
                cache_filled=filled() if slots else None, budget_pages=stream.K if stream else None,
                measured_reuse=stream.measured() if stream else None, steps_ms=[r["ms"] for r in rec])


def make_rows(result, args):
    """Rows (batch x context, budget, cache, reuse) with every placement's cell and the ratios."""
    cells = {(c["shape"], c["placement"], c["cache_fraction"], c["budget"], c["reuse"]): c
             for c in result["cells"]}
    rows = []
    for (s, shape), b, cf, r in itertools.product(enumerate(result["shapes"]), args.budgets,
                                                  args.cache_fractions, args.reuse):
        key = {"hybrid": (cf, b, r), "offload": (cf, b, r), "cpu": (None, b, r),
               "gpu": (None, b, r), "dense": (None, None, None)}
        got = {p: cells.get((s, p) + key[p]) for p in PLACEMENTS}
        by_shape = {h: cells.get((s, f"hybrid/{h}") + key["hybrid"]) for h in SHAPES}
        measured = [c for c in by_shape.values() if c]
        if measured:                    # hybrid: the better shape (what step_shape="auto" keeps)
            got["hybrid"] = min(measured, key=lambda c: c["ms"])
        ms = {p: got[p]["ms"] if got[p] else None for p in PLACEMENTS}
        vs_lb = {p: got[p]["vs_lb"] if got[p] else None for p in PLACEMENTS}
        best = min([ms[p] for p in ("cpu", "offload") if ms[p]], default=None)
        speedup = best / ms["hybrid"] if best and ms["hybrid"] else None
        judged = r >= TARGET_REUSE
        rows.append(dict(
            shape=s, batch=shape["host_batch"] or shape["batch"], context=shape["context"],
            budget=b, cache_fraction=cf, reuse=r, ms=ms, vs_lb=vs_lb,
            hybrid_shape_ms={h: c["ms"] if c else None for h, c in by_shape.items()},
            hybrid_vs_best_cpu_offload=speedup,
            gpu_vs_dense=ms["dense"] / ms["gpu"] if ms["dense"] and ms["gpu"] else None,
            target_speedup_met=(speedup >= TARGET_SPEEDUP) if judged and speedup else None,
            target_lb_met=(vs_lb["hybrid"] <= TARGET_LB) if judged and vs_lb["hybrid"] else None,
            missing=[p for p in PLACEMENTS if got[p] is None and p in args.placements.split(",")]))
    return rows


def chart(result, path):
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not importable: no chart"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = result["shapes"]
    fig, axes = plt.subplots(len(shapes), 1, figsize=(12, 4 * len(shapes)), squeeze=False)
    for s, ax in zip(range(len(shapes)), axes[:, 0]):
        rows = [r for r in result["rows"] if r["shape"] == s]
        for i, p in enumerate(PLACEMENTS):
            xs = [j + (i - 2) * 0.16 for j, r in enumerate(rows) if r["ms"][p]]
            ax.bar(xs, [r["ms"][p] for r in rows if r["ms"][p]], width=0.16, label=p)
        lb = [(j - 0.32, r["ms"]["hybrid"] / r["vs_lb"]["hybrid"]) for j, r in enumerate(rows)
              if r["vs_lb"]["hybrid"]]
        if lb:
            ax.plot(*zip(*lb), "k_", markersize=14, label="hybrid lower bound")
        ax.set_xticks(range(len(rows)), [f"b{r['budget']:.0%} c{r['cache_fraction']:.0%} "
                                         f"r{r['reuse']:.0%}" for r in rows], rotation=60, fontsize=7)
        if any(r["ms"][p] for r in rows for p in PLACEMENTS):
            ax.set_yscale("log")
        ax.set_ylabel("ms per 32-layer step")
        ax.set_title(f"B={shapes[s]['batch']} x {shapes[s]['context']} tokens ({result['device']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"chart: {path}"


def fmt(x, spec=".2f", suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def table(head, lines):
    if not lines:
        return print("(none)")
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    for line in [head] + lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


def print_tables(result):
    print("\ncells: medians over the timed steps; page-heads: (page, KV head) pairs attended; wait: "
          "time the GPU side waited for the CPU worker / step time; reuse m: measured")
    table(["placement", "B x context", "budget", "cache", "reuse", "step ms", "LB ms", "bound",
           "host ms/layer", "wait", "hit", "GPU p-h", "CPU p-h", "fetched", "PCIe MB", "reuse m"],
          [[c["placement"], f"{c['batch']}x{result['shapes'][c['shape']]['context']}",
            fmt(c["budget"], ".0%"), fmt(c["cache_fraction"], ".0%"), fmt(c["reuse"], ".0%"),
            fmt(c["ms"]), fmt(c["lb_ms"], ".3f"), c["lb_term"], fmt(c["host_ms_per_layer"], ".3f"),
            fmt(c["cpu_wait_frac"]), fmt(c["hit_rate"]), f"{c['gpu_page_heads']:.0f}",
            f"{c['cpu_page_heads']:.0f}", f"{c['fetched_pages']:.0f}", fmt(c["pcie_bytes"] / 1e6, ".1f"),
            fmt(c["measured_reuse"])] for c in result["cells"]])
    print(f"\nrows, ratios first. Targets on rows with reuse >= {TARGET_REUSE:.0%}: hybrid >= "
          f"{TARGET_SPEEDUP}x faster than the better of cpu and offload, and <= {TARGET_LB}x its lower "
          "bound (ok / MISS; - = not judged or not measured). Then ms per 32-layer step.")
    flag = lambda met: "" if met is None else (" ok" if met else " MISS")  # noqa: E731
    table(["B x context", "budget", "cache", "reuse", "hyb vs best(cpu,off)", "hyb/LB", "off/LB",
           "cpu/LB", "gpu/LB", "dense/gpu", *PLACEMENTS, *(f"hyb {h}" for h in SHAPES), "missing"],
          [[f"{r['batch']}x{r['context']}", f"{r['budget']:.0%}", f"{r['cache_fraction']:.0%}",
            f"{r['reuse']:.0%}", fmt(r["hybrid_vs_best_cpu_offload"], ".2f", "x") +
            flag(r["target_speedup_met"]), fmt(r["vs_lb"]["hybrid"]) + flag(r["target_lb_met"]),
            *(fmt(r["vs_lb"][p]) for p in ("offload", "cpu", "gpu")),
            fmt(r["gpu_vs_dense"], ".2f", "x"), *(fmt(r["ms"][p]) for p in PLACEMENTS),
            *(fmt(r["hybrid_shape_ms"][h]) for h in SHAPES),
            ",".join(r["missing"]) or "-"] for r in result["rows"]])


def run_instance(placement, cf, s, shape, todo, name, est, args, costs, dev, result, t_start, save):
    """Build one placement's instance and measure its cells (budget x reuse) while time is left."""
    print(f"[{time.perf_counter() - t_start:6.0f} s] building {name} ...", flush=True)
    t0 = time.perf_counter()
    attn, rids, qkv, slots = build(placement, shape, cf, args, costs, dev)
    try:
        est["build"] = time.perf_counter() - t0
        print(f"  built in {est['build']:.1f} s ({len(rids)} requests, {attn.num_layers} layers, "
              f"{slots} cache slots per layer)", flush=True)
        shapes = args.step_shapes.split(",") if placement == "hybrid" else [None]
        for (b, r), step_shape in itertools.product(todo, shapes):
            elapsed = time.perf_counter() - t_start
            label = placement if step_shape is None else f"{placement}/{step_shape}"
            if elapsed + est["cell"] > args.time_limit:
                result["skipped"].append(f"{name} {label} budget {fmt(b, '.0%')} reuse "
                                         f"{fmt(r, '.0%')}: time limit ({elapsed:.0f} s elapsed)")
                continue
            if step_shape is not None:
                attn.step_shape = step_shape
            t0 = time.perf_counter()
            cell = measure_cell(attn, rids, qkv, slots, b, r, shape, args, costs, dev)
            est["cell"] = time.perf_counter() - t0
            result["cells"].append(dict(cell, shape=s, placement=label, cache_fraction=cf,
                                        budget=b, reuse=r))
            save()
            print(f"[{time.perf_counter() - t_start:6.0f} s] {name} {label} budget {fmt(b, '.0%')} reuse "
                  f"{fmt(r, '.0%')}: {cell['ms']:.2f} ms/step, {fmt(cell['vs_lb'])}x LB, host "
                  f"{cell['host_ms_per_layer']:.2f} ms/layer, hit {fmt(cell['hit_rate'])}, reuse "
                  f"measured {fmt(cell['measured_reuse'])} ({est['cell']:.1f} s)", flush=True)
    finally:
        attn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="32,8", help="requests per row, comma list (default 32,8)")
    ap.add_argument("--context", default="131072,524288", help="tokens per request, paired with --batch")
    ap.add_argument("--layers", type=int, default=4, help="distinct layers cycled for 32 (default 4)")
    ap.add_argument("--model-layers", type=int, default=32, help="layers of one step (default 32)")
    ap.add_argument("--budgets", type=floats, default=[0.02, 0.05], help="page fractions (0.02,0.05)")
    ap.add_argument("--cache-fractions", type=floats, default=[0.1, 0.3], help="of the KV (0.1,0.3)")
    ap.add_argument("--reuse", type=floats, default=[0.0, 0.5, 0.8], help="selection reuse (0,0.5,0.8)")
    ap.add_argument("--placements", default=",".join(PLACEMENTS), help="subset to run")
    ap.add_argument("--step-shapes", default=",".join(SHAPES),
                    help="hybrid's step shapes to measure, each on the same instance (the row's "
                         "hybrid time is the better one, what step_shape='auto' keeps)")
    ap.add_argument("--steps", type=int, default=3, help="timed 32-layer steps per cell (median)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps (up to 2x until the cache fills)")
    ap.add_argument("--split-costs", choices=("measured", "defaults"), default="measured",
                    help="hybrid's CPU/PCIe split uses this run's measured or the built-in bandwidths")
    ap.add_argument("--cpu-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="CPU kernel threads (default cores - 1, cpu_kernels/threads.py)")
    ap.add_argument("--time-limit", type=float, default=500,
                    help="seconds (500): skip a build or cell that the last one says would end later")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results", help="folder for hybrid_step.json / .png")
    args = ap.parse_args()
    batches, contexts = [int(x) for x in args.batch.split(",")], [int(x) for x in args.context.split(",")]
    if len(batches) != len(contexts):
        batches, contexts = (batches * len(contexts), contexts) if len(batches) == 1 else \
            (batches, contexts * len(batches)) if len(contexts) == 1 else (None, None)
    placements = [p for p in args.placements.split(",") if p]
    bad = [p for p in placements if p not in PLACEMENTS] + \
        [h for h in args.step_shapes.split(",") if h not in SHAPES]
    if batches is None or bad or args.model_layers % args.layers or args.steps < 1 or args.warmup < 0 \
            or not all(0 < b <= 1 for b in args.budgets) or not all(0 <= r <= 1 for r in args.reuse) \
            or not all(0 < c < 1 for c in args.cache_fractions) or min(batches) < 1:
        ap.error("--batch/--context: equal-length lists (or one value); --layers divides --model-layers;"
                 f" budgets in (0,1], reuse in [0,1], cache fractions in (0,1); placements {PLACEMENTS}; "
                 f"step shapes {SHAPES}")
    t_start = time.perf_counter()
    set_cpu_threads(args.cpu_threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    out_json = os.path.join(args.out, "hybrid_step.json")
    print(f"measuring ceilings (cost_model.measure(quick=True)) on {dev} ...", flush=True)
    costs = cost_model.measure(quick=True)
    print(f"  hbm {costs.hbm_bw / 1e9:.0f} GB/s, h2d {costs.h2d_bw / 1e9:.1f} (concurrent "
          f"{costs.h2d_bw_concurrent / 1e9:.1f}), cpu attention {costs.cpu_attn_bw / 1e9:.1f} (concurrent "
          f"{costs.cpu_attn_bw_concurrent / 1e9:.1f}) GB/s; measured: {', '.join(costs.measured)}"
          + (f"; notes: {costs.notes}" if costs.notes else ""))
    result = dict(question=__doc__.split("\n\n")[0], device=torch.cuda.get_device_name(dev) if
                  dev.type == "cuda" else f"CPU only ({platform.processor() or platform.machine()})",
                  cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"), args=vars(args),
                  torch=torch.__version__, cpu_threads=cpu_threads(),
                  costs=costs.to_dict(), shapes=[], cells=[], rows=[], skipped=[], complete=False,
                  notes=[f"a {args.model_layers}-layer step = {args.model_layers // args.layers} "
                         f"plan()/run() cycles over {args.layers} distinct layers; each cycle appends "
                         "one token", "selections: synthetic stream fed through run(sel=, check_sel="
                         "False), heads independent"])

    def save():
        result["rows"] = make_rows(result, args)
        with open(out_json, "w") as fh:
            json.dump(result, fh, indent=1)

    sparse = [(b, r) for b in args.budgets for r in args.reuse]
    for s, (batch, context) in enumerate(zip(batches, contexts)):
        release_memory(host=True)
        shape = plan_shape(args, batch, context,             # hybrid runs each cell per shape
                           len(sparse) * max(1, len(args.step_shapes.split(","))), dev)
        result["shapes"].append(shape)
        jobs = [(p, cf) for cf in args.cache_fractions for p in ("offload", "hybrid")]
        jobs = [("cpu", None)] + jobs + [("gpu", None), ("dense", None)]
        est = {"build": 0.0, "cell": 0.0}        # last build / cell of this row: skip what would overrun
        for placement, cf in [j for j in jobs if j[0] in placements]:
            todo = [(None, None)] if placement == "dense" else sparse
            name = f"B={batch} x {context} {placement}" + (f" cache {cf:.0%}" if cf else "")
            elapsed = time.perf_counter() - t_start
            if (shape["host_batch"] if placement in HOST else shape["dev_batch"]) < 1:
                result["skipped"].append(f"{name}: does not fit in memory")
            elif elapsed + est["build"] + est["cell"] > args.time_limit:
                result["skipped"] += [f"{name} budget {fmt(b, '.0%')} reuse {fmt(r, '.0%')}: time "
                                      f"limit ({elapsed:.0f} s elapsed)" for b, r in todo]
            else:
                try:
                    run_instance(placement, cf, s, shape, todo, name, est, args, costs, dev, result,
                                 t_start, save)
                except Exception as exc:          # out of memory, say: record it, go on
                    result["skipped"].append(f"{name}: failed: {exc!r}"[:400])
                    print(f"  FAILED: {exc!r}"[:400], flush=True)
                release_memory(host=True)     # the pool check counts only free memory
    if any(c["placement"] == "offload" and c["cpu_page_heads"] for c in result["cells"]):
        result["notes"].append("offload left pages to the CPU where its cache could not hold a "
                               "step's selection (CPU p-h column)")
    result["complete"] = True
    save()
    print(chart(result, os.path.join(args.out, "hybrid_step.png")))
    print(f"json: {out_json}; total {time.perf_counter() - t_start:.0f} s")
    for note in result["notes"] + [f"skipped: {x}" for x in result["skipped"]]:
        print(f"note: {note}")
    print_tables(result)


if __name__ == "__main__":
    main()
