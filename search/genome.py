"""A compression strategy as a genome, and its mapping to compression-config keys.

A :class:`Genome` holds the decoded genes of one strategy: layer order, exponent(s),
per-component budget multipliers, granularity, allocation, method, keep-dense layers and
target ratio. :meth:`Genome.to_config` turns it into the YAML keys of ``vac.compress
--config`` (``CompressConfig``), normalised so that two genomes that compress a model the
same way give the same dict -- and therefore the same :meth:`Genome.key`, which is what the
fitness cache is keyed by. Exponents a method does not use are dropped, reals are rounded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

# The vocabularies are vac.compress's own (one source of truth): a method registered in
# vac/methods.py, an order in vac/config.py or a family in vac/families.py reaches the search
# without a second list to update.
from vac.config import ALLOCATIONS, GRANULARITIES
from vac.config import ORDERS as NAMED_ORDERS
from vac.errors import VacError
from vac.validate import EXPONENT, Bounds, check_multipliers, check_number


def methods() -> tuple[str, ...]:
    """The registered factorization methods (vac/methods.py ``METHODS``), read when asked, so
    that methods registered after import are searched too."""
    from vac.methods import METHODS  # late: it imports torch

    return tuple(METHODS)


#: every key a genome can write; all are ``CompressConfig`` fields of the same name
CONFIG_KEYS = ("method", "fisher_exponent", "kfac_out_exponent", "kfac_in_exponent", "order",
               "granularity", "allocation", "multipliers", "keep_dense", "ratio")

# Reals are rounded before keying: mutations below this resolution cannot change a
# compression measurably, and rounding lets the cache catch near-duplicates.
_DECIMALS = 4


def _round(x: float) -> float:
    return round(float(x), _DECIMALS)


@dataclass
class Genome:
    """One compression strategy (decoded genes).

    ``exponent`` is the loss-weighting exponent of the method: ``fisher_exponent`` for
    ``fisher`` and the output-side ``kfac_out_exponent`` (a, on G) for ``kfac``;
    ``in_exponent`` is the input-side ``kfac_in_exponent`` (b, on C). Methods that use no
    exponent (``svd``, ``whiten``) ignore both.
    """

    order: list[int] | str
    ratio: float
    method: str = "kfac"
    exponent: float = 0.25
    in_exponent: float = 0.5
    granularity: str = "matrix"
    allocation: str = "knapsack"
    multipliers: dict[str, float] = field(default_factory=dict)
    keep_dense: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.method not in methods():
            raise VacError(f"genome method {self.method!r} is not one of {methods()}")
        if self.granularity not in GRANULARITIES:
            raise VacError(f"genome granularity {self.granularity!r} is not one of {GRANULARITIES}")
        if self.allocation not in ALLOCATIONS:
            raise VacError(f"genome allocation {self.allocation!r} is not one of {ALLOCATIONS}")
        if isinstance(self.order, str):
            if self.order not in NAMED_ORDERS:
                raise VacError(f"genome order {self.order!r} is neither a list of layer indices "
                               f"nor one of {NAMED_ORDERS}")
        elif sorted(self.order) != list(range(len(self.order))):
            raise VacError(f"genome order {list(self.order)} is not a permutation of 0..{len(self.order) - 1}")
        check_multipliers(self.multipliers, "genome multipliers")
        check_number("genome ratio (dense params / compressed params)", self.ratio, Bounds(1, low_open=True))
        for name in ("exponent", "in_exponent"):
            check_number(f"genome {name}", getattr(self, name), EXPONENT)
        if any(int(i) < 0 for i in self.keep_dense):
            raise VacError(f"genome keep_dense has negative layer indices: {self.keep_dense}")

    # ---- compression config -------------------------------------------------------------

    def to_config(self) -> dict[str, Any]:
        """The ``CompressConfig`` keys this genome sets, normalised (see module docstring). Genes that
        do nothing in this genome's combination (kfac_in_exponent under per-matrix refits, the order
        of a weights-only method, multipliers without the knapsack) are left out, so genomes that
        differ only there are one strategy, with one key."""
        from vac.config import effective

        config: dict[str, Any] = {"method": self.method}
        if self.method == "fisher":
            config["fisher_exponent"] = _round(self.exponent)
        elif self.method == "kfac":
            config["kfac_out_exponent"] = _round(self.exponent)
            config["kfac_in_exponent"] = _round(self.in_exponent)
        config["order"] = self.order if isinstance(self.order, str) else [int(i) for i in self.order]
        config["granularity"] = self.granularity
        config["allocation"] = self.allocation
        config["multipliers"] = {k: _round(self.multipliers[k]) for k in sorted(self.multipliers)}
        config["keep_dense"] = sorted({int(i) for i in self.keep_dense})
        config["ratio"] = _round(self.ratio)
        return effective(config)

    @classmethod
    def from_config(cls, config: dict[str, Any], *, strict: bool = True) -> Genome:
        """Inverse of :meth:`to_config`. With ``strict=False`` keys that are not genes (for
        example a ``model`` added from the search's ``compress_base``) are ignored."""
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown and strict:
            raise VacError(f"not genome keys: {unknown}; a genome YAML holds only {CONFIG_KEYS}")
        if "ratio" not in config:
            raise VacError("genome config lacks 'ratio'")
        method = config.get("method", "kfac")
        exponent = config.get("fisher_exponent" if method == "fisher" else "kfac_out_exponent", 0.25)
        order = config.get("order", "front-to-back")  # absent for methods that read weights only
        return cls(order=order if isinstance(order, str) else [int(i) for i in order],
                   ratio=float(config["ratio"]), method=method,
                   exponent=float(exponent) if exponent is not None else 0.25,
                   in_exponent=float(config.get("kfac_in_exponent", 0.5)),
                   granularity=config.get("granularity", "matrix"),
                   allocation=config.get("allocation", "knapsack"),
                   multipliers={k: float(v) for k, v in (config.get("multipliers") or {}).items()},
                   keep_dense=[int(i) for i in (config.get("keep_dense") or [])])

    def key(self) -> str:
        """Stable identity of the compression this genome performs (the fitness-cache key)."""
        return config_key(self.to_config())

    # ---- YAML ---------------------------------------------------------------------------

    def to_yaml(self, base: dict[str, Any] | None = None) -> str:
        """YAML usable as ``python -m vac.compress --config``; ``base`` adds fixed keys
        (genes win on a clash)."""
        from vac.config import effective

        # base keys that do nothing in this genome's combination are left out: the YAML then
        # runs as is (vac.compress rejects options that would be ignored)
        return dump_config(effective({**(base or {}), **self.to_config()}))

    @classmethod
    def from_yaml(cls, text: str, *, strict: bool = True) -> Genome:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise VacError("a genome YAML must be a mapping of compression-config keys")
        return cls.from_config(data, strict=strict)

    def save(self, path, base: dict[str, Any] | None = None) -> None:
        with open(path, "w") as f:
            f.write(self.to_yaml(base))

    @classmethod
    def load(cls, path, *, strict: bool = True) -> Genome:
        with open(path) as f:
            return cls.from_yaml(f.read(), strict=strict)


def config_key(config: dict[str, Any]) -> str:
    """sha256 over canonical JSON of a (normalised) config; 16 hex digits is plenty."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _FlowLists(yaml.SafeDumper):
    """Dumps lists of scalars on one line so a 32-layer order stays readable."""


def _represent_list(dumper, data):
    flow = all(isinstance(x, (int, float, str)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowLists.add_representer(list, _represent_list)


def dump_config(config: dict[str, Any]) -> str:
    return yaml.dump(config, Dumper=_FlowLists, sort_keys=False, default_flow_style=False)
