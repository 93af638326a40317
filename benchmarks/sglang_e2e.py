"""Question: inside a real SGLang engine, what do the hybrid backend's placements cost or gain
against SGLang's own dense `triton` backend, how many requests does each admit, and do they produce
the same greedy output?

One `sgl.Engine` per run, each in a process of its own (this script with --one-run: an engine that
fails to start, hangs or crashes fails its run alone; --run-timeout ends it), on the same
Llama-shaped model, radix cache off so every run prefills every request. A run is `triton`
(SGLang's own backend, its CUDA graphs on), `PLACEMENT` (`vortex_hybrid`, sparse: --budget of the
pages, flow --flow) or `PLACEMENT@full` (budget_ratio 1.0: every page; its output must equal
triton's). `vortex_hybrid` runs with SGLang's decode CUDA graphs on over the backend's graph hooks
(prefill graphs off); --no-sglang-graphs turns SGLang's graphs off (the runtime then captures its
own per-layer graphs).

Shapes (--shape): `tiny`, a random 4-layer Llama (hidden 512, 8 q / 2 KV heads, head_dim 64)
written with weights, the CPU smoke; `llama3-8b`, Llama-3-8B's shapes (32 layers, hidden 4096, 32 q
/ 8 KV heads, head_dim 128, intermediate 14336, vocab 128256, rope_theta 500000, bf16): its config
and a byte-level tokenizer are written, no weights, and the engines load it with
`load_format="dummy"` (SGLang's random weights). --layers / --hidden / --intermediate override the
shape (a smoke of the 8B path on a small machine).

Grid: every --contexts value x every --kv-gib setting x every run (each cell's triton first):
- memory: `all` (SGLang's default --mem-fraction-static for triton; the plugin's default sizing
  for ours: the HBM SGLang would give its own pool, the prefill staging area included) or
  G GiB of HBM for KV (triton: SGLang's --max-total-tokens = G GiB / bytes per token of the shape,
  in whole pages, which is SGLang's KV pool exactly; ours on CUDA: the same G GiB, the prefill staging
  area (`sizing.staging_bytes`) within it: `gpu_memory_gib` is G less that area). The host placements take --host-gib of host memory (by
  default the KV of --max-batch requests, at most 75% of the available host memory).
- admission (--batch auto, the default of the 8B shape): after the engine starts, SGLang's
  `max_total_num_tokens` (from `Engine.get_server_info()`; with the plugin it is the runtime's
  capacity) and its effective max running requests say how many requests of --context + --new
  tokens (in whole pages) fit; that many are submitted (at most --max-batch). A configuration
  that fits none is recorded as such (admitted 0), not timed. `--batch N` submits N requests.
- timing: the requests (random token ids: speed only, the i-th prompt the same in every run) are
  submitted at once as one streamed generate of --new greedy tokens each (ignore_eos), after a
  warm-up generate of --warmup-requests requests. From the stream's arrival times: prefill time
  (start to the last request's first token), then the decode window in which every request is
  decoding (from the last first token to the first finish): output tokens/s of the whole batch in
  that window and TPOT (the window's time per output token of a request); also end-to-end output
  tokens/s (prefill included). The best of --repeats timed generates.
- memory used for KV: triton's KV pool (SGLang's `memory_usage.kvcache`); ours from the plugin's
  start-up line in the engine's log (HBM: runtime + prefill staging; host memory).
- prefill phases (ours, with VORTEX_HYBRID_PREFILL_TIMES=1 or profile in the environment): the
  backend's per-batch lines in the engine's log summed (`prefill_phases`: staging, model with the
  restaging of earlier chunks, sync into the runtime); the timing lines synchronise the device,
  so such a run's prefill is slower.

Writes sglang_e2e.json under --out after every run (a killed invocation keeps what finished;
--resume FILE carries a previous invocation's finished runs over, so a grid can span several
calls of a --time-limit each), prints a table per cell with ratios to triton, and draws
sglang_e2e.png (output tokens/s per run and cell) when matplotlib is importable.

    python benchmarks/sglang_e2e.py --out results                      # tiny random model
    python benchmarks/sglang_e2e.py --shape llama3-8b --out results    # 32K, 128K x all, 12 GiB

--model DIR uses an existing model folder (Llama-shaped, head_dim >= 64). On a machine without
CUDA it runs SGLang's CPU engine (float32, TRITON_INTERPRET=1 for the triton runs; needs the
stand-ins on the path: PYTHONPATH=tests/with_sglang/stubs): a smoke test only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

RUNS = "triton,dense@full,hybrid@full,gpu,offload,cpu,hybrid"
RUNS_8B = "triton,gpu,hybrid"
P = 16
GIB = 1 << 30
HOST_SHARE = 0.75
"""Share of the available host memory the host placements take at most by default (the plugin's
own default is 90%; the engine's processes need the rest)."""
MIN_RUN_S = 60.0
"""--time-limit: a run is not started with less time left than this (or than the longest run of
the same context so far)."""
BOS = 256
EXC = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*: ")
"""A log line that names an exception (`module.SomeError: message`)."""

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                 rope_theta=500000.0),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5),
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

LINE = re.compile(r"vortex_hybrid: placement (\w+); KV in HBM ([\d.]+) GiB \(runtime ([\d.]+) GiB, "
                  r"prefill staging ([\d.]+) GiB\), in host memory ([\d.]+) GiB; capacity (\d+) "
                  r"tokens(?:, (\d+) requests)?; GPU cache (\d+) pages")

PREFILL = re.compile(r"vortex_hybrid prefill batch: (\d+) rows, (\d+) new tokens, (\d+) read back "
                     r"from the runtime: staging ([\d.]+) ms, model ([\d.]+) ms"
                     r"(?: \(restaging earlier chunks ([\d.]+) ms of it\))?, "
                     r"sync into the runtime ([\d.]+) ms")
"""The backend's line per extend batch when VORTEX_HYBRID_PREFILL_TIMES is set."""


# ---------------------------------------------------------------------------------------------
# pure helpers (unit-tested)

def shape_config(shape: str, *, layers: Optional[int] = None, hidden: Optional[int] = None,
                 intermediate: Optional[int] = None, max_positions: int = 4096,
                 dtype: str = "bfloat16") -> dict:
    """The LlamaConfig fields of a shape, with the overrides; max_position_embeddings at least
    `max_positions` (rounded up to 1024)."""
    cfg = dict(SHAPES[shape])
    if layers:
        cfg["num_hidden_layers"] = layers
    if hidden:
        cfg["hidden_size"] = hidden
    if intermediate:
        cfg["intermediate_size"] = intermediate
    cfg.update(max_position_embeddings=max(4096, -(-max_positions // 1024) * 1024),
               tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=BOS + 1,
               pad_token_id=BOS + 2, torch_dtype=dtype)
    return cfg


def geometry(config: dict) -> dict:
    """Layers, KV heads, head_dim, dtype and KV bytes per token (K and V of every layer) of a model
    config (config.json's fields)."""
    heads = int(config["num_attention_heads"])
    hd = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    g = dict(layers=int(config["num_hidden_layers"]), kv_heads=int(config.get(
        "num_key_value_heads") or heads), head_dim=hd, dtype=dtype,
        vocab=int(config["vocab_size"]))
    g["bytes_per_token"] = bytes_per_token(g["layers"], g["kv_heads"], hd, DTYPE_BYTES[dtype])
    return g


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """KV bytes of one token: K and V, every layer."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def kv_tokens(gib: float, per_token: int, page: int = P) -> int:
    """Tokens of KV that `gib` GiB hold, in whole pages: SGLang's --max-total-tokens for a KV pool
    of that size (Llama-3-8B bf16, 128 KiB a token: 12 GiB -> 98304 tokens)."""
    return int(gib * GIB) // (per_token * page) * page


def tokens_per_request(context: int, new: int, page: int = P) -> int:
    """Slots one request takes at its end (prompt + new tokens), in whole pages."""
    return -(-(context + new) // page) * page


def admission_tokens(context: int, new: int, page: int = P) -> int:
    """Tokens of SGLang's capacity one request of `context` + `new` tokens (ignore_eos, radix
    cache off) needs to be admitted beside others (sglang 0.5.17's `PrefillAdder`: the prompt in
    whole pages, every new token, one page of alignment overhead, one token of reserve)."""
    return -(-context // page) * page + new + page + 1


def fit(max_total_tokens: int, per_request: int, *caps: Optional[int]) -> int:
    """Requests that run at once in `max_total_tokens` when each needs `per_request`
    (`admission_tokens`), at most each of `caps` (max running requests, --max-batch)."""
    n = max(0, int(max_total_tokens)) // per_request
    for cap in caps:
        if cap is not None:
            n = min(n, int(cap))
    return n


def host_gib_for(want_requests: int, per_request: int, per_token: int,
                 available_bytes: int, share: float = HOST_SHARE) -> float:
    """Default host memory of the host placements: the KV of `want_requests` requests, at most
    `share` of the available host memory, in GiB."""
    return min(want_requests * per_request * per_token, share * available_bytes) / GIB


def stream_timing(t_start: float, events: dict) -> dict:
    """Timing of one streamed batch generate. events: request index -> [(arrival time, output
    tokens so far)]. Prefill: start to the last request's first token; the decode window: from
    then to the first request's finish, when every request is decoding. Output tokens/s of the
    batch in that window, TPOT (the window's time per output token of a request), end-to-end
    output tokens/s and the largest number of requests decoding at once."""
    events = {i: ev for i, ev in events.items() if any(n >= 1 for _, n in ev)}
    if not events:
        raise RuntimeError("the timed generate returned no token")
    first = {i: min(t for t, n in ev if n >= 1) for i, ev in events.items()}
    last = {i: max(t for t, _ in ev) for i, ev in events.items()}
    final = {i: max(n for _, n in ev) for i, ev in events.items()}
    t0, t1 = max(first.values()), min(last.values())
    r = {"prefill_s": round(t0 - t_start, 4),
         "total_s": round(max(last.values()) - t_start, 4),
         "output_tokens": sum(final.values())}
    r["e2e_tok_s"] = round(r["output_tokens"] / max(r["total_s"], 1e-9), 2)
    marks = sorted(first.values())
    r["concurrency"] = max(sum(first[i] <= t <= last[i] for i in events) for t in marks)

    def upto(i: int, t: float) -> int:
        return max([n for s, n in events[i] if s <= t] or [0])

    tokens = sum(upto(i, t1) - upto(i, t0) for i in events)
    if t1 <= t0 or tokens <= 0:
        r.update(decode_s=None, decode_tokens=0, decode_tok_s=None, tpot_ms=None,
                 timing=("no window with every request decoding (a request finished before "
                         "the last one's first token: raise --new, or fewer requests)"))
        return r
    r.update(decode_s=round(t1 - t0, 4), decode_tokens=tokens,
             decode_tok_s=round(tokens / (t1 - t0), 2),
             tpot_ms=round(1e3 * (t1 - t0) * len(events) / tokens, 3))
    return r


def estimate_s(done: list, context: int, requests: Optional[int] = None) -> float:
    """Seconds a run at `context` is expected to take: the longest run of that context so far,
    else the longest of another context scaled by the context ratio, else MIN_RUN_S; with the
    run's predicted `requests`, at least the slowest engine start of that context plus its
    slowest prefill per request times `requests` (a run that admits 22 requests where the
    earlier ones admitted 2 prefills 11 times as long)."""
    same = [r for r in done if r.get("context") == context and r.get("wall_s")]
    if same:
        need = max(MIN_RUN_S, max(r["wall_s"] for r in same))
        per = [r["prefill_s"] / r["admitted"] for r in same
               if r.get("prefill_s") and r.get("admitted")]
        if requests and per:
            start = max(r.get("engine_start_s") or 0.0 for r in same)
            need = max(need, start + max(per) * requests)
        return need
    other = [r["wall_s"] * context / r["context"] for r in done
             if r.get("wall_s") and r.get("context")]
    return max([MIN_RUN_S] + other)


def parse_startup(log: str) -> Optional[dict]:
    """The plugin's start-up line (the last one in `log`) as numbers."""
    found = LINE.findall(log)
    if not found:
        return None
    p, hbm, runtime, staging, host, cap, reqs, cache = found[-1]
    return {"placement": p, "kv_hbm_gib": float(hbm), "runtime_hbm_gib": float(runtime),
            "staging_hbm_gib": float(staging), "kv_host_gib": float(host),
            "capacity_tokens": int(cap), "capacity_requests": int(reqs) if reqs else None,
            "gpu_cache_pages": int(cache)}


def parse_prefill_times(log: str) -> Optional[dict]:
    """The backend's prefill phase lines in `log` (VORTEX_HYBRID_PREFILL_TIMES set in the
    engine's environment), summed: extend batches, new tokens, tokens read back, and seconds of
    staging, model (restaging included), restaging, sync into the runtime; None without lines."""
    found = PREFILL.findall(log)
    if not found:
        return None
    tot = dict(batches=len(found), new_tokens=0, read_back_tokens=0, staging_s=0.0, model_s=0.0,
               restage_s=0.0, sync_s=0.0)
    for rows, new, back, staging, model, restage, sync in found:
        tot["new_tokens"] += int(new)
        tot["read_back_tokens"] += int(back)
        for key, ms in (("staging_s", staging), ("model_s", model), ("restage_s", restage),
                        ("sync_s", sync)):
            tot[key] += float(ms or 0) / 1e3
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in tot.items()}


def agreement(outs: list, ref: list) -> tuple:
    """(requests equal token for token, mean length of the matching prefix) over the requests
    both ran (the first min(len) prompts are the same prompts)."""
    pairs = list(zip(outs, ref))
    if not pairs:
        return 0, 0.0
    same = sum(a == b for a, b in pairs)
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in pairs]
    return same, sum(prefix) / len(prefix)


def kv_label(kv) -> str:
    return "all" if kv is None else f"{kv:g}"


def parse_kv(text: str) -> list:
    """--kv-gib: comma list of `all` (None) and GiB numbers."""
    out = []
    for x in [x.strip() for x in str(text).split(",") if x.strip()]:
        out.append(None if x.lower() in ("all", "none") else float(x))
        if out[-1] is not None and out[-1] <= 0:
            raise ValueError(f"--kv-gib {x}: a positive number of GiB, or all")
    return out


def backend_of(run: str) -> str:
    return "triton" if run == "triton" else "vortex_hybrid"


# ---------------------------------------------------------------------------------------------
# the model

def write_model(out: Path, args, weights: bool, dtype: str, max_positions: int) -> Path:
    """A Llama-shaped model of --shape (with the overrides) and a byte-level tokenizer (ids 0-258,
    below every shape's vocab), offline; random weights when `weights`, else the config only (the
    engines load it with load_format="dummy")."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(**shape_config(args.shape, layers=args.layers, hidden=args.hidden,
                                     intermediate=args.intermediate, max_positions=max_positions,
                                     dtype=dtype))
    if weights:
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).eval().to(getattr(torch, dtype)).save_pretrained(out)
    else:
        cfg.architectures = ["LlamaForCausalLM"]         # what save_pretrained of a model adds
        cfg.save_pretrained(out)
    vocab = {bytes([i]).decode("latin-1"): i for i in range(256)}
    vocab.update({"<s>": BOS, "</s>": BOS + 1, "<pad>": BOS + 2})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out)
    return out


def read_geometry(model: Path, cuda: bool) -> dict:
    g = geometry(json.loads((model / "config.json").read_text()))
    if not cuda:              # the CPU engine runs float32 (dtype="float32"), KV included
        g["dtype"] = "float32"
        g["bytes_per_token"] = bytes_per_token(g["layers"], g["kv_heads"], g["head_dim"], 4)
    return g


def prompts_for(n: int, context: int, seed: int) -> list:
    """n prompts of `context` random byte ids after a BOS; prompt i is the same for any n."""
    out = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        out.append([BOS] + rng.choices(range(256), k=context - 1))
    return out


# ---------------------------------------------------------------------------------------------
# one engine (the child process)

def engine_kwargs(run: str, context: int, kv: Optional[float], args, cuda: bool, geo: dict,
                  host_available: int) -> tuple:
    """(`sgl.Engine` keywords, vortex_hybrid config or None, predicted requests or None) of a run.
    Legacy sizing (a fixed --batch, --kv-gib all): SGLang's --max-total-tokens for the batch, the
    GPU page cache --cache of the batch's pages, as this benchmark always did."""
    auto = args.batch == "auto"
    legacy = not auto and kv is None
    cap = args.max_batch if auto else int(args.batch)
    per_req = admission_tokens(context, args.new)
    kw = dict(model_path=str(args.model), load_format=args.load_format,
              sampling_backend="pytorch", skip_tokenizer_init=True, random_seed=0, page_size=P,
              disable_radix_cache=True, max_running_requests=cap + 1,
              chunked_prefill_size=args.chunk, dtype="bfloat16" if cuda else "float32",
              log_level="info")
    # max_running_requests: one more than the requests, since SGLang 0.5.17's scheduler marks its
    # batch full when its last request slot goes to a request in chunked prefill, and then admits
    # none until a request finishes
    if legacy:
        kw["max_total_tokens"] = cap * (context + args.new) + 64 * P
    else:
        kw.update(context_length=context + args.new + P, max_prefill_tokens=args.chunk)
    if args.no_overlap:
        kw["disable_overlap_schedule"] = True
    if cuda:
        if legacy and args.shape == "tiny":
            kw["mem_fraction_static"] = 0.3
    else:
        kw["device"] = "cpu"
    predicted = None
    graphs = cuda and (run == "triton" or args.sglang_graphs)
    if run == "triton":
        kw["attention_backend"] = "triton"
        if kv is not None:
            kw["max_total_tokens"] = kv_tokens(kv, geo["bytes_per_token"])
            predicted = fit(kw["max_total_tokens"], per_req, cap)
        cfg = None
    else:
        placement, _, full = run.partition("@")
        cfg = {"placement": placement, "page_size": P, "flow": args.flow,
               "budget_ratio": 1.0 if full == "full" else args.budget}
        if placement != "dense" and args.summary_dtype != "float32":
            cfg["summary_dtype"] = args.summary_dtype
        if legacy:
            pages = cap * -(-(context + args.new) // P)
            cfg["gpu_cache_pages"] = max(8, int(args.cache * pages))
        elif kv is not None:
            # on CUDA the same HBM as triton's: the prefill staging area within the G GiB (for at
            # most the request-pool rows of cap requests), the rest the runtime's
            staging = staging_gib(kw, geo, rows=kw["max_running_requests"] + 8) if cuda else 0.0
            if staging >= kv:
                raise SystemExit(f"--kv-gib {kv}: the plugin's prefill staging area alone takes "
                                 f"{staging:.2f} GiB; give more HBM or a smaller --chunk")
            cfg["gpu_memory_gib"] = round(kv - staging, 6)
            if placement in ("dense", "gpu"):
                predicted = fit(kv_tokens(cfg["gpu_memory_gib"], geo["bytes_per_token"]),
                                per_req, cap)
        if placement in ("offload", "cpu", "hybrid") and not legacy:
            host = args.host_gib if args.host_gib else host_gib_for(
                cap, per_req, geo["bytes_per_token"], host_available)
            cfg["host_memory_gib"] = round(host, 3)
            host_tokens = int(cfg["host_memory_gib"] * GIB) // (geo["bytes_per_token"] * P) * P
            predicted = fit(host_tokens, per_req, cap)
            # SGLang's request pool (and the GPU page cache's state of its decode graphs) for
            # what can run, not for --max-batch
            kw["max_running_requests"] = max(1, predicted) + 1
        kw.update(attention_backend="vortex_hybrid", vortex_hybrid_config=json.dumps(cfg))
    if graphs:
        kw["cuda_graph_max_bs_decode"] = kw["max_running_requests"]
        if run != "triton":
            kw["disable_prefill_cuda_graph"] = True
    else:
        kw["disable_cuda_graph"] = True
    return kw, cfg, predicted


def staging_gib(kw: dict, geo: dict, rows: int) -> float:
    """GiB of the plugin's prefill staging area for an engine of keywords `kw` (its chunk sizes
    and context length; `rows`: at least SGLang's request-pool rows), as the plugin sizes it."""
    import types

    from vortex_hybrid.integrations.sglang.sizing import staging_bytes
    sa = types.SimpleNamespace(max_prefill_tokens=kw.get("max_prefill_tokens"),
                               chunked_prefill_size=kw.get("chunked_prefill_size"))
    return staging_bytes(sa, int(kw["context_length"]), rows, P, geo["layers"],
                         geo["bytes_per_token"] // geo["layers"]) / GIB


def plan_run(run: str, context: int, kv: Optional[float], args, cuda: bool,
             geo: dict) -> tuple:
    """(the run's record so far, its engine keywords): the sizes, the admission the sizes
    predict, and status no_fit when they already say that no request fits (no engine needed)."""
    import psutil
    kw, cfg, predicted = engine_kwargs(run, context, kv, args, cuda, geo,
                                       psutil.virtual_memory().available)
    per_req = admission_tokens(context, args.new)
    r = {"run": run, "context": context, "kv_gib": kv_label(kv), "backend": backend_of(run),
         "config": cfg, "tokens_per_request": tokens_per_request(context, args.new),
         "admission_tokens": per_req, "predicted_admission": predicted,
         "engine": {k: v for k, v in kw.items() if k not in ("model_path",
                                                              "vortex_hybrid_config")}}
    if predicted == 0:
        where = "the host memory" if cfg and "host_memory_gib" in cfg else \
            f"{kv_label(kv)} GiB of KV"
        r.update(status="no_fit", admitted=0,
                 reason=f"not started: a request ({per_req} tokens to admit) does not fit in "
                        f"{where}")
    return r, kw


def one_run(run: str, context: int, kv: Optional[float], io: Path, args, cuda: bool) -> None:
    """The child: one engine, its admission, a warm-up and the timed streamed generates; the
    result into io/result.json (written once the engine is up, and again at the end)."""
    path = io / "result.json"
    r = {"run": run, "context": context, "kv_gib": kv_label(kv), "backend": backend_of(run)}
    try:
        geo = read_geometry(Path(args.model), cuda)
        r, kw = plan_run(run, context, kv, args, cuda, geo)
        if r.get("status") == "no_fit":
            path.write_text(json.dumps(r))
            return
        run_engine(r, kw, context, r["admission_tokens"], geo["bytes_per_token"], args, path)
    except Exception as exc:
        r.update(status="error", error=f"{type(exc).__name__}: {exc}")
        path.write_text(json.dumps(r))
        raise


def run_engine(r: dict, kw: dict, context: int, per_req: int, per_token: int, args,
               path: Path) -> None:
    import sglang as sgl

    from vortex_hybrid.integrations.sglang.shutdown import shut_down
    t0 = time.perf_counter()
    llm = sgl.Engine(**kw)
    r["engine_start_s"] = round(time.perf_counter() - t0, 2)
    try:
        info = llm.get_server_info()
        states = info.get("internal_states") or [{}]
        total = int(info["max_total_num_tokens"])
        running = states[0].get("effective_max_running_requests_per_dp") or \
            kw["max_running_requests"]
        usage = states[0].get("memory_usage") or {}
        admits = fit(total, per_req, int(running) - 1, args.max_batch if args.batch == "auto"
                     else int(args.batch))
        n = admits if args.batch == "auto" else int(args.batch)
        r.update(max_total_num_tokens=total, max_running_requests=int(running), admits=admits,
                 admitted=n, sglang_memory_usage=usage, status="started")
        if r["backend"] == "triton":
            r["kv_hbm_gib"] = usage.get("kvcache", round(total * per_token / GIB, 3))
            r["kv_host_gib"] = 0.0
        path.write_text(json.dumps(r))
        if n == 0:
            r.update(status="no_fit", reason=f"SGLang's capacity of {total} tokens admits no "
                                             f"request ({per_req} tokens to admit)")
            path.write_text(json.dumps(r))
            return
        prompts = prompts_for(n, context, args.seed)
        greedy = {"temperature": 0, "ignore_eos": True}
        w = max(1, min(args.warmup_requests, n))
        llm.generate(input_ids=prompts[:w], sampling_params={**greedy, "max_new_tokens": 4})
        best, outs = None, None
        for _ in range(args.repeats):
            events: dict = {i: [] for i in range(n)}
            got: dict = {}
            start = time.perf_counter()
            for chunk in llm.generate(input_ids=prompts, sampling_params={
                    **greedy, "max_new_tokens": args.new}, stream=True):
                i = chunk.get("index", 0)
                events[i].append((time.perf_counter(), len(chunk["output_ids"])))
                if chunk["meta_info"].get("finish_reason") is not None:
                    got[i] = list(chunk["output_ids"])
            timing = stream_timing(start, events)
            if best is None or (timing["decode_tok_s"] or 0) > (best["decode_tok_s"] or 0):
                best, outs = timing, [got.get(i, []) for i in range(n)]
        r.update(best, status="ok", output_ids=outs)
        if best.get("timing"):
            print(f"warning: {r['run']}: {best['timing']}", flush=True)
        path.write_text(json.dumps(r))
    finally:
        shut_down(llm)


# ---------------------------------------------------------------------------------------------
# the parent: each run in a child process

_CHILD: Optional[subprocess.Popen] = None


def _group_alive(pgid: int) -> list:
    """The live (not zombie) processes of process group `pgid`."""
    import psutil
    alive = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return alive


def _end_group(proc: subprocess.Popen, wait_s: float = 30.0) -> None:
    """SIGKILL the child's process group (the engine's scheduler and detokenizer processes with
    it) and wait until none of it is left alive, so the next engine starts on free memory."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + wait_s
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def _on_signal(signum, frame):
    if _CHILD is not None:
        _end_group(_CHILD, 5.0)
    raise SystemExit(128 + signum)


def device_name(cuda: bool) -> str:
    """The GPU's name from nvidia-smi (no CUDA context in this process, whose memory the engines
    would not have), or "cpu"."""
    if not cuda:
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0].strip() or "cuda"
    except (OSError, IndexError, subprocess.SubprocessError):
        return "cuda"


def child_run(run: str, context: int, kv: Optional[float], model: Path, args, argv: list,
              timeout: float, logs: Optional[Path]) -> dict:
    """One run in a process of its own (this script with --one-run), in a process group of its
    own that is ended with it: an engine that cannot start, hangs or crashes fails this run
    alone."""
    global _CHILD
    with tempfile.TemporaryDirectory(prefix="sglang_e2e_") as io:
        log_path = Path(io, "engine.log") if logs is None else \
            logs / f"{context}_{kv_label(kv)}_{run.replace('@', '-')}.log"
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--one-run", run,
               "--cell", f"{context}:{kv_label(kv)}", "--io", io, "--model", str(model)]
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, process_group=0)
            _CHILD = proc
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _end_group(proc)
                _CHILD = None
        wall = time.perf_counter() - t0
        text = log_path.read_text(errors="replace")
        answer = Path(io, "result.json")
        r = json.loads(answer.read_text()) if answer.is_file() else \
            {"run": run, "context": context, "kv_gib": kv_label(kv), "backend": backend_of(run)}
        r["wall_s"], r["pid"] = round(wall, 1), proc.pid       # pid: also its process group
        line = parse_startup(text)
        if line is not None:
            r["startup"] = line
            r["kv_hbm_gib"], r["kv_host_gib"] = line["kv_hbm_gib"], line["kv_host_gib"]
        phases = parse_prefill_times(text)
        if phases is not None:
            r["prefill_phases"] = phases
            print(f"{run}: prefill phases over {phases['batches']} extend batches: "
                  f"staging {phases['staging_s']} s, model {phases['model_s']} s (restaging "
                  f"{phases['restage_s']} s of it), sync into the runtime {phases['sync_s']} s",
                  flush=True)
        if timed_out:
            r.update(status="error", error=f"no answer within {timeout:.0f} s (--run-timeout or "
                                           "--time-limit); the engine was ended")
        elif proc.returncode != 0 and r.get("status") != "error":
            r.update(status="error", error=f"exit {proc.returncode}")
        elif r.get("status") not in ("ok", "no_fit", "error"):
            r.update(status="error", error=f"the run ended at status {r.get('status')}")
        if r["status"] == "error":
            lines = [x for x in text.strip().splitlines() if x.strip()]
            r["log_tail"] = lines[-15:]
            if r["error"].startswith("exit"):      # the child was ended before it could say why
                why = [x.strip() for x in lines if EXC.match(x.strip())]
                r["error"] += f": {(why or lines or ['no output'])[-1].strip()}"
        return r


def compare(result: dict) -> None:
    """Per cell: agreement with triton's tokens and ratios to triton (output tokens/s and TPOT)."""
    for r in result["runs"]:
        for k in ("same_as_triton", "compared", "mean_matching_prefix", "tok_s_vs_triton",
                  "tpot_vs_triton"):
            r.pop(k, None)
    for r in result["runs"]:
        base = next((b for b in result["runs"] if b["run"] == "triton" and b["context"] ==
                     r["context"] and b["kv_gib"] == r["kv_gib"]), None)
        if base is None or r.get("status") != "ok" or base.get("status") != "ok":
            continue
        r["same_as_triton"], r["mean_matching_prefix"] = agreement(r["output_ids"],
                                                                   base["output_ids"])
        r["compared"] = min(len(r["output_ids"]), len(base["output_ids"]))
        if base.get("decode_tok_s") and r.get("decode_tok_s"):
            r["tok_s_vs_triton"] = round(r["decode_tok_s"] / base["decode_tok_s"], 3)
        if base.get("tpot_ms") and r.get("tpot_ms"):
            r["tpot_vs_triton"] = round(base["tpot_ms"] / r["tpot_ms"], 3)


def table(result: dict) -> list:
    """The table's lines, a block per cell (context x memory setting)."""
    a = result["args"]
    lines = []
    cells = []
    for r in result["runs"]:
        if (r["context"], r["kv_gib"]) not in cells:
            cells.append((r["context"], r["kv_gib"]))
    for context, kv in cells:
        batch = "admitted" if a["batch"] == "auto" else a["batch"]
        mem = "all of HBM for KV" if kv == "all" else f"KV limited to {kv} GiB of HBM"
        if lines:
            lines.append("")
        lines.append(f"sglang_e2e on {result['device']}, {a['shape']}, {batch} x {context} tokens, "
                     f"{a['new']} new, {mem}, sparse {a.get('flow', 'quest')} at {a['budget']} "
                     f"(vs triton: output tokens/s; TPOT vs triton: >1 is faster than triton)")
        lines.append(f"{'run':<13}{'requests':>9}{'tok/s':>10}{'vs triton':>10}{'TPOT ms':>9}"
                     f"{'TPOT vs triton':>15}{'prefill s':>10}{'HBM GiB':>9}{'host GiB':>9}"
                     f"{'SGLang tokens':>14}{'start s':>8}{'same as triton':>16}")
        for r in result["runs"]:
            if (r["context"], r["kv_gib"]) != (context, kv):
                continue
            st = r.get("status")
            if st in ("error", "skipped"):
                what = r.get("error") or r.get("reason") or ""
                lines.append(f"{r['run']:<13} {st}: {what[:110]}")
                continue

            def num(key, fmt):
                v = r.get(key)
                return "-" if v is None else format(v, fmt)
            tot = num("max_total_num_tokens", "d")
            if st == "no_fit":
                lines.append(f"{r['run']:<13}{0:>9}  no request fits: {r.get('reason', '')[:100]}")
                continue
            n = len(r["output_ids"])
            reqs = f"{n}" if r.get("concurrency", n) == n else f"{n} ({r['concurrency']})"
            ratio = f"{r['tok_s_vs_triton']:.2f}x" if "tok_s_vs_triton" in r else "-"
            tratio = f"{r['tpot_vs_triton']:.2f}x" if "tpot_vs_triton" in r else "-"
            same = f"{r['same_as_triton']}/{r['compared']}" if "same_as_triton" in r else "-"
            if r["run"].endswith("@full") and "same_as_triton" in r and \
                    r["same_as_triton"] != r["compared"]:
                same += " MISMATCH"
            lines.append(f"{r['run']:<13}{reqs:>9}{num('decode_tok_s', '.1f'):>10}{ratio:>10}"
                         f"{num('tpot_ms', '.2f'):>9}{tratio:>15}{num('prefill_s', '.2f'):>10}"
                         f"{num('kv_hbm_gib', '.2f'):>9}{num('kv_host_gib', '.2f'):>9}{tot:>14}"
                         f"{num('engine_start_s', '.0f'):>8}{same:>16}")
    return lines


def plot(result: dict, path: Path) -> Optional[str]:
    """sglang_e2e.png: decode output tokens/s per run, grouped by cell (context, memory setting),
    each bar labelled with its requests; returns a note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no PNG: matplotlib is not importable"
    cells, runs = [], []
    for r in result["runs"]:
        if (r["context"], r["kv_gib"]) not in cells:
            cells.append((r["context"], r["kv_gib"]))
        if r["run"] not in runs:
            runs.append(r["run"])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cells) * max(1, len(runs)) / 2), 4.5))
    width = 0.8 / max(1, len(runs))
    for j, run in enumerate(runs):
        for i, cell in enumerate(cells):
            r = next((x for x in result["runs"] if x["run"] == run and
                      (x["context"], x["kv_gib"]) == cell), None)
            if r is None:
                continue
            v = r.get("decode_tok_s") or 0.0
            x = i + (j - (len(runs) - 1) / 2) * width
            ax.bar(x, v, width, color=f"C{j}", label=run if i == 0 else None)
            label = {"ok": f"{len(r.get('output_ids') or [])}", "no_fit": "0 fit",
                     "skipped": "skipped", "error": "error"}.get(r.get("status"), "?")
            if r.get("tok_s_vs_triton"):
                label += f"\n{r['tok_s_vs_triton']:.2f}x"
            ax.annotate(label, (x, v), ha="center", va="bottom", fontsize=7)
    ax.margins(y=0.15)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([f"{c // 1024}K, {'all HBM' if k == 'all' else k + ' GiB'}"
                        if c >= 1024 else f"{c}, {k}" for c, k in cells])
    ax.set_ylabel("decode output tokens/s (all admitted requests)")
    a = result["args"]
    ax.set_title(f"SGLang end to end, {a['shape']} on {result['device']}: {a['new']} new tokens, "
                 f"budget {a['budget']} (bar labels: requests, ratio to triton)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def same_setup(old: dict, args) -> bool:
    a = old.get("args", {})
    keys = ("shape", "new", "budget", "flow", "batch", "max_batch", "layers", "hidden",
            "intermediate", "chunk", "sglang_graphs", "no_overlap", "host_gib", "load_format",
            "seed")
    return all(a.get(k) == getattr(args, k) for k in keys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results", help="folder for sglang_e2e.json (and .png)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                    help="model shape: tiny (random weights written; default) or llama3-8b "
                         "(config only, load_format dummy)")
    ap.add_argument("--model", help="an existing Llama-shaped model folder (default: write "
                                    "--shape to a temporary folder)")
    ap.add_argument("--layers", type=int, help="override the shape's layers (tiny: 4)")
    ap.add_argument("--hidden", type=int, help="override the shape's hidden size")
    ap.add_argument("--intermediate", type=int, help="override the shape's MLP size")
    ap.add_argument("--load-format", choices=["auto", "dummy"],
                    help="SGLang's load_format (tiny: auto, its written weights; llama3-8b: "
                         "dummy, the only one it has)")
    ap.add_argument("--batch", help="requests: a number, or auto (as many as SGLang admits, at "
                                    "most --max-batch); tiny: 4, llama3-8b: auto")
    ap.add_argument("--max-batch", type=int, default=64, help="--batch auto: at most (64)")
    ap.add_argument("--context", "--contexts", dest="contexts",
                    help="prompt tokens per request, a comma list for a grid (tiny: 8192; "
                         "llama3-8b: 32768,131072)")
    ap.add_argument("--kv-gib", help="HBM for KV: all, or GiB; a comma list for a grid (tiny: "
                                     "all; llama3-8b: all,12)")
    ap.add_argument("--host-gib", type=float,
                    help="host memory of the host placements, GiB (default: the KV of "
                         f"--max-batch requests, at most {HOST_SHARE * 100:.0f}%% of the available)")
    ap.add_argument("--new", type=int, help="greedy tokens generated per request (tiny: 32, "
                                            "llama3-8b: 128)")
    ap.add_argument("--budget", type=float, default=0.05, help="sparse runs: share of pages")
    ap.add_argument("--flow", default="quest",
                    help="sparse runs: the flow (quest, HybridConfig's default)")
    from vortex_hybrid.config import SUMMARY_DTYPES
    ap.add_argument("--summary-dtype", default="bfloat16", choices=SUMMARY_DTYPES,
                    help="sparse runs: page summaries' dtype (bfloat16; with KV limited to a few "
                         "GiB of HBM, float32 summaries of the host store would take most of it)")
    ap.add_argument("--cache", type=float, default=0.1,
                    help="fixed --batch with --kv-gib all: GPU page cache of the host placements, "
                         "as a share of the batch's pages")
    ap.add_argument("--chunk", type=int, default=8192, help="SGLang's --chunked-prefill-size "
                    "(and, with --batch auto or --kv-gib, --max-prefill-tokens)")
    ap.add_argument("--repeats", type=int, default=1, help="timed generates per run, the best "
                                                           "counts (1)")
    ap.add_argument("--warmup-requests", type=int, default=1,
                    help="requests of the warm-up generate (1; it compiles the prefill kernels)")
    ap.add_argument("--seed", type=int, default=0, help="prompts' seed")
    ap.add_argument("--sglang-graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="vortex_hybrid runs with SGLang's decode CUDA graphs on (CUDA only; "
                         "default on; --no-sglang-graphs: SGLang's CUDA graphs off)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless every run finished and every PLACEMENT@full run gave "
                         "triton's tokens (a validation)")
    ap.add_argument("--no-overlap", action="store_true",
                    help="every run with SGLang's overlap scheduler off (--disable-overlap-schedule)")
    ap.add_argument("--runs", help=f"comma-separated runs: triton, PLACEMENT, PLACEMENT@full "
                                   f"(tiny: {RUNS}; llama3-8b: {RUNS_8B})")
    ap.add_argument("--run-timeout", type=float, default=1800,
                    help="seconds one engine may take, start to last token (1800)")
    ap.add_argument("--time-limit", type=float,
                    help="seconds for the whole invocation: a run is skipped (recorded so) when "
                         "less is left than it is expected to take, and no run outlasts it")
    ap.add_argument("--resume", help="a previous sglang_e2e.json of the same settings: its "
                                     "finished runs are kept, the others run")
    ap.add_argument("--logs", help="folder for each engine's log (default: a temporary one)")
    ap.add_argument("--one-run", help=argparse.SUPPRESS)     # the child of child_run
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--io", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    big = args.shape != "tiny"
    args.load_format = args.load_format or ("dummy" if big else "auto")
    args.batch = args.batch or ("auto" if big else "4")
    if args.batch != "auto":
        if not args.batch.isdigit() or int(args.batch) < 1:
            ap.error(f"--batch={args.batch}: a positive number or auto")
    args.new = args.new or (128 if big else 32)
    args.runs = args.runs or (RUNS_8B if big else RUNS)
    try:
        contexts = [int(x) for x in (args.contexts or ("32768,131072" if big else "8192"))
                    .split(",") if x.strip()]
        kvs = parse_kv(args.kv_gib or ("all,12" if big else "all"))
    except ValueError as exc:
        ap.error(str(exc))
    args.contexts, args.kv_gib = ",".join(map(str, contexts)), ",".join(map(kv_label, kvs))
    if big and args.load_format != "dummy" and not args.model:
        ap.error("--shape llama3-8b writes no weights: --load-format dummy, or --model DIR")
    if min(contexts) < 2 or args.new < 1 or args.repeats < 1 or args.max_batch < 1:
        ap.error("--context, --new, --repeats and --max-batch must be positive")

    import torch
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.one_run:
        ctx, kv = args.cell.split(":")
        one_run(args.one_run, int(ctx), parse_kv(kv)[0], Path(args.io), args, cuda)
        return 0

    signal.signal(signal.SIGTERM, _on_signal)
    t_begin = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = Path(args.model)
    else:
        model = write_model(Path(tempfile.mkdtemp(prefix="sglang_e2e_model_")), args,
                            weights=args.load_format != "dummy",
                            dtype="bfloat16" if cuda else "float32",
                            max_positions=max(2 * max(contexts), max(contexts) + args.new + 2 * P))
    logs = Path(args.logs) if args.logs else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    geo = read_geometry(model, cuda)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if "triton" in runs:
        runs = ["triton"] + [r for r in runs if r != "triton"]
    result = {"device": device_name(cuda), "date": time.strftime("%Y-%m-%d"),
              "args": {k: v for k, v in vars(args).items() if k not in ("one_run", "cell", "io")},
              "model": {"folder": str(model), **geo, "load_format": args.load_format},
              "notes": ["prompts: random token ids (byte ids after a BOS; speed only), prompt i "
                        "the same in every run",
                        "timing: one streamed generate of all admitted requests (best of "
                        "--repeats): prefill_s to the last first token; decode_tok_s and tpot_ms "
                        "over the window in which every request decodes; e2e_tok_s includes the "
                        "prefill",
                        "memory: triton's kv_hbm_gib is SGLang's KV pool; ours is the plugin's "
                        "start-up line (runtime + prefill staging in HBM, host store)"],
              "runs": []}
    kept = {}
    if args.resume and Path(args.resume).is_file():
        old = json.loads(Path(args.resume).read_text())
        if same_setup(old, args) and old.get("device") == result["device"]:
            kept = {(r["run"], r["context"], r["kv_gib"]): r for r in old["runs"]
                    if r.get("status") in ("ok", "no_fit")}
        else:
            print(f"--resume {args.resume}: other settings or device; nothing kept", flush=True)
    path = out / "sglang_e2e.json"
    given = list(sys.argv[1:] if argv is None else argv)
    for context in contexts:
        for kv in kvs:
            for run in runs:
                key = (run, context, kv_label(kv))
                print(f"== {run}, context {context}, KV {kv_label(kv)}", flush=True)
                if key in kept:
                    r = dict(kept[key], resumed=True)
                else:
                    try:
                        r, _ = plan_run(run, context, kv, args, cuda, geo)
                    except Exception:                 # the child says it, with its log
                        r = {}
                    left = None if args.time_limit is None else \
                        args.time_limit - (time.monotonic() - t_begin)
                    need = estimate_s(result["runs"], context, r.get("predicted_admission"))
                    if r.get("status") == "no_fit":   # the sizes say it: no engine needed
                        r["wall_s"] = 0.0
                    elif left is not None and left < need:
                        r = {"run": run, "context": context, "kv_gib": kv_label(kv),
                             "backend": backend_of(run), "status": "skipped",
                             "reason": f"--time-limit: {max(left, 0):.0f} s left, about "
                                       f"{need:.0f} s needed"}
                    else:
                        timeout = args.run_timeout if left is None else \
                            min(args.run_timeout, left)
                        r = child_run(run, context, kv, model, args, given, timeout, logs)
                result["runs"].append(r)
                compare(result)
                print({k: v for k, v in r.items() if k not in ("output_ids", "log_tail",
                                                               "engine")}, flush=True)
                path.write_text(json.dumps(result, indent=1))
    note = plot(result, out / "sglang_e2e.png")
    if note:
        result["notes"].append(note)
        print(note, flush=True)
    path.write_text(json.dumps(result, indent=1))
    print("\n".join(table(result)), flush=True)
    if args.check:
        bad = [f"{r['run']} ({r['context']}, {r['kv_gib']})" for r in result["runs"]
               if r.get("status") not in ("ok", "no_fit") or (
                   r["run"].endswith("@full") and r.get("same_as_triton") != r.get("compared", -1))]
        base = [r for r in result["runs"] if r["run"] == "triton" and r.get("status") == "ok"]
        if bad or not base:
            print(f"sglang_e2e --check: failed or not triton's tokens: "
                  f"{bad or ['triton (no baseline)']}", file=sys.stderr, flush=True)
            return 1
        print("sglang_e2e --check: every run finished; every @full run gave triton's tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
