"""Scoring one compression strategy for the evolutionary search.

``evaluate_strategy(model_spec, config)`` compresses a fresh copy of the base model with
``config`` and scores it on a held-out slice of the *calibration* data (never the evaluation
split: a search that selected on the benchmark would overfit it). The base model, token
blocks and the dense model's statistics are computed once per process and reused for every
genome a worker evaluates.
"""

from __future__ import annotations

import copy
import functools
import json
import time

from vac.config import make_config
from vac.errors import VacError

SPEC_DEFAULTS = {"model": "smollm2-135m", "metric": "kl", "data": "bundled", "calibration_blocks": 16,
                 "heldout_blocks": 4, "block_size": 256, "dtype": "float32", "device": "auto", "seed": 0}


@functools.lru_cache(maxsize=2)
def _base(spec_json: str):
    from vac.data import token_blocks
    from vac.models import load

    spec = json.loads(spec_json)
    loaded = load(spec["model"], spec["dtype"], spec["device"])
    n_cal, n_held = int(spec["calibration_blocks"]), int(spec["heldout_blocks"])
    # calibration-split documents only; the held-out blocks follow the statistics blocks
    blocks = token_blocks(spec["data"], loaded.tokenizer, n_cal + n_held, int(spec["block_size"]),
                          split="calib", shared=True, seed=int(spec["seed"]))
    return loaded, blocks[:n_cal], blocks[n_cal:]


@functools.lru_cache(maxsize=2)
def _stats_store(spec_json: str):
    """What compress_ measures on the dense model (gradient statistics, allocation spectra): the
    same for every genome scored against one base model and calibration set, so kept per process."""
    from vac.statstore import StatsStore

    return StatsStore()


def evaluate_strategy(model_spec: dict, config: dict) -> dict:
    from vac.evaluate import compare
    from vac.pipeline import compress_

    spec = {**SPEC_DEFAULTS, **{k: v for k, v in model_spec.items() if k != "split"}}
    if spec["metric"] not in ("kl", "ppl"):
        raise VacError(f"search metric must be kl or ppl, got {spec['metric']!r}")
    loaded, calib, heldout = _base(json.dumps(spec, sort_keys=True))
    cfg = make_config({**{k: v for k, v in config.items() if k != "model"}, "calib_samples": len(calib),
                       "seq_len": calib.shape[1], "evaluate": False, "out": None})
    model = copy.deepcopy(loaded.model)
    t0 = time.perf_counter()
    result = compress_(model, cfg, calib, progress=False, store=_stats_store(json.dumps(spec, sort_keys=True)))
    seconds = time.perf_counter() - t0
    metrics = compare({"c": model}, heldout, reference=loaded.model, progress=False)["c"]
    return {"quality": metrics[spec["metric"]], "ratio": result.linear_ratio, "ppl": metrics["ppl"],
            "kl": metrics["kl"], "top1": metrics["top1"], "seconds": seconds}
