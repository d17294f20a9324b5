"""The factorized replacement for ``nn.Linear``."""

from __future__ import annotations

import torch
from torch import nn


class FactorizedLinear(nn.Module):
    """y = up(down(x)) + bias, with ``down``: n -> r and ``up``: r -> m.

    Parameter names (``down.weight``, ``up.weight``, ``bias``) are part of the checkpoint
    format: the exported modeling code builds the same module tree.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} outside [1, {min(in_features, out_features)}] "
                             f"for a {out_features}x{in_features} matrix")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "FactorizedLinear":
        m, r = up.shape
        r2, n = down.shape
        assert r == r2, f"factor shapes disagree: up {tuple(up.shape)}, down {tuple(down.shape)}"
        dtype = dtype or up.dtype
        layer = cls(n, m, r, bias=bias is not None, device=up.device, dtype=dtype)
        with torch.no_grad():
            layer.up.weight.copy_(up.to(dtype))
            layer.down.weight.copy_(down.to(dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    @property
    def weight_product(self) -> torch.Tensor:
        """The dense m x n matrix this layer represents (for analysis, not for inference)."""
        return self.up.weight @ self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.down(x))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


def factorized_params(m: int, n: int, rank: int) -> int:
    """Weight parameters of a rank-r factorization of an m x n matrix."""
    return rank * (m + n)
