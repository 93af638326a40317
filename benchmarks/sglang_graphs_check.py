"""Question: with SGLang's decode CUDA graphs on, does `vortex_hybrid` give SGLang's `triton` tokens
while the batch shrinks through padded graph buckets?

One `sgl.Engine` per run on a random Llama-shaped model (benchmarks/sglang_e2e.py's): --batch
prompts of different lengths, each with its own number of new tokens (so the decode batch shrinks
one request at a time and most of its sizes are padded up to SGLang's next captured bucket), greedy,
radix cache off. Runs: SGLang's `triton` backend (its graphs on), then `vortex_hybrid` in each
placement at full budget with SGLang's decode graphs on (prefill graphs off). Every run's tokens must equal triton's, request for request; a sparse run
(`PLACEMENT` without `@full`, --budget of the pages) must finish. Prints one line per run, writes
sglang_graphs_check.json under --out, exits 1 on any failure. CUDA only.

    python benchmarks/sglang_graphs_check.py --out results
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

RUNS = "gpu@full,hybrid@full,offload@full,cpu@full,dense@full,gpu,hybrid"
P = 16


def run_engine(run: str, model: Path, prompts: list, news: list, args) -> list:
    """Each request's greedy tokens from one engine."""
    import sglang as sgl

    from vortex_hybrid.integrations.sglang.shutdown import shut_down
    kw = dict(model_path=str(model), sampling_backend="pytorch", skip_tokenizer_init=True,
              random_seed=0, page_size=P, disable_radix_cache=True, dtype="bfloat16",
              max_running_requests=args.batch, mem_fraction_static=0.3, log_level="warning")
    if run == "triton":
        kw["attention_backend"] = "triton"
    else:
        placement, _, full = run.partition("@")
        cfg = {"placement": placement, "page_size": P, "flow": "quest", "gpu_cache_pages": 64,
               "budget_ratio": 1.0 if full == "full" else args.budget}
        kw.update(attention_backend="vortex_hybrid", vortex_hybrid_config=json.dumps(cfg),
                  disable_prefill_cuda_graph=True)
    llm = sgl.Engine(**kw)
    try:
        params = [{"temperature": 0, "ignore_eos": True, "max_new_tokens": n} for n in news]
        return [o["output_ids"] for o in llm.generate(input_ids=prompts, sampling_params=params)]
    finally:
        shut_down(llm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results", help="folder for sglang_graphs_check.json")
    ap.add_argument("--batch", type=int, default=7, help="requests (the decode batch shrinks "
                                                         "from this to 1)")
    ap.add_argument("--context", type=int, default=1500, help="longest prompt, tokens")
    ap.add_argument("--new", type=int, default=24, help="new tokens of the longest-running request")
    ap.add_argument("--layers", type=int, default=2, help="layers of the written model")
    ap.add_argument("--budget", type=float, default=0.05, help="sparse runs: share of pages")
    ap.add_argument("--runs", default=RUNS,
                    help=f"comma-separated vortex_hybrid runs, PLACEMENT[@full] (default {RUNS})")
    args = ap.parse_args()

    import torch
    if not torch.cuda.is_available():
        raise SystemExit("sglang_graphs_check: needs CUDA (SGLang's CUDA graphs)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sglang_e2e import write_model
    model = write_model(Path(tempfile.mkdtemp(prefix="sglang_graphs_model_")), args.layers,
                        "bfloat16", args.context + args.new)
    rng = random.Random(0)
    lens = [max(8, args.context * (i + 1) // args.batch) for i in range(args.batch)]
    prompts = [[256] + [rng.randrange(256) for _ in range(n - 1)] for n in lens]
    news = [max(2, args.new - 3 * i) for i in range(args.batch)]     # finish one by one
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "args": vars(args), "runs": {}}
    failed = []
    want = None
    for run in ["triton"] + [r.strip() for r in args.runs.split(",") if r.strip()]:
        try:
            got = run_engine(run, model, prompts, news, args)
        except Exception as exc:                      # the other runs still answer
            result["runs"][run] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(run)
            print(f"{run}: error {exc}", flush=True)
            continue
        if run == "triton":
            want = got
        same = None if want is None else sum(a == b for a, b in zip(got, want))
        ok = want is not None and (not run.endswith("@full") or same == len(want))
        result["runs"][run] = {"same_as_triton": same, "output_ids": got}
        if not ok:
            failed.append(run)
        print(f"{run}: {same}/{len(prompts)} requests give triton's tokens"
              f"{'' if ok else '  FAILED'}", flush=True)
        (out / "sglang_graphs_check.json").write_text(json.dumps(result, indent=1))
    if failed:
        raise SystemExit(f"sglang_graphs_check: failed: {failed}")
    print("sglang_graphs_check: every run finished; every @full run gave triton's tokens")


if __name__ == "__main__":
    main()
