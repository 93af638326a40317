"""Benchmark: Triton sparse paged decode attention vs full attention by torch SDPA (Llama-3-8B shapes).

Question: how close does `sparse_decode_attention` get to HBM bandwidth on the bytes it touches, and
how much faster is a whole sparse step (page scoring + top-k + sparse attention) than full attention?

Shapes: 32 query / 8 KV heads, head_dim 128, bf16 pools, page 16; contexts 32K and 128K; batch 1, 8,
32; budgets 1/2/5/10% of the pages (sink 1, recent 2 pages). Per point, `triton.testing.do_bench`
medians (eager, host launch included) and GPU time from CUDA-graph replays (`bench_gpu`, L2 flushed
clean before every call) of:
  - sparse: our split kernel + split merge on a fixed `sel` from the quest indexer;
  - step (quest / centroid): indexer (GPU-B's `gpu_kernels.page_scoring.launch_indexer`, the
    unchecked launcher behind `quest_indexer` / `centroid_indexer`, when present, else torch scoring
    + `torch.topk`; the output names which) followed by the sparse attention;
  - peer: full attention by `torch.nn.functional.scaled_dot_product_attention` on contiguous K/V
    `[B, 8, T, 128]` built from the same pool outside the timing (the 4 query heads of a KV head as
    4 query rows: exact GQA, each KV byte read once), and our kernel over all pages (`dense`).
Bytes touched / time is reported against the device-to-device copy bandwidth measured in this run.
A short offload section times `gather_pages` (pinned host pool -> GPU slots).

    python3 benchmarks/gpu_attention.py [--tune] [--out DIR]     # GPU machine, ~4 minutes
    python3 benchmarks/gpu_attention.py --smoke                    # tiny shapes, any machine

JSON goes to DIR/gpu_attention.json (DIR defaults to $OUT, else the current directory); the table is
printed last.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import json
import math
import os
import statistics
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vortex_hybrid import gpu_kernels  # noqa: E402
from vortex_hybrid.gpu_kernels import (launch_gather_pages, launch_sparse_decode_attention,  # noqa: E402
                                       merge_split_states)
from vortex_hybrid.gpu_kernels.sparse_decode_attention import (DEFAULT_CONFIG, LaunchConfig,  # noqa: E402
                                                               plan_splits)
from vortex_hybrid.reference import all_pages_sel  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
GROUP = HQ // HKV
SINK, RECENT = 1, 2
DTYPE = torch.bfloat16
ELEM = 2
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TUNE_POINTS = [(131072, 8, 0.02), (131072, 8, 0.10), (131072, 1, 0.02), (32768, 8, 0.01),
               (131072, 32, 0.05), (32768, 32, 0.02)]
TUNE_GRID = [LaunchConfig(block_t=bt, num_warps=w, num_stages=s, waves=wv, prefetch_indices=pf)
             for pf, wv, bt, w, s in itertools.product((False, True), (1.0, 4.0), (32, 64, 128), (4, 8),
                                                       (2, 3))]
TUNE_SECONDS_PER_POINT = 35.0


def bench(fn, rep: int = 100) -> float:
    """Median milliseconds of fn (do_bench on a GPU, one wall-clock run otherwise)."""
    if DEV.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


_FLUSH: list[torch.Tensor] = []


def bench_gpu(fn, n: int = 10, reps: int = 7) -> float:
    """Median GPU milliseconds of fn: CUDA-graph replays of n x (L2 flush, fn) minus n x (flush).

    Host launch overhead is out of this number (graphs replay without the Python launcher), so it
    is the kernels' own time plus the gaps between them; NaN when fn cannot be captured. The flush
    *reads* 256 MiB, leaving L2 cold and clean (a zero-fill flush, as do_bench's, leaves L2 full of
    dirty lines that fn then pays to write back: up to 50 MB of extra HBM traffic).
    """
    if DEV.type != "cuda":
        return float("nan")
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device=DEV))
    flush = _FLUSH[0]
    fn()
    torch.cuda.synchronize()
    graphs = []
    try:
        for with_fn in (True, False):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(n):
                    flush.sum()
                    if with_fn:
                        fn()
            graphs.append(g)
    except Exception as exc:  # e.g. a host sync inside fn
        print(f"note: CUDA graph capture failed: {exc!r}")
        torch.cuda.synchronize()
        return float("nan")
    times = []
    for _ in range(reps):
        pair = []
        for g in graphs:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            pair.append(start.elapsed_time(end))
        times.append((pair[0] - pair[1]) / n)
    del graphs
    return statistics.median(times)


@triton.jit
def _empty_kernel(x_ptr):
    tl.store(x_ptr + tl.program_id(0), 1.0)


def launch_floor_ms() -> float:
    """GPU time of one trivial one-program Triton launch, the same way as bench_gpu."""
    x = torch.zeros(1, device=DEV)
    return bench_gpu(lambda: _empty_kernel[(1,)](x))


def host_us(fn, n: int = 200) -> float:
    """Host microseconds per call of fn (launch overhead; the GPU runs behind)."""
    n = n if DEV.type == "cuda" else 1
    fn()
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    el = time.perf_counter() - t
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    return el / n * 1e6


def hbm_copy_bandwidth() -> float:
    """Device-to-device copy GB/s, counting bytes read plus written."""
    n = (1 << 28) if DEV.type == "cuda" else (1 << 16)
    src = torch.randn(n, device=DEV)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n * 4 / ms / 1e6


def _page_summaries(k_pool: torch.Tensor) -> dict[str, torch.Tensor]:
    """kmin, kmax, mean float32 [N, Hkv, 1, D] of every page (outside the timing, in chunks)."""
    n = k_pool.shape[0]
    out = {name: torch.empty(n, HKV, 1, D, dtype=torch.float32, device=DEV)
           for name in ("kmin", "kmax", "mean")}
    for s in range(0, n, 16384):
        chunk = k_pool[s:s + 16384].float()
        out["kmin"][s:s + 16384] = chunk.amin(dim=2, keepdim=True)
        out["kmax"][s:s + 16384] = chunk.amax(dim=2, keepdim=True)
        out["mean"][s:s + 16384] = chunk.mean(dim=2, keepdim=True)
    return out


def _torch_topk(scores, page_table, seq_lens, budget):
    """Fallback top-k with sink/recent forced: torch.topk over masked scores; sel int32, -1 padded."""
    n = (seq_lens.to(torch.int64) + PAGE - 1) // PAGE
    idx = torch.arange(scores.shape[-1], device=DEV)
    forced = (idx[None, :] < SINK) | ((idx[None, :] >= n[:, None] - RECENT) & (idx[None, :] < n[:, None]))
    scores = torch.where(forced[:, None, :], float("inf"), scores)
    scores = torch.where(idx[None, None, :] < n[:, None, None], scores, float("-inf"))
    val, pos = torch.topk(scores, min(budget, scores.shape[-1]), dim=-1)
    return torch.where(torch.isneginf(val), -1, pos).to(torch.int32)


def torch_quest_indexer(q, summaries, page_table, seq_lens, budget, sink, recent):
    """sum_j sum_d max(q*kmax, q*kmin) = sum_d (sum_j relu(q)) kmax + (sum_j min(q, 0)) kmin."""
    qg = q.float().view(q.shape[0], HKV, GROUP, D)
    pt = page_table.to(torch.int64)
    kmax = summaries["kmax"][pt][:, :, :, 0]                    # [B, pages, Hkv, D]
    kmin = summaries["kmin"][pt][:, :, :, 0]
    scores = torch.einsum("bhd,bphd->bhp", qg.clamp(min=0).sum(2), kmax) + \
        torch.einsum("bhd,bphd->bhp", qg.clamp(max=0).sum(2), kmin)
    return _torch_topk(scores, page_table, seq_lens, budget)


def torch_centroid_indexer(q, summaries, page_table, seq_lens, budget, sink, recent):
    """sum_j q_j . mean_p."""
    qg = q.float().view(q.shape[0], HKV, GROUP, D).sum(2)
    mean = summaries["mean"][page_table.to(torch.int64)][:, :, :, 0]
    return _torch_topk(torch.einsum("bhd,bphd->bhp", qg, mean), page_table, seq_lens, budget)


def find_indexers() -> dict[str, tuple[object, str]]:
    """flow -> (indexer fn, where it comes from).

    GPU-B's unchecked `page_scoring.launch_indexer` when importable (no host sync, so it can be
    graph-captured), else the checked `gpu_kernels.<flow>_indexer`, else torch scoring + topk.
    """
    found = {}
    try:
        launch_indexer = importlib.import_module("vortex_hybrid.gpu_kernels.page_scoring").launch_indexer
    except Exception as exc:  # a half-written module of another helper must not stop the run
        print(f"note: gpu_kernels.page_scoring.launch_indexer unavailable: {exc!r}")
        launch_indexer = None
    for flow, fallback in (("quest", torch_quest_indexer), ("centroid", torch_centroid_indexer)):
        a, b = ("kmax", "kmin") if flow == "quest" else ("mean", "mean")
        if launch_indexer is not None:
            def fn(q, summ, pt, sl, budget, sink, recent, a=a, b=b, quest=flow == "quest"):
                return launch_indexer(q, summ[a], summ[b], pt, sl, budget, sink, recent, PAGE,
                                      quest=quest)
            found[flow] = (fn, "gpu_kernels.page_scoring.launch_indexer (GPU-B, unchecked)")
            continue
        checked = getattr(gpu_kernels, f"{flow}_indexer", None)
        if checked is not None:
            def fn(q, summ, pt, sl, budget, sink, recent, checked=checked):
                return checked(q, summ, pt, sl, budget, sink, recent, page_size=PAGE)
            found[flow] = (fn, f"gpu_kernels.{flow}_indexer (GPU-B, checked)")
        else:
            found[flow] = (fallback, "torch scoring + torch.topk (no gpu_kernels indexer)")
    return found


class Setup:
    """One (context, batch): pools, shuffled page table, queries, summaries, contiguous K/V."""

    def __init__(self, ctx: int, batch: int) -> None:
        g = torch.Generator(device=DEV).manual_seed(ctx + batch)
        self.ctx, self.batch, self.pages = ctx, batch, ctx // PAGE
        n = batch * self.pages
        self.k_pool = torch.randn(n, HKV, PAGE, D, device=DEV, generator=g, dtype=DTYPE)
        self.v_pool = torch.randn(n, HKV, PAGE, D, device=DEV, generator=g, dtype=DTYPE)
        self.page_table = torch.randperm(n, device=DEV, generator=g).view(batch, self.pages).to(torch.int32)
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
        self.q = torch.randn(batch, HQ, D, device=DEV, generator=g, dtype=DTYPE)
        self.summaries = _page_summaries(self.k_pool)
        self.k_flat = self._contiguous(self.k_pool)
        self.v_flat = self._contiguous(self.v_pool)

    def _contiguous(self, pool: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, T, D] copy of the request's tokens in order (the SDPA peer's input)."""
        gathered = pool[self.page_table.to(torch.int64)]           # [B, pages, Hkv, P, D]
        return gathered.permute(0, 2, 1, 3, 4).reshape(self.batch, HKV, self.ctx, D).contiguous()

    def sdpa(self) -> torch.Tensor:
        q4 = self.q.view(self.batch, HKV, GROUP, D)
        return F.scaled_dot_product_attention(q4, self.k_flat, self.v_flat)

    def sparse(self, sel: torch.Tensor, config: LaunchConfig = DEFAULT_CONFIG):
        return launch_sparse_decode_attention(self.q, self.k_pool, self.v_pool, self.page_table,
                                              self.seq_lens, sel, config=config)

    def sparse_bytes(self, sel: torch.Tensor, config: LaunchConfig = DEFAULT_CONFIG) -> tuple[int, int]:
        """(KV + q + sel + state bytes the kernel must touch, extra bytes of split partial states)."""
        pages = int((sel >= 0).sum())
        must = pages * PAGE * D * ELEM * 2 + self.q.numel() * ELEM + sel.numel() * 4 + \
            self.batch * HQ * (D + 1) * 4
        splits, _ = plan_splits(self.batch, HKV, sel.shape[2], PAGE,
                                torch.cuda.get_device_properties(DEV).multi_processor_count
                                if DEV.type == "cuda" else 4, config)
        extra = 0 if splits == 1 else 2 * self.batch * HQ * splits * (D + 1) * 4
        return must, extra

    def merge_ms(self, sel: torch.Tensor, config: LaunchConfig) -> float:
        """GPU time of the split merge alone at this launch's split count (0 without splits)."""
        splits, _ = plan_splits(self.batch, HKV, sel.shape[2], PAGE,
                                torch.cuda.get_device_properties(DEV).multi_processor_count
                                if DEV.type == "cuda" else 4, config)
        if splits == 1:
            return 0.0
        o_part = torch.randn(self.batch, HQ, splits, D, device=DEV)
        lse_part = torch.randn(self.batch, HQ, splits, device=DEV)
        o = torch.empty(self.batch, HQ, D, device=DEV)
        lse = torch.empty(self.batch, HQ, device=DEV)
        return bench_gpu(lambda: merge_split_states(o_part, lse_part, o, lse))

    def index_bytes(self, flow: str) -> int:
        """Summary bytes an indexer must read (+ page table) for every page of every request."""
        per_page = (2 if flow == "quest" else 1) * D * 4
        return self.batch * self.pages * (HKV * per_page + 4)


def run_tune(hbm: float, indexers) -> tuple[list[dict], dict]:
    """GPU time (graph replays) of every TUNE_GRID config at TUNE_POINTS; best by geomean vs default."""
    rows = []
    by_setup: dict[tuple[int, int], list[float]] = {}
    for ctx, batch, frac in TUNE_POINTS:
        by_setup.setdefault((ctx, batch), []).append(frac)
    quest = indexers["quest"][0]
    for (ctx, batch), fracs in by_setup.items():
        st = Setup(ctx, batch)
        for frac in fracs:
            budget = max(SINK + RECENT, round(frac * st.pages))
            sel = quest(st.q, st.summaries, st.page_table, st.seq_lens, budget, SINK, RECENT)
            must, _ = st.sparse_bytes(sel)
            base = None
            t_end = time.perf_counter() + TUNE_SECONDS_PER_POINT * (3 if not rows else 1)
            for cfg in [DEFAULT_CONFIG, DEFAULT_CONFIG] + TUNE_GRID:   # default twice: noise
                if time.perf_counter() > t_end:
                    print(f"tune: time limit at ctx={ctx} B={batch} budget={frac:.0%}, rest skipped")
                    break
                ms = bench_gpu(lambda: st.sparse(sel, cfg))
                base = ms if base is None else base
                rows.append(dict(ctx=ctx, batch=batch, budget=frac, config=cfg.__dict__, ms=ms,
                                 vs_default=ms / base, frac_hbm=must / ms / 1e6 / hbm))
            here = [r for r in rows if (r["ctx"], r["batch"], r["budget"]) == (ctx, batch, frac)]
            print(f"tune ctx={ctx} B={batch} budget={frac:.0%}: default measured twice: "
                  f"{here[0]['ms'] * 1e3:.1f} / {here[1]['ms'] * 1e3:.1f} us; {len(here)} configs")
            best = min((r for r in rows if (r["ctx"], r["batch"], r["budget"]) == (ctx, batch, frac)),
                       key=lambda r: r["ms"])
            print(f"tune ctx={ctx} B={batch} budget={frac:.0%}: default {base * 1e3:.1f} us, best "
                  f"{best['ms'] * 1e3:.1f} us ({best['frac_hbm']:.0%} HBM) {best['config']}")
        del st
        torch.cuda.empty_cache() if DEV.type == "cuda" else None
    by_cfg: dict[str, dict[tuple, float]] = {}
    for r in rows:                      # the first of the default's two timings per point counts
        by_cfg.setdefault(json.dumps(r["config"], sort_keys=True), {}).setdefault(
            (r["ctx"], r["batch"], r["budget"]), r["vs_default"])
    by_cfg = {c: list(v.values()) for c, v in by_cfg.items()}
    scored = sorted((math.exp(sum(map(math.log, v)) / len(v)), c) for c, v in by_cfg.items()
                    if len(v) == len(TUNE_POINTS))
    best = dict(config=json.loads(scored[0][1]), geomean_time_vs_default=scored[0][0],
                top10=[dict(config=json.loads(c), geomean=g) for g, c in scored[:10]])
    return rows, best


def run_gather(hbm: float) -> list[dict]:
    """Offload path: gather n random pinned host pages (one layer, K and V) into GPU slots."""
    if DEV.type != "cuda":
        return []
    src_k = torch.randn(8192, HKV, PAGE, D, dtype=DTYPE).pin_memory()
    src_v = torch.randn(8192, HKV, PAGE, D, dtype=DTYPE).pin_memory()
    dst_k = torch.empty(4096, HKV, PAGE, D, dtype=DTYPE, device=DEV)
    dst_v = torch.empty_like(dst_k)
    rows = []
    for n in (64, 512, 4096):
        s = torch.randperm(8192)[:n]
        d = torch.randperm(4096)[:n]
        s_dev, d_dev = s.to(DEV), d.to(DEV)
        nbytes = 2 * n * HKV * PAGE * D * ELEM
        ms = bench(lambda: launch_gather_pages(src_k, src_v, s_dev, dst_k, dst_v, d_dev))

        def staged():                     # peer: gather on the host into pinned memory, then copy
            dst_k[d_dev] = src_k[s].pin_memory().to(DEV, non_blocking=True)
            dst_v[d_dev] = src_v[s].pin_memory().to(DEV, non_blocking=True)
        ms_staged = bench(staged, rep=50)
        assert torch.equal(dst_k[d_dev].cpu(), src_k[s]) and torch.equal(dst_v[d_dev].cpu(), src_v[s])
        rows.append(dict(pages=n, bytes=nbytes, ms=ms, gbps=nbytes / ms / 1e6,
                         ms_staged_torch=ms_staged, gbps_staged_torch=nbytes / ms_staged / 1e6))
    return rows


def run_table(contexts, batches, budgets, indexers, config: LaunchConfig, hbm: float):
    rows, checks = [], []
    for ctx, batch in itertools.product(contexts, batches):
        st = Setup(ctx, batch)
        ms_sdpa = bench_gpu(st.sdpa)
        ms_sdpa_eager = bench(st.sdpa)
        sdpa_bytes = 2 * st.k_flat.numel() * ELEM + st.q.numel() * ELEM * 2
        sel_all = all_pages_sel(st.seq_lens, HKV, st.pages, PAGE)
        ms_dense = bench_gpu(lambda: st.sparse(sel_all, config))
        dense_bytes, _ = st.sparse_bytes(sel_all)
        if batch == batches[0]:
            o, _ = st.sparse(sel_all, config)
            ref = st.sdpa().reshape(batch, HQ, D).float()
            err = ((o - ref).norm() / ref.norm()).item()
            checks.append(dict(ctx=ctx, batch=batch, dense_vs_sdpa_rel_err=err))
            print(f"check ctx={ctx} B={batch}: our dense vs SDPA rel err {err:.2e}")
        for frac in budgets:
            budget = max(SINK + RECENT, round(frac * st.pages))
            args = (st.summaries, st.page_table, st.seq_lens, budget, SINK, RECENT)
            sels = {f: fn(st.q, *args) for f, (fn, _) in indexers.items()}
            if frac == budgets[0]:
                for f, fallback in (("quest", torch_quest_indexer), ("centroid", torch_centroid_indexer)):
                    same = torch.equal(sels[f].sort(-1).values, fallback(st.q, *args).sort(-1).values)
                    checks.append(dict(ctx=ctx, batch=batch, budget=frac, flow=f,
                                       indexer_equals_torch_topk=same))
            sel = sels["quest"]
            must, extra = st.sparse_bytes(sel, config)
            ms_sparse = bench_gpu(lambda: st.sparse(sel, config))
            row = dict(ctx=ctx, batch=batch, budget=frac, budget_pages=budget,
                       ms_sdpa=ms_sdpa, ms_sdpa_eager=ms_sdpa_eager,
                       sdpa_frac_hbm=sdpa_bytes / ms_sdpa / 1e6 / hbm,
                       ms_dense=ms_dense, dense_frac_hbm=dense_bytes / ms_dense / 1e6 / hbm,
                       ms_sparse=ms_sparse, ms_sparse_eager=bench(lambda: st.sparse(sel, config)),
                       host_us_sparse=host_us(lambda: st.sparse(sel, config)),
                       sparse_bytes=must, split_state_bytes=extra,
                       sparse_frac_hbm=must / ms_sparse / 1e6 / hbm,
                       ms_merge_only=st.merge_ms(sel, config))
            for f, (fn, _) in indexers.items():
                def step(fn=fn):
                    return st.sparse(fn(st.q, *args), config)
                ms_step = bench_gpu(step)
                row[f"ms_step_{f}"] = ms_step
                row[f"ms_step_{f}_eager"] = bench(step)
                row[f"ms_index_{f}"] = bench_gpu(lambda fn=fn: fn(st.q, *args))
                row[f"speedup_{f}"] = ms_sdpa / ms_step
                row[f"speedup_{f}_eager"] = ms_sdpa_eager / row[f"ms_step_{f}_eager"]
                row[f"step_{f}_frac_hbm"] = (must + st.index_bytes(f)) / ms_step / 1e6 / hbm
                row[f"step_{f}_speedup_bound"] = sdpa_bytes / (must + st.index_bytes(f))
            rows.append(row)
        del st
        torch.cuda.empty_cache() if DEV.type == "cuda" else None
    return rows, checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tune", action="store_true",
                    help="sweep TUNE_GRID at TUNE_POINTS first and use the best config for the table")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script runs")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_attention.json")
    args = ap.parse_args()
    global TUNE_POINTS, TUNE_GRID, bench_gpu
    contexts, batches = ((512,), (1, 2)) if args.smoke else ((32768, 131072), (1, 8, 32))
    budgets = (0.01, 0.02, 0.05, 0.10)
    if args.smoke:
        TUNE_POINTS, TUNE_GRID = [(512, 2, 0.1)], TUNE_GRID[:2]
        if DEV.type != "cuda":
            bench_gpu = bench  # noqa: F811  (no graphs without CUDA: wall-clock of one run)

    hbm = hbm_copy_bandwidth()
    indexers = find_indexers()
    info = dict(device=torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "cpu (interpreter)",
                date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__, hbm_copy_gbps=hbm, default_config=DEFAULT_CONFIG.__dict__,
                indexers={f: src for f, (_, src) in indexers.items()})
    info["launch_floor_us"] = launch_floor_ms() * 1e3
    print(f"{info['device']}: HBM copy {hbm:.0f} GB/s; one trivial launch {info['launch_floor_us']:.1f} us "
          f"GPU time; indexers {info['indexers']}")
    config, tune_rows, best = DEFAULT_CONFIG, [], None
    if args.tune:
        tune_rows, best = run_tune(hbm, indexers)
        config = LaunchConfig(**best["config"])
    info["table_config"] = config.__dict__
    rows, checks = run_table(contexts, batches, budgets, indexers, config, hbm)
    gather_rows = run_gather(hbm)
    out = dict(info=info, rows=rows, checks=checks, tune=tune_rows, tune_best=best, gather=gather_rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_attention.json"), "w") as fh:
        json.dump(out, fh, indent=1)

    if best:
        print("\nTuning: geomean GPU time vs default over TUNE_POINTS, best 10:")
        for t in best["top10"]:
            print(f"  {t['geomean']:.3f}  {t['config']}")
    print("\nChecks:", json.dumps(checks))
    if gather_rows:
        print("\nOffload gather (pinned host -> GPU slots, one layer K+V, 32 KiB per page), do_bench:")
        print("| pages | MB | gather_pages us | GB/s | torch host-gather+copy us | GB/s |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in gather_rows:
            print(f"| {r['pages']} | {r['bytes'] / 1e6:.1f} | {r['ms'] * 1e3:.0f} | {r['gbps']:.1f} "
                  f"| {r['ms_staged_torch'] * 1e3:.0f} | {r['gbps_staged_torch']:.1f} |")
    print("\nEager (do_bench medians, host launch included) and host launch cost:")
    print("| ctx | B | budget | SDPA us | sparse us | sparse host us/call | quest step us | x SDPA "
          "| centroid step us | x SDPA |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ctx'] // 1024}K | {r['batch']} | {r['budget']:.0%} | {r['ms_sdpa_eager'] * 1e3:.0f} "
              f"| {r['ms_sparse_eager'] * 1e3:.1f} | {r['host_us_sparse']:.0f} "
              f"| {r['ms_step_quest_eager'] * 1e3:.1f} | {r['speedup_quest_eager']:.1f} "
              f"| {r['ms_step_centroid_eager'] * 1e3:.1f} | {r['speedup_centroid_eager']:.1f} |")
    print(f"\n{info['device']}, {info['date']}, HBM copy {hbm:.0f} GB/s, config {config.__dict__}; "
          f"GPU time from CUDA-graph replays, L2 flushed before each call; step = indexer + sparse "
          f"attention; indexers: {info['indexers']}")
    print("| ctx | B | budget | pages | SDPA us | SDPA %HBM | dense(ours) us | dense %HBM | sparse us "
          "| sparse %HBM | of it: merge us | quest step us | x SDPA (bound) | centroid step us "
          "| x SDPA (bound) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ctx'] // 1024}K | {r['batch']} | {r['budget']:.0%} | {r['budget_pages']} "
              f"| {r['ms_sdpa'] * 1e3:.0f} | {r['sdpa_frac_hbm']:.0%} | {r['ms_dense'] * 1e3:.0f} "
              f"| {r['dense_frac_hbm']:.0%} | {r['ms_sparse'] * 1e3:.1f} | {r['sparse_frac_hbm']:.0%} "
              f"| {r['ms_merge_only'] * 1e3:.1f} "
              f"| {r['ms_step_quest'] * 1e3:.1f} | {r['speedup_quest']:.1f} ({r['step_quest_speedup_bound']:.0f}) "
              f"| {r['ms_step_centroid'] * 1e3:.1f} | {r['speedup_centroid']:.1f} "
              f"({r['step_centroid_speedup_bound']:.0f}) |")


if __name__ == "__main__":
    main()
