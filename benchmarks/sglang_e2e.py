"""Question: inside a real SGLang engine, what do the hybrid backend's placements cost or gain
against SGLang's own dense `triton` backend, and do they produce the same greedy output?

Starts one `sgl.Engine` per run on the same Llama-shaped model and the same long-context batch
(--batch random prompts of --context tokens, --new greedy tokens each, radix cache off so every run
prefills the whole batch): SGLang's `triton` backend (CUDA graphs on, its normal mode) and
`vortex_hybrid` in each placement (SGLang's decode CUDA graphs on over the backend's graph hooks,
prefill graphs off; with --no-sglang-graphs, SGLang's CUDA graphs off and the runtime capturing
its own per-layer graphs). A run is `triton`, or `PLACEMENT` (sparse, --budget of the pages, quest) or
`PLACEMENT@full` (budget_ratio 1.0: every page, the output must equal triton's). Per run: decode
throughput and time per output token (TPOT, from timed generates of --new and of 2 x --new tokens,
the faster of two of each: prefill and the previous call's clean-up cancel),
engine start time, and agreement with triton (requests equal token for token, mean matching prefix).
Writes sglang_e2e.json under --out after every run (a timeout keeps what finished) and prints a
table last, ratios first.

    python benchmarks/sglang_e2e.py --out results                 # writes a random model to /tmp
    bash scripts/dev/gpu_machine_run.sh sglang_e2e                # the project's offline H100 machine

--model DIR uses an existing model (Llama-shaped, head_dim >= 64); without it a random one is written
(bf16, head_dim 64, --layers layers: no download needed). On a machine without
CUDA it runs on the CPU (float32, TRITON_INTERPRET=1 for the triton runs): a smoke test only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

RUNS = "triton,dense@full,hybrid@full,gpu,offload,cpu,hybrid"
P = 16


def write_model(out: Path, layers: int, dtype: str, context: int) -> Path:
    """A random Llama-shaped model (8 query / 2 KV heads of head_dim 64) and a byte-level
    tokenizer, offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=max(4096, 2 * context),
                      rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=256,
                      eos_token_id=257, pad_token_id=258, torch_dtype=dtype)
    LlamaForCausalLM(cfg).eval().to(getattr(torch, dtype)).save_pretrained(out)
    vocab = {bytes([i]).decode("latin-1"): i for i in range(256)}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out)
    return out


def hybrid_config(run: str, args) -> dict:
    placement, _, full = run.partition("@")
    pages = args.batch * -(-(args.context + args.new) // P)
    cfg = {"placement": placement, "page_size": P, "flow": "quest",
           "gpu_cache_pages": max(8, int(args.cache * pages))}
    cfg.update({"budget_ratio": 1.0} if full == "full" else {"budget_ratio": args.budget})
    return cfg


def run_engine(run: str, model: Path, prompts: list[list[int]], args, cuda: bool) -> dict:
    import sglang as sgl

    from vortex_hybrid.integrations.sglang.shutdown import shut_down
    kw = dict(model_path=str(model), sampling_backend="pytorch", skip_tokenizer_init=True,
              random_seed=0, page_size=P, disable_radix_cache=True,
              max_total_tokens=args.batch * (args.context + args.new) + 64 * P,
              max_running_requests=args.batch, chunked_prefill_size=args.chunk,
              dtype="bfloat16" if cuda else "float32", log_level="warning")
    if args.no_overlap:
        kw["disable_overlap_schedule"] = True
    if cuda:
        kw["mem_fraction_static"] = 0.3
    else:
        kw["device"] = "cpu"
    if run == "triton":
        kw["attention_backend"] = "triton"
        if cuda:
            kw["cuda_graph_max_bs_decode"] = args.batch
        else:
            kw["disable_cuda_graph"] = True
        cfg = None
    else:
        cfg = hybrid_config(run, args)
        kw.update(attention_backend="vortex_hybrid", vortex_hybrid_config=json.dumps(cfg))
        if cuda and args.sglang_graphs:
            kw.update(cuda_graph_max_bs_decode=args.batch, disable_prefill_cuda_graph=True)
        else:
            kw["disable_cuda_graph"] = True
    t0 = time.perf_counter()
    llm = sgl.Engine(**kw)
    start_s = time.perf_counter() - t0
    try:
        greedy = {"temperature": 0, "ignore_eos": True}
        llm.generate(input_ids=prompts, sampling_params={**greedy, "max_new_tokens": 4})
        # warm-up at the timed shapes: the first long prefill compiles kernels (triton's JIT)
        # TPOT from generates of --new and 2 x --new tokens: both pay the same prefill and the
        # same clean-up of the previous call's requests, which lands in the next call
        t_first = t_all = float("inf")
        for _ in range(2):              # the faster of two of each: a first call pays one-offs
            t0 = time.perf_counter()
            outs = llm.generate(input_ids=prompts, sampling_params={**greedy,
                                "max_new_tokens": args.new})
            t_first = min(t_first, time.perf_counter() - t0)
            t0 = time.perf_counter()
            llm.generate(input_ids=prompts, sampling_params={**greedy,
                         "max_new_tokens": 2 * args.new})
            t_all = min(t_all, time.perf_counter() - t0)
    finally:
        shut_down(llm)                           # so that the next run's engine can start
    decode_s = t_all - t_first                   # args.new more tokens per request
    r = {"run": run, "config": cfg, "engine_start_s": round(start_s, 2),
         "sglang_graphs": bool(cuda and (run == "triton" or args.sglang_graphs)),
         "generate_new_s": round(t_first, 4), "generate_2new_s": round(t_all, 4),
         "tpot_ms": None, "decode_tok_s": None, "output_ids": [o["output_ids"] for o in outs]}
    if decode_s <= 0:        # timing noise larger than the decode: the outputs still count
        r["timing"] = (f"{2 * args.new} tokens took {t_all:.3f} s, {args.new} tokens "
                       f"{t_first:.3f} s: no decode time to measure (raise --new)")
        print(f"warning: {run}: {r['timing']}", flush=True)
    else:
        r["tpot_ms"] = round(1e3 * decode_s / args.new, 3)
        r["decode_tok_s"] = round(args.batch * args.new / decode_s, 1)
    return r


def agreement(outs: list[list[int]], ref: list[list[int]]) -> tuple[int, float]:
    """(requests equal token for token, mean length of the matching prefix)."""
    same = sum(a == b for a, b in zip(outs, ref))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
              for a, b in zip(outs, ref)]
    return same, sum(prefix) / len(prefix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results", help="folder for sglang_e2e.json")
    ap.add_argument("--model", help="an existing Llama-shaped model folder (default: write one to "
                                    "a temporary folder)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the written model")
    ap.add_argument("--batch", type=int, default=4, help="requests in the batch")
    ap.add_argument("--context", type=int, default=8192, help="prompt tokens per request")
    ap.add_argument("--new", type=int, default=32, help="greedy tokens generated per request")
    ap.add_argument("--budget", type=float, default=0.05, help="sparse runs: share of pages")
    ap.add_argument("--cache", type=float, default=0.1,
                    help="GPU page cache of the host placements, as a share of the batch's pages")
    ap.add_argument("--chunk", type=int, default=8192, help="SGLang's --chunked-prefill-size")
    ap.add_argument("--sglang-graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="vortex_hybrid runs with SGLang's decode CUDA graphs on (CUDA only; "
                         "default on; --no-sglang-graphs: SGLang's CUDA graphs off)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless every run finished and every PLACEMENT@full run gave "
                         "triton's tokens (a validation)")
    ap.add_argument("--no-overlap", action="store_true",
                    help="every run with SGLang's overlap scheduler off (--disable-overlap-schedule)")
    ap.add_argument("--runs", default=RUNS,
                    help=f"comma-separated runs: triton, PLACEMENT, PLACEMENT@full (default {RUNS})")
    args = ap.parse_args()

    import torch
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else \
        write_model(Path(tempfile.mkdtemp(prefix="sglang_e2e_model_")), args.layers,
                    "bfloat16" if cuda else "float32", args.context + args.new)
    rng = random.Random(0)
    prompts = [[256] + [rng.randrange(256) for _ in range(args.context - 1)]
               for _ in range(args.batch)]
    device = torch.cuda.get_device_name() if cuda else "cpu"
    result = {"device": device, "date": time.strftime("%Y-%m-%d"), "args": vars(args), "runs": []}
    path = out / "sglang_e2e.json"
    base = None
    for run in [r.strip() for r in args.runs.split(",") if r.strip()]:
        print(f"== {run}", flush=True)
        try:
            r = run_engine(run, model, prompts, args, cuda)
        except Exception as exc:                  # keep going: the other runs still answer
            r = {"run": run, "error": f"{type(exc).__name__}: {exc}"}
        if run == "triton" and "error" not in r:
            base = r
        if base is not None and "error" not in r:
            r["same_as_triton"], r["mean_matching_prefix"] = agreement(r["output_ids"],
                                                                       base["output_ids"])
            if base["tpot_ms"] and r["tpot_ms"]:
                r["tpot_vs_triton"] = round(base["tpot_ms"] / r["tpot_ms"], 3)
        print({k: v for k, v in r.items() if k != "output_ids"}, flush=True)
        result["runs"].append(r)
        path.write_text(json.dumps(result, indent=1))
    table(result)
    if args.check:
        bad = [r["run"] for r in result["runs"] if "error" in r or (
            r["run"].endswith("@full") and r.get("same_as_triton") != args.batch)]
        if bad or base is None:
            raise SystemExit(f"sglang_e2e --check: failed or not triton's tokens: "
                             f"{bad or ['triton (no baseline)']}")
        print("sglang_e2e --check: every run finished; every @full run gave triton's tokens")


def table(result: dict) -> None:
    a = result["args"]
    print(f"\nsglang_e2e on {result['device']}, {a['batch']} x {a['context']} tokens, {a['new']} "
          f"new, sparse budget {a['budget']} (TPOT vs triton: >1 is faster than triton)")
    print(f"{'run':<14}{'TPOT vs triton':>15}{'TPOT ms':>9}{'decode tok/s':>13}{'gen --new s':>10}"
          f"{'start s':>9}{'same as triton':>16}{'mean prefix':>12}")
    for r in result["runs"]:
        if "error" in r:
            print(f"{r['run']:<14} error: {r['error'][:100]}")
            continue
        n = len(r["output_ids"])
        ratio = f"{r['tpot_vs_triton']:.2f}x" if "tpot_vs_triton" in r else "-"
        same = f"{r['same_as_triton']}/{n}" if "same_as_triton" in r else "-"
        if r["run"].endswith("@full") and r.get("same_as_triton", n) != n:
            same += " MISMATCH"
        tpot = "-" if r["tpot_ms"] is None else f"{r['tpot_ms']:.2f}"
        tok_s = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"
        print(f"{r['run']:<14}{ratio:>15}{tpot:>9}{tok_s:>13}"
              f"{r['generate_new_s']:>10.2f}{r['engine_start_s']:>9.1f}{same:>16}"
              f"{r.get('mean_matching_prefix', 0.0):>12.1f}")


if __name__ == "__main__":
    main()
