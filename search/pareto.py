"""Pareto maths on evaluated entries ``{"key", "quality", "ratio", ...}``.

Objectives: minimise ``quality`` (perplexity or KL), maximise ``ratio``. Entries carrying an
``error`` (failed evaluations) never reach a front.
"""

from __future__ import annotations

from typing import Any, Iterable

Entry = dict[str, Any]


def dominates(a: Entry, b: Entry) -> bool:
    """a is no worse than b in both objectives and better in one."""
    no_worse = a["quality"] <= b["quality"] and a["ratio"] >= b["ratio"]
    return no_worse and (a["quality"] < b["quality"] or a["ratio"] > b["ratio"])


def valid(entries: Iterable[Entry]) -> list[Entry]:
    return [e for e in entries if "error" not in e]


def nondominated(entries: Iterable[Entry]) -> list[Entry]:
    """The non-dominated entries, by increasing ratio. Of several entries with identical
    objectives only the one with the smallest key is kept, so the result is deterministic."""
    ordered = sorted(valid(entries), key=lambda e: (-e["ratio"], e["quality"], e["key"]))
    front, best_quality = [], float("inf")
    for entry in ordered:  # sweep from the highest ratio down: keep strict quality improvements
        if entry["quality"] < best_quality:
            front.append(entry)
            best_quality = entry["quality"]
    return front[::-1]


def best_by_quality(entries: Iterable[Entry], k: int) -> list[Entry]:
    return sorted(valid(entries), key=lambda e: (e["quality"], -e["ratio"], e["key"]))[:k]


def hypervolume(front: Iterable[Entry], ref_quality: float, ref_ratio: float = 1.0) -> float:
    """Area dominated by ``front`` and bounded by the reference point (worst quality, dense
    ratio 1.0). Rises monotonically as the archive front improves: a one-number progress
    measure for two objectives."""
    points = sorted(((e["ratio"], e["quality"]) for e in nondominated(front)
                     if e["quality"] < ref_quality and e["ratio"] > ref_ratio), reverse=True)
    area = 0.0
    for i, (ratio, quality) in enumerate(points):
        next_ratio = points[i + 1][0] if i + 1 < len(points) else ref_ratio
        area += (ref_quality - quality) * (ratio - next_ratio)
    return area
