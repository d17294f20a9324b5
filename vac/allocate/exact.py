"""``dp_exact``: the exact dynamic programme for small instances, the tests' ground truth."""

from __future__ import annotations

import math
import time

import numpy as np

from vac.allocate.options import Allocation, Group, Option, _check_feasible, _make_allocation, _pareto, _validate


def dp_exact(groups: list[Group], budget: int, *, max_states: int = 20_000_000) -> Allocation:
    """Exact optimum by dynamic programming over integer costs (small instances only).

    Costs and budget are divided by the gcd of all costs first (r*(m+n) shares factors).
    Time and memory are O(groups * options * budget / gcd); refuses above ``max_states``.
    """
    t0 = time.perf_counter()
    _validate(groups, budget)
    _check_feasible(groups, budget, {})
    pareto = [_pareto(g.options) for g in groups]
    unit = math.gcd(*[o.params for opts in pareto for o in opts]) or 1
    cap = budget // unit
    if cap * len(groups) > max_states:
        raise ValueError(f"dp_exact needs {cap * len(groups):,} states (> max_states={max_states:,}); "
                         "use solve() for instances this large")
    # best[c] = least loss of the groups so far with cost <= c
    best = np.zeros(cap + 1)
    picks = np.zeros((len(groups), cap + 1), dtype=np.int32)
    for g, opts in enumerate(pareto):
        new = np.full(cap + 1, np.inf)
        for k, o in enumerate(opts):
            w = o.params // unit
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + o.loss
            better = cand < new
            new[better] = cand[better]
            picks[g, better] = k
        best = new
    assert math.isfinite(best[cap]), "dp_exact found no feasible allocation despite the feasibility check"
    chosen: list[Option] = []
    c = cap
    for g in range(len(groups) - 1, -1, -1):
        o = pareto[g][picks[g, c]]
        chosen.append(o)
        c -= o.params // unit
    chosen.reverse()
    return _make_allocation(groups, chosen, budget, "OPTIMAL", 0.0, t0)
