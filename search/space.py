"""The search space and the DEAP encoding of a genome.

A :class:`SearchSpace` says which genes are free and within what: a real is free when
given as ``[low, high]`` and fixed when given as a number; a categorical is free when
given as a list of two or more choices and fixed otherwise; the order is free when
``order: search``; ``keep_dense`` lists the layers that *may* be kept dense (one bit each).

An :class:`Individual` is what DEAP operators act on: four flat gene groups (a permutation,
bounded reals, categorical choice indices, keep-dense bits) plus a DEAP ``Fitness``.
Only free genes are encoded; :meth:`SearchSpace.decode` fills fixed ones in.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

from deap import base

from vac.errors import VacError

from vac.validate import EXPONENT, POSITIVE, Bounds, as_layers, check_multipliers, check_number

from .genome import ALLOCATIONS, GRANULARITIES, NAMED_ORDERS, Genome, methods

#: valid values of the real genes (multipliers: > 0)
_REAL_BOUNDS = {"ratio": Bounds(1, low_open=True), "exponent": EXPONENT, "in_exponent": EXPONENT}


class FitnessPareto(base.Fitness):
    """(quality, achieved ratio): minimise the quality metric, maximise the ratio."""

    weights = (-1.0, 1.0)


class FitnessSingle(base.Fitness):
    """Quality only, at a fixed ratio: minimise."""

    weights = (-1.0,)


class Individual:
    """Encoded genes; gene groups are plain lists so DEAP operators work on them in place."""

    def __init__(self, perm, reals, cats, bits, fitness: base.Fitness):
        self.perm: list[int] = list(perm)
        self.reals: list[float] = list(reals)
        self.cats: list[int] = list(cats)
        self.bits: list[int] = list(bits)
        self.fitness = fitness

    def genes(self) -> dict[str, list]:
        return {"perm": self.perm, "reals": self.reals, "cats": self.cats, "bits": self.bits}

    def __repr__(self) -> str:
        return f"Individual({self.genes()}, fitness={self.fitness.values})"


Range = tuple[float, float]


def _is_range(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _as_choices(name: str, value, allowed) -> tuple[str, ...]:
    choices = (value,) if isinstance(value, str) else tuple(value)
    bad = [c for c in choices if c not in allowed]
    if not choices or bad:
        raise VacError(f"search space {name}: {bad or 'empty'} not among {tuple(allowed)}")
    return choices


@dataclass
class SearchSpace:
    """Which genes are searched, and their bounds or choices.

    ``ratio``: a number (fixed target ratio; required for single-objective search) or
    ``[low, high]``. ``order``: ``"search"`` (free permutation of ``num_layers`` layers), a
    named order or an explicit list. ``multipliers``: key (``attention``/``mlp`` or a matrix
    kind such as ``q_proj``) -> number or ``[low, high]``.
    """

    num_layers: int
    ratio: float | Range = (1.5, 2.5)
    order: str | list[int] = "search"
    method: str | list[str] = "kfac"
    exponent: float | Range = (0.0, 0.75)
    in_exponent: float | Range = 0.5
    granularity: str | list[str] = "layer"
    allocation: str | list[str] = "knapsack"
    multipliers: dict[str, float | Range] = field(default_factory=dict)
    keep_dense: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or self.num_layers < 1:
            raise VacError(f"search space num_layers must be a positive integer, got {self.num_layers!r}")
        self.order = as_layers(self.order, "search space order", NAMED_ORDERS + ("search",))
        self.keep_dense = as_layers(self.keep_dense, "search space keep_dense")
        if not isinstance(self.multipliers, dict):
            raise VacError(f"search space multipliers must be a mapping, got {self.multipliers!r}")
        if isinstance(self.order, str):
            if self.order != "search" and self.order not in NAMED_ORDERS:
                raise VacError(f"search space order {self.order!r}: use 'search', one of {NAMED_ORDERS} "
                               "or a list of layer indices")
        elif sorted(self.order) != list(range(self.num_layers)):
            raise VacError(f"search space order {self.order} is not a permutation of {self.num_layers} layers")
        self.method = _as_choices("method", self.method, methods())
        self.granularity = _as_choices("granularity", self.granularity, GRANULARITIES)
        self.allocation = _as_choices("allocation", self.allocation, ALLOCATIONS)
        check_multipliers({k: 1.0 for k in self.multipliers}, "search space multipliers")  # the keys
        self.keep_dense = sorted({int(i) for i in self.keep_dense})
        if any(not 0 <= i < self.num_layers for i in self.keep_dense):
            raise VacError(f"search space keep_dense {self.keep_dense} outside 0..{self.num_layers - 1}")
        # layout: (name, low, high) of free reals; (name, choices) of free categoricals
        reals = [("ratio", self.ratio), ("exponent", self.exponent), ("in_exponent", self.in_exponent)]
        reals += [(f"multipliers.{k}", v) for k, v in sorted(self.multipliers.items())]
        self.real_genes: list[tuple[str, float, float]] = []
        for name, value in reals:
            bounds = _REAL_BOUNDS.get(name, POSITIVE)  # multipliers: > 0
            if _is_range(value):
                low, high = float(value[0]), float(value[1])
                for end in (low, high):
                    check_number(f"search space {name}", end, bounds)
                if not low < high:
                    raise VacError(f"search space {name}: range [{low}, {high}] must have low < high")
                self.real_genes.append((name, low, high))
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                raise VacError(f"search space {name}: expected a number or [low, high], got {value!r}")
            else:
                check_number(f"search space {name}", value, bounds)
        if _is_range(self.in_exponent) and ("kfac" not in self.method or self.granularity == ("matrix",)):
            # the default objective (dense-target) refits every matrix with C~ whitened exactly
            raise VacError("search space in_exponent is a range but can have no effect: it is kfac's input-side "
                           "exponent, and under per-matrix dense-target refits (granularity matrix) C~ is whitened "
                           "exactly; fix it (in_exponent: 0.5) or search granularity: [layer, matrix]")
        self.cat_genes: list[tuple[str, tuple[str, ...]]] = [
            (name, choices) for name in ("method", "granularity", "allocation")
            if len(choices := getattr(self, name)) > 1]

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpace:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise VacError(f"unknown search space keys {unknown}; known: {sorted(known)}")
        if "num_layers" not in data:
            raise VacError("search space needs num_layers (decoder layers of the model)")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k in self.__dataclass_fields__}
        for k, v in out.items():  # tuples -> lists, single choices -> scalars (YAML/JSON friendly)
            if isinstance(v, tuple):
                out[k] = v[0] if len(v) == 1 and isinstance(v[0], str) else list(v)
        out["multipliers"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.multipliers.items()}
        return out

    # ---- encoding -----------------------------------------------------------------------

    @property
    def free_order(self) -> bool:
        return self.order == "search"

    @property
    def single_ratio(self) -> bool:
        return not _is_range(self.ratio)

    @property
    def bounds(self) -> tuple[list[float], list[float]]:
        return [g[1] for g in self.real_genes], [g[2] for g in self.real_genes]

    def new_individual(self, perm, reals, cats, bits, fitness_cls) -> Individual:
        return Individual(perm, reals, cats, bits, fitness_cls())

    def random_individual(self, fitness_cls, rng: random.Random | None = None) -> Individual:
        rng = rng or random
        perm = rng.sample(range(self.num_layers), self.num_layers) if self.free_order else []
        reals = [rng.uniform(low, high) for _, low, high in self.real_genes]
        cats = [rng.randrange(len(choices)) for _, choices in self.cat_genes]
        bits = [int(rng.random() < 0.5) for _ in self.keep_dense]
        return self.new_individual(perm, reals, cats, bits, fitness_cls)

    def centre_individual(self, order: list[int], fitness_cls) -> Individual:
        """Midpoint reals, first choices, nothing kept dense: the neutral background that
        the seed orders are compared on."""
        perm = list(order) if self.free_order else []
        reals = [(low + high) / 2 for _, low, high in self.real_genes]
        return self.new_individual(perm, reals, [0] * len(self.cat_genes), [0] * len(self.keep_dense),
                                   fitness_cls)

    def decode(self, ind: Individual) -> Genome:
        values: dict[str, Any] = {"ratio": self.ratio, "exponent": self.exponent,
                                  "in_exponent": self.in_exponent, **{
                                      f"multipliers.{k}": v for k, v in self.multipliers.items()}}
        values.update({name: x for (name, _, _), x in zip(self.real_genes, ind.reals)})
        values.update({name: getattr(self, name)[0] for name in ("method", "granularity", "allocation")})
        values.update({name: choices[i] for (name, choices), i in zip(self.cat_genes, ind.cats)})
        order = list(ind.perm) if self.free_order else self.order
        return Genome(order=order, ratio=float(values["ratio"]), method=values["method"],
                      exponent=float(values["exponent"]), in_exponent=float(values["in_exponent"]),
                      granularity=values["granularity"], allocation=values["allocation"],
                      multipliers={k: float(values[f"multipliers.{k}"]) for k in sorted(self.multipliers)},
                      keep_dense=[layer for layer, bit in zip(self.keep_dense, ind.bits) if bit])

    def encode(self, genome: Genome, fitness_cls) -> Individual:
        """Genes of ``genome`` in this space (values outside bounds are clipped; fixed genes
        are not stored)."""
        order = genome.order
        if self.free_order:
            if isinstance(order, str) and order in NAMED_ORDERS:  # e.g. a weights-only genome, which has none
                from vac.plan import layer_order

                order = layer_order(order, self.num_layers)
            if isinstance(order, str) or len(order) != self.num_layers:
                raise VacError(f"genome order {genome.order!r} is not a permutation of {self.num_layers} layers")
        flat = {"ratio": genome.ratio, "exponent": genome.exponent, "in_exponent": genome.in_exponent,
                **{f"multipliers.{k}": v for k, v in genome.multipliers.items()}}
        reals = [min(max(float(flat.get(name, (low + high) / 2)), low), high)
                 for name, low, high in self.real_genes]
        cats = []
        for name, choices in self.cat_genes:
            value = getattr(genome, name)
            if value not in choices:
                raise VacError(f"genome {name} {value!r} is not among the space's choices {choices}")
            cats.append(choices.index(value))
        bits = [int(layer in genome.keep_dense) for layer in self.keep_dense]
        return self.new_individual(list(order) if self.free_order else [], reals, cats, bits, fitness_cls)
