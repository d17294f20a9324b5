"""Compression of a model in place: the ``compress_`` entry point, and ``compress_home`` under it.

    profile (dense gradients, backward one layer at a time) -> statistics store
    allocate (spectra, one forward sweep) -> knapsack ranks
    factorize (a plan of steps, one executor, one layer at a time) -> factorized layers in the home

Every stage touches one decoder layer at a time (vac/profile.py, vac/executor.py); what
depends only on the dense model and the calibration data (G, Fisher diagonals, allocation
spectra) lives in a :class:`~vac.statstore.StatsStore`, so it is measured once and, for the
evolutionary search, shared by every strategy scored against the same model and data.
Gradient statistics come from the dense model only: recomputing them after each step would
cost a backward sweep per layer, while the input statistics, which the closed-loop objectives
depend on, are remeasured at the cost of one decoder layer per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from vac.checks import FACTORS_HINT, check_finite
from vac.config import CompressConfig
from vac.errors import VacError
from vac.executor import SequentialExecutor, plan_steps
from vac.families import ATTENTION, Target, find_targets
from vac.hidden import HiddenStore
from vac.home import InMemoryHome, ModelHome
from vac.layers import FactorizedLinear, factorized_params
from vac.memory import Stages
from vac.methods import METHODS, TargetStats
from vac.plan import layer_order, uniform_ranks
from vac.profile import allocation_spectra, profile_gradients
from vac.statstore import StatsStore

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
    """Unique parameters: tied embeddings counted once, also in a streamed model's skeleton, whose head
    and embedding are separate (meta) tensors that the checkpoint stores once."""
    from vac.weights import tied_source_name

    unique = {id(p): p for name, p in model.named_parameters(remove_duplicate=False)
              if tied_source_name(model, name) is None}
    return sum(p.numel() for p in unique.values())


def compress_(model: nn.Module, cfg: CompressConfig, calib: torch.Tensor, grad_blocks: torch.Tensor | None = None,
              progress: bool = True, store: StatsStore | None = None,
              hidden: HiddenStore | None = None) -> CompressionResult:
    """Factorize ``model``'s target linears in place following ``cfg``; returns ranks and timings.

    ``store``: statistics of the dense model kept by the caller for one model and one calibration
    set, to compress many fresh copies of it (the evolutionary search): gradient statistics and
    the allocator's spectra are then measured once. ``hidden`` bounds the RAM of cached hidden
    states (spilling the rest to disk).
    """
    return compress_home(InMemoryHome(model), cfg, calib, grad_blocks=grad_blocks, progress=progress, store=store,
                         hidden=hidden)


def compress_home(home: ModelHome, cfg: CompressConfig, calib: torch.Tensor, *,
                  grad_blocks: torch.Tensor | None = None, progress: bool = True, store: StatsStore | None = None,
                  hidden: HiddenStore | None = None, stages: Stages | None = None) -> CompressionResult:
    """Factorize the targets of the model behind ``home`` (in memory, or a checkpoint on disk).

    ``stages`` records seconds and peak memory of the three sweeps (gradient_stats, allocation,
    factorize); ``result.timings`` has their seconds either way.
    """
    method = METHODS[cfg.method]
    all_targets = find_targets(home.model)
    num_layers = home.num_layers
    bad = [l for l in cfg.keep_dense if not -num_layers <= l < num_layers]
    if bad:
        raise VacError(f"--keep-dense layers {bad} out of range: use 0..{num_layers - 1}, or -1 for the last")
    keep = {l % num_layers for l in cfg.keep_dense}  # -1 = the last layer, on any depth
    targets = [t for t in all_targets if t.layer not in keep]
    result = CompressionResult(ranks={t.name: None for t in all_targets}, targets=all_targets)
    stages = stages or Stages()
    budget = result.dense_target_params / cfg.ratio - sum(t.dense_params for t in all_targets if t not in targets)
    _check_feasible(targets, budget, cfg)  # before any expensive statistics
    shared = store is not None  # a caller's store serves strategies with other keep-dense layers
    store = store if store is not None else StatsStore()
    own_hidden = hidden is None
    hidden = hidden if hidden is not None else HiddenStore()
    want_g = method.needs_output_grads or cfg.allocation == "knapsack"
    try:
        # 1. gradient statistics of the dense model, backward one layer at a time
        if want_g or method.needs_fisher:
            blocks = grad_blocks if grad_blocks is not None else calib[: cfg.fisher_samples]
            with stages("gradient_stats"):
                profile_gradients(home, blocks, all_targets if shared else targets, store, output_cov=want_g,
                                  fisher=method.needs_fisher, hidden=hidden, grad_rank=cfg.grad_rank,
                                  progress=progress)
            stages.record_disk("gradient_stats", store.nbytes())

        # 2. ranks
        with stages("allocation"):
            _allocate(home, cfg, calib, targets, all_targets if shared else targets, store, budget, result,
                      progress)

        # 3. factorize in order, one step (a stage, or a layer) at a time
        with stages("factorize"):
            _factorize(home, cfg, calib, targets, store, hidden, result, progress)
    finally:
        if own_hidden:
            hidden.close()
    result.timings.update({k[len(stages.prefix):]: v for k, v in stages.seconds.items() if k.startswith(stages.prefix)})
    _check_plan(result, cfg)
    return result


def _allocate(home: ModelHome, cfg: CompressConfig, calib, targets, measured, store, budget, result, progress):
    if cfg.allocation == "uniform":
        eff_ratio = sum(t.dense_params for t in targets) / budget
        result.ranks.update(uniform_ranks(targets, eff_ratio))
        return
    key = f"damp={cfg.damp!r}"
    spectra = store.spectra(key)
    missing = [t for t in measured if t.name not in spectra]
    if missing:
        spectra.update(allocation_spectra(home, calib, missing, store, damp=cfg.damp, batch_size=cfg.batch_size,
                                          progress=progress))
        store.put_spectra(key, spectra)
    result.ranks.update(_knapsack_ranks(targets, spectra, cfg, budget, result))


def _factorize(home: ModelHome, cfg: CompressConfig, calib, targets, store, hidden, result, progress):
    """The plan of steps in the configured order and granularity, walked by one executor."""
    method = METHODS[cfg.method]
    chosen = [t for t in targets if result.ranks[t.name] is not None]
    per_matrix = cfg.granularity == "matrix" and cfg.order != "one-shot"
    family = home.family
    steps = plan_steps(layer_order(cfg.order, home.num_layers), chosen,
                       lambda t: family.stage_of(t.name[len(home.layer_prefix(t.layer)):]), per_matrix)

    def fit(t: Target, module: nn.Module, C, C_cross) -> FactorizedLinear:
        W = module.weight.detach()
        stats = TargetStats(C=C, C_cross=C_cross)
        if method.needs_output_grads:
            G = store.G(t.layer, t.name)
            stats.G = G.to(W.device).damped(cfg.damp) if G is not None else None
        if method.needs_fisher:
            stats.F = store.F(t.layer, t.name).to(W.device)
        f = method.fit(W, stats, result.ranks[t.name], cfg)
        check_finite([(f"{t.name}.up", f.up), (f"{t.name}.down", f.down)], "factors", FACTORS_HINT)
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        result.spectra.setdefault(t.name, f.spectrum.cpu())
        return FactorizedLinear.from_factors(f.up, f.down, bias, dtype=W.dtype)

    executor = SequentialExecutor(home, calib, batch_size=cfg.batch_size, one_shot=cfg.order == "one-shot",
                                  dense_target=cfg.objective == "dense-target", per_matrix=per_matrix,
                                  hidden=hidden, fit=fit, progress=progress,
                                  desc=f"factorize ({cfg.method}, {cfg.order})")
    if method.needs_inputs:
        executor.run(steps)
    else:  # svd, fisher: weights (and gradients) only
        executor.run_weights_only(steps)


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


def _knapsack_ranks(targets: list[Target], spectra: dict[str, torch.Tensor], cfg, budget, result) -> dict:
    """Options per target from the tail of its K-FAC-weighted spectrum, then CP-SAT.

    The predicted loss of rank r is sum_{k>r} sigma_k^2 of G^1/2 W C^1/2: to second order the loss
    increase of a perturbation under the Kronecker-factored Fisher, so options of different
    matrices are in the same units and can be traded against each other.
    """
    from vac import factorize as fz
    from vac.allocate import Group, allocate, rank_options

    use_kind = any(k not in (ATTENTION, "mlp") for k in cfg.multipliers)
    groups = []
    for t in targets:
        spectrum = spectra[t.name]
        result.spectra[t.name] = spectrum.float().cpu()
        opts = rank_options(t.out_features, t.in_features, fz.tail_energy(spectrum.double()), grid=cfg.rank_grid,
                            allow_dense=not cfg.compress_all)
        groups.append(Group(name=t.name, component=t.kind if use_kind else t.component, options=opts))
    dense_by = {}
    for t in targets:
        key = t.kind if use_kind else t.component
        dense_by[key] = dense_by.get(key, 0) + t.dense_params
    alloc = allocate(groups, int(budget), multipliers=cfg.multipliers or None, dense_by_component=dense_by,
                     ratio=cfg.ratio, time_limit=30.0)
    result.allocation = {"status": alloc.status, "gap": alloc.gap, "seconds": alloc.seconds,
                         "predicted_loss": alloc.total_loss, "budget": alloc.budget}
    return {name: opt.rank for name, opt in alloc.choices.items()}


def _check_plan(result: CompressionResult, cfg: CompressConfig) -> None:
    """Fail loudly if the plan missed its budget or a rank is out of range."""
    for t in result.targets:
        r = result.ranks[t.name]
        assert r is None or 1 <= r <= min(t.out_features, t.in_features), (t.name, r)
    achieved = result.linear_ratio
    assert achieved >= cfg.ratio * (1 - 1e-9), f"achieved ratio {achieved:.4f} below target {cfg.ratio}"
