"""`python -m vortex_hybrid.eval`: a real model on long-context retrieval tasks in every mode, accuracy
and decode speed side by side.

    python -m vortex_hybrid.eval                                  # smollm2-135m, defaults below
    python -m vortex_hybrid.eval --model ./my-llama --context 8192 --budget 0.02,0.05,1024t

Prints a table (accuracy per task and mode with a 95% interval, decode tokens/s after an untimed
warm-up of each mode, KV bytes read per token, page-heads attended on the GPU and the CPU per token)
and a legend of its columns; writes eval.json and, where matplotlib imports, eval.png (accuracy vs
budget per mode and flow; decode tokens/s per mode) under --out. Bad options exit with code 2 and
one line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from . import tasks as task_lib
from .models import add_model_argument, load_model
from .run import (MODES, EvalSpec, budget_label, calibration_files, evaluate, parse_budgets,
                  placement_of)

DEFAULT_TASKS = "niah_single,niah_multikey"
DEFAULT_BUDGETS = "0.05,512t"
LEGEND = ("legend: budget = a share of each request's pages (5%) or tokens per KV head (512t); "
          "accuracy = exact match, with its 95% (Wilson) interval; decode tok/s = greedy decode "
          "after each mode's untimed warm-up (compilation excluded); KV MB/token = K and V bytes "
          "attended per decoded token; GPU p-h/tok, CPU p-h/tok = page-heads (one page of one KV "
          "head in one layer) attended per decoded token on the GPU side and by the CPU")
NO_CUDA = ("no GPU in use (no CUDA here, or --device cpu): the `gpu` side of every mode (GPU "
           "kernels, GPU page cache) runs on the CPU as torch code, so decode speeds compare CPU "
           "stand-ins, not a GPU")


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vortex_hybrid.eval",
                                 description=__doc__.split("\n\n")[0])
    add_model_argument(ap)
    ap.add_argument("--tasks", default=DEFAULT_TASKS,
                    help=f"comma list of {', '.join(task_lib.TASKS)} (default {DEFAULT_TASKS})")
    ap.add_argument("--context", type=int, default=2048, help="prompt tokens per sample (2048)")
    ap.add_argument("--samples", type=int, default=2, help="samples per task (2)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma list of {', '.join(MODES)} (default: all)")
    ap.add_argument("--flow", default="lowbit",
                    help="comma list of page selection flows for the sparse modes (default "
                         "lowbit: on smollm2-135m's needle tasks at 4K it scored 0.625-0.675 at "
                         "2%%, 5%% and 512t against dense 0.65 and centroid 0.13-0.38, measured "
                         "on the flow interpreter; docs/BENCHMARKS.md); 'mass': the pages of "
                         "the most true attention mass, a diagnostic ceiling that reads every key")
    ap.add_argument("--budget", default=DEFAULT_BUDGETS,
                    help="comma list of budgets, each a fraction of a request's pages in (0, 1] "
                         "(budget_ratio, e.g. 0.05) or tokens per KV head with a 't' suffix "
                         f"(budget_tokens, e.g. 512t) (default {DEFAULT_BUDGETS})")
    ap.add_argument("--calibration", default=None, metavar="FILE[,FILE]",
                    help="calibrations from python -m vortex_hybrid.profile, at most one per flow: "
                         "every sparse mode also runs each one's per-head budgets (shown as flow "
                         "<flow>@calib, budget = the mean of its ratios)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="capture the runtime's per-layer GPU work in CUDA graphs (worth it for long "
                         "decodes; each run captures anew)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="greedy decode length (16)")
    ap.add_argument("--haystack", default="essay", choices=("essay", "noise"))
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip each configuration's untimed warm-up decode: accuracy is the same, "
                         "decode tok/s then include one-time costs (compilation)")
    ap.add_argument("--batch", type=int, default=1,
                    help="samples decoded together (left-padded; one request each) (1)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/eval", help="folder for eval.json and eval.png")
    ap.add_argument("--no-chat", action="store_true",
                    help="plain prompts even when the tokenizer has a chat template")
    return ap.parse_args(argv)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check(args) -> EvalSpec:
    tasks = [t for t in args.tasks.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    bad = [t for t in tasks if t not in task_lib.TASKS]
    if bad or not tasks:
        fail(f"--tasks {args.tasks!r}: unknown {bad}; allowed: {', '.join(task_lib.TASKS)}")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        fail(f"--modes {args.modes!r}: unknown {bad}; allowed: {', '.join(MODES)}")
    try:
        budgets = parse_budgets(args.budget)
    except ValueError as exc:
        fail(f"--budget {args.budget!r}: {exc}")
    for name in ("context", "samples", "max_new_tokens", "batch"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.device not in ("auto", "cpu", "cuda"):
        fail(f"--device {args.device!r}: cpu, cuda or auto")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        fail(f"--out {args.out!r} is not writable ({exc.strerror or exc})")
    if args.calibration is not None:
        from .run import calibrated_combos
        try:
            calibrated_combos(args.calibration, args.model)
        except ValueError as exc:
            fail(f"--calibration: {str(exc).splitlines()[0]}")
    return EvalSpec(calibration=calibration_files(args.calibration), cuda_graphs=args.cuda_graphs,
                    tasks=tasks, context=args.context, samples=args.samples, modes=modes,
                    flows=[f for f in args.flow.split(",") if f], budgets=budgets, seed=args.seed,
                    max_new_tokens=args.max_new_tokens, haystack=args.haystack,
                    batch=args.batch, warmup=not args.no_warmup)


def load(args, spec: EvalSpec):
    from ..config import HybridConfig
    from ..integrations.hf import ATTN_IMPLEMENTATION
    from .mass_oracle import MASS_FLOW
    for flow in spec.flows:
        if flow == MASS_FLOW:
            continue
        try:
            HybridConfig(flow=flow)
        except ValueError as exc:
            fail(f"--flow {flow!r}: {str(exc).splitlines()[0]}")
    try:
        model, tok, path = load_model(args.model, args.device, ATTN_IMPLEMENTATION, args.threads)
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit and spec.context + spec.max_new_tokens > limit:
        fail(f"--context {spec.context} + --max-new-tokens {spec.max_new_tokens} exceeds the model's "
             f"{limit} positions")
    chat = not args.no_chat and bool(getattr(tok, "chat_template", None))
    return model, tok, chat, str(path)


def table(summary: list[dict]) -> str:
    head = ["task", "mode", "flow", "budget", "n", "accuracy", "95% interval", "decode tok/s",
            "KV MB/token", "GPU p-h/tok", "CPU p-h/tok"]
    rows = [[s["task"], s["mode"], s["flow"] or "-", budget_label(s["budget"]),
             str(s["n"]), f"{s['accuracy']:.2f}",
             f"[{s['interval'][0]:.2f}, {s['interval'][1]:.2f}]",
             "-" if s["decode_tokens_per_s"] is None else f"{s['decode_tokens_per_s']:.1f}",
             f"{s['kv_bytes_per_token'] / 1e6:.2f}", f"{s['gpu_page_heads_per_token']:.0f}",
             f"{s['cpu_page_heads_per_token']:.0f}"]
            for s in sorted(summary, key=lambda s: (s["task"] == "all", s["task"], s["mode"],
                                                    s["flow"] or "", s["budget_share"] or 0))]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [head] + rows)


def chart(result: dict, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no chart"
    overall = [s for s in result["summary"] if s["task"] == "all"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    lines: dict[tuple, list] = {}
    for s in overall:
        if s["budget"] is None:
            a.axhline(s["accuracy"], color="k", linestyle="--", label=f"{s['mode']} (every page)")
        else:
            lines.setdefault((s["mode"], s["flow"]), []).append((s["budget_share"], s["accuracy"]))
    for i, ((mode, flow), pts) in enumerate(sorted(lines.items())):
        xs, ys = zip(*sorted(pts))                   # modes often coincide: markers tell them apart
        a.plot(xs, ys, marker="osD^vP*X"[i % 8], markersize=9 - (i % 8), alpha=0.8,
               label=mode if mode == "streaming" else f"{mode} / {flow}")
    a.set_xlabel(f"budget (share of a request's pages; token budgets / {result['context']})")
    a.set_ylabel("exact match (all tasks)")
    a.set_ylim(-0.02, 1.05)
    a.legend(fontsize=7)
    modes = sorted({s["mode"] for s in overall})
    speed = [sum(s["decode_tokens_per_s"] or 0 for s in overall if s["mode"] == m) /
             sum(1 for s in overall if s["mode"] == m) for m in modes]
    b.bar(modes, speed)
    b.set_ylabel("decode tokens/s (mean over flows, budgets)")
    b.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle(f"{result['model']} @ {result['context']} tokens, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"chart: {path}"


def note_cost_figures(modes: list[str]) -> None:
    """Let the runtime log its one-time notes now, before the progress bar: which machine figures
    each placement plans with are defaults, not measured here (`scheduler.cost_model.costs_for`,
    which the runs call again for the same costs, logging nothing more)."""
    from ..scheduler import cost_model
    for placement in dict.fromkeys(placement_of(m) for m in modes):
        cost_model.costs_for(placement)


def main(argv=None) -> int:
    args = parse(argv)
    spec = check(args)
    model, tok, chat, path = load(args, spec)
    n = len(spec.tasks) * spec.samples * sum(
        1 if m == "dense" else len(spec.budgets) * (1 if m == "streaming" else len(spec.flows))
        + (m != "streaming") * len(spec.calibration) for m in spec.modes)
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    note_cost_figures(spec.modes)
    bar = tqdm(total=n, desc="eval", unit="run")

    def progress(what: str, done: bool = True) -> None:
        bar.set_postfix_str(what)
        if done:
            bar.update()

    t0 = time.perf_counter()
    try:
        with logging_redirect_tqdm():           # log lines print above the bar, not through it
            result = evaluate(model, tok, spec, chat, progress)
    except ValueError as exc:           # e.g. a context too small for a task's fixed text
        bar.close()
        fail(str(exc).splitlines()[0])
    bar.close()
    result.update(model=args.model, model_path=path, context=spec.context, chat=chat,
                  device=str(model.device) + ("" if model.device.type == "cuda" else
                                              f" ({platform.machine()}, {os.cpu_count()} cores)"),
                  spec=vars(spec), seconds=time.perf_counter() - t0,
                  date=time.strftime("%Y-%m-%d"))
    out = Path(args.out)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    print(table(result["summary"]))
    print(LEGEND)
    if not spec.warmup:
        print("--no-warmup: decode tok/s include one-time costs (compilation, first calls)")
    if model.device.type != "cuda":
        print(NO_CUDA)
    print(chart(result, out / "eval.png"))
    print(f"json: {out / 'eval.json'}; {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
