"""Question: do per-head budgets reach the mean output error of uniform budgets with fewer pages?

Reads a calibration written by `python -m vortex_hybrid.profile` (its calibration-prompt curves and
its held-out curves, per (layer, KV head) and budget ratio) and, for each error target, chooses
per-head budgets on the calibration prompts and judges them on the held-out prompts: their held-out
mean output error, their pages, and the pages a uniform budget needs for the same held-out error
(`vortex_hybrid.profile.calibrate.judge`), with page granularity only and with each head at page
or token granularity (`auto`; pages then count byte-equivalent pages). Target (issue): pages ratio
<= 0.7 (30% fewer).

    python benchmarks/calibrated_budgets.py calib.json --targets 0.05,0.1,0.2,0.3 --out results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vortex_hybrid.predictors import Calibration
from vortex_hybrid.profile.calibrate import Curves, judge


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("calibration")
    ap.add_argument("--targets", default="0.05,0.1,0.2,0.3")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    try:
        cal = Calibration.load(args.calibration)
        targets = [float(t) for t in args.targets.split(",") if t]
    except ValueError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        calib, held = Curves.stored(cal)
    except KeyError:
        held = None
    if held is None:
        print("error: the calibration has no held-out curves (profile with --heldout >= 1)",
              file=sys.stderr)
        return 2
    grans = ["page", "auto"] if "token_error_curves" in cal.extra else ["page"]
    rows = [judge(calib, held, t, gran, token_share=cal.token_share)
            for gran in grans for t in targets]
    m = cal.model
    head = (f"{m.get('name')}: {cal.num_layers} layers x {cal.num_kv_heads} KV heads, flow "
            f"{cal.flow}, page {cal.page_size}, context {cal.extra['prompts']['context']}, "
            f"{cal.extra['summary']['calibration_prompts']} calibration + "
            f"{cal.extra['summary']['heldout_prompts']} held-out prompts")
    lines = [head, "",
             "| granularity | error target | token heads | per-head pages | held-out mean error "
             "| uniform pages at that error | pages ratio | fewer pages |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['granularity']} | {r['target']:g} | {r['token_heads']} | "
                     f"{r['per_head_pages']:.4f} | "
                     f"{r['per_head_mean_error']:.4f} | {r['uniform_pages_at_equal_error']:.4f} | "
                     f"{r['pages_ratio']:.3f} | {1 - r['pages_ratio']:.1%} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibrated_budgets.json").write_text(json.dumps({"model": m, "rows": rows}, indent=1))
    (out / "calibrated_budgets.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
