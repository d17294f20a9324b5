"""Non-finite detection: weights, statistics, factors and losses, each named where it goes wrong.

A NaN or Inf that slips into a weight or a statistic surfaces much later and far away (a
``LinAlgError`` deep inside an SVD, an export whose logits disagree with themselves). These
checks stop at the first bad tensor instead and name it, with what to do about it.

:func:`check_finite` takes ``(name, tensor)`` pairs, so a caller can stream them one at a time
(one decoder layer's statistics, one safetensors entry); :func:`scan_safetensors` does exactly
that for a checkpoint directory, so the whole model never has to be in memory to be checked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from vac.errors import VacError

#: elements checked per piece of a large tensor: bounds the temporary boolean mask to a few MB
CHUNK = 1 << 24


class NonFiniteError(VacError):
    """A tensor or a loss holds NaN or Inf; the message names it."""


def _first_bad(t: torch.Tensor) -> tuple[int, int, float] | None:
    """(count, flat index of the first, its value) of the non-finite entries of ``t``, or None."""
    flat = t.detach().reshape(-1)
    count, first = 0, None
    for start in range(0, flat.numel(), CHUNK):
        piece = flat[start: start + CHUNK]
        bad = ~torch.isfinite(piece)
        n = int(bad.sum())
        if n and first is None:
            i = int(bad.nonzero()[0, 0])
            first = (start + i, float(piece[i]))
        count += n
    return None if first is None else (count, *first)


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], what: str, hint: str = "") -> None:
    """Raise :class:`NonFiniteError` naming the first tensor of ``tensors`` with a NaN or Inf.

    ``what`` says what the tensors are ("weights of /path", "input statistics of layer 3");
    ``hint`` what to do about it. Integer tensors (packed quantised weights) cannot hold NaN and
    are skipped.
    """
    for name, t in tensors:
        if not (t.is_floating_point() or t.is_complex()):
            continue
        found = _first_bad(t)
        if found is None:
            continue
        count, index, value = found
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), tuple(t.shape))) if t.dim() else ()
        raise NonFiniteError(f"{what}: {name} has {count:,} non-finite value{'s' * (count > 1)} "
                             f"(first: {value} at index {list(where)} of shape {list(t.shape)})"
                             + (f"; {hint}" if hint else ""))


def safetensors_entries(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(file:name, tensor)`` for every tensor of every *.safetensors file, one at a time."""
    from safetensors import safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            # one open per tensor: pages of a mapping left open stay resident, and a whole
            # checkpoint's worth of them would count against the memory the run may use
            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(key)
            yield f"{path.name}:{key}", tensor


WEIGHTS_HINT = ("the checkpoint is corrupt or was saved from a run that diverged; re-download or re-export it "
                "(VAC cannot compress weights that are not numbers)")


def scan_safetensors(directory: str | Path) -> None:
    """Check every tensor of a safetensors checkpoint directory for NaN/Inf, one tensor in memory at a time."""
    check_finite(safetensors_entries(directory), f"weights in {directory}", WEIGHTS_HINT)


STATS_HINT = ("activations overflowed or the weights are not numbers: use --dtype float32, check the calibration "
              "data, or raise --damp")
FACTORS_HINT = "the weighted factorization was ill-conditioned: raise --damp or use --dtype float32"


def check_loss(value: float, where: str, hint: str) -> None:
    """A training loss (or gradient norm) must be a finite number; ``where`` names the step."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{where} is {value}; {hint}")


__all__ = ["FACTORS_HINT", "NonFiniteError", "STATS_HINT", "check_finite", "check_loss", "safetensors_entries",
           "scan_safetensors"]
