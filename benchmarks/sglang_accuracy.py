"""Question: served by a real SGLang engine with the plugin, does a real model keep its answers?
At full budget the tokens must be SGLang's own backend's; at a sparse budget the accuracy on the
eval's long-context tasks must stay near the dense engine's.

One `sgl.Engine` per run on a real model (a built-in name of `vortex_hybrid.eval`, resolved to its
converted folder, or a Hugging Face folder) and the eval's own prompts (`vortex_hybrid.eval.tasks`:
--samples per task at --context tokens, rendered with the model's chat template, greedy,
--max-new-tokens). Runs: SGLang's own backend (`triton` on CUDA with its graphs on; `torch_native`
without CUDA: the CPU engine), then `vortex_hybrid` at full budget (`PLACEMENT@full`: every page;
its tokens must be the peer's) and at --budget with --flow (`PLACEMENT`). Per run: accuracy
(RULER's exact match, `tasks.score`) per task and in all, requests whose tokens equal the peer's,
and the seconds the run took. Writes sglang_accuracy.json under --out after every run; exits 1
with --check unless every run finished and every @full run gave the peer's tokens.

    python benchmarks/sglang_accuracy.py --model smollm2-135m --context 2048 --samples 8 --out results

Without CUDA it runs SGLang's CPU engine, which needs stand-ins for `sgl_kernel` and `torchvision`
on the path: `PYTHONPATH=tests/with_sglang/stubs` (what the real-SGLang tests use).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RUNS = "gpu@full,hybrid"
P = 16


def backend_of(run: str, cuda: bool) -> str:
    """The attention backend of a run: SGLang's own for the peer, else vortex_hybrid."""
    if run == "peer":
        return "triton" if cuda else "torch_native"
    return "vortex_hybrid"


def engine_kwargs(run: str, model: Path, args, cuda: bool) -> dict:
    """The `sgl.Engine` keywords of a run: the peer (`peer`), or vortex_hybrid in a placement."""
    kw = dict(model_path=str(model), sampling_backend="pytorch", skip_tokenizer_init=True,
              random_seed=0, page_size=P, disable_radix_cache=True, log_level="warning",
              max_running_requests=args.batch, dtype="bfloat16" if cuda else "float32",
              context_length=args.context + args.max_new_tokens + 64,
              max_total_tokens=args.batch * (args.context + args.max_new_tokens + 64) + 64 * P)
    if cuda:
        kw["mem_fraction_static"] = 0.5
    else:
        kw.update(device="cpu", disable_cuda_graph=True)
    kw["attention_backend"] = backend_of(run, cuda)
    if run == "peer":
        return kw
    placement, _, full = run.partition("@")
    cfg = {"placement": placement, "page_size": P, "flow": args.flow,
           "budget_ratio": 1.0 if full == "full" else args.budget}
    kw["vortex_hybrid_config"] = json.dumps(cfg)
    if cuda:
        kw["disable_prefill_cuda_graph"] = True      # SGLang's decode graphs stay on
    return kw


def generate(run: str, model: Path, prompts: list, args, argv: list) -> list:
    """Each prompt's greedy tokens from one engine of `run`, started in a process of its own (this
    script with --one-run): an engine that fails to start leaves sockets behind that would hang the
    next engine's requests in this process (pyzmq's garbage collection, SGLang 0.5.17), and a run
    past --run-timeout is ended there, not here."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory(prefix="sglang_accuracy_") as io:
        Path(io, "prompts.json").write_text(json.dumps(prompts))
        try:
            child = subprocess.run([sys.executable, __file__, *argv, "--one-run", run, "--io", io,
                                    "--model", str(model)], capture_output=True, text=True,
                                   timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"no answer within --run-timeout={args.run_timeout:g} s") from None
        answer = Path(io, "output_ids.json")
        if child.returncode != 0 or not answer.is_file():
            tail = (child.stderr or "").strip().splitlines()[-1:] or ["no error output"]
            raise RuntimeError(f"exit {child.returncode}: {tail[0]}")
        return json.loads(answer.read_text())


def one_run(run: str, io: Path, args, cuda: bool) -> None:
    """The child side of `generate`: one engine over io/prompts.json into io/output_ids.json."""
    import sglang as sgl

    from vortex_hybrid.integrations.sglang.shutdown import shut_down
    prompts = json.loads((io / "prompts.json").read_text())
    llm = sgl.Engine(**engine_kwargs(run, Path(args.model), args, cuda))
    try:
        params = {"temperature": 0, "max_new_tokens": args.max_new_tokens}
        got = [o["output_ids"] for o in llm.generate(input_ids=prompts, sampling_params=params)]
        (io / "output_ids.json").write_text(json.dumps(got))
    finally:
        shut_down(llm)


def table(result: dict) -> str:
    """The markdown table of the runs."""
    tasks = result["args"]["tasks"].split(",")
    head = ["run", "backend", "budget"] + tasks + ["all", "= peer", "s"]
    rows = []
    for run, r in result["runs"].items():
        if "error" in r:
            rows.append([run, "-", "-"] + ["-"] * len(tasks) + ["error", "-", "-"])
            continue
        rows.append([run, r["backend"], r["budget"]] + [f"{r['by_task'][t]:.2f}" for t in tasks]
                    + [f"{r['accuracy']:.3f}", f"{r['same_as_peer']}/{r['n']}", f"{r['s']:.0f}"])
    md = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(md + ["| " + " | ".join(x) + " |" for x in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m",
                    help="a built-in model of vortex_hybrid.eval or a Hugging Face folder")
    ap.add_argument("--context", type=int, default=2048, help="prompt tokens (2048)")
    ap.add_argument("--samples", type=int, default=8, help="prompts per task (8)")
    ap.add_argument("--tasks", default="niah_single,niah_multikey", help="comma list of eval tasks")
    ap.add_argument("--flow", default="lowbit", help="selection flow of the sparse runs (lowbit)")
    ap.add_argument("--budget", type=float, default=0.05, help="sparse runs: share of pages (0.05)")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8, help="SGLang's --max-running-requests (8)")
    ap.add_argument("--runs", default=RUNS,
                    help=f"comma-separated vortex_hybrid runs, PLACEMENT[@full] (default {RUNS}); "
                         "the peer always runs first")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless every run finished and every @full run gave the peer's tokens")
    ap.add_argument("--run-timeout", type=float, default=1800,
                    help="seconds one engine may take, start to last token (1800)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--one-run", help=argparse.SUPPRESS)       # the child of `generate`
    ap.add_argument("--io", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="results", help="folder for sglang_accuracy.json")
    args = ap.parse_args(argv)
    for name in ("context", "samples", "max_new_tokens", "batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer")
    if not 0 < args.budget <= 1:
        ap.error(f"--budget={args.budget} must lie in (0, 1]")

    import torch
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.one_run:
        one_run(args.one_run, Path(args.io), args, cuda)
        return 0
    from transformers import AutoTokenizer

    from vortex_hybrid.eval import tasks as task_lib
    from vortex_hybrid.eval.models import resolve_model
    task_names = [t for t in args.tasks.split(",") if t]
    try:
        folder = resolve_model(args.model)
        tok = AutoTokenizer.from_pretrained(folder)
        chat = bool(getattr(tok, "chat_template", None))
        suite = task_lib.make_suite(task_names, tok, args.context, args.samples, args.seed, chat)
    except ValueError as exc:
        ap.error(str(exc))
    prompts = [task_lib.render(s, tok, chat) for s in suite]
    print(f"seed {args.seed}; model {folder}; {len(prompts)} prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens; {'CUDA' if cuda else 'CPU engine'}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name() if cuda else "CPU", "date":
              time.strftime("%Y-%m-%d"), "args": vars(args), "model": str(folder), "runs": {}}
    peer, failed = None, []
    given = list(sys.argv[1:] if argv is None else argv)
    for run in ["peer"] + [r.strip() for r in args.runs.split(",") if r.strip()]:
        t0 = time.perf_counter()
        try:
            got = generate(run, folder, prompts, args, given)
        except Exception as exc:                      # the other runs still answer
            result["runs"][run] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(run)
            print(f"{run}: error {exc}", flush=True)
            continue
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in got]
        scores = [task_lib.score(s, x) for s, x in zip(suite, texts)]
        peer = got if run == "peer" else peer
        same = sum(a == b for a, b in zip(got, peer)) if peer is not None else 0
        by_task = {t: sum(sc for s, sc in zip(suite, scores) if s.task == t) /
                   sum(s.task == t for s in suite) for t in task_names}
        full = run == "peer" or run.endswith("@full")
        result["runs"][run] = dict(
            backend=backend_of(run, cuda),
            budget="all" if full else f"{args.budget:g} ({args.flow})", n=len(prompts),
            accuracy=sum(scores) / len(scores), by_task=by_task, same_as_peer=same,
            s=time.perf_counter() - t0, texts=texts, output_ids=got)
        if run.endswith("@full") and same != len(prompts):
            failed.append(run)
        print(f"{run}: accuracy {sum(scores) / len(scores):.3f}, {same}/{len(prompts)} requests "
              f"with the peer's tokens, {time.perf_counter() - t0:.0f} s", flush=True)
        (out / "sglang_accuracy.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    (out / "sglang_accuracy.md").write_text(md + "\n")
    print(md)
    if args.check and failed:
        print(f"sglang_accuracy: failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
