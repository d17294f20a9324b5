"""Rank allocation: CP-SAT against an exact DP and brute force on small seeded instances."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from vac.allocate import Allocation, Group, Option, allocate, dp_exact, greedy, rank_options, solve
from vac.errors import VacError
from vac.factorize import tail_energy

SHAPES = [(24, 24), (8, 24), (48, 24), (24, 48)]


def llm_like(seed: int, n_groups: int = 10, grid: int = 4) -> list[Group]:
    """Small matrices with power-law spectra whose scales span several orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for i in range(n_groups):
        m, n = SHAPES[i % len(SHAPES)]
        alpha = 0.3 + torch.rand((), generator=gen).item()
        scale = 10 ** (4 * torch.rand((), generator=gen).item() - 2)
        spectrum = scale * (torch.arange(min(m, n), dtype=torch.float64) + 1) ** -alpha
        comp = "attention" if i % 2 == 0 else "mlp"
        groups.append(Group(f"m{i}", comp, rank_options(m, n, tail_energy(spectrum), grid=grid)))
    return groups


def arbitrary(seed: int, n_groups: int = 8, n_options: int = 5) -> list[Group]:
    """Non-convex curves with dominated options and nonzero best losses: pruning must stay exact."""
    rng = random.Random(seed)
    groups = []
    for i in range(n_groups):
        opts = [Option(rank=k + 1, params=rng.randrange(1, 40) * 3,
                       loss=rng.uniform(-1.0, 10.0) * 10 ** rng.randint(-2, 2)) for k in range(n_options)]
        groups.append(Group(f"g{i}", "attention" if i % 3 == 0 else "mlp", opts))
    return groups


def dense_total(groups: list[Group]) -> int:
    return sum(max(o.params for o in g.options) for g in groups)


def brute_force(groups: list[Group], budget: int, caps: dict[str, int] | None = None) -> float:
    best = math.inf
    for combo in itertools.product(*[g.options for g in groups]):
        if sum(o.params for o in combo) > budget:
            continue
        if caps and any(sum(o.params for g, o in zip(groups, combo) if g.component == c) > cap
                        for c, cap in caps.items()):
            continue
        best = min(best, sum(o.loss for o in combo))
    return best


def check_valid(alloc: Allocation, groups: list[Group], budget: int) -> None:
    assert list(alloc.choices) == [g.name for g in groups]
    for g in groups:
        assert alloc.choices[g.name] in g.options
    assert alloc.total_params == sum(o.params for o in alloc.choices.values()) <= budget
    assert alloc.total_loss == pytest.approx(sum(o.loss for o in alloc.choices.values()))
    assert alloc.gap >= 0 and alloc.seconds >= 0


def close(a: float, b: float) -> bool:
    # solve() is exact up to the integer scaling of losses (<= groups/2e9 relative)
    return a == pytest.approx(b, rel=1e-6, abs=1e-9)


# ----------------------------------------------------------------------------- rank_options


def test_rank_options_grid_and_dense():
    m, n = 96, 48
    tail = tail_energy(torch.linspace(5, 0.1, 48, dtype=torch.float64))
    opts = rank_options(m, n, tail, grid=8)
    ranks = [o.rank for o in opts[:-1]]
    assert ranks == list(range(8, 32, 8))  # 32 * 144 = 4608 = m*n is not cheaper than dense
    assert all(o.params == o.rank * (m + n) < m * n for o in opts[:-1])
    assert all(o.loss == float(tail[o.rank]) for o in opts[:-1])
    assert opts[-1] == Option(rank=None, params=m * n, loss=0.0)
    # largest rank offered is the largest grid multiple still cheaper than dense
    assert (ranks[-1] + 8) * (m + n) >= m * n


def test_rank_options_flags_and_errors():
    tail = tail_energy(torch.ones(64, dtype=torch.float64))
    no_dense = rank_options(64, 64, tail, grid=16, allow_dense=False)
    assert [o.rank for o in no_dense] == [16]
    capped = rank_options(256, 256, tail_energy(torch.ones(256, dtype=torch.float64)), grid=8, max_ratio_rank=20)
    assert [o.rank for o in capped] == [8, 16, None]
    assert [o.rank for o in rank_options(4, 4, tail_energy(torch.ones(4)), grid=8)] == [None]
    with pytest.raises(ValueError, match="grid"):
        rank_options(64, 64, tail, grid=0)
    with pytest.raises(ValueError, match="tail"):
        rank_options(64, 64, tail[:10], grid=8)
    with pytest.raises(ValueError, match="no options"):
        rank_options(4, 4, tail_energy(torch.ones(4)), grid=8, allow_dense=False)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [1.3, 1.8, 3.0])
def test_solve_matches_dp_on_llm_like(seed, ratio):
    groups = llm_like(seed)
    budget = int(dense_total(groups) / ratio)
    exact = dp_exact(groups, budget)
    got = solve(groups, budget, rel_gap=0.0, workers=2)
    check_valid(exact, groups, budget)
    check_valid(got, groups, budget)
    assert got.status == "OPTIMAL" and got.gap == 0.0
    assert close(got.total_loss, exact.total_loss)
    fast = greedy(groups, budget)
    check_valid(fast, groups, budget)
    assert fast.status == "GREEDY"
    assert fast.total_loss >= exact.total_loss - 1e-9 * abs(exact.total_loss)


@pytest.mark.parametrize("seed", range(12))
def test_solve_matches_brute_force_on_arbitrary_curves(seed):
    groups = arbitrary(seed)
    budget = int(dense_total(groups) * random.Random(seed).uniform(0.3, 0.8))
    best = brute_force(groups, budget)
    got = solve(groups, budget, rel_gap=0.0, workers=1 + seed % 3)  # every worker portfolio
    check_valid(got, groups, budget)
    assert close(got.total_loss, best)
    assert close(dp_exact(groups, budget).total_loss, best)
    assert greedy(groups, budget).total_loss >= best - 1e-9


def test_constant_loss_offsets_change_no_decision():
    groups = llm_like(3)
    budget = int(dense_total(groups) / 1.8)
    shifted = [Group(g.name, g.component, [Option(o.rank, o.params, o.loss + 100.0 * i) for o in g.options])
               for i, g in enumerate(groups)]
    a, b = solve(groups, budget, rel_gap=0.0), solve(shifted, budget, rel_gap=0.0)
    assert close(b.total_loss - a.total_loss, sum(100.0 * i for i in range(len(groups))))


def test_generous_budget_keeps_everything_dense():
    groups = llm_like(1)
    alloc = solve(groups, dense_total(groups))
    assert all(o.rank is None for o in alloc.choices.values())
    assert alloc.status == "OPTIMAL" and alloc.total_loss == 0.0


def test_dp_exact_refuses_huge_instances():
    groups = [Group("a", "mlp", [Option(1, 1, 1.0), Option(None, 10**9, 0.0)])]
    with pytest.raises(ValueError, match="solve"):
        dp_exact(groups, 10**9, max_states=1000)


# ----------------------------------------------------------------------------- budgets and caps


def test_infeasible_budget_raises_vac_error():
    groups = llm_like(0)
    cheapest = sum(min(o.params for o in g.options) for g in groups)
    for fn in (solve, greedy, dp_exact):
        with pytest.raises(VacError, match=f"{cheapest:,}"):
            fn(groups, cheapest - 1)
    check_valid(solve(groups, cheapest), groups, cheapest)  # exactly the cheapest fits


@pytest.mark.parametrize("seed", range(6))
def test_component_caps_honoured_and_optimal(seed):
    groups = arbitrary(seed, n_groups=6, n_options=4)
    budget = int(dense_total(groups) * 0.7)
    att_dense = sum(max(o.params for o in g.options) for g in groups if g.component == "attention")
    att_cheap = sum(min(o.params for o in g.options) for g in groups if g.component == "attention")
    caps = {"attention": max(att_cheap, int(att_dense * 0.4))}
    got = solve(groups, budget, rel_gap=0.0, component_caps=caps)
    check_valid(got, groups, budget)
    used = sum(o.params for g in groups for o in [got.choices[g.name]] if g.component == "attention")
    assert used <= caps["attention"]
    assert close(got.total_loss, brute_force(groups, budget, caps))
    fast = greedy(groups, budget, component_caps=caps)
    check_valid(fast, groups, budget)
    assert sum(fast.choices[g.name].params for g in groups if g.component == "attention") <= caps["attention"]


def test_caps_errors():
    groups = llm_like(0)
    budget = int(dense_total(groups) / 1.5)
    with pytest.raises(VacError, match="attention"):
        solve(groups, budget, component_caps={"attention": 1})
    with pytest.raises(ValueError, match="unknown components"):
        solve(groups, budget, component_caps={"atention": 10**6})


def test_allocate_multipliers_become_caps():
    groups = llm_like(2, n_groups=12)
    ratio = 1.8
    budget = int(dense_total(groups) / ratio)
    dense = {c: sum(max(o.params for o in g.options) for g in groups if g.component == c) for c in ("attention", "mlp")}
    alloc = allocate(groups, budget, multipliers={"attention": 0.8}, ratio=ratio, rel_gap=0.0)
    check_valid(alloc, groups, budget)
    att = sum(alloc.choices[g.name].params for g in groups if g.component == "attention")
    assert att <= 0.8 * dense["attention"] / ratio
    free = allocate(groups, budget, rel_gap=0.0)  # no multipliers: plain solve
    assert free.total_loss <= alloc.total_loss + 1e-12
    with pytest.raises(ValueError, match="multipliers"):
        allocate(groups, budget, multipliers={"embed": 1.0})


def test_invalid_groups_rejected():
    opts = [Option(8, 10, 1.0)]
    with pytest.raises(ValueError, match="unique"):
        solve([Group("a", "mlp", opts), Group("a", "mlp", opts)], 100)
    with pytest.raises(ValueError, match="no options"):
        solve([Group("a", "mlp", [])], 100)
    with pytest.raises(ValueError, match="non-finite"):
        solve([Group("a", "mlp", [Option(8, 10, math.nan)])], 100)
