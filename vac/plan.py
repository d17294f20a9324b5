"""Orders of sequential compression and per-matrix ranks."""

from __future__ import annotations

from vac.errors import VacError
from vac.factorize import uniform_rank
from vac.families import Target


def layer_order(order, num_layers: int) -> list[int]:
    """The decoder-layer order for a named order or an explicit list (validated permutation)."""
    if isinstance(order, list):
        if sorted(order) != list(range(num_layers)):
            raise VacError(f"--order list must be a permutation of 0..{num_layers - 1}, got {order}")
        return list(order)
    if order in ("one-shot", "front-to-back"):
        return list(range(num_layers))
    if order == "back-to-front":
        return list(reversed(range(num_layers)))
    if order == "middle-out":
        # middle layer first, then alternating outward: below, above, below, ...
        mid = num_layers // 2
        out = [mid]
        for d in range(1, num_layers):
            for l in (mid - d, mid + d):
                if 0 <= l < num_layers:
                    out.append(l)
        return out
    raise VacError(f"unknown order {order!r}")


def uniform_ranks(targets: list[Target], ratio: float) -> dict[str, int]:
    """The same ratio for every target: the largest rank with r(m+n) <= mn/ratio."""
    ranks = {}
    for t in targets:
        r = uniform_rank(t.out_features, t.in_features, ratio)
        if r < 1:
            m, n = t.out_features, t.in_features
            raise VacError(f"--ratio {ratio} is too high: {t.name} ({m}x{n}) would get rank {r} < 1; "
                           f"the largest uniform ratio for this model is {min(x.dense_params / (x.out_features + x.in_features) for x in targets):.1f}")
        ranks[t.name] = min(r, t.out_features, t.in_features)
    return ranks
