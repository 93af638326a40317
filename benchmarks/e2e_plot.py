"""Plot e2e_decode.json files: tokens/s per mode, one group of bars per file (a row of the
benchmark: context and HBM for KV), each bar labelled with its batch and share of its lower bound.

    python benchmarks/e2e_plot.py --out docs/img/e2e.png a.json b.json ...
    python benchmarks/e2e_plot.py --out x.png --labels "before,after" a.json b.json
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="e2e_decode.json files (each a row)")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--title", default="Llama-3-8B shape, quest 5%, end-to-end decode")
    ap.add_argument("--labels", default=None,
                    help="comma list, one per file: added to each group's context/HBM label")
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [""] * len(args.files)
    if len(labels) != len(args.files):
        sys.exit(f"--labels has {len(labels)} entries for {len(args.files)} files")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("e2e_plot needs matplotlib")
    rows = []
    for path, label in zip(args.files, labels):
        with open(path) as fh:
            d = json.load(fh)
        hbm = d["sizes"]["hbm_usable"]
        name = f"{d['context'] // 1024}K, {hbm:.0f} GiB HBM for KV"
        rows.append((f"{name}\n{label}" if label else name, d["modes"]))
    modes = [m for m in ("dense", "gpu", "hybrid", "cpu", "offload")
             if any(r["mode"] == m for _, recs in rows for r in recs)]
    fig, ax = plt.subplots(figsize=(2.2 + 2.4 * len(rows), 4.2))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        for j, (_, recs) in enumerate(rows):
            rec = next((r for r in recs if r["mode"] == mode), None)
            if rec is None:
                continue
            x = j + (i - (len(modes) - 1) / 2) * width
            ax.bar(x, rec["tokens_per_s"], width, color=f"C{i}",
                   label=mode if j == 0 or mode not in ax.get_legend_handles_labels()[1] else None)
            ax.text(x, rec["tokens_per_s"], f"B{rec['batch']}\n{rec['of_lower_bound']:.0%}",
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), [name for name, _ in rows])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(args.title + " (bar labels: batch, share of lower bound)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
