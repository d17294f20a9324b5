"""Checkpoint plumbing: atomic JSON files, verified checkpoints, RNG states and individuals as JSON.

Files are written to a temporary name in the same directory, fsynced and moved into place
with ``os.replace`` (atomic on POSIX), so a run killed at any instant never leaves half a file.
The checkpoint itself (:func:`save_state`) carries a sha256 of its own content and is checked
after writing; the previous generation's checkpoint is kept beside it as
``state-previous.json``. :func:`load_state` takes the newest one that verifies, so a checkpoint
damaged later (truncated, altered) costs one generation, not the run. Floats round-trip exactly
through JSON (``repr``), so a resumed run sees bit-identical genes and fitnesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from vac.errors import VacError
from vac.files import fsync_dir, pid_alive

from .space import Individual

STATE_FILE = "state.json"
PREVIOUS_STATE = "state-previous.json"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)  # make the rename itself durable


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=True))


def _digest(state: dict[str, Any]) -> str:
    # JSON round-trips exactly (floats by repr, key order kept), so the text can be re-derived
    return hashlib.sha256(json.dumps(state, indent=1, allow_nan=True).encode()).hexdigest()


def _state_problem(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(state, None) for a checkpoint file that verifies, else (None, what is wrong)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable ({e.__class__.__name__})"
    except ValueError:
        return None, "not valid JSON (truncated?)"
    if not isinstance(state, dict):
        return None, "not a checkpoint"
    checksum = state.pop("checksum", None)
    # (checkpoints of VAC before checksums have none: a file that parses is all they promise)
    if checksum is not None and checksum != _digest(state):
        return None, "its content does not match its checksum"
    return state, None


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Write the checkpoint, verify it, and only then make it the newest (the newest becomes the previous)."""
    run_dir = Path(run_dir)
    path, previous = run_dir / STATE_FILE, run_dir / PREVIOUS_STATE
    tmp = run_dir / f".{STATE_FILE}.new-{os.getpid()}"
    atomic_write_json(tmp, {**state, "checksum": _digest(state)})
    _, problem = _state_problem(tmp)
    if problem is not None:
        tmp.unlink(missing_ok=True)
        raise VacError(f"the search checkpoint written to {tmp} does not verify ({problem}); the previous one "
                       f"is kept. Check the disk under {run_dir}")
    if path.exists():
        os.replace(path, previous)  # a kill right here leaves the previous one, which load_state takes
    os.replace(tmp, path)


def has_state(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in (STATE_FILE, PREVIOUS_STATE))


def load_state(run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """The newest checkpoint that verifies, and one line per newer one passed over (and why)."""
    skipped = []
    for name in (STATE_FILE, PREVIOUS_STATE):
        path = Path(run_dir) / name
        if not path.exists():
            continue
        state, problem = _state_problem(path)
        if state is not None:
            return state, skipped
        skipped.append(f"{name} is unusable: {problem}")
    raise VacError(f"no usable search checkpoint in {run_dir} ({'; '.join(skipped) or 'none found'}); start a new "
                   "run with another --out")


#: temporary files of atomic writes (``.NAME.tmp-PID``, ``.state.json.new-PID``)
_TMP = re.compile(r"\.(.+)\.(?:tmp|new)-(\d+)")


def remove_stale_tmp(run_dir: Path) -> list[str]:
    """Delete temporary files that killed runs left in ``run_dir`` (only ours, only of dead processes)."""
    removed = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else ():
        m = _TMP.fullmatch(p.name)
        if m and p.is_file() and int(m.group(2)) != os.getpid() and not pid_alive(int(m.group(2))):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


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
