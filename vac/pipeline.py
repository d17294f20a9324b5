"""Sequential application of a method in an order: the ``compress_`` entry point.

    stats (gradients, once) -> ranks (uniform or knapsack) -> for each layer in order:
        inputs the layer will see -> statistics -> weighted SVD -> FactorizedLinear in place

Gradient statistics (G for kfac, diagonal Fisher for fisher) come from the dense model, once:
recomputing them after each step would cost a full backward pass per layer, while the input
statistics, which the closed-loop objectives depend on, are recomputed from cached hidden states
at the cost of one decoder layer per step (see vac/sequential.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from vac import factorize as fz
from vac.config import CompressConfig
from vac.errors import VacError
from vac.families import ATTENTION, Target, decoder_layers, find_targets, get_family
from vac.layers import FactorizedLinear, factorized_params
from vac.methods import METHODS, TargetStats
from vac.plan import layer_order, uniform_ranks
from vac.sequential import LayerRunner, PairedInputStats
from vac.stats import collect_gradient_stats

log = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    ranks: dict[str, int | None]  # None: kept dense
    targets: list[Target]
    timings: dict[str, float] = field(default_factory=dict)
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted spectra, for plots
    allocation: dict = field(default_factory=dict)

    @property
    def dense_target_params(self) -> int:
        return sum(t.dense_params for t in self.targets)

    @property
    def compressed_target_params(self) -> int:
        total = 0
        for t in self.targets:
            r = self.ranks.get(t.name)
            total += t.dense_params if r is None else factorized_params(t.out_features, t.in_features, r)
        return total

    @property
    def linear_ratio(self) -> float:
        return self.dense_target_params / self.compressed_target_params


def param_count(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def replace_linear(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def compress_(model: nn.Module, cfg: CompressConfig, calib: torch.Tensor, grad_blocks: torch.Tensor | None = None,
              progress: bool = True, dense_cache: dict | None = None) -> CompressionResult:
    """Factorize ``model``'s target linears in place following ``cfg``; returns ranks and timings.

    ``dense_cache``: a dict owned by the caller for one dense model and one calibration set, which
    compresses many fresh copies of that model (the evolutionary search). What depends only on the
    dense model (gradient statistics and the allocator's spectra) is computed once and kept there.
    """
    method = METHODS[cfg.method]
    family = get_family(model)
    all_targets = find_targets(model)
    num_layers = len(decoder_layers(model))
    bad = [l for l in cfg.keep_dense if not -num_layers <= l < num_layers]
    if bad:
        raise VacError(f"--keep-dense layers {bad} out of range: use 0..{num_layers - 1}, or -1 for the last")
    keep = {l % num_layers for l in cfg.keep_dense}  # -1 = the last layer, on any depth
    targets = [t for t in all_targets if t.layer not in keep]
    result = CompressionResult(ranks={t.name: None for t in all_targets}, targets=all_targets)
    modules = {t.name: model.get_submodule(t.name) for t in targets}
    need_grads = method.needs_output_grads or method.needs_fisher or cfg.allocation == "knapsack"
    timings = result.timings
    budget = result.dense_target_params / cfg.ratio - sum(t.dense_params for t in all_targets if t not in targets)
    _check_feasible(targets, budget, cfg)  # before any expensive statistics

    # 1. gradient statistics from the dense model (once)
    G: dict[str, torch.Tensor] = {}
    F: dict[str, torch.Tensor] = {}
    if need_grads:
        t0 = time.perf_counter()
        want_g = method.needs_output_grads or cfg.allocation == "knapsack"
        key = ("gradients", cfg.fisher_samples, cfg.damp, want_g, method.needs_fisher)
        if dense_cache is not None and key in dense_cache:
            G, F = dense_cache[key]
        else:
            blocks = grad_blocks if grad_blocks is not None else calib[: cfg.fisher_samples]
            # a shared cache serves strategies with other keep-dense layers: measure every target
            measured = modules if dense_cache is None else {t.name: model.get_submodule(t.name) for t in all_targets}
            stats = collect_gradient_stats(model, measured, blocks, output_cov=want_g, fisher=method.needs_fisher,
                                           progress=progress)
            F = {n: stats.fisher_mean(n) for n in stats.fisher} if method.needs_fisher else {}
            # decomposed once: the allocator takes G^1/2, the factorization G^a and G^-a
            for name in list(stats.G):
                G[name] = fz.SymEig(stats.G.pop(name), cfg.damp)
            del stats
            if dense_cache is not None:
                dense_cache[key] = (G, F)
        timings["gradient_stats"] = time.perf_counter() - t0

    # hidden states are needed only by methods that read layer inputs (and by the allocator)
    runner = None
    if method.needs_inputs or cfg.allocation == "knapsack":
        t0 = time.perf_counter()
        runner = LayerRunner(model, calib, cfg.batch_size)
        timings["capture"] = time.perf_counter() - t0

    # 2. ranks
    t0 = time.perf_counter()
    cov_cache = None
    if cfg.allocation == "uniform":
        eff_ratio = sum(t.dense_params for t in targets) / budget
        result.ranks.update(uniform_ranks(targets, eff_ratio))
    else:
        # one-shot factorization needs exactly the input covariances the allocator measures:
        # keep them (within a memory cap) instead of a second pass over every layer
        cov_cache = {} if cfg.order == "one-shot" and method.needs_inputs else None
        spectra = None if dense_cache is None else dense_cache.setdefault(("spectra", cfg.damp), {})
        result.ranks.update(_knapsack_ranks(runner, targets, G, cfg, budget, result, progress, cov_cache,
                                            spectra))
    timings["allocation"] = time.perf_counter() - t0

    # 3. factorize in order
    t0 = time.perf_counter()
    one_shot = cfg.order == "one-shot"
    order = layer_order(cfg.order, num_layers)
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        if result.ranks[t.name] is not None:
            by_layer.setdefault(t.layer, []).append(t)
    front_to_back = order == sorted(order)
    steps = [l for l in order if l in by_layer]
    for l in tqdm(steps, desc=f"factorize ({cfg.method}, {cfg.order})", disable=not progress, unit="layer"):
        layer_targets = by_layer[l]
        if not method.needs_inputs:  # svd, fisher: weights (and gradients) only
            for t in layer_targets:
                _factorize_target(model, t, result.ranks[t.name], TargetStats(G=G.get(t.name), F=F.get(t.name)),
                                  method, cfg, result)
            continue
        if one_shot and cov_cache and all(t.name in cov_cache for t in layer_targets):
            for t in layer_targets:
                s = TargetStats(C=cov_cache.pop(t.name), G=G.get(t.name), F=F.get(t.name))
                _factorize_target(model, t, result.ranks[t.name], s, method, cfg, result)
            continue
        if one_shot:
            current, dense, cross = runner.dense_inputs(l), None, False
        else:
            current = runner.current_inputs(l)
            cross = cfg.objective == "dense-target" and any(k < l for k in runner.changed)
            dense = runner.dense_inputs(l) if cross else None
        prefix = f"{family.layers_path}.{l}."
        # one-shot statistics all come from the dense model, so granularity makes no difference there
        per_matrix = cfg.granularity == "matrix" and not one_shot
        if per_matrix:  # one step per shared-input stage: q/k/v (and gate/up) see the same inputs
            stage = {t.name: family.stage_of(t.name[len(prefix):]) for t in layer_targets}
            groups = [[t for t in layer_targets if stage[t.name] == i] for i in sorted(set(stage.values()))]
        else:
            groups = [layer_targets]
        for group in groups:
            stats_in = None
            if method.needs_inputs:
                if per_matrix:
                    runner.snapshot_dense(l)
                # per matrix, earlier matrices of this same layer change the inputs of later ones
                cross_here = cross or (per_matrix and cfg.objective == "dense-target")
                stats_in = PairedInputStats(runner, l, {t.name: t.name[len(prefix):] for t in group},
                                            cross=cross_here)
                unchanged = one_shot or not any(k < l for k in runner.changed)
                dense_out = stats_in.collect(current, dense if dense is not None else runner.dense_inputs(l),
                                             current_is_dense=unchanged and group is groups[0],
                                             want_dense_out=group is groups[0])
                if group is groups[0]:
                    runner.offer_dense(l + 1, dense_out)
            # dense[l+1] must exist before layer l changes: later steps may start from it
            runner.dense_inputs(l + 1)
            for t in group:
                s = TargetStats(G=G.get(t.name), F=F.get(t.name))
                if stats_in is not None:
                    s.C = stats_in.C[t.name]
                    s.C_cross = stats_in.C_cross.get(t.name)
                _factorize_target(model, t, result.ranks[t.name], s, method, cfg, result)
        runner.release_dense(l)
        if not one_shot:
            runner.mark_changed(l)
        if front_to_back:
            runner.drop_dense_below(l)
    timings["factorize"] = time.perf_counter() - t0
    _check_plan(result, cfg)
    return result


def _check_feasible(targets: list[Target], budget: float, cfg: CompressConfig) -> None:
    """The smallest factorization the allocation can choose must fit the budget."""
    if budget <= 0:
        raise VacError(f"--ratio {cfg.ratio} is too high: the layers kept dense by --keep-dense {cfg.keep_dense} "
                       "alone exceed the budget")
    min_rank = 1 if cfg.allocation == "uniform" else cfg.rank_grid
    smallest = sum(factorized_params(t.out_features, t.in_features, min(min_rank, t.out_features, t.in_features))
                   for t in targets)
    if smallest > budget:
        dense = sum(t.dense_params for t in targets)
        raise VacError(f"--ratio {cfg.ratio} is too high: even rank {min_rank} everywhere needs {smallest:,} "
                       f"parameters, more than the budget of {int(budget):,}; the largest reachable ratio is "
                       f"about {dense / smallest:.1f}")


def _factorize_target(model, t: Target, rank: int, stats: TargetStats, method, cfg, result) -> None:
    module = model.get_submodule(t.name)
    W = module.weight.detach()
    f = method.fit(W, stats, rank, cfg)
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    new = FactorizedLinear.from_factors(f.up, f.down, bias, dtype=W.dtype)
    replace_linear(model, t.name, new)
    result.spectra.setdefault(t.name, f.spectrum.cpu())


#: input covariances kept between the allocation and a one-shot factorization pass, at most
COV_CACHE_BYTES = 2 * 1024**3


def _knapsack_ranks(runner: LayerRunner, targets: list[Target], G, cfg, budget, result, progress,
                    cov_cache: dict | None = None, spectra: dict | None = None) -> dict:
    """Options per target from the tail of its K-FAC-weighted spectrum, then CP-SAT.

    The predicted loss of rank r is sum_{k>r} sigma_k^2 of G^1/2 W C^1/2: to second order the loss
    increase of a perturbation under the Kronecker-factored Fisher, so options of different
    matrices are in the same units and can be traded against each other.
    """
    from vac.allocate import Group, allocate, rank_options

    groups = []
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    use_kind = any(k not in (ATTENTION, "mlp") for k in cfg.multipliers)

    def add_group(t: Target, spectrum: torch.Tensor) -> None:
        result.spectra[t.name] = spectrum.float().cpu()
        opts = rank_options(t.out_features, t.in_features, fz.tail_energy(spectrum.double()), grid=cfg.rank_grid,
                            allow_dense=not cfg.compress_all)
        groups.append(Group(name=t.name, component=t.kind if use_kind else t.component, options=opts))

    for l in tqdm(sorted(by_layer), desc="spectra for allocation", disable=not progress, unit="layer"):
        if spectra is not None and all(t.name in spectra for t in by_layer[l]):  # the dense model's, measured before
            for t in by_layer[l]:
                add_group(t, spectra[t.name])
            continue
        prefix = t_prefix(by_layer[l][0])
        stats = PairedInputStats(runner, l, {t.name: t.name[len(prefix):] for t in by_layer[l]}, cross=False)
        stats.collect(runner.dense_inputs(l), None)
        roots: dict[int, torch.Tensor] = {}  # targets reading the same input share C (q/k/v, gate/up)
        for t in by_layer[l]:
            W = runner.layers[l].get_submodule(t.name[len(prefix):]).weight.detach()
            dtype = fz.compute_dtype(W.device)
            left = G[t.name].power(0.5).to(dtype)
            C = stats.C[t.name]
            if id(C) not in roots:
                roots[id(C)] = fz.psd_power(fz.damped(C.to(dtype), cfg.damp), 0.5)
            right = roots[id(C)]
            if cov_cache is not None:
                cov_cache[t.name] = C
            spectrum = torch.linalg.svdvals(left @ W.to(dtype) @ right)
            if spectra is not None:
                spectra[t.name] = spectrum.cpu()
            add_group(t, spectrum)
        if cov_cache is not None:
            unique = {id(c): c for c in cov_cache.values()}.values()
            if sum(c.numel() * c.element_size() for c in unique) > COV_CACHE_BYTES:
                cov_cache.clear()  # too big to keep: the factorization pass recomputes them
                cov_cache = None
    dense_by = {}
    for t in targets:
        key = t.kind if use_kind else t.component
        dense_by[key] = dense_by.get(key, 0) + t.dense_params
    alloc = allocate(groups, int(budget), multipliers=cfg.multipliers or None, dense_by_component=dense_by,
                     ratio=cfg.ratio, time_limit=30.0)
    result.allocation = {"status": alloc.status, "gap": alloc.gap, "seconds": alloc.seconds,
                         "predicted_loss": alloc.total_loss, "budget": alloc.budget}
    return {name: opt.rank for name, opt in alloc.choices.items()}


def t_prefix(t: Target) -> str:
    """'model.layers.3.' for a target of layer 3."""
    return t.name[: t.name.index(f".{t.layer}.") + len(f".{t.layer}.")]


def _check_plan(result: CompressionResult, cfg: CompressConfig) -> None:
    """Fail loudly if the plan missed its budget or a rank is out of range."""
    for t in result.targets:
        r = result.ranks[t.name]
        assert r is None or 1 <= r <= min(t.out_features, t.in_features), (t.name, r)
    achieved = result.linear_ratio
    assert achieved >= cfg.ratio * (1 - 1e-9), f"achieved ratio {achieved:.4f} below target {cfg.ratio}"
