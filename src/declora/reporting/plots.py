"""PNG plots for the run directory (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import networkx as nx
import numpy as np


def label_distribution(
    counts: np.ndarray,
    label_names: list[str],
    path: Path,
    *,
    title: str = "Label distribution per peer",
) -> Path:
    """Stacked bars: how many examples of each class (or category) every peer holds."""
    n = counts.shape[0]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * n + 2), 3.6))
    bottom = np.zeros(n)
    for c, name in enumerate(label_names):
        ax.bar(np.arange(n), counts[:, c], bottom=bottom, label=name)
        bottom += counts[:, c]
    ax.set_xlabel("peer")
    ax.set_ylabel("training examples")
    ax.set_title(title)
    ax.set_xticks(np.arange(n))
    ax.legend(fontsize=7 if len(label_names) <= 8 else 6, ncol=1 + len(label_names) // 8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_per_round(
    series: dict[str, tuple[list[int], list[float]]],
    ylabel: str,
    path: Path,
    *,
    title: str | None = None,
    scale: str = "linear",
) -> Path:
    """One line per run (or per view of a run) against the round number."""
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    drawn = 0
    for label, (x, y) in series.items():
        if x:
            ax.plot(x, y, marker="o", markersize=3, label=label)
            drawn += 1
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    if scale == "symlog":  # consensus distance starts at exactly 0
        ax.set_yscale("symlog", linthresh=1e-6)
    elif scale == "log":
        ax.set_yscale("log")
    ax.set_title(title or ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:  # e.g. no evaluation during the run (eval.every=0): say so instead of a blank plot
        ax.text(0.5, 0.5, "no values recorded", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def topology(graph: nx.Graph, path: Path, *, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    pos = nx.circular_layout(graph) if graph.number_of_nodes() <= 64 else nx.spring_layout(graph)
    nx.draw_networkx(graph, pos, ax=ax, node_size=260, font_size=7, node_color="#8fb8de")
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_vs_bytes(
    points: dict[str, tuple[float, float]], ylabel: str, path: Path, *, title: str
) -> Path:
    """One labelled point per run: final metric against bytes each peer sent (log x)."""
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    for label, (x, y) in points.items():
        ax.scatter([max(x, 1.0)], [y], s=30)
        ax.annotate(label, (max(x, 1.0), y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per peer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
