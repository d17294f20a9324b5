"""The sequential pipeline on tiny models: orders, hooks, ranks, budgets."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_blocks, tiny_model

from vac.config import make_config
from vac.errors import VacError
from vac.evaluate import compare
from vac.families import find_targets
from vac.layers import FactorizedLinear
from vac.pipeline import compress_
from vac.plan import layer_order
from vac.stats import hook_count


def test_named_orders():
    assert layer_order("front-to-back", 5) == [0, 1, 2, 3, 4]
    assert layer_order("back-to-front", 5) == [4, 3, 2, 1, 0]
    assert layer_order("middle-out", 6) == [3, 2, 4, 1, 5, 0]
    assert layer_order("middle-out", 5) == [2, 1, 3, 0, 4]
    assert layer_order([2, 0, 1], 3) == [2, 0, 1]
    with pytest.raises(VacError, match="permutation"):
        layer_order([0, 0, 1], 3)


@pytest.mark.parametrize("order", ["front-to-back", "back-to-front", "middle-out", [1, 3, 0, 2]])
def test_layers_are_compressed_in_the_stated_order(order, monkeypatch):
    model = tiny_model_with_layers(4)
    seen = []
    from vac.home import InMemoryHome

    real = InMemoryHome.commit
    monkeypatch.setattr(InMemoryHome, "commit", lambda self, l, *a: (seen.append(l), real(self, l, *a)))
    compress_(model, make_config(dict(method="whiten", ratio=1.5, order=order, batch_size=4, allocation="uniform")),
              random_blocks(4, 16), progress=False)
    layers = list(dict.fromkeys(seen))
    assert layers == layer_order(order, 4)


def tiny_model_with_layers(n: int):
    from transformers import AutoModelForCausalLM
    from conftest import tiny_config

    cfg = tiny_config("llama")
    cfg.num_hidden_layers = n
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("method", ["svd", "whiten", "fisher", "kfac"])
@pytest.mark.parametrize("order,granularity", [("one-shot", "layer"), ("front-to-back", "matrix"),
                                               ("middle-out", "layer")])
def test_methods_compress_and_remove_their_hooks(method, order, granularity):
    from vac.config import effective

    model = tiny_model("olmo3")
    cfg = make_config(effective(dict(method=method, ratio=1.6, order=order, granularity=granularity, batch_size=4,
                                     fisher_samples=2, allocation="uniform")))
    result = compress_(model, cfg, random_blocks(8, 16), progress=False)
    assert hook_count(model.modules()) == 0
    assert result.linear_ratio >= 1.6
    assert all(isinstance(model.get_submodule(t.name), FactorizedLinear) for t in find_targets(model))
    assert not any(p.requires_grad is False for p in model.parameters())  # requires_grad restored


def test_loss_aware_beats_plain_svd_on_kl():
    dense = tiny_model("llama", seed=1)
    calib, held = random_blocks(16, 32, seed=0), random_blocks(4, 32, seed=9)
    kl = {}
    for method in ("svd", "whiten"):
        model = copy.deepcopy(dense)
        compress_(model, make_config(dict(method=method, ratio=2.0, batch_size=8, allocation="uniform")), calib, progress=False)
        kl[method] = compare({"m": model}, held, reference=dense, progress=False)["m"]["kl"]
    assert kl["whiten"] < kl["svd"]


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_dense_layers_stay_dense_and_budget_holds(keep):
    model = tiny_model("qwen3")
    last = max(t.layer for t in find_targets(model))
    cfg = make_config(dict(method="svd", ratio=1.3, keep_dense=[keep], allocation="uniform"))
    result = compress_(model, cfg, random_blocks(4, 16), progress=False)
    for t in find_targets(model):
        assert isinstance(model.get_submodule(t.name), FactorizedLinear) == (t.layer != (keep % (last + 1)))
    assert result.linear_ratio >= 1.3
    with pytest.raises(VacError, match="-1 for the last"):
        compress_(tiny_model("qwen3"), make_config(dict(method="svd", ratio=1.3, keep_dense=[last + 1])),
                  random_blocks(2, 8), progress=False)


def test_ratio_too_high_for_uniform_ranks():
    with pytest.raises(VacError, match="too high"):
        compress_(tiny_model(), make_config(dict(method="svd", ratio=60.0, allocation="uniform")), random_blocks(2, 8), progress=False)


def test_knapsack_allocation_fits_budget_and_honours_multipliers():
    from vac.families import ATTENTION, MLP

    calib = random_blocks(8, 32)
    ranks = {}
    for mult in (None, {"attention": 0.5, "mlp": 1.2}):
        model = tiny_model("llama", seed=2)
        cfg = make_config(dict(method="kfac", ratio=1.5, allocation="knapsack", rank_grid=4, fisher_samples=4,
                               batch_size=4, multipliers=mult or {}, compress_all=True))
        result = compress_(model, cfg, calib, progress=False)
        assert 1.5 <= result.linear_ratio <= 1.5 * 1.05  # the grid of 4 leaves a little slack on a tiny model
        assert result.allocation["status"] in ("OPTIMAL", "FEASIBLE")
        assert all(r is not None for r in result.ranks.values())  # compress_all: nothing kept dense
        ranks[mult is None] = result
    capped = ranks[False]
    attn = [t for t in capped.targets if t.component == ATTENTION]
    attn_params = sum(capped.ranks[t.name] * (t.out_features + t.in_features) for t in attn)
    assert attn_params <= 0.5 * sum(t.dense_params for t in attn) / 1.5
    assert any(t.component == MLP for t in capped.targets)


def test_knapsack_may_keep_matrices_dense():
    model = tiny_model("qwen2", seed=3)
    cfg = make_config(dict(method="whiten", ratio=1.2, allocation="knapsack", rank_grid=4, fisher_samples=2,
                           batch_size=4))
    result = compress_(model, cfg, random_blocks(8, 32), progress=False)
    assert result.linear_ratio >= 1.2
    for t in find_targets(model):
        kept = result.ranks[t.name] is None
        assert isinstance(model.get_submodule(t.name), FactorizedLinear) != kept


def _input_cov(model, name: str, blocks: torch.Tensor, other=None) -> torch.Tensor:
    """sum x x^T of a linear's inputs over ``blocks`` (or sum x_other x^T with another model's)."""
    xs = {}
    handles = [m.get_submodule(name).register_forward_hook(lambda mod, i, o, key=key: xs.setdefault(key, []).append(
        i[0].reshape(-1, i[0].shape[-1]).double())) for key, m in (("self", model), ("other", other)) if m is not None]
    with torch.no_grad():
        model(input_ids=blocks)
        if other is not None:
            other(input_ids=blocks)
    for h in handles:
        h.remove()
    x = torch.cat(xs["self"])
    return (torch.cat(xs["other"]).T @ x) if other is not None else x.T @ x


def test_matrix_granularity_sees_earlier_stages_of_the_same_layer_compressed(monkeypatch):
    """Per matrix, o_proj's statistics come from the model with this layer's q/k/v already factorized,
    and the dense-target cross-covariance pairs them with the dense model's inputs token by token."""
    import vac.executor as ex

    dense = tiny_model("llama", seed=5)
    model = copy.deepcopy(dense)
    calib = random_blocks(4, 16)
    checked = []
    real = ex.collect_stage

    def spy(home, l, names, *a, **k):
        stats = real(home, l, names, *a, **k)
        for sub, name in names.items():
            kind = sub.rsplit(".", 1)[-1]
            if kind in ("o_proj", "down_proj") and l == 1:
                assert isinstance(model.get_submodule(name.replace(kind, "q_proj" if kind == "o_proj" else "gate_proj")),
                                  FactorizedLinear)
                torch.testing.assert_close(stats.C[name].double(), _input_cov(model, name, calib), rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(stats.C_cross[name].double(), _input_cov(model, name, calib, other=dense),
                                           rtol=1e-4, atol=1e-4)
                checked.append(kind)
        return stats

    monkeypatch.setattr(ex, "collect_stage", spy)
    compress_(model, make_config(dict(method="whiten", ratio=1.5, order="front-to-back", granularity="matrix",
                                      objective="dense-target", allocation="uniform", batch_size=2)),
              calib, progress=False)
    assert checked == ["o_proj", "down_proj"]


def test_stats_store_reuses_dense_statistics_and_changes_nothing(monkeypatch):
    """The search's per-process store: the second compression skips the gradient pass and the
    allocator's spectra, and gives bitwise the same model; other keep-dense sets still work."""
    import vac.pipeline as pl
    from vac.statstore import StatsStore

    calls = []
    real = pl.profile_gradients
    monkeypatch.setattr(pl, "profile_gradients", lambda home, blocks, targets, store, **k: (
        calls.append(1) if not all(store.has_layer(t.layer, [t.name]) for t in targets) else None,
        real(home, blocks, targets, store, **k))[1])
    calib = random_blocks(8, 32)
    cfg = dict(method="kfac", ratio=1.5, allocation="knapsack", rank_grid=4, batch_size=4, fisher_samples=2)
    logits, cache = [], StatsStore()
    for store in (None, cache, cache):
        model = tiny_model("llama", seed=6)
        compress_(model, make_config(cfg), calib, progress=False, store=store)
        with torch.no_grad():
            logits.append(model(input_ids=calib[:2]).logits)
    assert len(calls) == 2  # without the cache, then once for the cache
    torch.testing.assert_close(logits[1], logits[0], atol=0, rtol=0)
    torch.testing.assert_close(logits[2], logits[0], atol=0, rtol=0)
    model = tiny_model("llama", seed=6)
    result = compress_(model, make_config({**cfg, "keep_dense": [1], "ratio": 1.3}), calib, progress=False,
                       store=cache)
    assert len(calls) == 2 and all(result.ranks[t.name] is None for t in find_targets(model) if t.layer == 1)
