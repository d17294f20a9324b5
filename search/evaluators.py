"""Evaluators: what turns a compression config into a fitness.

An evaluator is built once per worker (process or Ray actor) from a picklable
:class:`EvaluatorSpec` -- so the base model and calibration data are loaded once per worker,
not once per genome -- and then called with one config dict per genome. It returns at least
``{"quality": float, "ratio": float}``: quality is a metric to *minimise* (perplexity or KL
to the dense model on a held-out calibration slice), ratio the *achieved* compression ratio.
Extra keys (timings, ranks summary) are kept in the cache and logged.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from vac.errors import VacError

from .operators import middle_out

#: quality given to an evaluation that raised or returned a non-finite number; finite so
#: that crowding distances stay defined, and large enough to be dominated by everything
FAILED_QUALITY = 1e12


class Evaluator(Protocol):
    def __call__(self, config: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class EvaluatorSpec:
    """Picklable recipe for an evaluator: ``kind`` is ``toy``, ``compression`` or an import
    path ``package.module:Class``; ``options`` are its keyword arguments."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> Evaluator:
        return self.build()

    def build(self) -> Evaluator:
        if self.kind in EVALUATORS:
            cls = EVALUATORS[self.kind]
        elif ":" in self.kind:
            module, _, name = self.kind.partition(":")
            cls = getattr(importlib.import_module(module), name)
        else:
            raise VacError(f"unknown evaluator {self.kind!r}; use one of {sorted(EVALUATORS)} "
                           "or 'package.module:Class'")
        return cls(**self.options)


def safe_evaluate(evaluator: Callable, config: dict[str, Any]) -> dict[str, Any]:
    """Run one evaluation; an exception or a non-finite result becomes a failed fitness
    (with the error text) instead of ending the whole search."""
    start = time.perf_counter()
    try:
        result = dict(evaluator(config))
        quality, ratio = float(result["quality"]), float(result["ratio"])
        if not (math.isfinite(quality) and math.isfinite(ratio)):
            raise ValueError(f"non-finite fitness quality={quality} ratio={ratio}")
        result.update(quality=quality, ratio=ratio)
    except Exception as exc:  # noqa: BLE001 -- one bad genome must not kill the run
        result = {"quality": FAILED_QUALITY, "ratio": 0.0, "error": f"{type(exc).__name__}: {exc}"}
    result.setdefault("eval_s", round(time.perf_counter() - start, 3))
    return result


class ToyEvaluator:
    """Deterministic stand-in with the shape of the real problem, for tests and dry runs.

    quality = ratio^1.5 * (1 + penalties), penalties growing with the order's distance from
    middle-out, the exponent's distance from 0.25 (and b's from 0.5), the attention
    multiplier's distance from 1.5, and a per-method offset; each kept-dense layer helps
    quality a little and costs achieved ratio. ``delay`` (seconds) imitates a slow
    evaluation.
    """

    METHOD_PENALTY = {"svd": 1.0, "whiten": 0.4, "fisher": 0.15, "kfac": 0.0}
    NAMED_ORDER_PENALTY = {"middle-out": 0.0, "back-to-front": 0.3, "front-to-back": 0.6, "one-shot": 1.0}

    def __init__(self, delay: float = 0.0):
        from vac.config import CompressConfig

        self.delay = delay
        self.calls = 0
        self.defaults = CompressConfig().to_dict()  # what a config leaves out, as vac.compress would

    @staticmethod
    def order_penalty(order) -> float:
        if isinstance(order, str):
            return ToyEvaluator.NAMED_ORDER_PENALTY[order]
        n = len(order)
        target = {layer: pos for pos, layer in enumerate(middle_out(n))}
        # mean displacement from middle-out, in units of the largest possible (n/2)
        return sum(abs(pos - target[layer]) for pos, layer in enumerate(order)) / max(n * n / 2, 1)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        config = {**self.defaults, **config}
        method = config["method"]
        if method == "fisher":
            exp_pen = (config["fisher_exponent"] - 0.25) ** 2
        elif method == "kfac":
            exp_pen = (config["kfac_out_exponent"] - 0.25) ** 2 + (config["kfac_in_exponent"] - 0.5) ** 2
        else:
            exp_pen = 0.0
        mult = config.get("multipliers") or {}
        mult_pen = 0.2 * math.log(mult.get("attention", 1.5) / 1.5) ** 2 + 0.1 * math.log(mult.get("mlp", 1.0)) ** 2
        keep = len(config.get("keep_dense") or [])
        penalty = (self.order_penalty(config["order"]) + 2.0 * exp_pen + mult_pen
                   + self.METHOD_PENALTY[method] - (0.05 if config.get("granularity") == "matrix" else 0.0)
                   - 0.03 * keep)
        ratio = float(config["ratio"])
        achieved = ratio * (1.0 - 0.02 * keep)
        return {"quality": achieved ** 1.5 * (1.0 + max(penalty, 0.0)) + 1.0, "ratio": achieved}


class CompressionEvaluator:
    """Compresses the base model with a genome's config and measures it.

    Calls ``vac.strategy.evaluate_strategy(model_spec, config) -> dict`` (imported lazily,
    so that workers only pay for torch/transformers when they really evaluate). Contract
    for that function:

    - ``model_spec`` is the ``evaluation:`` mapping of the search config, passed verbatim
      (the presets use ``model``, ``metric`` = ``kl`` | ``ppl``, ``data``, ``calibration_blocks``,
      ``heldout_blocks``, ``block_size``, ``dtype``, ``device``);
    - ``config`` holds ``CompressConfig`` keys (the genome's, over the search's
      ``compress_base``);
    - it returns ``{"quality": float, "ratio": float, ...}``: quality = the metric on a
      *held-out slice of the calibration data* (never the evaluation split, or the search
      would fit the benchmark), lower is better; ratio = the achieved linear-layer ratio;
    - it must keep the base model, tokenizer and calibration/held-out token blocks cached
      per ``model_spec`` within the process (e.g. ``functools.lru_cache`` on a frozen spec)
      and restore or copy the dense weights for each call: one worker evaluates many
      genomes in a row. Inside a worker the visible GPU is already set via
      ``CUDA_VISIBLE_DEVICES`` (local executor) or by Ray (one GPU per actor).
    """

    def __init__(self, **model_spec: Any):
        self.model_spec = model_spec
        self._evaluate = None

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        if self._evaluate is None:
            try:
                from vac.strategy import evaluate_strategy
            except ImportError as exc:
                raise VacError("the compression evaluator needs vac.strategy.evaluate_strategy, which "
                               f"could not be imported ({exc}); use --evaluator toy for a dry run") from exc
            self._evaluate = evaluate_strategy
        return self._evaluate(self.model_spec, config)


EVALUATORS: dict[str, type] = {"toy": ToyEvaluator, "compression": CompressionEvaluator}
