"""Question: do the head predictor's online statistics cost under 1 ms per step for every head of
an 8B model on the GPU?

Per decode step and layer the predictor's features are `score_statistics` over the flow's page
scores (the indexer computes them anyway) and `selection_reuse` between this step's selection and
the last one. This times both for all 32 layers of a Llama-3-8B shape (8 KV heads), page 16, at
several batches and contexts, with CUDA events around a whole step's 32 layers (eager launches
included), median of 20 steps; and checks reuse against a set-based count.

    python benchmarks/head_features.py --out results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from vortex_hybrid.predictors.head_properties import score_statistics, selection_reuse

LAYERS, HKV, PAGE = 32, 8, 16


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        for T in [int(t) for t in args.contexts.split(",")]:
            S = T // PAGE
            K = max(3, int(args.budget * S))
            scores = [torch.randn(B, HKV, S, device=dev, generator=gen) for _ in range(LAYERS)]
            n = torch.full((B,), S, dtype=torch.int32, device=dev)
            sels = [torch.topk(s, K, -1).indices.int() for s in scores]
            prevs = [torch.topk(s + 0.3 * torch.randn_like(s), K, -1).indices.int() for s in scores]
            ref = len(set(prevs[0][0, 0].tolist()) & set(sels[0][0, 0].tolist())) / K
            got = float(selection_reuse(prevs[0], sels[0], S)[0, 0])
            assert abs(got - ref) < 1e-6, (got, ref)
            times = []
            for step in range(args.steps + 3):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for layer in range(LAYERS):
                    score_statistics(scores[layer], n, 1, 2)
                    selection_reuse(prevs[layer], sels[layer], S)
                e1.record()
                e1.synchronize()
                if step >= 3:
                    times.append(e0.elapsed_time(e1))
            ms = statistics.median(times)
            rows.append(dict(batch=B, context=T, pages=S, budget_pages=K, ms_per_step=ms,
                             us_per_layer=1000 * ms / LAYERS, under_1ms=ms < 1.0))
            print(f"B={B:3d} context={T:7d}: {ms:.3f} ms per step ({1000 * ms / LAYERS:.1f} us "
                  f"per layer) {'<' if ms < 1 else '>='} 1 ms", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "head_features.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
