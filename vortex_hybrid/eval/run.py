"""One offline evaluation: a model, a suite of long-context task samples, and every mode decoding
from one shared dense prefill per sample.

Per sample the prompt is prefilled once with transformers' SDPA (a `DynamicCache`); each mode then
gets a `HybridCache` that `admit`s that prefill and decodes greedily through `HybridAttention` (so
modes differ only in decode attention, as in the runtime). Modes: the five placements, and
`streaming` (sink + recent pages only, on the GPU side), the bad baseline. Each sparse mode runs
every flow of `flows` at every budget (flow `mass`: the pages of the most true attention mass,
`mass_oracle`, a diagnostic ceiling) (`config.budget_fields`: "0.05" a share of the pages, "512t"
tokens per KV head). Accuracy is RULER's exact match (`tasks.score`), with a Wilson 95% interval
over the samples. Decode speed excludes one-time costs (Numba and Triton compilation, first-call
set-up): each (mode, flow, budget) first decodes `WARMUP_TOKENS` tokens of the first batch,
untimed and unscored, before its timed runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..config import HybridConfig, budget_fields
from ..integrations.hf import ATTN_IMPLEMENTATION, CACHE_ARGUMENT, HybridCache, model_shape
from . import tasks as task_lib
from .mass_oracle import MASS_FLOW, RUNTIME_FLOW, MassOracle

MODES = ("dense", "gpu", "offload", "cpu", "hybrid", "streaming")
PAGE_SIZE = 16
CACHE_SHARE = 0.25
"""GPU page-cache slots of `offload` and `hybrid`, as a share of the batch's pages."""
WARMUP_TOKENS = 4
"""Tokens (3 decode steps) each (mode, flow, budget) decodes untimed before its timed runs."""


@dataclass
class EvalSpec:
    """What to evaluate (the CLI's options, checked there)."""
    tasks: list[str]
    context: int
    samples: int
    modes: list[str]
    flows: list[str] = field(default_factory=lambda: ["centroid"])
    budgets: list[str] = field(default_factory=lambda: ["0.05"])
    """Each a budget as `config.budget_fields` reads it: "0.05" (share of pages) or "512t"."""
    seed: int = 0
    max_new_tokens: int = 24
    haystack: str = "essay"
    batch: int = 1
    calibration: Optional[str] = None
    """A calibration file (`python -m vortex_hybrid.profile`): each sparse mode also runs its
    per-head budgets, as flow "<flow>@calib" at budget = the mean of its ratios."""
    cuda_graphs: bool = False
    """Capture the runtime's per-layer GPU work in CUDA graphs. Off by default: each run is a new
    runtime decoding a few tokens, and captures (per layer, per shape) cost more than they save."""


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (exact-match scores may be fractional: partial
    multi-answer credit counts as that fraction of a success)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, centre - half), min(1.0, centre + half))


CALIBRATED = "@calib"


def parse_budgets(text: str) -> list[str]:
    """The eval's `--budget`: a comma list of budgets, each as `config.budget_fields` reads it
    ("0.05": a share of a request's pages; "512t": tokens per KV head), in canonical form
    ("0.05", "512t"), duplicates dropped; ValueError naming a bad one and the forms allowed."""
    out = []
    for item in text.split(","):
        if not item.strip():
            continue
        fields = budget_fields(item)
        canonical = (f"{fields['budget_tokens']}t" if "budget_tokens" in fields
                     else repr(fields["budget_ratio"]))
        if canonical not in out:
            out.append(canonical)
    if not out:
        raise ValueError("no budget given: a comma list such as 0.05,512t")
    return out


def placement_of(mode: str) -> str:
    """The runtime placement a mode runs in (`streaming`: the GPU side's sparse placement)."""
    return "gpu" if mode == "streaming" else mode


def mode_config(mode: str, flow: str, budget, kv_dtype: str,
                calibration: Optional[str] = None) -> HybridConfig:
    """The runtime config of one run (`budget`: "0.05", 0.05 or "512t", `config.budget_fields`;
    unused by `dense`); a flow named "<flow>@calib" uses `calibration`'s budgets; flow `mass` (the
    oracle, given to the runtime by `decode_run`) runs on a runtime built with `RUNTIME_FLOW`."""
    if mode == "dense":
        return HybridConfig(placement="dense", page_size=PAGE_SIZE, kv_dtype=kv_dtype)
    placement, flow = placement_of(mode), "streaming" if mode == "streaming" else flow
    calibrated = flow.endswith(CALIBRATED)
    if flow == MASS_FLOW:
        flow = RUNTIME_FLOW
    return HybridConfig(placement=placement, flow=flow.removesuffix(CALIBRATED),
                        page_size=PAGE_SIZE, kv_dtype=kv_dtype,
                        calibration=calibration if calibrated else None, **budget_fields(budget))


def budget_share(budget: Optional[str], context: int) -> Optional[float]:
    """A budget as a share of a `context`-token request (a token budget over the context); None
    for none (dense). The x axis of the accuracy plot and the table's order."""
    if budget is None:
        return None
    fields = budget_fields(budget)
    return fields.get("budget_ratio") or fields["budget_tokens"] / context


def budget_label(budget: Optional[str]) -> str:
    """How the table shows a budget: "5%" (share of the pages), "512t" (tokens), "-" (none)."""
    if budget is None:
        return "-"
    ratio = budget_fields(budget).get("budget_ratio")
    return budget if ratio is None else f"{100 * ratio:.3g}%"


def calibrated_combo(path: str, model: Optional[str] = None) -> tuple[str, str]:
    """(flow label, mean budget ratio as a budget text) of a calibration file, checked against the
    eval's pages and, when given, the `--model` it will run (`predictors.calibration.model_name`)."""
    from ..predictors.calibration import Calibration
    try:
        cal = Calibration.load(path)
    except ValueError as exc:
        raise ValueError(f"HybridConfig.calibration: {exc}") from None
    HybridConfig(page_size=PAGE_SIZE, calibration=path, flow=cal.flow)     # the settings match
    cal.check_model(f"calibration {path!r}", "evaluation", name=model)
    return cal.flow + CALIBRATED, repr(float(cal.budgets.mean()))


@torch.inference_mode()
def greedy(model, cache, first: torch.Tensor, max_new: int, eos: set[int]
           ) -> tuple[list[list[int]], float]:
    """Greedy decode of a batch from `first` [B, 1] until every row has produced an EOS or
    `max_new` tokens; (each row's tokens from `first` through its first EOS, decode seconds)."""
    eos_t = torch.tensor(sorted(eos) or [-1], device=first.device)
    out, x = [first], first
    done = torch.isin(first[:, 0], eos_t)
    t0 = time.perf_counter()
    while len(out) < max_new and not bool(done.all()):
        x = model(x, **{CACHE_ARGUMENT: cache}).logits[:, -1:].argmax(-1)
        out.append(x)
        done |= torch.isin(x[:, 0], eos_t)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rows = []
    for row in torch.cat(out, 1).tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row) - 1)
        rows.append(row[:end + 1])
    return rows, seconds


def decode_run(model, cfg: HybridConfig, prefill: tuple, first: torch.Tensor, max_new: int,
               eos: set[int], cuda_graphs: bool = False, mass: bool = False
               ) -> tuple[list[list[int]], float, dict]:
    """One run: a `HybridCache` for `cfg` admits `prefill` (keys, values per layer [B, Hkv, T, D],
    mask [B, T]) and decodes greedily from `first` [B, 1]; (rows, decode seconds, runtime totals).
    mass: the pages come from a `MassOracle` (flow `mass`), not from cfg's flow."""
    keys, values, mask = prefill
    B, T = mask.shape
    selector = MassOracle(cfg, len(model_shape(model).full_layers)) if mass else None
    cache = HybridCache.for_tokens(model, cfg, B, T + max_new, cache_share=CACHE_SHARE,
                                   cuda_graphs=cuda_graphs, selector=selector)
    try:
        cache.admit(keys, values, mask)
        rows, decode_s = greedy(model, cache, first, max_new, eos)
        return rows, decode_s, cache.stats()["totals"]
    finally:
        cache.close()


def evaluate(model, tokenizer, spec: EvalSpec, chat: bool,
             progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run every (sample, mode, flow, budget), `spec.batch` samples at a time (left-padded), each
    (mode, flow, budget) after an untimed warm-up (`WARMUP_TOKENS` on the first batch); returns
    {"runs": [...], "summary": [...]}. A run's decode_s is its share of its batch's decode time."""
    from transformers import DynamicCache
    device = model.device
    kv_dtype = str(model.dtype).removeprefix("torch.")
    suite = task_lib.make_suite(spec.tasks, tokenizer, spec.context, spec.samples, spec.seed, chat,
                                haystack=spec.haystack)
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    gen_eos = gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    eos = {t for t in [tokenizer.eos_token_id, *gen_eos] if isinstance(t, int)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    combos = []                                 # (mode, flow, budget)
    calibrated = calibrated_combo(spec.calibration) if spec.calibration else None
    for m in spec.modes:
        if m == "dense":
            combos.append((m, None, None))
        else:
            combos += [(m, f, b) for f in (["streaming"] if m == "streaming" else spec.flows)
                       for b in spec.budgets]
            if calibrated and m != "streaming":
                combos.append((m, *calibrated))
    runs, warmed = [], set()
    for start in range(0, len(suite), spec.batch):
        group = suite[start:start + spec.batch]
        seqs = [task_lib.render(s, tokenizer, chat) for s in group]
        T, B = max(map(len, seqs)), len(seqs)
        ids = torch.tensor([[pad] * (T - len(x)) + x for x in seqs], device=device)
        mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in seqs], device=device)
        with torch.inference_mode():
            model.config._attn_implementation = "sdpa"
            dyn = DynamicCache(config=model.config)
            t0 = time.perf_counter()
            first = model(ids, attention_mask=mask, **{CACHE_ARGUMENT: dyn}
                          ).logits[:, -1:].argmax(-1)
            prefill_s = (time.perf_counter() - t0) / B
            model.config._attn_implementation = ATTN_IMPLEMENTATION
        keys = [layer.keys for layer in dyn.layers]
        values = [layer.values for layer in dyn.layers]
        prefill = (keys, values, mask)
        head_page_bytes = 2 * PAGE_SIZE * keys[0].shape[-1] * keys[0].element_size()
        for combo in combos:
            mode, flow, budget = combo
            cfg = mode_config(mode, flow or "quest", budget, kv_dtype, spec.calibration)
            mass = flow == MASS_FLOW
            if combo not in warmed:             # compilation and first-call set-up, untimed
                decode_run(model, cfg, prefill, first, WARMUP_TOKENS, set(), spec.cuda_graphs,
                           mass)
                warmed.add(combo)
            rows, decode_s, totals = decode_run(model, cfg, prefill, first, spec.max_new_tokens,
                                                eos, spec.cuda_graphs, mass)
            per_token = max(totals.get("steps", 0), 1) * B            # row-steps
            for b, (sample, tokens) in enumerate(zip(group, rows)):
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                runs.append(dict(
                    task=sample.task, sample=start + b, seed=sample.seed, depth=sample.depth,
                    mode=mode, flow=flow, budget=budget,
                    budget_share=budget_share(budget, spec.context), batch=B,
                    prompt_tokens=len(seqs[b]), answers=sample.answers, output=text,
                    score=task_lib.score(sample, text),
                    prefill_s=prefill_s, decode_s=decode_s / B, decode_tokens=len(tokens) - 1,
                    gpu_page_heads_per_token=totals.get("gpu_pages", 0) / per_token,
                    cpu_page_heads_per_token=totals.get("cpu_pages", 0) / per_token,
                    kv_bytes_per_token=(totals.get("gpu_pages", 0) + totals.get("cpu_pages", 0))
                    * head_page_bytes / per_token))
                if progress:
                    progress(f"{sample.task} #{start + b} {mode}" +
                             (f" {flow} {budget_label(budget)}" if budget else ""))
    return dict(runs=runs, summary=summarize(runs))


def summarize(runs: list[dict]) -> list[dict]:
    """Per (task, mode, flow, budget) and per (all tasks, mode, flow, budget): accuracy with its
    interval, decode tokens/s, KV bytes and page-heads per token."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        for task in (r["task"], "all"):
            groups.setdefault((task, r["mode"], r["flow"], r["budget"]), []).append(r)
    out = []
    for (task, mode, flow, budget), rs in groups.items():
        n, s = len(rs), sum(r["score"] for r in rs)
        dec_s = sum(r["decode_s"] for r in rs)
        out.append(dict(task=task, mode=mode, flow=flow, budget=budget,
                        budget_share=rs[0]["budget_share"], n=n, accuracy=s / n,
                        interval=wilson(s, n),
                        decode_tokens_per_s=sum(r["decode_tokens"] for r in rs) / dec_s
                        if dec_s else None,
                        kv_bytes_per_token=sum(r["kv_bytes_per_token"] for r in rs) / n,
                        gpu_page_heads_per_token=sum(r["gpu_page_heads_per_token"] for r in rs) / n,
                        cpu_page_heads_per_token=sum(r["cpu_page_heads_per_token"] for r in rs) / n))
    return out
