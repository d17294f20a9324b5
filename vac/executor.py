"""Sequential factorization: a plan of steps, and one executor that walks it one layer at a time.

A :class:`Step` is one decoder layer and the targets factorized together: a shared-input stage
(q/k/v, o, gate/up, down) with ``granularity: matrix``, or the whole layer. For each step the
executor

1. gets the inputs the layer will really see: X~, the hidden states entering layer l in the
   model *as compressed so far*, and for the dense-target objective X, the dense model's;
2. runs the layer over them once with hooks, accumulating C~ = X~ X~^T and C_cross = X X~^T
   per target (the dense layer on X and the current one on X~, batch by batch, token by token);
3. fits each target with the method and commits it to the model's home;
4. after the layer's last step, finishes the layer (the home persists it) and drops every
   hidden-state boundary that no later step can need.

Hidden states live in a :class:`~vac.hidden.HiddenStore` under keys ``("dense", k)`` and
``("cur", k)``: the inputs of layer k in the dense and in the current model. A current boundary
is valid until a layer below it changes. Front to back, the executor holds the two streams at
layers l and l+1 and nothing else; other orders (back-to-front, middle-out, any permutation)
keep what their later steps need, which the store spills to disk past its RAM cap.

The dense model's boundaries are derived forward from the highest cached one below, through
dense layers. Before a layer changes, the boundary above it is computed if a later step will
need dense inputs higher up, so a dense boundary never has to be derived through a layer that
is no longer dense (an in-memory model keeps no dense copy of finished layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vac.checks import STATS_HINT, check_finite
from vac.families import Target
from vac.hidden import HiddenStore
from vac.home import ModelHome, _Stop


@dataclass(frozen=True)
class Step:
    layer: int
    targets: tuple[Target, ...]
    first: bool  # the layer's first step: its inputs and the dense layer's outputs are measured here
    last: bool  # the layer's last step: the layer is finished after it


def plan_steps(order: list[int], targets: list[Target], stage_of: Callable[[Target], int],
               per_matrix: bool) -> list[Step]:
    """Steps in ``order``; per matrix, one step per shared-input stage in the order a token flows."""
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    steps = []
    for l in order:
        if l not in by_layer:
            continue
        if per_matrix:
            stages = sorted({stage_of(t) for t in by_layer[l]})
            groups = [tuple(t for t in by_layer[l] if stage_of(t) == s) for s in stages]
        else:
            groups = [tuple(by_layer[l])]
        for i, group in enumerate(groups):
            steps.append(Step(l, group, first=i == 0, last=i == len(groups) - 1))
    return steps


@dataclass
class StageStats:
    C: dict[str, torch.Tensor]  # X~ X~^T per target (shared between targets reading one tensor)
    C_cross: dict[str, torch.Tensor]  # X X~^T per target, with cross statistics
    dense_out: list[torch.Tensor] | None  # the dense layer's outputs, when this pass computed them


class SequentialExecutor:
    """Walks a plan of steps over a home; ``fit(target, module, C, C_cross)`` returns the new module."""

    def __init__(self, home: ModelHome, calib: torch.Tensor, *, batch_size: int, one_shot: bool,
                 dense_target: bool, per_matrix: bool, hidden: HiddenStore,
                 fit: Callable[[Target, torch.nn.Module, torch.Tensor | None, torch.Tensor | None], torch.nn.Module],
                 progress: bool = False, desc: str = "factorize"):
        self.home, self.calib, self.batch_size = home, calib, batch_size
        self.one_shot = one_shot
        # one-shot statistics all come from the dense model: no closed loop, no stages
        self.dense_target = dense_target and not one_shot
        self.per_matrix = per_matrix and not one_shot
        self.hidden, self.fit, self.progress, self.desc = hidden, fit, progress, desc
        self.changed: set[int] = set()  # layers whose current version differs from the dense one
        self.inputs = None

    # --- what a step needs -------------------------------------------------------------------
    def _changed_below(self, l: int) -> bool:
        return any(k < l for k in self.changed)

    def _needs_dense(self, l: int) -> bool:
        """Will a step at layer l read dense inputs (as X, or as X~ when nothing below changed)?"""
        return self.one_shot or self.dense_target or not self._changed_below(l)

    def _keys(self, stream: str) -> list[int]:
        return sorted(k for s, k in self.hidden.keys() if s == stream)

    def _capture(self) -> list[torch.Tensor]:
        h, inputs = self.home.capture(self.calib, self.batch_size)
        if self.inputs is None:
            self.inputs = inputs
        return h

    def dense_inputs(self, l: int) -> list[torch.Tensor]:
        if ("dense", l) in self.hidden:
            return self.hidden.get(("dense", l))
        base = max((k for k in self._keys("dense") if k < l), default=None)
        if base is None:
            self.hidden.put(("dense", 0), self._capture())
            base = 0
        h = self.hidden.get(("dense", base))
        for k in range(base, l):
            h = self.home.run_all(self.home.dense_layer(k), h, self.inputs)
            self.hidden.put(("dense", k + 1), h)  # every boundary: back-to-front reads them all
            self.home.release(k)
        return h

    def current_inputs(self, l: int) -> list[torch.Tensor]:
        if not self._changed_below(l):
            return self.dense_inputs(l)
        if ("cur", l) in self.hidden:
            return self.hidden.get(("cur", l))
        lowest = min(self.changed)  # below it, the current model is the dense one
        starts = [k for k in self._keys("cur") if lowest < k < l]
        k = max(starts, default=lowest)
        h = self.hidden.get(("cur", k)) if starts else self.dense_inputs(lowest)
        while k < l:
            h = self.home.run_all(self.home.current_layer(k), h, self.inputs)
            self.home.release(k)
            k += 1
        self.hidden.put(("cur", l), h)
        return h

    # --- the walk ----------------------------------------------------------------------------
    def run(self, steps: list[Step]) -> None:
        try:
            self.hidden.put(("dense", 0), self._capture())
            for i, step in enumerate(tqdm(steps, desc=self.desc, disable=not self.progress, unit="step")):
                self._step(step, {s.layer for s in steps[i + 1:]})
        finally:
            self.hidden.clear()

    def _step(self, step: Step, remaining: set[int]) -> None:
        home, l = self.home, step.layer
        subs = {t.name[len(home.layer_prefix(l)):]: t for t in step.targets}
        current = self.current_inputs(l)
        cross = self.dense_target and (self._changed_below(l) or self.per_matrix)
        dense = self.dense_inputs(l) if cross else None
        # dense[l+1] must exist before layer l changes if a later step reads dense inputs above it
        want_next = (step.first and ("dense", l + 1) not in self.hidden
                     and any(j > l and (self.one_shot or self.dense_target) for j in remaining))
        stats = collect_stage(home, l, {sub: t.name for sub, t in subs.items()}, current, dense, self.inputs,
                              current_is_dense=step.first and not self._changed_below(l), want_dense_out=want_next)
        check_finite([*stats.C.items(), *stats.C_cross.items()], f"input statistics of layer {l}", STATS_HINT)
        if want_next:
            out = stats.dense_out
            if out is None:
                out = home.run_all(home.dense_layer(l), self.dense_inputs(l), self.inputs)
            self.hidden.put(("dense", l + 1), out)
        del current, dense
        layer = home.current_layer(l)
        for sub, t in subs.items():
            module = self.fit(t, layer.get_submodule(sub), stats.C.get(t.name), stats.C_cross.get(t.name))
            home.commit(l, sub, module)
            layer = home.current_layer(l)
        if step.last:
            home.finish(l)
            if not self.one_shot:
                self.changed.add(l)
                for k in self._keys("cur"):
                    if k > l:
                        self.hidden.drop(("cur", k))
            self._prune(remaining)

    def _prune(self, remaining: set[int]) -> None:
        """Drop every boundary no remaining step can read or derive its inputs from."""
        dense_keys, cur_keys = self._keys("dense"), self._keys("cur")

        def dense_base(j: int) -> int | None:
            return j if j in dense_keys else max((k for k in dense_keys if k < j), default=None)

        keep_dense, keep_cur = set(), set()
        for j in remaining:
            if self._needs_dense(j):
                keep_dense.add(dense_base(j))
            if self._changed_below(j):
                lowest = min(self.changed)
                starts = [k for k in cur_keys if lowest < k <= j]
                if starts:
                    keep_cur.add(max(starts))
                else:
                    keep_dense.add(dense_base(lowest))
        self.hidden.retain(lambda key: key[1] in (keep_dense if key[0] == "dense" else keep_cur))

    def run_weights_only(self, steps: list[Step]) -> None:
        """Methods that read no inputs (svd, fisher): fit each target from its weights alone."""
        for step in tqdm(steps, desc=self.desc, disable=not self.progress, unit="step"):
            layer = self.home.current_layer(step.layer)
            for t in step.targets:
                sub = t.name[len(self.home.layer_prefix(step.layer)):]
                self.home.commit(step.layer, sub, self.fit(t, layer.get_submodule(sub), None, None))
                layer = self.home.current_layer(step.layer)
            if step.last:
                self.home.finish(step.layer)


@torch.no_grad()
def collect_stage(home: ModelHome, l: int, names: dict[str, str], current: list[torch.Tensor],
                  dense: list[torch.Tensor] | None, inputs, *, current_is_dense: bool,
                  want_dense_out: bool) -> StageStats:
    """C~ (and with ``dense``, C_cross) of the linears ``names`` (sub-module path -> full name) of layer l.

    With ``dense``, each batch goes first through the dense layer on the dense inputs, which
    stashes each target's input, then through the current layer on the current inputs, which
    pairs them token by token. A pass whose output nobody needs stops as soon as the last
    hooked linear has seen its input: for the q/k/v or o stage that skips the MLP entirely.
    Returns the dense layer's outputs when this pass computed them anyway (with cross
    statistics, or when the current layer and inputs are still the dense ones).
    """
    cur_layer = home.current_layer(l)
    dense_layer = home.dense_layer(l) if dense is not None else None
    C: dict[str, torch.Tensor] = {}
    C_cross: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    stash: dict[str, torch.Tensor] = {}
    state = {"dense_pass": False, "fired": 0, "seen": {}}
    want_current_out = current_is_dense and dense is None and want_dense_out

    def maybe_stop(stop: bool) -> None:
        state["fired"] += 1
        if stop and state["fired"] == len(names):
            raise _Stop

    def stash_hook(name: str, stop: bool):
        def hook(module, args, output):
            if state["dense_pass"]:
                stash[name] = args[0].reshape(-1, args[0].shape[-1]).float()
                maybe_stop(stop)
        return hook

    def acc_hook(name: str, stop: bool):
        def hook(module, args, output):
            if state["dense_pass"]:
                return  # the dense layer is this very module (layer not modified yet)
            x = args[0]
            # q/k/v (and gate/up) read the very same tensor: accumulate its covariance once
            seen = state["seen"].get(id(x))
            if seen is not None and seen[1] is x:
                alias[name] = seen[0]
            else:
                state["seen"][id(x)] = (name, x)
                flat = x.reshape(-1, x.shape[-1]).float()
                _add(C, name, flat.T @ flat)
                if dense is not None:
                    _add(C_cross, name, stash[name].T @ flat)
            maybe_stop(stop)
        return hook

    handles = []
    dense_out: list[torch.Tensor] = []
    try:
        if dense_layer is not None:
            for sub, name in names.items():
                handles.append(dense_layer.get_submodule(sub).register_forward_hook(
                    stash_hook(name, stop=not want_dense_out)))
        for sub, name in names.items():
            handles.append(cur_layer.get_submodule(sub).register_forward_hook(
                acc_hook(name, stop=not want_current_out)))
        for b, h in enumerate(current):
            if dense_layer is not None:
                state["dense_pass"], state["fired"] = True, 0
                y = _run(home, dense_layer, dense[b], inputs, b)
                if want_dense_out:
                    dense_out.append(y.to("cpu"))
                state["dense_pass"] = False
            state["fired"] = 0
            y = _run(home, cur_layer, h, inputs, b)
            if want_current_out:
                dense_out.append(y.to("cpu"))
            stash.clear()
            state["seen"].clear()
    finally:
        for hd in handles:
            hd.remove()
    for name, owner in alias.items():
        C[name] = C[owner]
        if owner in C_cross:
            C_cross[name] = C_cross[owner]
    return StageStats(C, C_cross, dense_out or None)


def _run(home: ModelHome, layer, h: torch.Tensor, inputs, b: int) -> torch.Tensor | None:
    try:
        return home.run(layer, h, inputs, b)
    except _Stop:
        return None


def _add(acc: dict, key: str, value: torch.Tensor) -> None:
    if key in acc:
        acc[key] += value
    else:
        acc[key] = value
