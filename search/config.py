"""The search recipe: one YAML file under ``configs/search/`` -> :class:`SearchConfig`.

Top-level keys (unknown keys are rejected, so a typo fails loudly instead of being ignored):

- ``space``: the :class:`~vac.search.space.SearchSpace` (genes, bounds, choices);
- ``search``: :class:`~vac.search.loop.SearchSettings` (population, generations, mode, seed...);
- ``evaluator`` (``compression`` | ``toy`` | ``module:Class``) and ``evaluation`` (its options;
  for ``compression`` the model spec handed to ``vac.strategy.evaluate_strategy``), ``toy``
  (options of the toy evaluator when ``--evaluator toy`` overrides);
- ``compress_base``: fixed ``CompressConfig`` keys written under every genome's keys;
- ``references``: name -> ``CompressConfig`` keys of hand-made strategies (e.g. the default),
  scored once by the same evaluator and shown beside the search's best;
- ``executor`` (``local`` | ``ray``), ``workers``, ``address``, ``gpus_per_actor``,
  ``cpus_per_actor``, ``runtime_env``;
- ``out`` (run directory), ``wandb`` (``project``, ``entity``, ``mode``, ``enabled``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vac.config import CompressConfig
from vac.errors import VacError
from vac.validate import NON_NEGATIVE, POSITIVE, check_number, read_yaml_file

from .evaluators import EvaluatorSpec
from .loop import SearchSettings
from .space import SearchSpace


@dataclass
class SearchConfig:
    space: SearchSpace
    search: SearchSettings = field(default_factory=SearchSettings)
    evaluator: str = "compression"
    evaluation: dict[str, Any] = field(default_factory=dict)
    toy: dict[str, Any] = field(default_factory=dict)
    compress_base: dict[str, Any] = field(default_factory=dict)
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    executor: str = "local"
    workers: int | None = None
    address: str | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1
    runtime_env: dict[str, Any] | None = None
    out: str = "runs/search"
    wandb: dict[str, Any] = field(default_factory=lambda: {"project": "vac-search"})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchConfig:
        if not isinstance(data, dict):
            raise VacError("a search config must be a YAML mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VacError(f"unknown search config keys {unknown}; known: {sorted(known)}")
        if "space" not in data:
            raise VacError("a search config needs a 'space:' section (at least num_layers)")
        data = dict(data)
        for key, kind in (("space", dict), ("search", dict), ("evaluation", dict), ("toy", dict),
                          ("compress_base", dict), ("wandb", dict), ("runtime_env", dict),
                          ("evaluator", str), ("out", str), ("address", str)):
            if data.get(key) is not None and not isinstance(data[key], kind):
                raise VacError(f"search config {key!r} must be a {'mapping' if kind is dict else 'string'}, "
                               f"got {data[key]!r}")
        data["space"] = SearchSpace.from_dict(data["space"] or {})
        settings = data.get("search") or {}
        bad = sorted(set(settings) - {f.name for f in fields(SearchSettings)})
        if bad:
            raise VacError(f"unknown keys in 'search:' {bad}; known: {[f.name for f in fields(SearchSettings)]}")
        data["search"] = SearchSettings(**settings)
        if data.get("executor", "local") not in ("local", "ray"):
            raise VacError(f"executor {data['executor']!r}: use 'local' or 'ray'")
        refs = data.get("references") or {}
        if not isinstance(refs, dict) or not all(isinstance(v, dict) for v in refs.values()):
            raise VacError("'references:' must map a name to compression config keys, e.g. "
                           "{default: {ratio: 1.8, method: kfac}}")
        valid_keys = {f.name for f in fields(CompressConfig)}
        base = data.get("compress_base") or {}
        if base.get("objective", "dense-target") != "dense-target":
            # genomes are made canonical (genes that do nothing dropped) for the default objective
            raise VacError("compress_base sets objective, which the search does not vary; the search assumes "
                           "objective dense-target")
        for name, ref in [("compress_base", data.get("compress_base") or {}),
                          *((f"reference {k!r}", v) for k, v in refs.items())]:
            if bad := sorted(set(ref) - valid_keys):
                raise VacError(f"search config {name} has keys {bad} that vac.compress does not know")
            if ref.get("own_samples"):
                raise VacError(f"search config {name} sets own_samples: a search calibrates on its evaluation data "
                               "blocks alone (the statistics are shared by every genome); remove it")
        for key, bounds in (("workers", NON_NEGATIVE), ("gpus_per_actor", NON_NEGATIVE), ("cpus_per_actor", POSITIVE)):
            if data.get(key) is not None:
                check_number(f"search config {key}", data[key], bounds, integer=key == "workers")
        for key in ("evaluation", "toy", "compress_base", "references", "wandb"):
            if data.get(key) is None:
                data.pop(key, None)
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> SearchConfig:
        path = Path(path)
        if not path.is_file():
            raise VacError(f"search config {path} not found (presets live in configs/search/)")
        return cls.from_dict(read_yaml_file(path, "search config"))

    def evaluator_spec(self) -> EvaluatorSpec:
        options = self.toy if self.evaluator == "toy" else self.evaluation
        return EvaluatorSpec(self.evaluator, dict(options))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["space"] = self.space.to_dict()
        out["search"] = asdict(self.search)
        return out
