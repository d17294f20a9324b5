"""The production solver: ``solve`` by OR-Tools CP-SAT over the presolved options, with the
objective's integer scaling and the choice of CP-SAT workers."""

from __future__ import annotations

import math
import os
import time

import numpy as np

from vac.allocate.options import Allocation, Group, _make_allocation
from vac.allocate.presolve import _candidates, _prepare, _rel_gap


#: CP-SAT needs integer objective coefficients. The loss of the incumbent (the greedy
#: answer after pair-exchange polish; losses measured above each group's best option) is
#: mapped to this many units. Why relative to the incumbent rather than to the largest
#: loss: losses span many orders of magnitude (rank 8 of a sensitive MLP matrix can cost
#: 1e6 times the whole optimum), and scaling by the largest loss would spend the integer
#: range on options no good allocation picks and round the decisive small losses away.
#: Options whose own loss exceeds the incumbent's total cannot be optimal (all losses are
#: >= 0 after the shift) and are dropped, so every coefficient is <= 1e9 and no sum
#: overflows int64 or loses precision in CP-SAT's float LP (< 2**53). Rounding costs at
#: most half a unit per group: a relative error <= groups / 2e9 of the optimum (5e-7 for
#: 1000 matrices), far below the default 1e-4 gap. (1e6..1e12 measured equally fast.)
OBJECTIVE_UNITS = 1e9


def _cores() -> int:
    """Cores this process may use (the affinity mask, which containers restrict; cpu_count does not)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _portfolio(params, workers: int) -> None:
    """Choose CP-SAT's workers. Measured on 2 cores (experiments/bench_knapsack.py), proving
    optimality of these knapsacks is LP-bound work: full linearization (level 2) wins, and the
    default 2-worker portfolio (one default_lp worker, the other time-sliced between LNS
    heuristics that our complete hint makes useless) timed out at 15 s on 1000 x 64 instances
    that "linearization 2 + max_lp" proves in 1-2 s. With more cores, keep CP-SAT's own
    portfolio and add the linearization-2 worker to it.
    """
    params.num_workers = workers
    if workers == 1:
        params.linearization_level = 2
        return
    text = 'subsolver_params { name: "vac_lin2" linearization_level: 2 } '
    text += 'subsolvers: "vac_lin2" subsolvers: "max_lp"' if workers == 2 else 'extra_subsolvers: "vac_lin2"'
    if hasattr(params, "merge_text_format"):  # ortools >= 9.12 (pybind parameters)
        params.merge_text_format(text)
    else:  # older ortools: a protobuf message
        from google.protobuf import text_format
        text_format.Merge(text, params)


def solve(groups: list[Group], budget: int, *, time_limit: float = 30.0, workers: int | None = None,
          rel_gap: float = 1e-4, component_caps: dict[str, int] | None = None,
          log: bool = False) -> Allocation:
    """Optimal allocation by OR-Tools CP-SAT, with the greedy answer as hint and fallback.

    One BoolVar per option that can still be optimal, ``add_exactly_one`` per group, the
    budget and optional per-component caps as linear constraints, integer-scaled losses as
    objective (see ``OBJECTIVE_UNITS``). Stops at ``rel_gap`` (pass 0 to demand a proof) or
    after ``time_limit`` seconds. Status "OPTIMAL" only when the returned allocation is
    proven optimal (gap 0, up to the integer scaling), "FEASIBLE" when stopped earlier,
    "GREEDY" when CP-SAT found nothing better than the greedy answer in time.

    Before CP-SAT sees the model, options that cannot be in an allocation better than the
    incumbent are removed, exactly (no optimum is lost): dominated options (``_pareto``),
    then reduced-cost fixing against the LP bound (``_candidates``). The MCKP LP is tight
    (its gap is at most one upgrade), so typically 95%+ of the options go and CP-SAT
    proves optimality over a few hundred booleans; without this, 224 x 32 took 1-4 s to
    prove on 2 cores instead of ~0.1-0.7 s.
    """
    from ortools.sat.python import cp_model  # heavy import, only when solving

    t0 = time.perf_counter()
    pre, caps = _prepare(groups, budget, component_caps)
    greedy_choice = [opts[p] for opts, p in zip(pre.pareto, pre.pos)]
    if pre.incumbent <= 0:  # every group already at its best option: nothing to trade
        return _make_allocation(groups, greedy_choice, budget, "OPTIMAL", 0.0, t0, caps)
    lp_gap = _rel_gap(pre.incumbent, pre.bound)
    if lp_gap <= rel_gap:  # the LP bound already proves the gap asked for
        return _make_allocation(groups, greedy_choice, budget, "OPTIMAL" if lp_gap == 0 else "FEASIBLE", lp_gap,
                                t0, caps)

    scale = OBJECTIVE_UNITS / pre.incumbent
    model = cp_model.CpModel()
    group_vars: list[list[tuple]] = []  # per group: (var, option, scaled loss, index)
    keep = _candidates(pre, budget)
    for g, (opts, sh, p) in enumerate(zip(pre.pareto, pre.shifted, pre.pos)):
        entries = []
        for k in np.flatnonzero(keep[pre.start[g]: pre.start[g] + len(opts)]).tolist():
            o = opts[k]
            x = model.new_bool_var(f"x{g}_{k}")
            model.add_hint(x, k == p)
            entries.append((x, o, int(round(sh[k] * scale)), k))
        model.add_exactly_one([e[0] for e in entries])
        group_vars.append(entries)

    def weighted(entries, field):
        xs = [e[0] for e in entries]
        ws = [e[1].params if field == "params" else e[2] for e in entries]
        return cp_model.LinearExpr.weighted_sum(xs, ws)

    flat = [e for entries in group_vars for e in entries]
    model.add(weighted(flat, "params") <= budget)
    for comp, cap in caps.items():
        members = [e for g, entries in zip(groups, group_vars) if g.component == comp for e in entries]
        model.add(weighted(members, "params") <= cap)
    # Tell CP-SAT the LP bound: its own root bound can be weaker, and without it CP-SAT may
    # search until the time limit for a gap our bound already proves. Scaled losses are
    # rounded, so any allocation scores >= bound * scale - groups / 2.
    model.add(weighted(flat, "loss") >= math.floor(pre.bound * scale - len(groups) / 2 - 1))
    model.minimize(weighted(flat, "loss"))

    solver = cp_model.CpSolver()
    # the time limit covers the whole call, presolve and model building included
    solver.parameters.max_time_in_seconds = max(0.05, float(time_limit) - (time.perf_counter() - t0))
    _portfolio(solver.parameters, int(workers or _cores()))
    solver.parameters.relative_gap_limit = float(rel_gap)
    solver.parameters.log_search_progress = bool(log)
    status = solver.solve(model)

    bound = pre.bound  # best lower bound known, in shifted loss units
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        picked = [next(e for e in entries if solver.boolean_value(e[0])) for entries in group_vars]
        obj = sum(e[2] for e in picked)
        incumbent = sum(e[2] for entries, p in zip(group_vars, pre.pos) for e in entries if e[3] == p)
        if obj <= incumbent:  # always, in practice: the hint is a feasible start
            proven = status == cp_model.OPTIMAL and obj <= solver.best_objective_bound
            loss = math.fsum(sh[e[3]] for sh, e in zip(pre.shifted, picked))
            gap = 0.0 if proven else _rel_gap(loss, max(bound, solver.best_objective_bound / scale))
            return _make_allocation(groups, [e[1] for e in picked], budget,
                                    "OPTIMAL" if proven else "FEASIBLE", gap, t0, caps)
        bound = max(bound, solver.best_objective_bound / scale)
    # CP-SAT found nothing (better) in time: the greedy answer, with the best bound known
    return _make_allocation(groups, greedy_choice, budget, "GREEDY", _rel_gap(pre.incumbent, bound), t0, caps)
