"""Plots saved into the run directory (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .pareto import valid  # noqa: E402

#: line styles of the hand-made references (dark grey, one style each)
REF_STYLES = (":", "-.", (0, (5, 2)), (0, (1, 3)))


def plot_pareto(entries: list[dict[str, Any]], front: list[dict[str, Any]], path: Path,
                *, quality_label: str = "quality (lower is better)",
                references: dict[str, dict[str, Any]] | None = None) -> None:
    """Every evaluated genome (coloured by the generation that found it), the front, and the
    hand-made references (crosses)."""
    entries = valid(entries)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    if entries:
        sc = ax.scatter([e["ratio"] for e in entries], [e["quality"] for e in entries],
                        c=[e.get("generation", 0) for e in entries], cmap="viridis", s=18, alpha=0.75,
                        label="evaluated")
        fig.colorbar(sc, ax=ax, label="generation found")
    if front:
        xs, ys = [e["ratio"] for e in front], [e["quality"] for e in front]
        ax.step(xs, ys, where="pre", color="tab:red", lw=1.2, alpha=0.8)
        ax.scatter(xs, ys, facecolors="none", edgecolors="tab:red", s=60, lw=1.5, label="Pareto front")
    for name, ref in (references or {}).items():
        ax.scatter([ref["ratio"]], [ref["quality"]], marker="X", s=80, color="black", zorder=3)
        ax.annotate(name, (ref["ratio"], ref["quality"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("achieved ratio (higher is better)")
    ax.set_ylabel(quality_label)
    ax.set_title("Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_evaluations(entries: list[dict[str, Any]], path: Path, *, quality_label: str = "quality (lower is better)",
                     references: dict[str, dict[str, Any]] | None = None) -> None:
    """Single-objective runs: every genome's quality in the order evaluated (coloured by
    generation), the best so far, and the references as horizontal lines."""
    entries = valid(entries)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    if entries:
        xs = list(range(1, len(entries) + 1))
        ys = [e["quality"] for e in entries]
        gens = [e.get("generation", 0) for e in entries]
        sc = ax.scatter(xs, ys, c=gens, cmap="viridis", s=22, alpha=0.8, label="evaluated",
                        vmin=min(gens), vmax=max(max(gens), min(gens) + 1))
        fig.colorbar(sc, ax=ax, label="generation")
        best = [min(ys[: i + 1]) for i in range(len(ys))]
        ax.step(xs, best, where="post", color="tab:red", lw=1.4, label="best so far")
    for i, (name, ref) in enumerate((references or {}).items()):
        ax.axhline(ref["quality"], color="0.25", ls=REF_STYLES[i % len(REF_STYLES)], lw=1.3,
                   label=f"{name} (reference)")
    ax.set_xlabel("evaluation")
    ax.set_ylabel(quality_label)
    ax.set_title("evaluated genomes")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_fitness(logbook: list[dict[str, Any]], path: Path, *, pareto: bool = True,
                 quality_label: str = "quality", references: dict[str, dict[str, Any]] | None = None) -> None:
    """Population quality (best, median) per generation, the references' quality as grey
    lines; the hypervolume alongside in two-objective runs."""
    gens = [r["gen"] for r in logbook]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.plot(gens, [r["q_min"] for r in logbook], "o-", label=f"best {quality_label}")
    ax.plot(gens, [r["q_median"] for r in logbook], "s--", label=f"median {quality_label}")
    for i, (name, ref) in enumerate((references or {}).items()):
        ax.axhline(ref["quality"], color="0.25", ls=REF_STYLES[i % len(REF_STYLES)], lw=1.2,
                   label=f"{name} (reference)")
    ax.set_xlabel("generation")
    ax.set_ylabel(f"{quality_label} (population)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if pareto:  # at a fixed ratio there is nothing to show beside the quality
        ax2 = ax.twinx()
        ax2.plot(gens, [r["hv"] for r in logbook], "^-", color="tab:green", label="hypervolume of archive front")
        ax2.set_ylabel("hypervolume of archive front")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best")
    ax.set_title("fitness by generation")
    if gens:
        ax.set_xticks(gens)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
