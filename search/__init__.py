"""Evolutionary search over compression strategies (shipped as ``vac.search``).

A genome (layer order, exponents, per-component budget multipliers, granularity,
allocation, method, keep-dense layers, ratio) maps to ``vac.compress`` config keys; DEAP's
NSGA-II searches quality after compression against achieved ratio, with a fitness cache,
per-generation atomic checkpoints, and local-process or Ray-actor executors.
Run it with ``python -m vac.search --config configs/search/<name>.yaml``.
"""

from .config import SearchConfig
from .evaluators import CompressionEvaluator, EvaluatorSpec, ToyEvaluator, safe_evaluate
from .executors import LocalExecutor, RayExecutor, make_executor
from .genome import Genome, config_key
from .loop import Search, SearchResult, SearchSettings
from .operators import back_to_front, front_to_back, middle_out
from .pareto import hypervolume, nondominated
from .space import Individual, SearchSpace

__all__ = [
    "CompressionEvaluator", "EvaluatorSpec", "Genome", "Individual", "LocalExecutor", "RayExecutor",
    "Search", "SearchConfig", "SearchResult", "SearchSettings", "SearchSpace", "ToyEvaluator",
    "back_to_front", "config_key", "front_to_back", "hypervolume", "make_executor", "middle_out",
    "nondominated", "safe_evaluate",
]
