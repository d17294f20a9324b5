"""Checkpoint plumbing: atomic JSON files, RNG states and individuals as JSON.

A checkpoint is one JSON file written to a temporary name in the same directory, fsynced
and moved over the old one with ``os.replace`` (atomic on POSIX), so a run killed at any
instant leaves either the previous generation's checkpoint or the new one, never half a
file. Floats round-trip exactly through JSON (``repr``), so a resumed run sees bit-identical
genes and fitnesses.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from .space import Individual


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=True))


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def rng_state() -> dict[str, Any]:
    """States of ``random`` (used by DEAP and our operators) and of numpy's global RNG."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"random": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


class isolated_rng:
    """Context manager that restores the global RNG states on exit, so that logging and
    plotting (wandb may draw random ids) cannot shift the search's random stream."""

    def __enter__(self):
        self._state = (random.getstate(), np.random.get_state())

    def __exit__(self, *exc):
        random.setstate(self._state[0])
        np.random.set_state(self._state[1])


def individual_to_dict(ind: Individual) -> dict[str, Any]:
    return {**ind.genes(), "fitness": list(ind.fitness.values)}


def individual_from_dict(data: dict[str, Any], fitness_cls) -> Individual:
    ind = Individual(data["perm"], data["reals"], data["cats"], data["bits"], fitness_cls())
    if data.get("fitness"):
        ind.fitness.values = tuple(data["fitness"])
    return ind
