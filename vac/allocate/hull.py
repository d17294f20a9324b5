"""Convex-hull maths of the multiple-choice knapsack: each group's lower hull, the LP
relaxation's budget price and bound, and the greedy choice that walks the hull upgrades."""

from __future__ import annotations

import math

import numpy as np

from vac.allocate.options import Group, Option


def _lower_hull(options: list[Option]) -> list[int]:
    """Indices (into Pareto-sorted ``options``) of the lower convex hull of (params, loss).

    Collinear points are kept so equal-efficiency upgrades stay separate small steps.
    """
    hull: list[int] = []
    for i, o in enumerate(options):
        while len(hull) >= 2:
            a, b = options[hull[-2]], options[hull[-1]]
            cross = (b.params - a.params) * (o.loss - a.loss) - (b.loss - a.loss) * (o.params - a.params)
            if cross < 0:  # b lies above the segment a -> o: not on the hull
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _hull_segments(pareto: list[list[Option]]) -> list[tuple[float, int, int, int, int]]:
    """All hull upgrades (efficiency, group, step, from, to), best loss drop per param first.

    Along one group's hull the efficiencies never increase, so sorting globally keeps every
    group's steps in order (ties broken by step index). The greedy relies on that order, so
    float noise on near-collinear points is clamped away rather than trusted.
    """
    segs = []
    for g, opts in enumerate(pareto):
        hull = _lower_hull(opts)
        prev = math.inf
        for k, (i, j) in enumerate(zip(hull[:-1], hull[1:])):
            eff = min(prev, (opts[i].loss - opts[j].loss) / (opts[j].params - opts[i].params))
            segs.append((eff, g, k, i, j))
            prev = eff
    segs.sort(key=lambda s: (-s[0], s[1], s[2]))
    return segs


def _lp_dual(pareto: list[list[Option]], segs, budget: int) -> tuple[float, float]:
    """Budget price and optimum of the LP relaxation (component caps ignored): (lam, bound).

    Taking hull upgrades in efficiency order, and a fraction of the first that does not fit,
    solves the LP of a multiple-choice knapsack (Sinha & Zoltners 1979); the efficiency of
    that critical step is the budget's dual price lam, and by duality the bound is
    sum_g min_o (loss_go + lam * params_go) - lam * budget. (That formula is a Lagrangian
    bound, valid for any lam >= 0, so the bound and the reduced-cost fixing built on it
    stay valid even if lam is slightly off.) It is computed from that formula
    with exactly rounded sums (``math.fsum``): a running sum of upgrades would cancel
    catastrophically, since cheap-rank losses can be 1e6 times the optimum.
    """
    left = budget - sum(opts[0].params for opts in pareto)
    lam = 0.0  # every upgrade fits: the budget is not binding
    for eff, g, _, i, j in segs:
        dp = pareto[g][j].params - pareto[g][i].params
        if dp > left:
            lam = eff
            break
        left -= dp
    bound = math.fsum([min(o.loss + lam * o.params for o in opts) for opts in pareto] + [-lam * budget])
    return lam, bound


def _greedy_indices(groups: list[Group], pareto: list[list[Option]], budget: int,
                    caps: dict[str, int]) -> tuple[list[int], list]:
    """Greedy choice (index into each Pareto list), and the hull segments it used."""
    segs = _hull_segments(pareto)
    comp = [g.component for g in groups]
    pos = [0] * len(pareto)
    left = budget - sum(opts[0].params for opts in pareto)
    cap_left = {c: cap - sum(opts[0].params for g, opts in zip(groups, pareto) if g.component == c)
                for c, cap in caps.items()}
    blocked = [False] * len(pareto)
    # 1. hull pass: the classic MCKP greedy. Once a group's next step does not fit, its later
    #    steps (which start where that one ends) cannot be taken either.
    for _, g, _, i, j in segs:
        if blocked[g]:
            continue
        dp = pareto[g][j].params - pareto[g][i].params
        c_left = cap_left.get(comp[g], dp)
        if dp <= left and dp <= c_left:
            pos[g] = j
            left -= dp
            if comp[g] in cap_left:
                cap_left[comp[g]] -= dp
        else:
            blocked[g] = True
    # 2. fill pass: the leftover budget may still buy an upgrade (often to an option off the
    #    hull, or a smaller step than the blocked one). Take the largest loss drop that fits
    #    until none does; vectorised over all options.
    grp = np.concatenate([np.full(len(opts), g) for g, opts in enumerate(pareto)])
    params = np.array([o.params for opts in pareto for o in opts], dtype=np.int64)
    loss = np.array([o.loss for opts in pareto for o in opts], dtype=np.float64)
    start = np.cumsum([0] + [len(opts) for opts in pareto])[:-1]
    comp_names = sorted(set(comp))
    comp_id = np.array([comp_names.index(c) for c in comp])[grp]
    while True:
        cur = start + np.array(pos)
        d_params = params - params[cur][grp]
        d_loss = loss[cur][grp] - loss
        room = np.full(len(comp_names), np.iinfo(np.int64).max, dtype=np.int64)
        for c, v in cap_left.items():
            room[comp_names.index(c)] = v
        ok = (d_loss > 0) & (d_params <= left) & (d_params <= room[comp_id])
        if not ok.any():
            break
        best = int(np.argmax(np.where(ok, d_loss, -np.inf)))
        g = int(grp[best])
        pos[g] = best - int(start[g])
        left -= int(d_params[best])
        if comp[g] in cap_left:
            cap_left[comp[g]] -= int(d_params[best])
    return pos, segs
