"""Hooks that accumulate per-target statistics without holding activations.

* input covariance C = sum_t x_t x_t^T (forward hooks), float32 accumulators;
* cross covariance X X~^T between the inputs of the same target in two models on the same tokens;
* output-gradient covariance G = sum_t g_t g_t^T, g = dL/dy (backward hooks);
* diagonal empirical Fisher F = mean over sequences of (dL_s/dW)^2 (per-sequence gradients).

Every collector is a context manager; leaving it removes all its hooks (tests check the count).
Targets that read the same tensor (q/k/v, gate/up) share one input covariance: the hook keys
accumulators by the input tensor it sees within a forward pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()


class InputCovariance:
    """Forward hooks accumulating C = sum x x^T for each named module (shared when inputs are shared)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.cov: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self._alias: dict[str, str] = {}  # target name -> owner of its accumulator
        self._seen: dict[tuple, tuple] = {}  # (data_ptr, shape) -> (owner, weakref to its input)
        self._handles: list = []

    def __enter__(self) -> "InputCovariance":
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def new_pass(self) -> None:
        """Call before each forward pass: input-sharing is detected within one pass."""
        self._seen.clear()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            key = (x.data_ptr(), tuple(x.shape))
            seen = self._seen.get(key)
            # a weak reference, compared by identity: a freed tensor whose memory was reused
            # for another input must not be mistaken for it
            if seen is not None and seen[1]() is x and seen[0] != name:
                self._alias[name] = seen[0]
                return
            self._seen[key] = (name, weakref.ref(x))
            flat = _flat(x)
            acc = self.cov.get(name)
            if acc is None:
                self.cov[name] = flat.T @ flat
            else:
                acc.addmm_(flat.T, flat)
        return hook

    def get(self, name: str) -> torch.Tensor:
        return self.cov[self._alias.get(name, name)]


class GradientStats:
    """Backward hooks: output-gradient covariance G per module, and per-sequence diagonal Fisher.

    Fisher needs the weight gradient of each sequence on its own (the square of a batch mean is
    not the mean of squares), so callers run one sequence per backward pass and call
    ``end_sequence()`` after each.
    """

    def __init__(self, modules: dict[str, nn.Module], output_cov: bool = True, fisher: bool = False,
                 keep_rows: set[str] = frozenset()):
        self.modules = modules
        self.want_g, self.want_f = output_cov, fisher
        #: modules whose gradient rows are kept instead of G = sum g g^T: with fewer tokens than
        #: output features the rows are the smaller of the two, and give G's eigenpairs cheaply
        self.keep_rows = set(keep_rows)
        self.G: dict[str, torch.Tensor] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.sequences = 0
        self._handles: list = []
        self._saved_requires_grad: dict[str, bool] = {}

    def __enter__(self) -> "GradientStats":
        for name, mod in self.modules.items():
            if self.want_g:
                self._handles.append(mod.register_full_backward_hook(self._hook(name)))
            if self.want_f:
                self._saved_requires_grad[name] = mod.weight.requires_grad
                mod.weight.requires_grad_(True)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, flag in self._saved_requires_grad.items():
            w = self.modules[name].weight
            w.requires_grad_(flag)
            w.grad = None

    def _hook(self, name: str):
        def hook(module, grad_input, grad_output):
            g = _flat(grad_output[0])
            if name in self.keep_rows:
                self.rows.setdefault(name, []).append(g.detach())
                return
            acc = self.G.get(name)
            if acc is None:
                self.G[name] = g.T @ g
            else:
                acc.addmm_(g.T, g)
        return hook

    def end_sequence(self) -> None:
        self.sequences += 1
        if not self.want_f:
            return
        for name, mod in self.modules.items():
            grad = mod.weight.grad
            if grad is None:
                continue
            sq = grad.float().square()
            if name in self.fisher:
                self.fisher[name] += sq
            else:
                self.fisher[name] = sq
            mod.weight.grad = None

    def rows_of(self, name: str) -> torch.Tensor:
        return torch.cat(self.rows.pop(name))

    def fisher_mean(self, name: str) -> torch.Tensor:
        return self.fisher[name] / max(self.sequences, 1)


def hook_count(modules: Iterable[nn.Module]) -> int:
    """Registered forward + backward hooks (for leak checks in tests)."""
    n = 0
    for m in modules:
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "_backward_pre_hooks", {}))
    return n
