"""Layer-by-layer execution on cached hidden states, for sequential compression.

Compressing layer l needs the inputs its linears will really see: the hidden states entering
layer l under the model *as compressed so far* (X~), and for the dense-target objective also the
dense model's (X). Recomputing them with full forward passes would cost O(L^2) model passes, so
we cache hidden states at layer boundaries and run single decoder layers on them:

* ``dense[k]``: inputs of layer k in the dense model, computed once (CPU-resident per batch);
* ``current[k]``: inputs of layer k in the current model, valid until a layer below k changes.

The per-layer keyword arguments (rotary position embeddings, masks) are captured once from a
real forward pass, so any family whose decoder layers take ``(hidden_states, **kwargs)`` works.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vac.families import decoder_layers


class _Stop(Exception):
    pass


def _as_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class LayerRunner:
    """Holds the calibration batches as hidden states at layer boundaries."""

    def __init__(self, model: nn.Module, blocks: torch.Tensor, batch_size: int,
                 storage_device: str | torch.device = "cpu", progress: Callable | None = None):
        self.model = model
        self.layers = decoder_layers(model)
        self.device = next(model.parameters()).device
        self.storage = torch.device(storage_device)
        self.batches = list(blocks.split(batch_size))
        self.args: list[tuple] = []
        self.kwargs: list[dict] = []
        first: list[torch.Tensor] = []
        for ids in self.batches:
            h, a, k = self._capture(ids.to(self.device))
            first.append(h.to(self.storage))
            self.args.append(a)
            self.kwargs.append(k)
        self.dense: dict[int, list[torch.Tensor]] = {0: first}
        self.current: dict[int, list[torch.Tensor]] = {}
        self.changed: set[int] = set()  # layers whose weights differ from the dense model
        self._dense_layers: dict[int, nn.Module] = {}
        self.progress = progress

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def _capture(self, ids: torch.Tensor):
        box = {}

        def pre_hook(module, args, kwargs):
            box["h"], box["args"], box["kwargs"] = args[0], args[1:], dict(kwargs)
            raise _Stop

        handle = self.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            self.model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        kwargs = box["kwargs"]
        for key in ("past_key_value", "past_key_values"):
            if key in kwargs:
                kwargs[key] = None
        kwargs["use_cache"] = False
        return box["h"], box["args"], kwargs

    @torch.no_grad()
    def run_layer(self, layer: nn.Module, hidden: list[torch.Tensor],
                  before_batch: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        out = []
        for b, h in enumerate(hidden):
            if before_batch is not None:
                before_batch(b)
            y = _as_tensor(layer(h.to(self.device), *self.args[b], **self.kwargs[b]))
            out.append(y.to(self.storage))
        return out

    def dense_layer(self, l: int) -> nn.Module:
        """The dense version of layer l (a copy is kept from the moment the layer first changes)."""
        return self._dense_layers.get(l, self.layers[l])

    def snapshot_dense(self, l: int) -> None:
        """Call before modifying layer l: keeps its dense weights for dense-side statistics."""
        if l not in self._dense_layers:
            import copy

            self._dense_layers[l] = copy.deepcopy(self.layers[l])

    def release_dense(self, l: int) -> None:
        self._dense_layers.pop(l, None)

    def dense_inputs(self, l: int) -> list[torch.Tensor]:
        k = max(self.dense)
        while k < l:
            self.dense[k + 1] = self.run_layer(self.dense_layer(k), self.dense[k])
            k += 1
        return self.dense[l]

    def offer_dense(self, l: int, hidden: list[torch.Tensor] | None) -> None:
        """Cache dense inputs of layer l computed as a by-product of another pass."""
        if hidden is not None and l not in self.dense and l - 1 in self.dense:
            self.dense[l] = hidden

    def drop_dense_below(self, l: int) -> None:
        """Free cached dense states no later step can need (front-to-back orders)."""
        for k in [k for k in self.dense if k < l]:
            del self.dense[k]

    def current_inputs(self, l: int) -> list[torch.Tensor]:
        """Inputs of layer l in the model as compressed so far."""
        lowest_change = min(self.changed, default=self.num_layers)
        if l <= lowest_change:
            return self.dense_inputs(l)
        starts = [k for k in self.current if k <= l]
        k = max(starts) if starts else lowest_change
        h = self.current[k] if starts else self.dense_inputs(k)
        while k < l:
            h = self.run_layer(self.layers[k], h)
            k += 1
            self.current[k] = h
        return h

    def mark_changed(self, l: int) -> None:
        self.changed.add(l)
        for k in [k for k in self.current if k > l]:
            del self.current[k]


class PairedInputStats:
    """C~ = sum x~ x~^T and C_cross = sum x x~^T for chosen linears of one layer.

    Runs the dense layer on the dense inputs and the current layer on the current inputs, batch
    by batch, pairing the two inputs of each target token by token.
    """

    def __init__(self, runner: LayerRunner, l: int, names: dict[str, str], cross: bool):
        # names: full target name -> sub-module path inside the decoder layer
        self.runner, self.l, self.names, self.cross = runner, l, names, cross
        self.C: dict[str, torch.Tensor] = {}
        self.C_cross: dict[str, torch.Tensor] = {}
        self._alias: dict[str, str] = {}
        self._batch_seen: dict[int, tuple] = {}

    @torch.no_grad()
    def collect(self, current_inputs: list[torch.Tensor], dense_inputs: list[torch.Tensor] | None,
                current_is_dense: bool = False, want_dense_out: bool = True) -> list[torch.Tensor] | None:
        """Accumulate the statistics; returns the dense layer's outputs when this pass computed them
        (with cross statistics, or when the current layer and inputs are still the dense ones), so the
        caller can cache them as the dense inputs of the next layer instead of recomputing them.

        A pass whose layer output nobody needs stops as soon as the last hooked linear has seen its
        input (``want_dense_out=False`` lets the dense pass stop too): for the q/k/v or o stage of a
        per-matrix step that skips the MLP entirely.
        """
        runner, l = self.runner, self.l
        dense_out: list[torch.Tensor] = []
        cur_layer, dense_layer = runner.layers[l], runner.dense_layer(l)
        stash: dict[str, torch.Tensor] = {}
        handles = []
        want_current_out = current_is_dense and not self.cross and want_dense_out
        try:
            if self.cross:
                for name, sub in self.names.items():
                    handles.append(dense_layer.get_submodule(sub).register_forward_hook(
                        self._stash_hook(name, stash, stop=not want_dense_out)))
            for name, sub in self.names.items():
                handles.append(cur_layer.get_submodule(sub).register_forward_hook(
                    self._acc_hook(name, stash, stop=not want_current_out)))
            # With cross statistics, run the dense layer first on each batch so the stash holds the
            # matching dense inputs when the current layer's hooks fire. The dense layer's hooks
            # must not fire during the current pass (they are different modules unless the layer
            # is still dense, in which case dense inputs are the current inputs: see below).
            for b, h in enumerate(current_inputs):
                if self.cross:
                    self._stash_mode = True
                    y = self._run(dense_layer, dense_inputs[b], b)
                    if want_dense_out:
                        dense_out.append(y.to(runner.storage))
                    self._stash_mode = False
                y = self._run(cur_layer, h, b)
                if want_current_out:
                    dense_out.append(y.to(runner.storage))
                stash.clear()
                self._batch_seen.clear()
        finally:
            for hd in handles:
                hd.remove()
            self._stash_mode = False
            self._batch_seen.clear()
        for name, owner in self._alias.items():
            self.C[name] = self.C[owner]
            if owner in self.C_cross:
                self.C_cross[name] = self.C_cross[owner]
        return dense_out or None

    _stash_mode = False

    def _run(self, layer: nn.Module, h: torch.Tensor, b: int) -> torch.Tensor | None:
        """One batch through ``layer``; None when a hook stopped it early."""
        runner = self.runner
        self._fired = 0
        try:
            return _as_tensor(layer(h.to(runner.device), *runner.args[b], **runner.kwargs[b]))
        except _Stop:
            return None

    def _maybe_stop(self, stop: bool) -> None:
        self._fired += 1
        if stop and self._fired == len(self.names):
            raise _Stop

    def _stash_hook(self, name, stash, stop: bool):
        def hook(module, inputs, output):
            if self._stash_mode:
                stash[name] = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                self._maybe_stop(stop)
        return hook

    def _acc_hook(self, name, stash, stop: bool):
        def hook(module, inputs, output):
            if self._stash_mode:
                return  # the dense layer is this same module (layer not yet modified)
            # q/k/v (and gate/up) read the very same tensor: accumulate its covariance once
            seen = self._batch_seen.get(id(inputs[0]))
            if seen is not None and seen[1] is inputs[0]:
                self._alias[name] = seen[0]
            else:
                self._batch_seen[id(inputs[0])] = (name, inputs[0])
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                _add(self.C, name, x.T @ x)
                if self.cross:
                    _add(self.C_cross, name, stash[name].T @ x)
            self._maybe_stop(stop)
        return hook


def _add(acc: dict, key: str, value: torch.Tensor) -> None:
    if key in acc:
        acc[key] += value
    else:
        acc[key] = value
