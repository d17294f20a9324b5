"""One decoder layer at a time: checkpoint homes, the hidden-state and statistics stores, the
backward profiling sweep, and memory that does not grow with depth."""

from __future__ import annotations

import pytest
import torch
from conftest import random_blocks, tiny_config

from vac.config import make_config
from vac.factorize import SymEig, damped, psd_power
from vac.families import find_targets
from vac.hidden import HiddenStore
from vac.home import CheckpointHome, InMemoryHome
from vac.pipeline import compress_, compress_home
from vac.profile import profile_gradients
from vac.statstore import StatsStore

ORDERS = ["front-to-back", "back-to-front", "middle-out", "one-shot", [2, 0, 3, 1]]


def deep_model(layers: int, family: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[0]] * layers
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def saved(tmp_path, model, name="ckpt"):
    d = tmp_path / name
    model.save_pretrained(d, safe_serialization=True)
    return d


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("order", ORDERS)
def test_streamed_checkpoint_gives_the_in_memory_factors(tmp_path, order):
    """The checkpoint home (weights read layer by layer from safetensors, factors written to a work
    directory) and the in-memory home run the same plan and give the same model."""
    calib = random_blocks(8, 32)
    cfg = make_config(dict(method="kfac", ratio=1.5, rank_grid=4, fisher_samples=4, batch_size=4, order=order))
    dense = deep_model(4, "olmo3")
    directory = saved(tmp_path, dense)
    home = CheckpointHome(directory, work_dir=tmp_path / "work")
    streamed = compress_home(home, cfg, calib, progress=False)
    in_memory = compress_(deep_model(4, "olmo3"), cfg, calib, progress=False)
    assert streamed.ranks == in_memory.ranks
    reference = deep_model(4, "olmo3")
    compress_(reference, cfg, calib, progress=False)
    torch.testing.assert_close(logits(home.to_model(), calib[:2]), logits(reference, calib[:2]), atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in (tmp_path / "work" / "layers").iterdir()) == [f"{l:05d}.safetensors" for l in range(4)]


def test_checkpoint_home_holds_at_most_one_layer_at_a_time(tmp_path, monkeypatch):
    """Dense and current versions of one layer, never two layers' worth, are materialized at once."""
    built, peak = [], [0]
    real = CheckpointHome._build

    def build(self, l, factorized=False):
        layer = real(self, l, factorized)
        held = {k for k in self._dense} | {k for k in self._current}
        peak[0] = max(peak[0], len(held | {l}))
        built.append(l)
        return layer

    monkeypatch.setattr(CheckpointHome, "_build", build)
    home = CheckpointHome(saved(tmp_path, deep_model(6)))
    compress_home(home, make_config(dict(method="kfac", ratio=1.5, rank_grid=4, fisher_samples=2, batch_size=4)),
                  random_blocks(8, 16), progress=False)
    assert peak[0] == 1 and set(built) == set(range(6))


def test_profiling_sweep_gives_the_whole_model_gradient_statistics():
    """G from the layer-by-layer backward sweep equals G from whole-model backward passes."""
    model = deep_model(3, "qwen2")
    blocks = random_blocks(3, 24)
    targets = find_targets(model)
    reference = {t.name: torch.zeros(t.out_features, t.out_features) for t in targets}

    def accumulate(name):
        def hook(module, grad_input, grad_output):
            g = grad_output[0].reshape(-1, grad_output[0].shape[-1])
            reference[name].add_(g.T @ g)
        return hook

    handles = [model.get_submodule(t.name).register_full_backward_hook(accumulate(t.name)) for t in targets]
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    for seq in blocks:
        model(input_ids=seq[None], labels=seq[None]).loss.backward()
    for h in handles:
        h.remove()
    store = StatsStore()
    with HiddenStore() as hidden:
        profile_gradients(InMemoryHome(model), blocks, targets, store, output_cov=True, fisher=False, hidden=hidden)
    for t in targets:
        G = store.G(t.layer, t.name)
        assert G.thin == (3 * 24 < t.out_features)  # 72 tokens: thin where fewer tokens than outputs
        torch.testing.assert_close(G.damped(0.01).power(1.0), damped(reference[t.name].double(), 0.01),
                                   rtol=1e-4, atol=1e-6 * float(reference[t.name].abs().max()))


def test_stats_store_round_trips_and_resets_on_another_fingerprint(tmp_path):
    torch.manual_seed(0)
    rows = torch.randn(5, 12, dtype=torch.float64)
    G = {"a": SymEig(rows.T @ rows, damp=None), "b": SymEig.from_rows(rows)}
    F = {"a": torch.rand(12, 7)}
    for path in (None, tmp_path / "store"):
        store = StatsStore(path, fingerprint={"model": "x"})
        assert not store.has_layer(3, ["a"])
        store.put_layer(3, G, F)
        store.put_spectra("damp=0.01", {"a": torch.arange(4.0)})
        if path is not None:
            store = StatsStore(path, fingerprint={"model": "x"})  # read back from disk
        assert store.has_layer(3, ["a", "b"])
        for name in G:
            torch.testing.assert_close(store.G(3, name).damped(0.01).power(0.5), G[name].damped(0.01).power(0.5))
        torch.testing.assert_close(store.F(3, "a"), F["a"])
        assert store.spectra("damp=0.01")["a"].tolist() == [0, 1, 2, 3] and store.spectra("damp=0.1") == {}
        assert store.nbytes() > 0
    fresh = StatsStore(tmp_path / "store", fingerprint={"model": "y"})
    assert not fresh.has_layer(3, ["a"]) and fresh.spectra("damp=0.01") == {}


def test_symeig_thin_and_truncated_forms():
    torch.manual_seed(1)
    rows = torch.randn(6, 20, dtype=torch.float64)
    M = rows.T @ rows
    for eig in (SymEig.from_rows(rows), SymEig(M, damp=None, rank=6)):
        for p in (0.5, 0.25, -0.25):
            torch.testing.assert_close(eig.damped(0.02).power(p), psd_power(damped(M, 0.02), p))
    # truncation below the true rank keeps the trace
    trunc = SymEig(M, damp=None, rank=3).damped(0.0)
    assert trunc.thin and abs(float(torch.trace(trunc.power(1.0))) - float(torch.trace(M))) < 1e-8 * float(torch.trace(M))


def test_hidden_store_spills_past_its_cap_and_reads_back(tmp_path):
    store = HiddenStore(ram_bytes=3 * 4 * 100, spill_dir=tmp_path)
    data = {k: [torch.full((2, 50), float(k)), torch.full((1, 50), -float(k))] for k in range(4)}
    for k, v in data.items():
        store.put(k, v)
    assert store.spills >= 2 and store.ram_bytes_held <= 3 * 4 * 100 and store.disk_bytes > 0
    for k, v in data.items():
        got = store.get(k)
        assert all(torch.equal(a, b) for a, b in zip(got, v))
    store.close()
    assert not any(tmp_path.iterdir())


def _peak_hidden(layers: int, order, ram_bytes: int, tmp_path) -> tuple[int, int]:
    hidden = HiddenStore(ram_bytes=ram_bytes, spill_dir=tmp_path)
    store = StatsStore()
    cfg = make_config(dict(method="kfac", ratio=1.5, rank_grid=4, fisher_samples=2, batch_size=4, order=order))
    compress_(deep_model(layers), cfg, random_blocks(8, 16), progress=False, store=store, hidden=hidden)
    hidden.close()
    return hidden.peak_ram_bytes, len(hidden.keys())


@pytest.mark.parametrize("order", ORDERS[:4])
def test_cached_hidden_states_do_not_grow_with_depth(tmp_path, order):
    """Bytes of hidden states held in RAM at depths 2, 4 and 8: front to back and one-shot hold a
    fixed number of boundaries whatever the depth; other orders are held to the store's cap."""
    boundary = 8 * 16 * 64 * 4  # 8 blocks x 16 tokens x hidden 64, float32
    uncapped = [_peak_hidden(n, order, 1 << 40, tmp_path)[0] for n in (2, 4, 8)]
    if order in ("front-to-back", "one-shot"):
        assert uncapped[1] == uncapped[2] <= 4 * boundary, uncapped
    capped = [_peak_hidden(n, order, 3 * boundary, tmp_path)[0] for n in (2, 4, 8)]
    assert max(capped) <= 3 * boundary and capped[1] == capped[2], capped


def test_non_finite_factors_stop_the_run_with_the_matrix_named(monkeypatch):
    import vac.factorize as fz
    from vac.checks import NonFiniteError

    real = fz.whitened_factorize

    def poisoned(W, C, rank, damp=fz.DEFAULT_DAMP):
        f = real(W, C, rank, damp)
        f.up[0, 0] = float("nan")
        return f

    monkeypatch.setattr(fz, "whitened_factorize", poisoned)
    with pytest.raises(NonFiniteError, match=r"factors: model\.layers\.0\.self_attn\.q_proj\.up has 1 non-finite"):
        compress_(deep_model(2), make_config(dict(method="whiten", ratio=1.5, allocation="uniform", order="one-shot")),
                  random_blocks(4, 16), progress=False)


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_skeleton_counts_tied_embeddings_once(tmp_path, tied):
    """The report's parameter count: a checkpoint home's skeleton holds the head and the embedding as
    two tensors even when they are tied; they are one parameter of the model, as in memory."""
    from vac.pipeline import param_count

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = tied
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg).eval()
    home = CheckpointHome(saved(tmp_path, model), work_dir=tmp_path / "work")
    assert param_count(home.model) == param_count(model)
    assert param_count(home.to_model()) == param_count(model)
