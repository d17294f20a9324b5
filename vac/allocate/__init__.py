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

Modules: ``options`` (the data, validation, the checked result), ``hull`` (convex hulls, the
LP bound, the greedy walk), ``presolve`` (what greedy and CP-SAT share, and ``greedy``),
``cpsat`` (``solve``), ``exact`` (``dp_exact``); ``allocate`` below turns per-component
multipliers into caps for ``solve``.
"""

from __future__ import annotations

from vac.allocate.cpsat import OBJECTIVE_UNITS, solve  # noqa: F401
from vac.allocate.exact import dp_exact  # noqa: F401
from vac.allocate.options import STATUSES, Allocation, Group, Option, rank_options  # noqa: F401
from vac.allocate.options import _dense_params, _validate
from vac.allocate.presolve import greedy  # noqa: F401


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
