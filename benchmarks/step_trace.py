"""Question: how does one decode step of the `hybrid` placement flow between the host thread, the CPU
worker and the GPU? Records a real step with `StepTrace` and draws its timeline.

Llama-3-8B attention shapes (32 q / 8 KV heads, D=128, bf16, page 16), --layers distinct layers,
--batch requests of --context tokens, quest at --budget of the pages, a GPU cache of --cache of the
KV. Warm-up steps fill the cache; the traced step is the one after. Writes
step_trace_<placement>.json (spans and stats) under --out and, where matplotlib imports, a PNG of
the same name (one row per lane, layers in alternating shades); prints how long the GPU was busy
(the union of its spans) against the step's wall time. `--render FILE.json` draws a PNG from a JSON written elsewhere (the GPU
machine has no matplotlib).

    python benchmarks/step_trace.py --out results                    # GPU machine
    python benchmarks/step_trace.py --render results/step_trace.json  # here, after fetching it
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import torch

from vortex_hybrid import HybridAttention, HybridConfig
from vortex_hybrid.runtime.hybrid_attention import HOST_PLACEMENTS
from vortex_hybrid.runtime.step_trace import StepTrace

HQ, HKV, D, P = 32, 8, 128, 16
LANES = ("host", "gpu", "cpu")


def record(args) -> dict:
    pages = args.context // P
    slots = max(1, int(args.cache * args.batch * pages))
    cfg = HybridConfig(page_size=P, flow="quest", budget_ratio=args.budget, placement=args.placement,
                       gpu_cache_pages=slots, kv_dtype="bfloat16")
    host = args.placement in HOST_PLACEMENTS
    attn = HybridAttention(cfg, args.layers, HQ, HKV, D,
                           device_pages=slots + 4 * args.batch + 64 if host else
                           args.batch * (pages + 4),
                           host_pages=args.batch * (pages + 4) if host else 0)
    dev = attn.device
    gen = torch.Generator(device=dev).manual_seed(0)
    rids = []
    for _ in range(args.batch):
        k = torch.randn(args.layers, args.context, HKV, D, generator=gen, device=dev,
                        dtype=torch.bfloat16)
        rids.append(attn.add_request(k, k))

    def step():
        attn.plan(rids)
        for layer in range(args.layers):
            q, kn, vn = (torch.randn(args.batch, h, D, generator=gen, device=dev,
                                     dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
            attn.run(layer, q, kn, vn)

    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    attn.trace = StepTrace(dev)
    t0 = time.perf_counter()
    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    spans = attn.trace.spans()
    attn.trace = None
    attn.close()
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d"), "placement": args.placement, "batch": args.batch,
            "context": args.context, "layers": args.layers, "budget": args.budget,
            "cache": args.cache, "step_ms": wall, "stats": attn.stats()["last_step"],
            "spans": spans}


def gpu_busy_ms(spans: list[dict]) -> float:
    """Length of the union of the GPU lane's spans (kernels of overlapping spans counted once)."""
    total, end = 0.0, float("-inf")
    for s in sorted((s for s in spans if s["lane"] == "gpu"), key=lambda s: s["start_ms"]):
        start = max(s["start_ms"], end)
        if s["end_ms"] > start:
            total += s["end_ms"] - start
        end = max(end, s["end_ms"])
    return total


def render(data: dict, path: str) -> bool:
    if importlib.util.find_spec("matplotlib") is None:
        print("note: matplotlib is not installed here: no PNG (render the JSON elsewhere)")
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12, 2.6))
    colors = {"host": ("#4c72b0", "#8fa8d6"), "gpu": ("#55a868", "#a3d4b1"),
              "cpu": ("#c44e52", "#e8a0a2")}
    for s in data["spans"]:
        if s["name"] == "run()":
            continue
        y = LANES.index(s["lane"])
        ax.barh(y, s["end_ms"] - s["start_ms"], left=s["start_ms"], height=0.6,
                color=colors[s["lane"]][s["layer"] % 2], edgecolor="none")
    for s in data["spans"]:
        if s["name"] == "run()":
            ax.axvline(s["start_ms"], color="#999999", lw=0.5, ls=":")
    ax.set_yticks(range(len(LANES)), ["host thread", "GPU stream", "CPU worker"])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step's trace started (dotted: each layer's run() call)")
    ax.set_title(f"{data['placement']} step, {data['device']}: batch {data['batch']} x "
                 f"{data['context'] // 1024}K, {data['layers']} layers, budget "
                 f"{data['budget']:.0%}, cache {data['cache']:.0%} of the KV, "
                 f"{data['step_ms']:.1f} ms", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--placement", default="hybrid", help="placement to trace (default hybrid)")
    ap.add_argument("--batch", type=int, default=4, help="requests (default 4)")
    ap.add_argument("--context", type=int, default=65536, help="tokens per request (default 64K)")
    ap.add_argument("--layers", type=int, default=4, help="layers (default 4)")
    ap.add_argument("--budget", type=float, default=0.05, help="budget ratio (default 0.05)")
    ap.add_argument("--cache", type=float, default=0.1, help="GPU cache share of the KV (0.1)")
    ap.add_argument("--warmup", type=int, default=3, help="untraced steps first (default 3)")
    ap.add_argument("--out", default="results", help="folder for step_trace.json / .png")
    ap.add_argument("--render", default=None, help="draw a PNG from this JSON and exit")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as fh:
            render(json.load(fh), os.path.splitext(args.render)[0] + ".png")
        return
    if args.batch < 1 or args.context < 4 * P or args.layers < 1 or not 0 < args.budget <= 1:
        ap.error("--batch >= 1, --context >= 64, --layers >= 1, --budget in (0, 1]")
    data = record(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"step_trace_{args.placement}.json")
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
    print(f"wrote {path}: {len(data['spans'])} spans, step {data['step_ms']:.1f} ms")
    per = {}
    for s in data["spans"]:
        per.setdefault((s["lane"], s["name"]), []).append(s["end_ms"] - s["start_ms"])
    print(f"{'lane':6s} {'span':36s} {'n':>3s} {'mean ms':>9s} {'total ms':>9s}")
    for (lane, name), v in sorted(per.items()):
        print(f"{lane:6s} {name:36s} {len(v):3d} {sum(v) / len(v):9.3f} {sum(v):9.3f}")
    print("stats:", json.dumps(data["stats"]))
    busy = gpu_busy_ms(data["spans"])
    print(f"GPU busy {busy:.2f} ms of the {data['step_ms']:.2f} ms step ({busy / data['step_ms']:.0%}); "
          f"step / GPU busy = {data['step_ms'] / max(busy, 1e-9):.2f}x")
    render(data, os.path.join(args.out, f"step_trace_{args.placement}.png"))


if __name__ == "__main__":
    main()
