"""The calibration's pictures: per-(layer, KV head) budgets as a heatmap, and selection reuse
between steps per layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def draw(cal, budgets_png: Path, reuse_png: Path) -> list[str]:
    """Write both PNGs; returns the paths written (none when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    b = np.asarray(cal.budgets)
    fig, ax = plt.subplots(figsize=(max(5.5, 0.5 * b.shape[1] + 3), max(3, 0.18 * b.shape[0] + 2)))
    im = ax.imshow(np.log2(b), aspect="auto", cmap="viridis", interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax)
    ticks = [t for t in cal.extra.get("ladder", []) if b.min() <= t <= b.max()] or [b.min()]
    cbar.set_ticks(np.log2(ticks))
    cbar.set_ticklabels([f"{t:g}" for t in ticks])
    cbar.set_label("budget (share of the request's pages)")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer (full attention)")
    ax.set_title(f"per-head budgets ({cal.flow}),\nmean output error <= {cal.error_target:g}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(budgets_png, dpi=110)
    plt.close(fig)

    reuse = np.asarray(cal.extra["properties"]["reuse"])          # [L, H]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    layers = np.arange(reuse.shape[0])
    ax.bar(layers, reuse.mean(1), color="tab:blue", label="mean over KV heads")
    ax.plot(layers, reuse.min(1), "v", color="tab:red", label="least reused head")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer (full attention)")
    ax.set_ylabel("selection reuse")
    ax.set_title("pages selected again at the next step (forced pages excluded)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(reuse_png, dpi=110)
    plt.close(fig)
    return [str(budgets_png), str(reuse_png)]
