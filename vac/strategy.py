"""Scoring one compression strategy for the evolutionary search.

``evaluate_strategy(model_spec, config)`` compresses the base model with ``config`` and scores it
on a held-out slice of the *calibration* data (never the evaluation split: a search that
selected on the benchmark would overfit it).

A worker never holds a whole model: the base model is its checkpoint on disk, each genome is
compressed one decoder layer at a time into a work directory of its own (the dense weights are
never copied), and scored by streaming the dense and compressed models side by side. What depends
only on the dense model and the calibration blocks (G, the allocation spectra) is measured once,
into a statistics store on disk (``stats_dir`` in the spec, e.g. shared by a machine's workers;
by default one per process), and read back by every genome.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import shutil
import tempfile
import time

from vac.config import effective, make_config
from vac.errors import VacError

SPEC_DEFAULTS = {"model": "smollm2-135m", "metric": "kl", "data": "bundled", "calibration_blocks": 16,
                 "heldout_blocks": 6, "block_size": 256, "dtype": "float32", "device": "auto", "seed": 0,
                 "stats_dir": None}


@functools.lru_cache(maxsize=2)
def _base(spec_json: str):
    import torch

    from vac.data import token_blocks
    from vac.models import DTYPES, open_checkpoint, resolve_device

    spec = json.loads(spec_json)
    checkpoint = open_checkpoint(spec["model"])
    device = resolve_device(spec["device"])
    if spec["dtype"] == "auto":
        dtype = checkpoint.published_dtype if device.type != "cpu" else torch.float32
    elif spec["dtype"] in DTYPES:
        dtype = DTYPES[spec["dtype"]]
    else:
        raise VacError(f"search evaluation dtype {spec['dtype']!r}: use auto, {', '.join(DTYPES)}")
    n_cal, n_held = int(spec["calibration_blocks"]), int(spec["heldout_blocks"])
    # calibration-split documents only; the held-out blocks follow the statistics blocks (of each
    # domain, for a bundled mixture: every domain gets its share of both)
    kw = dict(split="calib", shared=True, seed=int(spec["seed"]))
    calib = token_blocks(spec["data"], checkpoint.tokenizer, n_cal, int(spec["block_size"]), **kw)
    heldout = token_blocks(spec["data"], checkpoint.tokenizer, n_held, int(spec["block_size"]), skip_blocks=n_cal, **kw)
    return checkpoint, device, dtype, calib, heldout


@functools.lru_cache(maxsize=2)
def _stats_store(spec_json: str):
    """The dense model's statistics for one base model and calibration set, shared by every genome."""
    from vac.statstore import StatsStore

    spec = json.loads(spec_json)
    path = spec.get("stats_dir")
    if not path:
        path = tempfile.mkdtemp(prefix="vac-search-stats-")
        atexit.register(shutil.rmtree, path, True)
    fingerprint = {k: spec[k] for k in ("model", "data", "calibration_blocks", "heldout_blocks", "block_size",
                                        "dtype", "seed")}
    # the blocks themselves: a source's name (e.g. 'bundled') can stand for other text in another version
    calib = _base(spec_json)[3]
    fingerprint["calibration_sha256"] = hashlib.sha256(calib.numpy().tobytes()).hexdigest()
    return StatsStore(path, fingerprint=fingerprint)


def evaluate_strategy(model_spec: dict, config: dict) -> dict:
    from vac.evaluate import compare_home
    from vac.home import CheckpointHome
    from vac.pipeline import compress_home

    spec = {**SPEC_DEFAULTS, **{k: v for k, v in model_spec.items() if k != "split"}}
    if spec["metric"] not in ("kl", "ppl"):
        raise VacError(f"search metric must be kl or ppl, got {spec['metric']!r}")
    key = json.dumps(spec, sort_keys=True)
    if config.get("own_samples"):
        raise VacError("own_samples in a search: a search calibrates on its model spec's data blocks alone (its "
                       "statistics are shared by every genome); remove own_samples from the search's base config")
    checkpoint, device, dtype, calib, heldout = _base(key)
    cfg = make_config(effective({**{k: v for k, v in config.items() if k != "model"}, "calib_samples": len(calib),
                                 "own_samples": 0,  # a search calibrates on its spec's blocks alone
                                 "seq_len": calib.shape[1], "evaluate": False, "out": None}))
    home = CheckpointHome(checkpoint.directory, device=device, dtype=dtype, config=checkpoint.config)
    try:
        t0 = time.perf_counter()
        result = compress_home(home, cfg, calib, progress=False, store=_stats_store(key))
        seconds = time.perf_counter() - t0
        metrics = compare_home(home, heldout, progress=False)["compressed"]
    finally:
        home.close()
    return {"quality": metrics[spec["metric"]], "ratio": result.linear_ratio, "ppl": metrics["ppl"],
            "kl": metrics["kl"], "top1": metrics["top1"], "seconds": seconds}
