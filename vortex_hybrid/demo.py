"""Built-in demo: decode steps of the `HybridAttention` runtime in all five placements.

    python -m vortex_hybrid.demo [--batch 2 --context 4096 --layers 2 ...]

Builds one runtime per placement (`dense`, `gpu`, `cpu`, `offload`, `hybrid`) over the same
synthetic KV (random keys and values; host placements keep full pages in host memory, with a GPU
page cache of --cache of the KV for `offload` and `hybrid`), runs one warm-up step and --repeats
timed decode steps (plan once, then every layer in order), and reports per placement: ms per step
(median), where pages were attended (page-heads on the GPU side and on the CPU), pages fetched,
and the relative error of the last step's output against a float64 reference over the pages the
flow selects (all pages for `dense`). Without CUDA the GPU side is the torch reference on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

from . import reference, vflow
from .config import HybridConfig
from .runtime import HybridAttention
from .runtime.hybrid_attention import HOST_PLACEMENTS

PLACEMENTS = ("dense", "gpu", "cpu", "offload", "hybrid")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vortex_hybrid.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2, help="requests in the batch (default 2)")
    p.add_argument("--context", type=int, default=4096, help="prefill tokens per request (4096)")
    p.add_argument("--layers", type=int, default=2, help="layers (default 2)")
    p.add_argument("--q-heads", type=int, default=32, help="query heads (default 32)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--config", default=None,
                   help="HybridConfig JSON file or text (page size, flow, budget, sink, recent, "
                        "dtype); default: HybridConfig() (quest, 2%% of the pages)")
    p.add_argument("--flow", default=None,
                   help="flow overriding the config's: a registered name (quest, centroid, "
                        "streaming, oracle, double_sparsity) or path/to/file.py:name")
    p.add_argument("--cache", type=float, default=0.1,
                   help="GPU page cache of offload / hybrid, as a fraction of the KV (default 0.1)")
    p.add_argument("--placements", default=",".join(PLACEMENTS),
                   help=f"comma list, a subset of {','.join(PLACEMENTS)} (default all)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed decode steps after one warm-up step, median kept (default 3, >= 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p


def check_args(args: argparse.Namespace) -> tuple[HybridConfig, list[str]]:
    """The demo's config and placements, after checking every option (ValueError naming it)."""
    for name in ("batch", "context", "layers", "q_heads", "kv_heads", "head_dim", "repeats"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be a positive integer")
    if args.q_heads % args.kv_heads:
        raise ValueError(f"--q-heads={args.q_heads} must be a multiple of --kv-heads={args.kv_heads}")
    if not 0.0 < args.cache <= 1.0:
        raise ValueError(f"--cache={args.cache} must lie in (0, 1]")
    placements = [p.strip() for p in args.placements.split(",") if p.strip()]
    bad = [p for p in placements if p not in PLACEMENTS]
    if bad or not placements:
        raise ValueError(f"--placements={args.placements!r}: allowed are {','.join(PLACEMENTS)}")
    cfg = HybridConfig.from_json(args.config) if args.config else HybridConfig()
    if args.flow is not None:
        cfg = dataclasses.replace(cfg, flow=args.flow)
    return cfg, placements


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reference(cfg: HybridConfig, placement: str, q: torch.Tensor, kp: torch.Tensor,
               vp: torch.Tensor, seq_len: int) -> torch.Tensor:
    """float64 attention of q [1, Hq, D] over the pages the flow selects from one request's pages
    kp, vp [n, Hkv, P, D] holding seq_len tokens."""
    n, hkv, P, _ = kp.shape
    table = torch.arange(n, dtype=torch.int32)[None]
    lens = torch.tensor([seq_len], dtype=torch.int32)
    if placement == "dense":
        sel = reference.all_pages_sel(lens, hkv, n, P)
    else:
        flow = vflow.load_flow(cfg.flow, **dict(cfg.extra))
        sel = vflow.select_pages(flow, q.float(), kp.float(), table, lens, cfg.budget_for(n),
                                 cfg.sink_pages, cfg.recent_pages)
    o, _ = reference.sparse_decode_attention(q.double(), kp.double(), vp.double(), table, lens,
                                             sel)
    return o[0]


def run_placement(cfg: HybridConfig, placement: str, args, kv_data, steps_data) -> dict:
    P, B = cfg.page_size, args.batch
    pages = -(-(args.context + args.repeats + 2) // P) + 1
    total = B * pages
    host = placement in HOST_PLACEMENTS
    slots = max(1, int(args.cache * total)) if placement in ("offload", "hybrid") else 0
    cfg = dataclasses.replace(cfg, placement=placement,
                              gpu_cache_pages=slots if host else None)
    attn = HybridAttention(cfg, args.layers, args.q_heads, args.kv_heads, args.head_dim,
                           device_pages=slots + 2 * B + 64 if host else total,
                           host_pages=total if host else 0)
    try:
        dev = attn.device
        rids = [attn.add_request(k, v) for k, v in kv_data]
        times, last = [], None
        for step, per_layer in enumerate(steps_data):
            _sync()
            t0 = time.perf_counter()
            attn.plan(rids)
            outs = [attn.run(layer, q.to(dev), kn.to(dev), vn.to(dev))
                    for layer, (q, kn, vn) in enumerate(per_layer)]
            _sync()
            if step:                                     # step 0 warms up (compilation, caches)
                times.append(time.perf_counter() - t0)
            last = (outs, attn.stats()["last_step"])
        outs, stats = last
        err = 0.0
        for layer, (q, kn, vn) in enumerate(steps_data[-1]):      # the reference over the KV
            for b, rid in enumerate(rids):
                kp, vp = attn.kv.read_pages(rid, layer)
                want = _reference(cfg, placement, q[b:b + 1], kp, vp, attn.kv.seq_len(rid))
                got = outs[layer][b].double().cpu()
                err = max(err, float((got - want).norm() / want.norm().clamp_min(1e-300)))
        return dict(placement=placement, ms=statistics.median(times) * 1e3,
                    gpu=stats["gpu_pages"], cpu=stats["cpu_pages"],
                    fetched=stats["fetched_pages"], rel_err=err, device=str(dev))
    finally:
        attn.close()


def run_demo(args: argparse.Namespace) -> list[dict]:
    cfg, placements = check_args(args)
    gen = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, cfg.kv_dtype)
    shape = (args.layers, args.context, args.kv_heads, args.head_dim)
    kv_data = [(torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
               for _ in range(args.batch)]
    steps_data = [[tuple(torch.randn(args.batch, h, args.head_dim, generator=gen).to(dtype)
                         for h in (args.q_heads, args.kv_heads, args.kv_heads))
                   for _ in range(args.layers)] for _ in range(args.repeats + 1)]
    rows = [run_placement(cfg, p, args, kv_data, steps_data) for p in placements]
    flow = cfg.flow
    n = -(-args.context // cfg.page_size)
    print(f"vortex-hybrid demo: batch {args.batch} x {args.context} tokens, {args.layers} layers, "
          f"{args.q_heads}/{args.kv_heads} heads, D={args.head_dim}, page {cfg.page_size}, "
          f"{cfg.kv_dtype}, flow {flow}, budget {cfg.budget_for(n)} of {n} pages, GPU cache "
          f"{args.cache:.0%} of the KV (offload, hybrid), device={rows[0]['device']}")
    print(f"{'placement':<10} {'ms/step':>9} {'GPU p-h':>9} {'CPU p-h':>9} {'fetched':>8} "
          f"{'rel err':>9}")
    for r in rows:
        print(f"{r['placement']:<10} {r['ms']:>9.2f} {r['gpu']:>9} {r['cpu']:>9} {r['fetched']:>8} "
              f"{r['rel_err']:>9.1e}")
    print("(page-heads attended on the GPU side / CPU and pages fetched: the last step, all "
          "layers; rel err: the last step vs a float64 reference over the flow's pages, outputs "
          f"in {cfg.kv_dtype})")
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
