"""The registry of factorization methods.

A method turns one weight and the statistics of its layer into factors. It declares which
statistics it needs, so the pipeline collects only those. New methods join with ``register``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vac import factorize as fz


@dataclass
class TargetStats:
    """What the pipeline measured for one target (any field may be None if not needed)."""

    C: torch.Tensor | None = None  # X~ X~^T: inputs the layer will see
    C_cross: torch.Tensor | None = None  # X X~^T: dense inputs x current inputs (dense-target objective)
    G: torch.Tensor | None = None  # output-gradient covariance
    F: torch.Tensor | None = None  # diagonal empirical Fisher, m x n


@dataclass(frozen=True)
class Method:
    name: str
    needs_inputs: bool
    needs_output_grads: bool
    needs_fisher: bool
    fit: Callable  # (W, TargetStats, rank, config) -> Factorization
    summary: str


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def _svd(W, s: TargetStats, rank, cfg):
    return fz.svd_factorize(W, rank)


def _whiten(W, s: TargetStats, rank, cfg):
    if s.C_cross is not None:
        return fz.dense_target_factorize(W, s.C, s.C_cross, rank, damp=cfg.damp)
    return fz.whitened_factorize(W, s.C, rank, damp=cfg.damp)


def _fisher(W, s: TargetStats, rank, cfg):
    return fz.fisher_factorize(W, s.F, rank, exponent=cfg.fisher_exponent)


def _kfac(W, s: TargetStats, rank, cfg):
    if s.C_cross is not None:
        # the dense-target closed form whitens by C~ exactly (input exponent 1/2)
        return fz.dense_target_factorize(W, s.C, s.C_cross, rank, G=s.G, out_exponent=cfg.kfac_out_exponent,
                                         damp=cfg.damp)
    return fz.kfac_factorize(W, s.C, s.G, rank, out_exponent=cfg.kfac_out_exponent,
                             in_exponent=cfg.kfac_in_exponent, damp=cfg.damp)


register(Method("svd", False, False, False, _svd, "plain truncated SVD (F ~= I)"))
register(Method("whiten", True, False, False, _whiten, "activation-whitened SVD (SVD-LLM)"))
register(Method("fisher", False, False, True, _fisher, "separable diagonal-Fisher scaling (the seed's VAC)"))
register(Method("kfac", True, True, False, _kfac, "two-sided K-FAC weighting G^a W C^b"))
