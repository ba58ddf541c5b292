"""PNG figures of probe results (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from megalong.eval.common import format_length


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_curves(results: Sequence[dict], path: str | Path, title: str | None = None) -> str:
    """Mean loss per position bucket, one line per model (all on one plot for comparison)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        rows = [b for b in r["buckets"] if b["mean_loss"] is not None]
        x = [(b["start"] + b["end"]) / 2 for b in rows]
        ax.plot(x, [b["mean_loss"] for b in rows], marker="o", markersize=3,
                label=f"{r['model']['name']} (all: {r['mean_loss']:.3f})" if r["mean_loss"] is not None
                else r["model"]["name"])
    length = max(r["length"] for r in results)
    ticks = np.linspace(0, length, 9)
    ax.set_xticks(ticks, [format_length(int(t)) if t % 1024 == 0 else str(int(t)) for t in ticks])
    ax.set(xlabel="position in document (tokens)", ylabel="loss (nats / token)",
           title=title or f"loss by position ({results[0]['data']['selected']} samples of {format_length(length)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_recall_heatmap(result: dict, path: str | Path) -> str:
    """Depth (rows) × length (columns) exact-match accuracy, each cell annotated."""
    plt = _pyplot()
    acc = np.asarray(result["accuracy"], dtype=float)
    lengths, depths = result["lengths"], result["depths"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(acc[i, j]):
                ax.text(j, i, f"{100 * acc[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set(xlabel="length (tokens)", ylabel="needle depth",
           title=f"{result['probe']} exact match — {result['model']['name']} "
                 f"(mean {100 * (result['mean_accuracy'] or 0):.0f}%)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
