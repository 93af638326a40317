"""`python -m vortex_hybrid.profile`: per-head budgets for a model, and the machine's bandwidths.

    python -m vortex_hybrid.profile --model smollm2-135m --context 4096 --out calib.json
    python -m vortex_hybrid.eval --calibration calib.json           # use it (or HybridConfig(
                                                                    #   flow="centroid", calibration="calib.json"))
    python -m vortex_hybrid.profile --check calib.json              # validate and summarise one

Runs long-context task prompts (`vortex_hybrid.eval.tasks`) through the model with dense attention,
measuring at every full-attention layer, per KV head, the output error of the flow's selection over
a ladder of budgets, and the head's concentration, locality and step-to-step reuse
(`predictors.head_properties`). Chooses per-head budgets whose mean output error
||o_sparse - o_dense|| / ||o_dense|| meets --error-target with the fewest pages
(`predictors.budget_selector`), judges them on held-out prompts against uniform budgets, fits and
judges the head predictor, measures the machine (GPU and host memory; HBM, PCIe and CPU bandwidth
alone and concurrent, saved for the runtime's scheduler), and writes a versioned JSON calibration
plus two PNGs beside it (<out>_budgets.png, <out>_reuse.png). Bad options, a missing model, an
unwritable output, a wrong-version or corrupt calibration exit with code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

DEFAULT_TASKS = "niah_single,niah_multikey,niah_multivalue,vt,cwe"


def parse(argv) -> argparse.Namespace:
    from ..eval.models import add_model_argument
    ap = argparse.ArgumentParser(prog="python -m vortex_hybrid.profile",
                                 description=__doc__.split("\n\n")[0])
    add_model_argument(ap)
    ap.add_argument("--samples", type=int, default=4,
                    help="calibration prompts, cycling through --tasks (4)")
    ap.add_argument("--heldout", type=int, default=2,
                    help="held-out prompts (other seeds) that judge the budgets and the predictor; "
                         "0 skips the judgement (2)")
    ap.add_argument("--context", type=int, default=2048, help="prompt tokens (2048)")
    ap.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma list ({DEFAULT_TASKS})")
    ap.add_argument("--error-target", type=float, default=0.1,
                    help="mean relative output error the per-head budgets must meet (0.1)")
    ap.add_argument("--max-pages", type=float, default=None,
                    help="optional cap on the mean budget (share of a request's pages): when the "
                         "target needs more, the error is minimised under the cap instead")
    ap.add_argument("--granularity", default="auto", choices=("auto", "page"),
                    help="auto: each head at page or token granularity (page then token on the CPU), "
                         "whichever meets the target with fewer bytes; page: page granularity only "
                         "(auto)")
    ap.add_argument("--flow", default="centroid", help="the flow the runtime will select with "
                                                       "(centroid)")
    ap.add_argument("--page-size", type=int, default=16, help="tokens per page (16)")
    ap.add_argument("--sink", type=int, default=1, help="sink pages, always attended (1)")
    ap.add_argument("--recent", type=int, default=2, help="recent pages, always attended (2)")
    ap.add_argument("--probes", type=int, default=8,
                    help="query positions measured per prompt: its last ones, where decoding "
                         "starts (8)")
    ap.add_argument("--out", default="calib.json", help="calibration JSON to write (calib.json)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help="task prompts' seed (0)")
    ap.add_argument("--no-bandwidth", action="store_true",
                    help="skip the bandwidth microbenchmarks (memory facts only)")
    ap.add_argument("--no-chat", action="store_true",
                    help="plain prompts even when the tokenizer has a chat template")
    ap.add_argument("--check", metavar="FILE", default=None,
                    help="validate a calibration file, print its summary, and exit")
    ap.add_argument("--retarget", metavar="FILE", default=None,
                    help="choose budgets again from FILE's measured curves for --error-target / "
                         "--max-pages (no prompts run) and write --out")
    return ap.parse_args(argv)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check(args) -> list[str]:
    from ..config import HybridConfig
    from ..eval import tasks as task_lib
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in task_lib.TASKS]
    if bad or not tasks:
        fail(f"--tasks {args.tasks!r}: unknown {bad}; allowed: {', '.join(task_lib.TASKS)}")
    for name, low in (("samples", 1), ("heldout", 0), ("context", 64), ("probes", 2)):
        if getattr(args, name) < low:
            fail(f"--{name} {getattr(args, name)}: must be >= {low}")
    if not (0 < args.error_target < float("inf")):
        fail(f"--error-target {args.error_target}: a positive number")
    if args.max_pages is not None and not (0 < args.max_pages <= 1):
        fail(f"--max-pages {args.max_pages}: a share of the pages in (0, 1]")
    try:
        HybridConfig(flow=args.flow, page_size=args.page_size, sink_pages=args.sink,
                     recent_pages=args.recent)
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        fail(f"--out {args.out!r} is not writable ({exc.strerror or exc})")
    if out.is_dir():
        fail(f"--out {args.out!r} is a folder; name the JSON file to write")
    return tasks


def show(cal) -> str:
    """A few lines summarising a calibration."""
    s = cal.extra.get("summary", {})
    lines = [f"calibration: {cal.model.get('name', '?')}, {cal.num_layers} layers x "
             f"{cal.num_kv_heads} KV heads, flow {cal.flow}, page {cal.page_size}, mean output "
             f"error target {cal.error_target:g}",
             f"per-head budgets: mean ratio {cal.budgets.mean():.4f} (min {cal.budgets.min():g}, "
             f"max {cal.budgets.max():g}); {int(cal.token_heads().sum())} of "
             f"{cal.budgets.size} heads at token granularity (token share {cal.token_share:g})"]
    ph, uni = s.get("per_head"), s.get("uniform")
    if ph:
        lines.append(f"calibration prompts: per-head mean error {ph['mean_error']:.4f} at "
                     f"{ph['pages']:.4f} of the pages" + ("" if ph["met"] else " (target missed)"))
    if uni:
        lines.append(f"best uniform budget meeting the target: ratio {uni['ratio']:g}, mean error "
                     f"{uni['mean_error']:.4f} at {uni['pages']:.4f} of the pages")
    h = s.get("heldout")
    if h:
        lines.append(f"held-out prompts: per-head mean error {h['per_head_mean_error']:.4f} at "
                     f"{h['per_head_pages']:.4f} of the pages; a uniform budget needs "
                     f"{h['uniform_pages_at_equal_error']:.4f} for that error: "
                     f"pages ratio {h['pages_ratio']:.3f} ({1 - h['pages_ratio']:+.1%} fewer)")
    p = s.get("predictor") or {}
    if p.get("heldout"):
        lines.append(f"head predictor, held-out: mean |error| {p['heldout']['mae_log2']:.2f} log2 "
                     f"units (constant baseline {p['heldout_constant_baseline']['mae_log2']:.2f}); "
                     f"its budgets meet the target for {p['heldout']['meets_target']:.0%} of heads")
    machine = cal.extra.get("machine") or {}
    if "costs" in machine:
        from ..scheduler.cost_model import MachineCosts
        lines.append(MachineCosts.from_dict(machine["costs"]).summary() +
                     f" (cache: {machine.get('costs_saved_to', '?')})")
    return "\n".join(lines)


def retarget(args) -> int:
    """Budgets chosen again from a calibration's stored curves (`--retarget`)."""
    import numpy as np
    from ..predictors.calibration import Calibration
    from .calibrate import Curves, choose, judge_heldout
    try:
        cal = Calibration.load(args.retarget)
        calib, held = Curves.stored(cal)
        ladder = np.asarray(cal.extra["ladder"], dtype=np.float64)
    except (ValueError, KeyError) as exc:
        fail(f"--retarget {args.retarget!r}: {str(exc).splitlines()[0]} (needs the curves a "
             "profile run stores)")
    if not (0 < args.error_target < float("inf")):
        fail(f"--error-target {args.error_target}: a positive number")
    R = calib.error.shape[-1]
    gran = args.granularity if "token_error_curves" in cal.extra else "page"
    choice, idx = choose(calib, gran, args.error_target, args.max_pages, cal.token_share)
    cal.budgets = ladder[idx % R]
    cal.granularity = np.where(idx >= R, "token", "page").tolist()
    cal.error_target = float(args.error_target)
    summary = dict(cal.extra.get("summary", {}))
    summary["per_head"] = {"mean_error": choice.mean_error, "pages": choice.pages,
                           "met": choice.met, "token_heads": int((idx >= R).sum())}
    if held is not None:
        summary["heldout"] = dict(summary["heldout"],
                                  **judge_heldout(idx, held, gran, cal.token_share))
    cal.extra.update(summary=summary, retargeted_from=str(args.retarget), granularity_choice=gran)
    print(f"wrote {write(cal, args.out)[0]}")
    return 0


def write(cal, out_arg: str) -> list[str]:
    """Save the calibration to --out, draw its pictures beside it, print its summary; returns the
    files written."""
    from .plots import draw
    out = Path(out_arg)
    try:
        cal.save(out)
    except OSError as exc:
        fail(f"--out {out_arg!r}: cannot write ({exc.strerror or exc})")
    stem = out.with_suffix("")
    files = [str(out)] + draw(cal, Path(f"{stem}_budgets.png"), Path(f"{stem}_reuse.png"))
    print(show(cal))
    return files


def main(argv=None) -> int:
    args = parse(argv)
    if args.check is not None:
        from ..predictors.calibration import Calibration
        try:
            print(show(Calibration.load(args.check)))
        except ValueError as exc:
            fail(str(exc).splitlines()[0])
        return 0
    if args.retarget is not None:
        return retarget(args)
    tasks = check(args)
    from tqdm import tqdm
    from ..eval import tasks as task_lib
    from ..eval.models import load_model
    from ..integrations.hf import model_shape
    from ..predictors.calibration import model_name
    from ..predictors.head_properties import LADDER, measure_layer
    from . import capture
    from .calibrate import calibrate
    from .machine import measure_machine
    t0 = time.perf_counter()
    try:
        model, tok, path = load_model(args.model, args.device, capture.PROFILE_ATTN, args.threads)
        shape = model_shape(model)
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit and args.context > limit:
        fail(f"--context {args.context} exceeds the model's {limit} positions")
    chat = not args.no_chat and bool(getattr(tok, "chat_template", None))
    seeds = [("calibration", args.seed + i) for i in range(args.samples)] + \
            [("heldout", args.seed + 100_000 + i) for i in range(args.heldout)]
    measure = partial(measure_layer, flow=args.flow, page_size=args.page_size, sink=args.sink,
                      recent=args.recent, ladder=LADDER)
    bar = tqdm(total=len(seeds) * len(shape.full_layers), desc="profile", unit="layer")
    traces = {"calibration": [], "heldout": []}
    try:
        for i, (part, seed) in enumerate(seeds):
            task = tasks[i % len(tasks)]
            bar.set_postfix_str(f"{part} {task} seed {seed}")
            sample = task_lib.make_sample(task, tok, args.context, seed, chat=chat)
            ids = task_lib.render(sample, tok, chat)
            traces[part].append(capture.trace_prompt(model, ids, args.probes, measure,
                                                     on_layer=bar.update))
    except ValueError as exc:
        bar.close()
        fail(str(exc).splitlines()[0])
    bar.close()
    settings = dict(flow=args.flow, page_size=args.page_size, sink_pages=args.sink,
                    recent_pages=args.recent)
    model_info = dict(name=model_name(path), path=str(path), num_layers=len(shape.full_layers),
                      num_q_heads=shape.num_q_heads, num_kv_heads=shape.num_kv_heads,
                      head_dim=shape.head_dim, model_layers=shape.full_layers)
    cal, summary = calibrate(traces["calibration"], traces["heldout"], list(LADDER),
                             args.error_target, args.max_pages, settings, model_info,
                             args.granularity)
    print("measuring the machine ...", file=sys.stderr)
    cal.extra.update(machine=measure_machine(not args.no_bandwidth),
                     prompts=dict(tasks=tasks, context=args.context, probes=args.probes,
                                  seed=args.seed, chat=chat, device=str(model.device)),
                     created=time.strftime("%Y-%m-%d %H:%M:%S"),
                     command="python -m vortex_hybrid.profile " + " ".join(argv or sys.argv[1:]),
                     seconds=time.perf_counter() - t0)
    files = write(cal, args.out)
    print(f"wrote {', '.join(files)} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
