"""Statistics of the dense model, one decoder layer at a time.

* :func:`profile_gradients` - output-gradient covariances G (and diagonal Fishers) of every
  target. Forward once over the gradient samples, keeping the layer-boundary hidden states
  (RAM up to a cap, then disk); then backward from the top: the head gives dL/dh_L, and for
  l = L-1 ... 0 layer l is loaded, its forward recomputed from the cached h_l with autograd on,
  the gradient arriving from layer l+1 backpropagated through it (hooks collect each target's
  output gradients), and the gradient at its input handed down. Each layer's G is decomposed
  right there and written to the statistics store; nothing of it stays in memory.
* :func:`allocation_spectra` - for the knapsack, the singular values of G^1/2 W C^1/2 of every
  target, C the input covariance on the calibration blocks: one forward sweep, one layer on
  the device at a time.

The loss is the sum over sequences of each sequence's mean next-token loss, exactly what one
backward pass per sequence through the whole model gave, so G is the same statistic as
before, only computed in a different order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from tqdm.auto import tqdm

from vac import factorize as fz
from vac.checks import STATS_HINT, check_finite
from vac.families import Target
from vac.hidden import HiddenStore
from vac.home import ModelHome
from vac.stats import GradientStats, InputCovariance
from vac.statstore import StatsStore


def by_layer(targets: list[Target]) -> dict[int, list[Target]]:
    out: dict[int, list[Target]] = {}
    for t in targets:
        out.setdefault(t.layer, []).append(t)
    return out


def sub_of(home: ModelHome, t: Target) -> str:
    return t.name[len(home.layer_prefix(t.layer)):]


def profile_gradients(home: ModelHome, blocks: torch.Tensor, targets: list[Target], store: StatsStore, *,
                      output_cov: bool, fisher: bool, hidden: HiddenStore, grad_rank: int | None = None,
                      progress: bool = False) -> None:
    """Write G (as a raw ``SymEig``: damping is applied where it is used) and/or the diagonal
    Fisher of each target to ``store``; layers already stored are skipped."""
    layers = by_layer(targets)
    todo = {l: ts for l, ts in layers.items()
            if not store.has_layer(l, [t.name for t in ts], G=output_cov, F=fisher)}
    if not todo:
        return
    bottom = min(todo)
    n_tokens = blocks.shape[0] * blocks.shape[1]
    bar = tqdm(total=2 * home.num_layers - bottom, desc="gradient statistics", disable=not progress, unit="layer")
    saved = _freeze(home)
    try:
        # forward: one sequence per batch, as the per-sequence Fisher needs
        h, inputs = home.capture(blocks, batch_size=1)
        hidden.put(("grad", 0), h)
        for l in range(home.num_layers):
            h = home.run_all(home.dense_layer(l), hidden.get(("grad", l)), inputs)
            if l + 1 < home.num_layers:
                hidden.put(("grad", l + 1), h)
            if l < bottom:
                hidden.drop(("grad", l))
            home.release(l)
            bar.update()
        # head: dL/dh_L for each sequence
        norm, head = home.head_modules()
        grads = []
        for b, h_last in enumerate(h):
            x = h_last.to(home.device).requires_grad_(True)
            with torch.enable_grad():
                logits = head(norm(x)).float()
                ids = blocks[b: b + 1].to(home.device)
                loss = Fn.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
                loss.backward()
            grads.append(x.grad.to("cpu"))
        del h
        # backward, layer by layer from the top
        for l in range(home.num_layers - 1, bottom - 1, -1):
            layer = home.dense_layer(l)
            modules = {t.name: layer.get_submodule(sub_of(home, t)) for t in todo.get(l, [])}
            rows = {n for n, m in modules.items() if output_cov and n_tokens < m.out_features}
            stats = GradientStats(modules, output_cov=output_cov, fisher=fisher, keep_rows=rows)
            new_grads = []
            with stats, torch.enable_grad():
                for b, x in enumerate(hidden.get(("grad", l))):
                    x = x.to(home.device).requires_grad_(True)
                    y = home.run(layer, x, inputs, b)
                    y.backward(grads[b].to(device=y.device, dtype=y.dtype))
                    new_grads.append(x.grad.to("cpu"))
                    stats.end_sequence()
            grads = new_grads
            hidden.drop(("grad", l))
            if modules:
                check_finite([*((n, r) for n, rs in stats.rows.items() for r in rs), *stats.G.items(),
                              *stats.fisher.items()], f"output-gradient statistics of layer {l}", STATS_HINT)
                G = {}
                for name in modules:
                    if not output_cov:
                        continue
                    if name in rows:
                        G[name] = fz.SymEig.from_rows(stats.rows_of(name))
                        if grad_rank is not None:
                            G[name].truncate_(grad_rank)
                    else:
                        G[name] = fz.SymEig(stats.G.pop(name), damp=None, rank=grad_rank)
                F = {n: stats.fisher_mean(n) for n in stats.fisher} if fisher else {}
                store.put_layer(l, G, F)
            home.release(l)
            bar.update()
    finally:
        bar.close()
        _unfreeze(home, saved)
        for key in [k for k in hidden.keys() if k[0] == "grad"]:
            hidden.drop(key)


def _freeze(home: ModelHome) -> dict:
    """No parameter requires grad during profiling (an in-memory model may have trainable ones)."""
    saved = {p: p.requires_grad for p in home.model.parameters() if p.device.type != "meta"}
    for p in saved:
        p.requires_grad_(False)
    return saved


def _unfreeze(home: ModelHome, saved: dict) -> None:
    for p, flag in saved.items():
        p.requires_grad_(flag)


@torch.no_grad()
def allocation_spectra(home: ModelHome, calib: torch.Tensor, targets: list[Target], store: StatsStore | None,
                       *, damp: float, batch_size: int, progress: bool = False) -> dict[str, torch.Tensor]:
    """Singular values of G^1/2 W C^1/2 per target (G^1/2 from ``store``; identity without one).

    The spectrum's tail sum_{k>r} sigma_k^2 is the predicted loss increase of rank r; any
    square root of C gives the same singular values, so the Cholesky factor is used (cheaper
    than an eigendecomposition, and C is damped to be positive definite).
    """
    layers = by_layer(targets)
    out: dict[str, torch.Tensor] = {}
    if not layers:
        return out
    h, inputs = home.capture(calib, batch_size)
    last = max(layers)
    for l in tqdm(range(last + 1), desc="spectra for allocation", disable=not progress, unit="layer"):
        layer = home.dense_layer(l)
        modules = {t.name: layer.get_submodule(sub_of(home, t)) for t in layers.get(l, [])}
        if modules:
            with InputCovariance(modules) as cov:
                h_next = []
                for b, x in enumerate(h):
                    cov.new_pass()
                    y = home.run(layer, x, inputs, b)
                    if l < last:
                        h_next.append(y.to("cpu"))
            check_finite(((n, cov.get(n)) for n in modules), f"input statistics of layer {l}", STATS_HINT)
            roots: dict[int, torch.Tensor] = {}  # q/k/v (and gate/up) share one C
            for t in layers[l]:
                W = modules[t.name].weight.detach()
                dtype = fz.compute_dtype(W.device)
                C = cov.get(t.name)
                if id(C) not in roots:
                    roots[id(C)] = _cholesky(fz.damped(C.to(dtype), damp))
                A = W.to(dtype) @ roots[id(C)]
                G = store.G(t.layer, t.name) if store is not None else None
                if G is not None:
                    A = G.to(W.device, dtype).damped(damp).power(0.5) @ A
                out[t.name] = torch.linalg.svdvals(A).float().cpu()
                check_finite([(t.name, out[t.name])], "allocation spectra", STATS_HINT)
            del cov, roots
            h = h_next
        elif l < last:
            h = home.run_all(layer, h, inputs)
        home.release(l)
    return out


def _cholesky(C: torch.Tensor) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(C)
    return L if int(info) == 0 else fz.psd_power(C, 0.5)
