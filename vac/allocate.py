"""Rank allocation under a global parameter budget: a multiple-choice knapsack.

Every target matrix is a *group*; each group offers *options* (a rank on the quantisation
grid, or "keep dense"), each with a parameter cost and a predicted loss (the tail energy of
the weighted spectrum, see ``vac.factorize.tail_energy``). Exactly one option is chosen per
group so that the summed loss is minimal and the summed cost fits the budget:

    minimise  sum_g sum_o c_go x_go
    s.t.      sum_o x_go = 1                  for every group g
              sum_g sum_o w_go x_go <= budget
              sum_{g in component k} sum_o w_go x_go <= cap_k   (optional)
              x_go in {0, 1}

Pure maths: no models, no hooks. ``solve`` (OR-Tools CP-SAT) is the production path,
``greedy`` its hint and fallback, ``dp_exact`` an exact dynamic programme for small
instances that the tests use as ground truth.

Losses and gaps: every group's loss is measured *above its best option* (usually the dense
option, loss 0). A constant per group changes no decision, and it is what the budget
trades, so reported gaps are relative to that quantity.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np

from vac.errors import VacError

STATUSES = ("OPTIMAL", "FEASIBLE", "GREEDY")

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


def _rel_gap(obj: float, bound: float) -> float:
    return 0.0 if obj <= 0 else max(obj - bound, 0.0) / obj


@dataclass
class _Presolved:
    """What greedy and CP-SAT share. Losses are *shifted*: each group's best loss is 0."""

    pareto: list[list[Option]]  # non-dominated options per group, by increasing params
    shifted: list[list[float]]  # loss - best loss of the group
    pos: list[int]  # incumbent choice, index into pareto
    lam: float  # LP dual price of one parameter of budget
    bound: float  # LP lower bound on the shifted objective
    incumbent: float  # shifted objective of pos
    # the same options flattened, group after group, for vectorised passes
    grp: np.ndarray  # group of each option
    params: np.ndarray  # int64
    loss: np.ndarray  # shifted, float64
    start: np.ndarray  # index of each group's first option

    def current(self) -> np.ndarray:
        return self.start + np.asarray(self.pos)


def _presolve(groups: list[Group], budget: int, caps: dict[str, int]) -> _Presolved:
    pareto = [_pareto(g.options) for g in groups]
    # the last Pareto option has the least loss; shifting it to 0 changes no decision
    shifted = [[o.loss - opts[-1].loss for o in opts] for opts in pareto]
    shifted_opts = [[Option(o.rank, o.params, s) for o, s in zip(opts, sh)] for opts, sh in zip(pareto, shifted)]
    pos, segs = _greedy_indices(groups, shifted_opts, budget, caps)
    lam, bound = _lp_dual(shifted_opts, segs, budget)
    sizes = [len(opts) for opts in pareto]
    pre = _Presolved(
        pareto, shifted, pos, lam, bound, math.fsum(sh[p] for sh, p in zip(shifted, pos)),
        grp=np.repeat(np.arange(len(pareto)), sizes),
        params=np.array([o.params for opts in pareto for o in opts], dtype=np.int64),
        loss=np.array([x for sh in shifted for x in sh], dtype=np.float64),
        start=np.cumsum([0] + sizes[:-1]))
    _polish(pre, groups, budget, caps)
    return pre


def _candidates(pre: _Presolved, budget: int) -> np.ndarray:
    """Mask of the (flat) options that may be in an allocation better than the incumbent.

    Reduced-cost fixing, exact: with the LP's budget price lam and bound LB, every
    allocation has loss >= LB + sum_g rc_g, where rc_g = loss + lam*params - (the least such
    value in group g) >= 0. So an option with rc > incumbent - LB cannot beat the incumbent.
    Options whose own loss exceeds the incumbent's total go too (losses are >= 0). The
    incumbent's options are always kept. The margin sits far above float rounding (the
    sums are exactly rounded, each term carries a few ulps) so nothing optimal is dropped.
    """
    price = pre.loss + pre.lam * pre.params
    floor = np.minimum.reduceat(price, pre.start)
    magnitude = math.fsum(np.maximum.reduceat(price, pre.start)) + pre.lam * budget
    slack = (pre.incumbent - pre.bound) + 1e-12 * magnitude + 1e-9 * pre.incumbent
    mask = (price - floor[pre.grp] <= slack) & (pre.loss <= pre.incumbent)
    mask[pre.current()] = True
    return mask


def _polish(pre: _Presolved, groups: list[Group], budget: int, caps: dict[str, int],
            max_rounds: int = 500, max_pair_options: int = 6000) -> None:
    """Improve the incumbent in place by the best single or paired option change, until none helps.

    A pair (upgrade one matrix, downgrade another) is what the greedy cannot see; a better
    incumbent also makes the reduced-cost fixing of ``_candidates`` prune far more, which
    is what lets CP-SAT prove optimality fast. Moves are searched only among candidates
    (the only options that can improve the incumbent), vectorised over all pairs.
    """
    comp_names = sorted({g.component for g in groups})
    comp_of_group = np.array([comp_names.index(g.component) for g in groups])
    comp_id = comp_of_group[pre.grp]
    unbounded = np.iinfo(np.int64).max // 4
    cap = np.array([caps.get(c, unbounded) for c in comp_names], dtype=np.int64)
    for _ in range(max_rounds):
        mask = _candidates(pre, budget)
        cur = pre.current()
        mask[cur] = False
        rows = np.flatnonzero(mask)
        if rows.size == 0:
            return
        cur_params = pre.params[cur]
        left = budget - int(cur_params.sum())
        used = np.zeros(len(comp_names), dtype=np.int64)
        np.add.at(used, comp_of_group, cur_params)
        gi, ci = pre.grp[rows], comp_id[rows]
        d_p = pre.params[rows] - cur_params[gi]
        d_l = pre.loss[rows] - pre.loss[cur][gi]
        rm = (cap - used)[ci]
        single = (d_p <= left) & (d_p <= rm) & (d_l < 0)
        best_gain, move = 0.0, None
        if single.any():
            i = int(np.argmin(np.where(single, d_l, np.inf)))
            best_gain, move = float(d_l[i]), (i,)
        if rows.size <= max_pair_options:
            # all pairs, in row blocks to bound memory (~block * rows * 8 bytes per array)
            fits_own = d_p <= rm
            block = max(1, 2_000_000 // rows.size)
            for lo in range(0, rows.size, block):
                sl = slice(lo, lo + block)
                P = d_p[sl, None] + d_p[None, :]
                L = d_l[sl, None] + d_l[None, :]
                ok = (P <= left) & (gi[sl, None] != gi[None, :]) & (L < best_gain)
                ok &= np.where(ci[sl, None] == ci[None, :], P <= rm[sl, None], fits_own[sl, None] & fits_own[None, :])
                if ok.any():
                    i, j = divmod(int(np.argmin(np.where(ok, L, np.inf))), rows.size)
                    best_gain, move = float(L[i, j]), (lo + i, j)
        if move is None:
            return
        for i in move:
            g = int(gi[i])
            pre.pos[g] = int(rows[i] - pre.start[g])
        pre.incumbent = math.fsum(pre.loss[pre.current()])


# ----------------------------------------------------------------------------- solvers


def greedy(groups: list[Group], budget: int, *, component_caps: dict[str, int] | None = None) -> Allocation:
    """Efficiency greedy: start from each group's cheapest option, upgrade by best loss drop per param.

    Upgrades follow each group's lower convex hull in global order of marginal rate (loss
    drop per extra parameter; off-hull points have no well-defined rate), the leftover
    budget then buys whatever single upgrade helps most, and a pair-exchange polish
    (upgrade one matrix, downgrade another) finishes. Milliseconds to a second; typically
    within 1e-4 of the optimum. ``gap`` is against the LP bound (which ignores caps).
    """
    t0 = time.perf_counter()
    _validate(groups, budget)
    caps = _validate_caps(groups, component_caps)
    _check_feasible(groups, budget, caps)
    pre = _presolve(groups, budget, caps)
    chosen = [opts[p] for opts, p in zip(pre.pareto, pre.pos)]
    return _make_allocation(groups, chosen, budget, "GREEDY", _rel_gap(pre.incumbent, pre.bound), t0, caps)


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
    _validate(groups, budget)
    caps = _validate_caps(groups, component_caps)
    _check_feasible(groups, budget, caps)
    pre = _presolve(groups, budget, caps)
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


def allocate(groups: list[Group], budget: int, *, multipliers: dict[str, float] | None = None,
             dense_by_component: dict[str, int] | None = None, ratio: float | None = None,
             **solve_kwargs) -> Allocation:
    """``solve`` with per-component budget multipliers turned into caps.

    Component c may use at most ``multipliers[c] * dense_by_component[c] / ratio`` params,
    on top of the global budget: multiplier 1 means "no more than its proportional share",
    above 1 lets that component keep more, below 1 forces it to give up more. Components not
    in ``multipliers`` are uncapped. Defaults: ``dense_by_component`` from each group's
    dense option (largest option where none), ``ratio`` = total dense params / budget.
    Extra keyword arguments go to ``solve`` (an explicit ``component_caps`` is combined with
    these caps by taking the smaller).
    """
    if not multipliers:
        return solve(groups, budget, **solve_kwargs)
    _validate(groups, budget)
    if dense_by_component is None:
        dense_by_component = {}
        for g in groups:
            dense_by_component[g.component] = dense_by_component.get(g.component, 0) + _dense_params(g)
    if ratio is None:
        ratio = sum(dense_by_component.values()) / budget
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    missing = sorted(set(multipliers) - set(dense_by_component))
    if missing:
        raise ValueError(f"multipliers name components {missing} not in dense_by_component "
                         f"{sorted(dense_by_component)}")
    caps = {c: int(m * dense_by_component[c] / ratio) for c, m in multipliers.items()}
    for c, v in (solve_kwargs.pop("component_caps", None) or {}).items():
        caps[c] = min(caps.get(c, v), int(v))
    return solve(groups, budget, component_caps=caps, **solve_kwargs)
