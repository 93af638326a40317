"""The accuracy grid's table and plot: eval results (`python -m vortex_hybrid.eval`'s eval.json, one
per model and context, or a combined accuracy.json this script wrote) into one markdown table per
model (accuracy per context x flow x budget, dense and streaming beside, each calibration's row
with its mean budget and KV bytes) and one PNG (accuracy vs budget, a panel per model and context).

    python benchmarks/accuracy_table.py runs/*/eval.json --json accuracy.json --md accuracy.md \
        --png accuracy.png
    python benchmarks/accuracy_table.py accuracy.json            # the table again, on stdout

Accuracy is over all tasks of a run (exact match, 95% Wilson interval in the JSON); a token budget's
share of the pages is its tokens / the context.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CALIB = "@calib"
RUN_FIELDS = ("task", "sample", "depth", "mode", "flow", "budget", "score", "output", "answers",
              "prompt_tokens", "decode_tokens")


def load(paths: list[str]) -> list[dict]:
    """Results, one per (model, context), from eval.json or combined files; a later one of the same
    (model, context) replaces an earlier one."""
    out: dict[tuple, dict] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for r in data.get("results", [data]):
            out[(r["model"], r["context"])] = compact(r)
    return sorted(out.values(), key=lambda r: (r["model"], r["context"]))


def compact(result: dict) -> dict:
    """What the table, the plot and a later reading need (runs without their timing fields)."""
    keep = {k: result[k] for k in ("model", "context", "device", "spec", "seconds", "date", "chat")
            if k in result}
    keep["summary"] = result["summary"]
    keep["runs"] = [{k: r[k] for k in RUN_FIELDS if k in r} for r in result.get("runs", [])]
    return keep


def ctx_label(tokens: int) -> str:
    return f"{round(tokens / 1024)}K"


def budget_label(budget: str) -> str:
    return budget if budget.endswith("t") else f"{100 * float(budget):.3g}%"


def overall(result: dict) -> list[dict]:
    return [s for s in result["summary"] if s["task"] == "all"]


def cell(s: dict | None) -> str:
    return "-" if s is None else f"{s['accuracy']:.2f}"


def markdown(results: list[dict]) -> str:
    """One table per model: a row per (context, flow), dense and streaming rows beside, columns the
    budgets, then each calibration's accuracy at its mean budget with KV MB per token (and the 5%
    budget's, to compare bytes)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        rs = [r for r in results if r["model"] == model]
        budgets = list(dict.fromkeys(b for r in rs for b in r["spec"]["budgets"]))
        n = sorted({s["n"] for r in rs for s in overall(r)})
        tasks = ", ".join(rs[0]["spec"]["tasks"])
        placements = sorted({s["mode"] for r in rs for s in overall(r)} - {"dense", "streaming"})
        lines += [f"### {model}", "",
                  f"Exact match over {tasks} (n = {'/'.join(map(str, n))} prompts per cell); "
                  f"sparse flows in the {'/'.join(placements) or '-'} placement (every placement "
                  "selects the same pages and attends them exactly: the same answers); dense "
                  "attends every page, streaming only the sink and recent pages.", "",
                  "| context | flow | dense | " + " | ".join(budget_label(b) for b in budgets)
                  + " | per-head budgets (mean budget; KV MB/token, vs 5%) |",
                  "|---|---|---|" + "---|" * len(budgets) + "---|"]
        for r in rs:
            rows = overall(r)
            by = {(s["mode"], s["flow"], s["budget"]): s for s in rows}
            dense = next((s for s in rows if s["mode"] == "dense"), None)
            sparse_modes = sorted({s["mode"] for s in rows} - {"dense", "streaming"})
            flows = list(dict.fromkeys(s["flow"] for s in rows if s["mode"] in sparse_modes
                                       and not s["flow"].endswith(CALIB)))
            for i, (mode, flow) in enumerate([(m, f) for m in sparse_modes for f in flows]
                                             + [("streaming", "streaming")]):
                cal = by_calib(rows, mode, flow)
                at5 = by.get((mode, flow, "0.05"))
                calib = "-" if cal is None else (
                    f"{cal['accuracy']:.2f} ({100 * float(cal['budget']):.2g}%; "
                    f"{cal['kv_bytes_per_token'] / 1e6:.2f}"
                    + (f" vs {at5['kv_bytes_per_token'] / 1e6:.2f}" if at5 else "") + ")")
                lines.append(f"| {ctx_label(r['context']) if i == 0 else ''} | {flow} | "
                             f"{cell(dense) if i == 0 else ''} | "
                             + " | ".join(cell(by.get((mode, flow, b))) for b in budgets)
                             + f" | {calib} |")
        lines.append("")
    return "\n".join(lines)


def by_calib(rows: list[dict], mode: str, flow: str) -> dict | None:
    return next((s for s in rows if s["mode"] == mode and s["flow"] == flow + CALIB), None)


def plot(results: list[dict], path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no plot"
    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.4), squeeze=False,
                             sharey=True)
    from matplotlib.ticker import FuncFormatter, NullFormatter
    flows = sorted({s["flow"].removesuffix(CALIB) for r in results for s in overall(r)
                    if s["flow"] and s["flow"] != "streaming"})
    colour = {f: f"C{i}" for i, f in enumerate(flows)} | {"streaming": "0.6"}
    for ax, r in zip(axes[0], results):
        lines: dict[str, list] = {}
        for s in overall(r):
            if s["mode"] == "dense":
                ax.axhline(s["accuracy"], color="k", linestyle="--", label="dense")
            elif s["flow"].endswith(CALIB):
                flow = s["flow"].removesuffix(CALIB)
                ax.plot([s["budget_share"]], [s["accuracy"]], marker="*", markersize=12,
                        linestyle="none", color=colour[flow], markeredgecolor="k",
                        label=f"{flow} per-head")
            else:
                lines.setdefault(s["flow"], []).append((s["budget_share"], s["accuracy"]))
        for i, (flow, pts) in enumerate(sorted(lines.items())):
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="osD^vP"[i % 6], label=flow, color=colour[flow], alpha=0.85)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{100 * x:g}%"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{r['model']} @ {ctx_label(r['context'])}", fontsize=9)
        ax.set_xlabel("budget (share of pages; tokens / context)", fontsize=8)
        ax.set_ylim(-0.02, 1.05)
    axes[0][0].set_ylabel("exact match (all tasks)")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"plot: {path}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="eval.json or combined accuracy.json files")
    ap.add_argument("--json", help="write the combined results here")
    ap.add_argument("--md", help="write the markdown tables here (else stdout)")
    ap.add_argument("--png", help="write the plot here")
    args = ap.parse_args(argv)
    try:
        results = load(args.files)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, separators=(",", ":")))
    table = markdown(results)
    if args.md:
        Path(args.md).write_text(table + "\n")
    else:
        print(table)
    if args.png and results:
        print(plot(results, args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
