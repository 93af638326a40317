"""One offline evaluation: a model, a suite of long-context task samples, and every mode decoding
from one shared dense prefill per sample.

Per sample the prompt is prefilled once, alone (no padding, only the last position's logits), with
transformers' SDPA (a `DynamicCache`); a batch's prefills are left-padded into one batch (each
sample's positions end where the batch's longest prompt ends, as a left-padded batched prefill
would place them) and each (mode, flow, budget) then gets a `HybridCache` that `admit`s that same
prefill and decodes greedily through `HybridAttention` (so modes differ only in decode attention,
as in the runtime, and the prefill is paid once per sample, not per configuration). Modes: the five placements, and
`streaming` (sink + recent pages only, on the GPU side), the bad baseline. Each sparse mode runs
every flow of `flows` at every budget (flow `mass`: the pages of the most true attention mass,
`mass_oracle`, a diagnostic ceiling) (`config.budget_fields`: "0.05" a share of the pages, "512t"
tokens per KV head). Accuracy is RULER's exact match (`tasks.score`), with a Wilson 95% interval
over the samples. Decode speed excludes one-time costs (Numba and Triton compilation, first-call
set-up): each (mode, flow, budget) first decodes `WARMUP_TOKENS` tokens of the first batch,
untimed and unscored, before its timed runs (`EvalSpec.warmup`; off for runs that want accuracy
only).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

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
    flows: list[str] = field(default_factory=lambda: ["lowbit"])
    budgets: list[str] = field(default_factory=lambda: ["0.05"])
    """Each a budget as `config.budget_fields` reads it: "0.05" (share of pages) or "512t"."""
    seed: int = 0
    max_new_tokens: int = 24
    haystack: str = "essay"
    batch: int = 1
    calibration: Union[str, list, None] = None
    """Calibration files (`python -m vortex_hybrid.profile`; a path, a comma list or a list, at
    most one per flow): each sparse mode also runs each one's per-head budgets, as flow
    "<flow>@calib" at budget = the mean of its ratios."""
    cuda_graphs: bool = False
    """Capture the runtime's per-layer GPU work in CUDA graphs. Off by default: each run is a new
    runtime decoding a few tokens, and captures (per layer, per shape) cost more than they save."""
    warmup: bool = True
    """Decode `WARMUP_TOKENS` untimed before each (mode, flow, budget)'s timed runs. Off: the decode
    speeds include one-time costs (compilation), the accuracies are the same."""


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


def calibration_files(calibration: Union[str, list, None]) -> list[str]:
    """`EvalSpec.calibration` as a list of paths (a path, a comma list, a list or None)."""
    if not calibration:
        return []
    items = calibration.split(",") if isinstance(calibration, str) else list(calibration)
    return [str(c).strip() for c in items if str(c).strip()]


def calibrated_combos(calibration: Union[str, list, None], model: Optional[str] = None
                      ) -> dict[str, tuple[str, str]]:
    """{flow label: (budget text, file)} of `calibrated_combo` over the files of `calibration`;
    ValueError for two files of the same flow (their rows could not be told apart)."""
    out: dict[str, tuple[str, str]] = {}
    for path in calibration_files(calibration):
        label, budget = calibrated_combo(path, model)
        if label in out:
            raise ValueError(f"calibrations {out[label][1]!r} and {path!r} are both for flow "
                             f"{label.removesuffix(CALIBRATED)!r}: give one per flow")
        out[label] = (budget, path)
    return out


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


PREFILL_CHUNK = 2048
"""Query rows per chunk of a long prompt's prefill (`windowed_prefill_attention`)."""
PREFILL_ATTENTION = "vortex_hybrid_prefill"


def windowed_prefill_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA, except the prefill of a lone unpadded prompt longer than
    `PREFILL_CHUNK`: each chunk of query rows attends only the keys it can reach (its window in a
    sliding-window layer, every earlier key in a full one), with the same causal (and window) mask
    SDPA would use, so no layer builds the T x T scores at once (gemma3-270m at 32K: its 15
    sliding layers would otherwise cost ~30x its 3 full ones, and a full layer's float32 scores
    take 16 GiB)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    window = getattr(module, "sliding_window", None)
    T = query.shape[2]
    if T <= PREFILL_CHUNK or key.shape[2] != T or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    outs = []
    for s in range(0, T, PREFILL_CHUNK):
        e = min(T, s + PREFILL_CHUNK)
        k0 = max(0, s - window + 1) if window else 0
        qi = torch.arange(s, e, device=query.device)[:, None]
        kj = torch.arange(k0, e, device=query.device)[None]
        mask = kj <= qi                                              # causal
        if window:
            mask = mask & (kj > qi - window)                         # transformers' sliding mask
        out, _ = sdpa_attention_forward(module, query[:, :, s:e], key[:, :, k0:e],
                                        value[:, :, k0:e], mask[None, None], is_causal=False,
                                        **kwargs)
        outs.append(out)
    return torch.cat(outs, 1), None


def _register_prefill_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(PREFILL_ATTENTION, windowed_prefill_attention)
    AttentionMaskInterface.register(PREFILL_ATTENTION, sdpa_mask)


@torch.inference_mode()
def prefill_batch(model, seqs: list[list[int]],
                  on_prompt: Optional[Callable[[int], None]] = None
                  ) -> tuple[tuple, torch.Tensor, list[float]]:
    """Prefill each prompt of `seqs` alone (SDPA, by chunks of query rows: `windowed_prefill_attention`; a `DynamicCache`, no padding, the last position's logits only) at the positions it holds in a batch left-padded to the longest prompt, and pack
    the caches into that batch: ((keys, values per layer [B, Hkv, T_layer, D], zeros where padded;
    mask [B, T]), first greedy tokens [B, 1], prefill seconds per prompt). Equal, up to the
    rounding of batched kernels, to one left-padded batched prefill; a lone prompt needs neither a
    padding mask nor the batch's T x T attention mask (which at 32K tokens would not fit).
    `on_prompt(i)` is called before prompt i's forward (progress)."""
    from transformers import DynamicCache
    device = model.device
    T = max(map(len, seqs))
    firsts, caches, seconds = [], [], []
    _register_prefill_attention()
    model.config._attn_implementation = PREFILL_ATTENTION
    try:
        for i, x in enumerate(seqs):
            if on_prompt is not None:
                on_prompt(i)
            ids = torch.tensor([x], device=device)
            pos = torch.arange(T - len(x), T, device=device)[None]
            dyn = DynamicCache(config=model.config)
            t0 = time.perf_counter()
            logits = model(ids, position_ids=pos, logits_to_keep=1,
                           **{CACHE_ARGUMENT: dyn}).logits
            firsts.append(logits[:, -1:].argmax(-1))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
            caches.append([(layer.keys, layer.values) for layer in dyn.layers])
            del dyn, logits
    finally:
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    keys, values = [], []
    for i in range(len(caches[0])):
        n = max(c[i][0].shape[2] for c in caches)
        for out, j in ((keys, 0), (values, 1)):
            parts = [c[i][j] for c in caches]
            packed = parts[0].new_zeros(len(parts), *parts[0].shape[1:2], n, parts[0].shape[3])
            for b, part in enumerate(parts):
                packed[b, :, n - part.shape[2]:] = part[0]
            out.append(packed)
        for c in caches:                        # free each sample's layer once packed
            c[i] = None
    mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in seqs], device=device)
    return (keys, values, mask), torch.cat(firsts), seconds


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
             progress: Optional[Callable[..., None]] = None) -> dict:
    """Run every (sample, mode, flow, budget), `spec.batch` samples at a time (left-padded), each
    (mode, flow, budget) after an untimed warm-up (`WARMUP_TOKENS` on the first batch; none
    without `spec.warmup`), all from one prefill per sample (`prefill_batch`); returns
    {"runs": [...], "summary": [...]}. A run's decode_s is its share of its batch's decode time.
    `progress(what)` is called after each run; `progress(what, False)` before each prompt's
    prefill (no run done: a long prompt's prefill takes minutes on a CPU)."""
    kv_dtype = str(model.dtype).removeprefix("torch.")
    suite = task_lib.make_suite(spec.tasks, tokenizer, spec.context, spec.samples, spec.seed, chat,
                                haystack=spec.haystack)
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    gen_eos = gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    eos = {t for t in [tokenizer.eos_token_id, *gen_eos] if isinstance(t, int)}
    combos = []                                 # (mode, flow, budget)
    calibrated = calibrated_combos(spec.calibration)
    for m in spec.modes:
        if m == "dense":
            combos.append((m, None, None))
        else:
            combos += [(m, f, b) for f in (["streaming"] if m == "streaming" else spec.flows)
                       for b in spec.budgets]
            if m != "streaming":
                combos += [(m, label, budget) for label, (budget, _) in calibrated.items()]
    runs, warmed = [], set()
    for start in range(0, len(suite), spec.batch):
        group = suite[start:start + spec.batch]
        seqs = [task_lib.render(s, tokenizer, chat) for s in group]
        B = len(seqs)
        note = None
        if progress:
            def note(i, start=start, group=group):
                progress(f"prefill {start + i + 1}/{len(suite)} ({group[i].task})", False)
        prefill, first, prefill_times = prefill_batch(model, seqs, note)
        keys = prefill[0]
        head_page_bytes = 2 * PAGE_SIZE * keys[0].shape[-1] * keys[0].element_size()
        for combo in combos:
            mode, flow, budget = combo
            cfg = mode_config(mode, flow or "quest", budget, kv_dtype,
                              calibrated.get(flow, (None, None))[1])
            mass = flow == MASS_FLOW
            if spec.warmup and combo not in warmed:     # compilation, first-call set-up: untimed
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
                    prefill_s=prefill_times[b], decode_s=decode_s / B, decode_tokens=len(tokens) - 1,
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
