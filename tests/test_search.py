"""Tests of vac.search: operators, genome/YAML, cache, checkpoint/resume, executors, CLI.

All on the deterministic ToyEvaluator; the whole file runs in well under a minute.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vac.errors import VacError
from vac.search import (EvaluatorSpec, Genome, LocalExecutor, Search, SearchConfig, SearchSettings, SearchSpace,
                        ToyEvaluator, hypervolume, middle_out, nondominated)
from vac.search.cli import main
from vac.search.genome import CONFIG_KEYS
from vac.search.operators import Variation, back_to_front, front_to_back, is_permutation, make_offspring
from vac.search.space import FitnessPareto

REPO = Path(__file__).resolve().parents[1]


def toy_space(**overrides) -> SearchSpace:
    spec = dict(num_layers=6, ratio=[1.4, 2.4], method=["fisher", "kfac"], exponent=[0.0, 0.75],
                in_exponent=[0.25, 0.75], granularity=["layer", "matrix"],
                multipliers={"attention": [0.5, 2.0], "mlp": 1.0}, keep_dense=[0, 5])
    spec.update(overrides)
    return SearchSpace.from_dict(spec)


class CountingExecutor:
    """In-process executor that records every config it is asked to evaluate."""

    def __init__(self, evaluator=None):
        self.evaluator = evaluator or ToyEvaluator()
        self.inner = LocalExecutor(lambda: self.evaluator, workers=0)
        self.seen: list[dict] = []

    def map(self, configs):
        self.seen.extend(configs)
        return self.inner.map(configs)


def run_search(run_dir, generations, *, space=None, resume=False, executor=None, **settings):
    settings = SearchSettings(**{"population": 6, "generations": generations, "seed": 3, **settings})
    search = Search(space or toy_space(), executor or CountingExecutor(), run_dir, settings,
                    resume=resume, progress=False, plots=False)
    return search.run()


def front_summary(result):
    return [(e["key"], e["quality"], e["ratio"]) for e in result.front]


# ---- orders and operators -----------------------------------------------------------------

def test_seed_orders():
    assert middle_out(6) == [3, 2, 4, 1, 5, 0]
    assert middle_out(5) == [2, 1, 3, 0, 4]
    assert front_to_back(4) == [0, 1, 2, 3] and back_to_front(4) == [3, 2, 1, 0]
    for n in range(1, 40):
        assert is_permutation(middle_out(n), n)


def test_operators_keep_genes_valid():
    random.seed(0)
    space = toy_space(num_layers=9)
    variation = Variation(space, indpb=0.3)
    low, up = space.bounds
    pop = [space.random_individual(FitnessPareto) for _ in range(10)]
    for ind in pop:
        ind.fitness.values = (random.random(), random.random())
    for _ in range(300):
        a, b = random.sample(pop, 2)
        variation.crossover(a, b)
        variation.mutate(a)
        variation.mutate(b)
        for ind in (a, b):
            assert is_permutation(ind.perm, 9)
            assert all(lo <= x <= hi for x, lo, hi in zip(ind.reals, low, up))
            assert all(0 <= c < len(choices) for c, (_, choices) in zip(ind.cats, space.cat_genes))
            assert set(ind.bits) <= {0, 1}
            space.decode(ind).validate()
    children = make_offspring(pop, 7, variation, cxpb=1.0, mutpb=1.0)
    assert len(children) == 7 and all(is_permutation(c.perm, 9) for c in children)
    assert all(not c.fitness.valid for c in children)


def test_operators_change_orders():
    random.seed(1)
    space = toy_space()
    variation = Variation(space)
    ind = space.centre_individual(middle_out(6), FitnessPareto)
    seen = set()
    for _ in range(50):
        variation.mutate(ind)
        seen.add(tuple(ind.perm))
    assert len(seen) > 10


# ---- genome, key, YAML --------------------------------------------------------------------

def test_key_normalises_irrelevant_and_tiny_differences():
    a = Genome(order=[1, 0, 2], ratio=1.8, method="svd", exponent=0.1)
    b = Genome(order=[1, 0, 2], ratio=1.8, method="svd", exponent=0.6)
    assert a.key() == b.key()  # svd uses no exponent
    c = Genome(order=[1, 0, 2], ratio=1.8, method="fisher", exponent=0.25)
    d = Genome(order=[1, 0, 2], ratio=1.8 + 1e-9, method="fisher", exponent=0.25 + 1e-9)
    assert c.key() == d.key() != a.key()
    # fisher reads weights only, so the order does not matter to it; it does to whiten
    assert c.key() == Genome(order=[0, 1, 2], ratio=1.8, method="fisher", exponent=0.25).key()
    assert Genome(order=[1, 0, 2], ratio=1.8, method="whiten").key() != Genome(order=[0, 1, 2], ratio=1.8,
                                                                                 method="whiten").key()
    with pytest.raises(VacError):
        Genome(order=[0, 0, 2], ratio=1.8)
    with pytest.raises(VacError):
        Genome(order=[0, 1], ratio=1.8, multipliers={"attn": 1.0})


def test_genome_yaml_round_trip(tmp_path):
    random.seed(2)
    space = toy_space()
    for _ in range(20):
        genome = space.decode(space.random_individual(FitnessPareto))
        text = genome.to_yaml()
        data = yaml.safe_load(text)
        assert set(data) <= set(CONFIG_KEYS)
        back = Genome.from_yaml(text)
        assert back.to_config() == genome.to_config() and back.key() == genome.key()
        again = space.decode(space.encode(back, FitnessPareto))
        assert again.key() == genome.key()
    genome.save(tmp_path / "g.yaml", base={"model": "smollm2-135m"})
    assert yaml.safe_load((tmp_path / "g.yaml").read_text())["model"] == "smollm2-135m"
    with pytest.raises(VacError):
        Genome.load(tmp_path / "g.yaml")  # model is not a gene
    assert Genome.load(tmp_path / "g.yaml", strict=False).key() == genome.key()
    named = Genome(order="middle-out", ratio=2.0, method="kfac")
    assert Genome.from_yaml(named.to_yaml()).to_config() == named.to_config()


def test_search_writes_genome_yamls_with_config_keys_only(tmp_path):
    result = run_search(tmp_path, 2)
    files = sorted((tmp_path / "best").glob("*.yaml"))
    assert len(files) == len(result.front) > 0
    for f in files:
        data = yaml.safe_load(f.read_text())
        assert set(data) <= set(CONFIG_KEYS)
        assert Genome.from_config(data).key() in result.cache


# ---- Pareto maths --------------------------------------------------------------------------

def test_nondominated_and_hypervolume():
    entries = [{"key": "a", "quality": 1.0, "ratio": 1.5}, {"key": "b", "quality": 2.0, "ratio": 2.0},
               {"key": "c", "quality": 2.5, "ratio": 1.8}, {"key": "d", "quality": 3.0, "ratio": 2.5},
               {"key": "e", "quality": 0.5, "ratio": 3.0, "error": "boom"}]
    assert [e["key"] for e in nondominated(entries)] == ["a", "b", "d"]
    # rectangles to the reference (quality 4, ratio 1): (4-3)*(2.5-2) + (4-2)*(2-1.5) + (4-1)*(1.5-1)
    assert hypervolume(entries, 4.0) == pytest.approx(0.5 + 1.0 + 1.5)


# ---- cache ---------------------------------------------------------------------------------

def test_cache_prevents_reevaluation(tmp_path):
    # 4 layers and two methods, nothing else free: 48 genomes, so a run must revisit some
    space = SearchSpace.from_dict(dict(num_layers=4, ratio=2.0, method=["svd", "kfac"], exponent=0.25))
    executor = CountingExecutor()
    result = run_search(tmp_path, 6, space=space, executor=executor, population=8)
    keys = [Genome.from_config(c).key() for c in executor.seen]
    assert len(keys) == len(set(keys)) == len(result.cache) == executor.evaluator.calls
    assert sum(r["hits"] for r in result.logbook) > 0
    # resuming a finished run with more generations evaluates only keys never seen
    more = run_search(tmp_path, 9, space=space, executor=executor, population=8, resume=True)
    keys = [Genome.from_config(c).key() for c in executor.seen]
    assert len(keys) == len(set(keys)) == len(more.cache)


def test_failed_evaluations_are_penalised_not_fatal(tmp_path):
    class Flaky(ToyEvaluator):
        def __call__(self, config):
            if config["method"] == "fisher":
                raise RuntimeError("out of memory")
            return super().__call__(config)

    result = run_search(tmp_path, 2, executor=CountingExecutor(Flaky()))
    failed = [e for e in result.cache.values() if "error" in e]
    assert failed and all("out of memory" in e["error"] for e in failed)
    assert all("error" not in e for e in result.front)

    class Broken(ToyEvaluator):
        def __call__(self, config):
            raise ImportError("no vac.pipeline")

    with pytest.raises(VacError, match="no vac.pipeline"):
        run_search(tmp_path / "broken", 2, executor=CountingExecutor(Broken()))


def test_references_are_scored_once_and_never_selected(tmp_path):
    default = {"method": "kfac", "ratio": 1.8, "order": "front-to-back", "kfac_out_exponent": 0.25}
    settings = SearchSettings(population=6, generations=2, seed=3)

    def search(executor, references, generations=2, resume=False):
        return Search(toy_space(), executor, tmp_path, SearchSettings(**{**settings.__dict__, "generations": generations}),
                      references=references, resume=resume, progress=False, plots=True)

    plain = run_search(tmp_path / "plain", 2)
    executor = CountingExecutor()
    result = search(executor, {"default": default}).run()
    assert executor.seen[0] == default and len(executor.seen) == 1 + len(result.cache)
    assert front_summary(result) == front_summary(plain)  # the reference changes nothing in the search
    assert all(e["config"] != default for e in result.cache.values())
    front = json.loads((tmp_path / "front.json").read_text())
    assert front["references"]["default"]["quality"] == ToyEvaluator()(default)["quality"]
    # resumed: the stored reference is reused; one added to the recipe is scored, nothing else runs
    other = {**default, "order": "middle-out"}
    resumed = CountingExecutor()
    search(resumed, {"default": default, "middle-out": other}, resume=True).run()
    assert resumed.seen == [other]
    assert set(json.loads((tmp_path / "front.json").read_text())["references"]) == {"default", "middle-out"}


def test_references_in_a_recipe_are_checked(tmp_path):
    space = {"num_layers": 4}
    assert SearchConfig.from_dict({"space": space, "references": {"d": {"ratio": 1.8}}}).references == {
        "d": {"ratio": 1.8}}
    with pytest.raises(VacError, match="ratioo"):
        SearchConfig.from_dict({"space": space, "references": {"d": {"ratioo": 1.8}}})
    with pytest.raises(VacError, match="must map a name"):
        SearchConfig.from_dict({"space": space, "references": [{"ratio": 1.8}]})
    with pytest.raises(VacError, match="own_samples"):  # a search calibrates on its own blocks
        SearchConfig.from_dict({"space": space, "compress_base": {"own_samples": 16}})


# ---- checkpoint and resume -----------------------------------------------------------------

def test_kill_and_resume_gives_the_same_front(tmp_path):
    full = run_search(tmp_path / "full", 6)
    run_search(tmp_path / "split", 2)  # "killed" after generation 2 was saved
    random.seed(12345)  # a new process would start from another random state
    resumed_executor = CountingExecutor()
    resumed = run_search(tmp_path / "split", 6, resume=True, executor=resumed_executor)
    assert front_summary(resumed) == front_summary(full)
    assert list(resumed.cache) == list(full.cache)
    assert resumed.logbook == full.logbook
    state_full = json.loads((tmp_path / "full" / "state.json").read_text())
    state_split = json.loads((tmp_path / "split" / "state.json").read_text())
    assert state_full["population"] == state_split["population"] and state_full["rng"] == state_split["rng"]
    # the resumed process evaluated only the generations after the checkpoint
    assert len(resumed_executor.seen) == sum(r["evals"] for r in full.logbook[3:])


def test_resume_refuses_a_different_search(tmp_path):
    run_search(tmp_path, 1)
    with pytest.raises(VacError, match="--resume"):
        run_search(tmp_path, 2)  # a checkpoint exists but resume was not asked for
    with pytest.raises(VacError, match="different search"):
        run_search(tmp_path, 2, resume=True, population=8)


def _write_toy_config(path: Path, out: Path, generations: int, delay: float = 0.0) -> Path:
    cfg = {"out": str(out), "evaluator": "toy", "toy": {"delay": delay}, "workers": 0,
           "search": {"population": 6, "generations": generations, "seed": 5},
           "space": {"num_layers": 8, "ratio": [1.5, 2.5], "exponent": [0.0, 0.75],
                     "multipliers": {"attention": [0.5, 2.0]}, "keep_dense": [0, 7]},
           "wandb": {"enabled": False}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sigkill_and_resume_from_the_cli(tmp_path):
    generations = 6
    ref_cfg = _write_toy_config(tmp_path / "ref.yaml", tmp_path / "ref", generations)
    assert main(["--config", str(ref_cfg), "--no-progress"]) == 0
    cfg = _write_toy_config(tmp_path / "kill.yaml", tmp_path / "kill", generations, delay=0.05)
    state = tmp_path / "kill" / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "vac.search", "--config", str(cfg), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if state.exists() and json.loads(state.read_text())["generation"] >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = json.loads(state.read_text())["generation"]
    assert 2 <= killed_at < generations
    assert main(["--config", str(cfg), "--resume", "--no-progress"]) == 0
    front = json.loads((tmp_path / "kill" / "front.json").read_text())["front"]
    ref = json.loads((tmp_path / "ref" / "front.json").read_text())["front"]
    assert [(e["key"], e["quality"], e["ratio"]) for e in front] == [(e["key"], e["quality"], e["ratio"]) for e in ref]


# ---- single objective, CLI, presets --------------------------------------------------------

def test_single_objective_at_fixed_ratio(tmp_path):
    space = toy_space(ratio=1.8)
    result = run_search(tmp_path, 3, space=space, mode="single")
    best = min(e["quality"] for e in result.cache.values())
    assert result.front[0]["quality"] == best
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["ratio"] == 1.8
    with pytest.raises(VacError, match="fixed ratio"):
        run_search(tmp_path / "x", 1, mode="single")  # ratio is a range in toy_space()


@pytest.mark.parametrize("preset,best,plot", [("smollm2-pareto.yaml", "front-*.yaml", "pareto.png"),
                                               ("smollm2-small.yaml", "top-*.yaml", "evaluations.png")])
def test_cli_end_to_end_with_plots(tmp_path, capsys, preset, best, plot):
    out = tmp_path / "run"
    args = ["--config", str(REPO / "configs/search" / preset), "--evaluator", "toy", "--out", str(out),
            "--generations", "2", "--population", "6", "--workers", "0", "--no-wandb"]
    assert main(args) == 0
    for name in ("state.json", "front.json", plot, "fitness.png", "search.yaml"):
        assert (out / name).is_file(), name
    assert list((out / "best").glob(best))
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    assert main(args + ["--resume", "--generations", "3"]) == 0
    assert json.loads((out / "state.json").read_text())["generation"] == 3


def test_cli_reports_bad_configs(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"space": {"num_layers": 4, "orderr": "search"}}))
    assert main(["--config", str(bad)]) == 2
    assert "orderr" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.parametrize("preset", sorted((REPO / "configs" / "search").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_presets_parse(preset):
    cfg = SearchConfig.load(preset)
    settings = cfg.search
    evaluations = settings.population + settings.generations * settings.offspring
    if preset.name == "smollm2-small.yaml":
        # under an hour here: rounds of `workers` parallel evaluations at the ~150 s per evaluation
        # measured on one CPU thread (experiments/RESULTS.md, "Search")
        rounds = -(-settings.population // cfg.workers) + settings.generations * -(-settings.offspring // cfg.workers)
        assert cfg.space.num_layers == 30 and settings.mode == "single" and rounds * 150 < 3600
    genome = cfg.space.decode(cfg.space.random_individual(FitnessPareto))
    assert set(genome.to_config()) <= set(CONFIG_KEYS)


# ---- executors -----------------------------------------------------------------------------

def _sample_configs(n=10):
    random.seed(4)
    space = toy_space()
    return [space.decode(space.random_individual(FitnessPareto)).to_config() for _ in range(n)]


def _fitness(results):
    return [(r["quality"], r["ratio"]) for r in results]


def test_local_process_pool_matches_in_process():
    configs = _sample_configs()
    expected = _fitness(LocalExecutor(EvaluatorSpec("toy"), workers=0).map(configs))
    with LocalExecutor(EvaluatorSpec("toy"), workers=2) as pool:
        assert _fitness(pool.map(configs)) == expected


class ThreadsEvaluator:
    """Reports the torch thread count of the worker it runs in."""

    def __call__(self, config):
        import torch
        return {"quality": float(torch.get_num_threads()), "ratio": 1.0}


def test_cpu_workers_split_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 6)  # read in the parent; not the real count
    with LocalExecutor(EvaluatorSpec(f"{__name__}:ThreadsEvaluator"), workers=2) as pool:
        if pool.gpus:
            pytest.skip("GPU workers are pinned to devices instead")
        assert [r["quality"] for r in pool.map([{}, {}])] == [3.0, 3.0]


def test_ray_executor_matches_local():
    ray = pytest.importorskip("ray")
    from vac.search import RayExecutor

    configs = _sample_configs()
    expected = _fitness(LocalExecutor(EvaluatorSpec("toy"), workers=0).map(configs))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        executor = RayExecutor(EvaluatorSpec("toy"))
        assert executor.num_actors == 2 and executor.gpus_per_actor == 0
        assert _fitness(executor.map(configs)) == expected
        assert executor.map([]) == []
        executor.close()
    finally:
        ray.shutdown()


def test_genome_yaml_is_a_compress_config(tmp_path):
    """A genome's YAML runs as `python -m vac.compress --config` on a model with that many layers."""
    from conftest import write_corpus, write_tiny_checkpoint

    from vac.compress import main as compress_main
    from vac.config import config_from_args

    random.seed(5)
    space = toy_space(num_layers=2, keep_dense=[], method=["whiten", "kfac"], ratio=[1.3, 1.6],
                      multipliers={"attention": [0.5, 2.0], "mlp": 1.0}, allocation=["uniform", "knapsack"])
    genome = space.decode(space.random_individual(FitnessPareto))
    path = tmp_path / "genome.yaml"
    genome.save(path, base={"calib_samples": 8, "seq_len": 32, "batch_size": 4, "fisher_samples": 2,
                            "evaluate": False})
    cfg = config_from_args(["--config", str(path)])
    for key, value in genome.to_config().items():
        assert getattr(cfg, key) == value, key
    model_dir, corpus = tmp_path / "m", tmp_path / "c.txt"
    write_tiny_checkpoint(model_dir)
    write_corpus(corpus)
    assert compress_main(["--config", str(path), "--model", str(model_dir), "--calib-data", str(corpus),
                          "--eval-data", str(corpus)]) == 0
