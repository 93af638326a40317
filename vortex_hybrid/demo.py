"""Built-in demo: one sparse decode step over synthetic KV in every placement this machine can run.

    python -m vortex_hybrid.demo [--batch 2 --context 8192 ...]

Builds a paged KV cache with random keys and values, offloads part of each request's full pages to
the host pool, selects pages with the configured flow (`vflow.select_pages(cfg.flow, ...)`), and
runs the step:
  - `hybrid`: pages resident on the device are attended by the device backend, host-only pages by the
    host backend, and the two states are merged;
  - `gpu-fetch`: host-only selected pages are first loaded into device slots, then everything is
    attended on the device (the PCIe path the hybrid placement avoids).
Each row reports time and the relative error against a float64 reference over the same pages.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from . import reference, vflow
from .backends import available_backends
from .config import HybridConfig
from .kv import NOT_RESIDENT, PagedKVCache


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vortex_hybrid.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2, help="requests in the batch (default 2)")
    p.add_argument("--context", type=int, default=4096, help="tokens per request (default 4096)")
    p.add_argument("--q-heads", type=int, default=32, help="query heads (default 32)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--config", default=None,
                   help="HybridConfig JSON file or text (page size, flow, budget, sink, recent, "
                        "dtype); default: HybridConfig() (quest, 2%% of the pages)")
    p.add_argument("--flow", default=None,
                   help="flow overriding the config's: a registered name (quest, centroid, "
                        "streaming, oracle, double_sparsity) or path/to/file.py:name")
    p.add_argument("--offload-fraction", type=float, default=0.5,
                   help="fraction of each request's full pages moved to host memory (default 0.5)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed repetitions after one warm-up call, median kept (default 3, >= 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p


def _timed(fn, repeats: int):
    """(output, median ms over `repeats` calls); one untimed warm-up call first (compilation)."""
    out, times = fn(), []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2] * 1e3


def _rel_err(o: torch.Tensor, ref: torch.Tensor) -> float:
    o, ref = o.double().cpu(), ref.double().cpu()
    return float((o - ref).norm() / ref.norm().clamp_min(1e-300))


def check_args(args: argparse.Namespace) -> HybridConfig:
    """The demo's config, after checking every option (ValueError naming the bad one)."""
    for name in ("batch", "context", "q_heads", "kv_heads", "head_dim", "repeats"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be a positive integer")
    if args.q_heads % args.kv_heads:
        raise ValueError(f"--q-heads={args.q_heads} must be a multiple of --kv-heads={args.kv_heads}")
    if not 0.0 <= args.offload_fraction <= 1.0:
        raise ValueError(f"--offload-fraction={args.offload_fraction} must lie in [0, 1]")
    cfg = HybridConfig.from_json(args.config) if args.config else HybridConfig()
    if args.flow is not None:
        cfg = dataclasses.replace(cfg, flow=args.flow)
    return cfg


def run_demo(args: argparse.Namespace) -> list[dict]:
    cfg = check_args(args)
    torch.manual_seed(args.seed)
    pages_per_req = -(-args.context // cfg.page_size)
    total = args.batch * pages_per_req
    kv = PagedKVCache(1, args.kv_heads, args.head_dim, cfg.page_size, device_pages=total,
                      host_pages=total, dtype=getattr(torch, cfg.kv_dtype))
    rids = []
    for _ in range(args.batch):
        rid = kv.create_request()
        shape = (1, args.context, args.kv_heads, args.head_dim)
        kv.append(rid, torch.randn(shape), torch.randn(shape))
        full = kv.num_full_pages(rid)
        kv.offload(rid, torch.randperm(full)[:int(args.offload_fraction * full)].tolist())
        rids.append(rid)
    q = torch.randn(args.batch, args.q_heads, args.head_dim)

    num_pages = torch.tensor([kv.num_pages(r) for r in rids], dtype=torch.int32)
    budget = cfg.budget_for(int(num_pages.max()))

    # One pool holding every page (device copy where there is one), for selection and ground truth.
    dev_table, lens = kv.page_table(rids, "device")
    host_table, _ = kv.page_table(rids, "host")
    on_dev = dev_table.cpu().long() != NOT_RESIDENT
    k_all = torch.cat([kv.device_pool.k[0].cpu(), kv.host_pool.k[0]])
    v_all = torch.cat([kv.device_pool.v[0].cpu(), kv.host_pool.v[0]])
    all_table = torch.where(on_dev, dev_table.cpu(), host_table + kv.device_pool.num_pages).int()
    flow = vflow.load_flow(cfg.flow, **cfg.extra)
    sel = vflow.select_pages(flow, q, k_all.float(), all_table, lens.cpu(), budget,
                             cfg.sink_pages, cfg.recent_pages)
    o_ref, _ = reference.sparse_decode_attention(q.double(), k_all.double(), v_all.double(),
                                                 all_table, lens.cpu(), sel)

    backends = available_backends()
    dev_name = "gpu" if "gpu" in backends else "reference"
    host_name = "cpu" if "cpu" in backends else "reference"
    dev_mod, host_mod = backends[dev_name], backends[host_name]
    qd, sel_d = q.to(kv.device), sel.to(kv.device)
    rows = []

    # hybrid: split the selection by residency, attend each part where its bytes are, merge.
    b_idx = torch.arange(args.batch)[:, None, None].expand_as(sel)
    resident = torch.where(sel >= 0, on_dev[b_idx, sel.clamp_min(0).long()], torch.zeros_like(sel, dtype=torch.bool))
    sel_dev = torch.where(resident, sel, -1).to(kv.device)
    sel_host = torch.where(~resident & (sel >= 0), sel, -1)

    def hybrid():
        o_d, l_d = dev_mod.sparse_decode_attention(qd, kv.device_pool.k[0], kv.device_pool.v[0],
                                                   dev_table, lens, sel_dev)
        o_h, l_h = host_mod.sparse_decode_attention(q, kv.host_pool.k[0], kv.host_pool.v[0],
                                                    host_table, lens.cpu(), sel_host)
        return dev_mod.merge_states(o_d, l_d, o_h.to(kv.device), l_h.to(kv.device))[0]

    o, ms = _timed(hybrid, args.repeats)
    rows.append(dict(placement="hybrid", device_backend=dev_name, host_backend=host_name, ms=ms,
                     rel_err=_rel_err(o, o_ref)))

    # gpu-fetch: load the host-only selected pages into device slots, attend there, evict again.
    fetch = {rid: sorted({int(p) for p in sel_host[b].flatten().tolist() if p >= 0})
             for b, rid in enumerate(rids)}

    def gpu_fetch():
        for rid, pages in fetch.items():
            kv.load(rid, pages)
        table, _ = kv.page_table(rids, "device")
        out = dev_mod.sparse_decode_attention(qd, kv.device_pool.k[0], kv.device_pool.v[0], table,
                                              lens, sel_d)[0]
        for rid, pages in fetch.items():
            kv.evict(rid, pages)
        return out

    o, ms = _timed(gpu_fetch, args.repeats)
    rows.append(dict(placement="gpu-fetch", device_backend=dev_name, host_backend="-", ms=ms,
                     rel_err=_rel_err(o, o_ref)))
    attended = int((sel >= 0).sum()) // (args.batch * args.kv_heads)
    print(f"vortex-hybrid demo: batch {args.batch}, context {args.context}, {args.q_heads}/"
          f"{args.kv_heads} heads, D={args.head_dim}, page {cfg.page_size}, {cfg.kv_dtype}, flow "
          f"{flow.name or type(flow).__name__}, budget {budget} of {pages_per_req} pages (~{attended}/head), "
          f"{args.offload_fraction:.0%} of full pages on the host, device={kv.device}")
    print(f"{'placement':<11} {'device side':<11} {'host side':<10} {'ms':>9} {'rel err':>9}")
    for r in rows:
        print(f"{r['placement']:<11} {r['device_backend']:<11} {r['host_backend']:<10} "
              f"{r['ms']:>9.2f} {r['rel_err']:>9.1e}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_demo(args)
    except ValueError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
