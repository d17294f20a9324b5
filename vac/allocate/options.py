"""The allocation's data and its checks: options, groups, the result, and the helpers that
validate an instance, prune dominated options and build a loudly checked ``Allocation``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from vac.errors import VacError


STATUSES = ("OPTIMAL", "FEASIBLE", "GREEDY")


@dataclass(frozen=True)
class Option:
    """One choice for one matrix: a rank (None = keep dense), its cost and predicted loss."""

    rank: int | None
    params: int
    loss: float


@dataclass
class Group:
    """One matrix to allocate: ``component`` (e.g. "attention", "mlp") feeds per-component caps."""

    name: str
    component: str
    options: list[Option]


@dataclass
class Allocation:
    choices: dict[str, Option]
    total_params: int
    total_loss: float
    budget: int
    #: "OPTIMAL" (proven, up to the integer scaling of losses), "FEASIBLE" (stopped by the
    #: gap or time limit; ``gap`` says how far from proven) or "GREEDY" (heuristic answer)
    status: str
    #: (objective - best lower bound) / objective, on losses above each group's best option
    gap: float
    seconds: float

    def ranks(self) -> dict[str, int | None]:
        return {name: o.rank for name, o in self.choices.items()}


# ----------------------------------------------------------------------------- options


def rank_options(m: int, n: int, tail, grid: int = 8, allow_dense: bool = True,
                 max_ratio_rank: int | None = None) -> list[Option]:
    """The options of an m x n matrix: ranks grid, 2*grid, ... and (optionally) dense.

    Only ranks whose factorization is strictly smaller than the dense matrix
    (r*(m+n) < m*n) are offered: a larger rank costs more than keeping W and is worse than
    it. ``grid`` is 8 by default (tensor-core friendly) or the quantisation group size when
    quantisation follows. ``max_ratio_rank`` optionally caps the largest rank offered (the
    dense option is still added). ``tail[r]`` is the predicted loss of rank r
    (``vac.factorize.tail_energy``).
    """
    for name, value in (("m", m), ("n", n), ("grid", grid)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_ratio_rank is not None and (not isinstance(max_ratio_rank, (int, np.integer)) or max_ratio_rank < 1):
        raise ValueError(f"max_ratio_rank must be a positive integer or None, got {max_ratio_rank!r}")
    dense = m * n
    # largest r with r*(m+n) < m*n
    r_max = (dense - 1) // (m + n)
    if max_ratio_rank is not None:
        r_max = min(r_max, int(max_ratio_rank))
    ranks = list(range(grid, r_max + 1, grid))
    losses = [float(v) for v in (tail.tolist() if hasattr(tail, "tolist") else tail)] if ranks else []
    if ranks and len(losses) <= ranks[-1]:
        raise ValueError(f"tail has {len(losses)} entries but rank {ranks[-1]} of a {m}x{n} matrix needs "
                         f"tail[{ranks[-1]}]; pass tail_energy(spectrum) of the full spectrum "
                         f"(length min(m, n) + 1 = {min(m, n) + 1})")
    options = []
    for r in ranks:
        loss = losses[r]
        if not math.isfinite(loss) or loss < 0:
            raise ValueError(f"tail[{r}] = {loss!r} is not a finite non-negative loss")
        options.append(Option(rank=r, params=r * (m + n), loss=loss))
    if allow_dense:
        options.append(Option(rank=None, params=dense, loss=0.0))
    if not options:
        raise ValueError(f"no options for a {m}x{n} matrix with grid {grid}: no multiple of {grid} "
                         f"is cheaper than dense (largest useful rank {(dense - 1) // (m + n)}); "
                         "use allow_dense=True or a smaller grid")
    return options


# ----------------------------------------------------------------------------- helpers


def _validate(groups: list[Group], budget: int) -> None:
    if not groups:
        raise ValueError("no groups to allocate")
    if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool):
        raise ValueError(f"budget must be an integer number of parameters, got {budget!r}")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise ValueError(f"group names must be unique; duplicated: {dup[:5]}")
    for g in groups:
        if not g.options:
            raise ValueError(f"group {g.name!r} has no options")
        for o in g.options:
            if not isinstance(o.params, (int, np.integer)) or o.params < 0:
                raise ValueError(f"group {g.name!r}: option {o} must have a non-negative integer params")
            if not math.isfinite(o.loss):
                raise ValueError(f"group {g.name!r}: option {o} has a non-finite loss")


def _validate_caps(groups: list[Group], caps: dict[str, int] | None) -> dict[str, int]:
    if not caps:
        return {}
    known = {g.component for g in groups}
    unknown = sorted(set(caps) - known)
    if unknown:
        raise ValueError(f"component_caps name unknown components {unknown}; components present: {sorted(known)}")
    return {k: int(v) for k, v in caps.items()}


def _pareto(options: list[Option]) -> list[Option]:
    """Options that no other option dominates, by increasing params (so decreasing loss).

    An option with at least the params *and* at least the loss of another is never needed
    by an optimal allocation, so dropping it is exact. (Dropping options off the convex hull
    would not be: in a knapsack the hull's gaps can be exactly what fits the budget.)
    """
    kept: list[Option] = []
    for o in sorted(options, key=lambda o: (o.params, o.loss)):
        if not kept or o.loss < kept[-1].loss:
            kept.append(o)
    return kept


def _dense_params(group: Group) -> int:
    dense = [o.params for o in group.options if o.rank is None]
    return dense[0] if dense else max(o.params for o in group.options)


def _check_feasible(groups: list[Group], budget: int, caps: dict[str, int]) -> None:
    """Raise VacError when even the cheapest option of every group exceeds a budget."""
    cheapest = sum(min(o.params for o in g.options) for g in groups)
    dense = sum(_dense_params(g) for g in groups)
    if cheapest > budget:
        raise VacError(
            f"parameter budget {budget:,} is infeasible: the cheapest option of every matrix already "
            f"totals {cheapest:,} parameters (ratio {dense / max(cheapest, 1):.3f} of the {dense:,} dense "
            f"parameters is the most reachable, the budget asks for {dense / max(budget, 1):.3f}). "
            "Lower the compression ratio, or offer smaller ranks (a smaller rank grid).")
    for comp, cap in caps.items():
        cheap_c = sum(min(o.params for o in g.options) for g in groups if g.component == comp)
        if cheap_c > cap:
            raise VacError(
                f"the cap of {cap:,} parameters on component {comp!r} is infeasible: its cheapest "
                f"options already total {cheap_c:,}. Raise that component's multiplier or lower the ratio.")


def _make_allocation(groups: list[Group], chosen: list[Option], budget: int, status: str, gap: float,
                     t0: float, caps: dict[str, int] | None = None) -> Allocation:
    """Build the result and check it loudly: one option per group, within every budget."""
    if len(chosen) != len(groups):
        raise AssertionError(f"allocation has {len(chosen)} choices for {len(groups)} groups")
    for g, o in zip(groups, chosen):
        if not any(o is p for p in g.options):
            raise AssertionError(f"group {g.name!r}: chosen option {o} is not one of its options")
    total = sum(o.params for o in chosen)
    if total > budget:
        raise AssertionError(f"allocation uses {total:,} params, over the budget of {budget:,}")
    for comp, cap in (caps or {}).items():
        used = sum(o.params for g, o in zip(groups, chosen) if g.component == comp)
        if used > cap:
            raise AssertionError(f"component {comp!r} uses {used:,} params, over its cap of {cap:,}")
    assert status in STATUSES, status
    return Allocation(choices={g.name: o for g, o in zip(groups, chosen)}, total_params=int(total),
                      total_loss=float(sum(o.loss for o in chosen)), budget=int(budget), status=status,
                      gap=float(max(gap, 0.0)), seconds=time.perf_counter() - t0)
