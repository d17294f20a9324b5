"""Variation operators and seed orders.

Each gene group gets operators that keep it valid: the order permutation only ever goes
through permutation-preserving operators (ordered crossover, index shuffling, adjacent
swaps), reals through the bounded SBX / polynomial operators, categoricals and keep-dense
bits through uniform crossover and resampling/flips. All randomness comes from the
``random`` module, which DEAP's operators use too, so one seeded state (saved in every
checkpoint) determines a whole run.
"""

from __future__ import annotations

import random

from deap import tools

from .space import Individual, SearchSpace


# ---- seed orders -------------------------------------------------------------------------

def front_to_back(n: int) -> list[int]:
    return list(range(n))


def back_to_front(n: int) -> list[int]:
    return list(range(n - 1, -1, -1))


def middle_out(n: int) -> list[int]:
    """Middle layer first, then alternately one below and one above: 6 -> [3, 2, 4, 1, 5, 0]."""
    mid = n // 2
    order = [mid]
    for step in range(1, n):
        for layer in (mid - step, mid + step):
            if 0 <= layer < n:
                order.append(layer)
    return order


SEED_ORDERS = {"front-to-back": front_to_back, "back-to-front": back_to_front, "middle-out": middle_out}


def named_order(name: str, n: int) -> list[int]:
    return SEED_ORDERS[name](n)


def is_permutation(order, n: int) -> bool:
    return sorted(order) == list(range(n))


# ---- permutation operators ---------------------------------------------------------------

def cx_order(perm1: list[int], perm2: list[int]) -> None:
    """Ordered crossover (OX) in place; a no-op for fewer than two layers."""
    if len(perm1) >= 2:
        tools.cxOrdered(perm1, perm2)


def mut_adjacent_swap(perm: list[int], indpb: float) -> None:
    """Swap neighbours with probability ``indpb`` each: a small step, since moving one layer
    a place earlier or later rarely changes much in sequential compression."""
    for i in range(len(perm) - 1):
        if random.random() < indpb:
            perm[i], perm[i + 1] = perm[i + 1], perm[i]


def mut_order(perm: list[int], indpb: float) -> None:
    """Half the time a long-range shuffle (``mutShuffleIndexes``), half adjacent swaps."""
    if len(perm) < 2:
        return
    if random.random() < 0.5:
        tools.mutShuffleIndexes(perm, indpb)
    else:
        mut_adjacent_swap(perm, 2 * indpb)


# ---- categorical and bit operators -------------------------------------------------------

def mut_categorical(cats: list[int], sizes: list[int], indpb: float) -> None:
    """Resample each choice (to a *different* one) with probability ``indpb``."""
    for i, size in enumerate(sizes):
        if size > 1 and random.random() < indpb:
            cats[i] = (cats[i] + random.randrange(1, size)) % size


# ---- whole individuals -------------------------------------------------------------------

class Variation:
    """Crossover and mutation settings for one space.

    ``eta_cx`` / ``eta_mut`` are the SBX and polynomial distribution indices (larger =
    children closer to parents); ``indpb`` is the per-gene mutation probability, defaulting
    to about one change per gene group.
    """

    def __init__(self, space: SearchSpace, *, eta_cx: float = 15.0, eta_mut: float = 20.0,
                 indpb: float | None = None):
        self.space = space
        self.eta_cx, self.eta_mut = eta_cx, eta_mut
        self.low, self.up = space.bounds
        self.sizes = [len(choices) for _, choices in space.cat_genes]
        self.indpb = indpb

    def _pb(self, n: int) -> float:
        return self.indpb if self.indpb is not None else 1.0 / max(n, 1)

    def crossover(self, a: Individual, b: Individual) -> None:
        cx_order(a.perm, b.perm)
        if a.reals:
            tools.cxSimulatedBinaryBounded(a.reals, b.reals, self.eta_cx, self.low, self.up)
        tools.cxUniform(a.cats, b.cats, 0.5)
        tools.cxUniform(a.bits, b.bits, 0.5)

    def mutate(self, ind: Individual) -> None:
        mut_order(ind.perm, self._pb(len(ind.perm)))
        if ind.reals:
            tools.mutPolynomialBounded(ind.reals, self.eta_mut, self.low, self.up, self._pb(len(ind.reals)))
        mut_categorical(ind.cats, self.sizes, self._pb(len(ind.cats)))
        if ind.bits:
            tools.mutFlipBit(ind.bits, self._pb(len(ind.bits)))


def clone(ind: Individual) -> Individual:
    return Individual(ind.perm, ind.reals, ind.cats, ind.bits, type(ind.fitness)())


def select_parents(population: list[Individual], k: int) -> list[Individual]:
    """Binary tournaments on (non-domination rank, crowding distance), as in NSGA-II.

    Unlike ``selTournamentDCD`` this does not need the population size to be a multiple
    of four.
    """
    fronts = tools.sortNondominated(population, len(population))
    rank = {}
    for r, front in enumerate(fronts):
        tools.emo.assignCrowdingDist(front)
        rank.update({id(ind): r for ind in front})
    chosen = []
    for _ in range(k):
        a, b = random.sample(population, 2) if len(population) > 1 else (population[0],) * 2
        ka = (rank[id(a)], -a.fitness.crowding_dist)
        kb = (rank[id(b)], -b.fitness.crowding_dist)
        chosen.append(a if ka < kb else b if kb < ka else random.choice((a, b)))
    return chosen


def make_offspring(population: list[Individual], n: int, variation: Variation,
                   cxpb: float, mutpb: float) -> list[Individual]:
    """``n`` children: tournament parents, pairwise crossover with ``cxpb``, then mutation
    with ``mutpb``; children carry no fitness."""
    parents = [clone(p) for p in select_parents(population, n + n % 2)]
    for a, b in zip(parents[::2], parents[1::2]):
        if random.random() < cxpb:
            variation.crossover(a, b)
    for child in parents:
        if random.random() < mutpb:
            variation.mutate(child)
    return parents[:n]
