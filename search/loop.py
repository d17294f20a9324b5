"""The NSGA-II search loop: evaluate, select, checkpoint, resume.

Generation 0 is the seed population (front-to-back, back-to-front and middle-out orders on
a neutral background, then random genomes). Each later generation breeds ``offspring``
children by binary tournament, crossover and mutation, evaluates the ones whose key is not
in the cache, and keeps the best ``population`` of parents + children by ``selNSGA2``.

After every generation the whole state (population with fitnesses, cache, archive front,
logbook, RNG states) goes to ``state.json`` atomically; ``resume=True`` restores it and
continues with the same random stream, so an interrupted seeded run ends exactly where an
uninterrupted one would. A kill loses at most the generation in flight.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from deap import tools
from tqdm.auto import tqdm

from vac.errors import VacError
from vac.validate import check_search_settings

from .evaluators import FAILED_QUALITY
from .genome import dump_config
from .operators import SEED_ORDERS, Variation, make_offspring
from .pareto import best_by_quality, hypervolume, nondominated, valid
from .plots import plot_evaluations, plot_fitness, plot_pareto
from .space import FitnessPareto, FitnessSingle, Individual, SearchSpace
from .state import (STATE_FILE, atomic_write_json, atomic_write_text, has_state, individual_from_dict,
                    individual_to_dict, isolated_rng, load_state, remove_stale_tmp, rng_state, save_state,
                    set_rng_state)
from .tracking import NullTracker

STATE_VERSION = 1


@dataclass
class SearchSettings:
    """How the search runs (everything but the space and the executor)."""

    population: int = 8
    #: generations after the initial one; evaluations <= population + generations * offspring
    generations: int = 5
    #: children per generation (default: population size)
    offspring: int | None = None
    #: "pareto": minimise quality and maximise achieved ratio; "single": quality at a fixed ratio
    mode: str = "pareto"
    seed: int = 0
    cxpb: float = 0.9
    mutpb: float = 1.0
    eta_cx: float = 15.0
    eta_mut: float = 20.0
    #: per-gene mutation probability; None = 1 / (size of each gene group)
    indpb: float | None = None
    #: single mode: how many best genomes to write as YAML
    top_k: int = 3
    #: label of the quality metric in plots and logs
    metric: str = "quality"

    def __post_init__(self) -> None:
        check_search_settings(self)  # types, finiteness, ranges
        if self.mode not in ("pareto", "single"):
            raise VacError(f"search mode {self.mode!r}: use 'pareto' or 'single'")
        if self.population < 2:
            raise VacError(f"population must be at least 2, got {self.population}")
        if self.generations < 0:
            raise VacError(f"generations must be >= 0, got {self.generations}")
        if self.offspring is None:
            self.offspring = self.population
        if self.offspring < 1:
            raise VacError(f"offspring must be >= 1, got {self.offspring}")

    def identity(self) -> dict[str, Any]:
        """Settings a resumed run must share with the checkpoint (all but generations)."""
        return {k: v for k, v in asdict(self).items() if k != "generations"}


@dataclass
class SearchResult:
    front: list[dict[str, Any]]
    logbook: list[dict[str, Any]]
    cache: dict[str, dict[str, Any]]
    run_dir: Path
    evaluated: int  # evaluations run by this process (not restored from a checkpoint)
    extras: dict[str, Any] = field(default_factory=dict)


def _jsonable(x):
    return json.loads(json.dumps(x))


class Search:
    """One search run in ``run_dir`` over ``space``, evaluating through the executor's
    ``imap`` (results as they finish) or ``map``.

    ``base_config``: fixed ``CompressConfig`` keys merged under every genome's keys (sent to
    the evaluator and written into the genome YAMLs). ``references``: name -> config of
    hand-made strategies scored once, by the same evaluator, and shown beside the search's best
    (plots, ``front.json``, the per-generation line). ``plots``: write the PNGs each
    generation. ``progress``: a tqdm bar and one line per generation.
    """

    def __init__(self, space: SearchSpace, executor, run_dir, settings: SearchSettings | None = None, *,
                 base_config: dict[str, Any] | None = None, references: dict[str, dict] | None = None,
                 tracker=None, resume: bool = False, progress: bool = True, plots: bool = True):
        self.space, self.executor = space, executor
        self.settings = settings or SearchSettings()
        if self.settings.mode == "single" and not space.single_ratio:
            raise VacError("single-objective search needs a fixed ratio in the space (ratio: 1.8), "
                           f"got the range {space.ratio}")
        self.run_dir = Path(run_dir)
        self.base_config = dict(base_config or {})
        #: hand-made strategies scored once by the same evaluator, for comparison only (never
        #: selected, never bred): name -> config, and name -> result once evaluated
        self.reference_configs = {str(k): dict(v or {}) for k, v in (references or {}).items()}
        self.references: dict[str, dict[str, Any]] = {}
        self.tracker = tracker or NullTracker()
        self.resume, self.progress, self.plots = resume, progress, plots
        self.fitness_cls = FitnessPareto if self.settings.mode == "pareto" else FitnessSingle
        self.variation = Variation(space, eta_cx=self.settings.eta_cx, eta_mut=self.settings.eta_mut,
                                   indpb=self.settings.indpb)
        self.population: list[Individual] = []
        self.cache: dict[str, dict[str, Any]] = {}
        self.logbook: list[dict[str, Any]] = []
        self.front: list[dict[str, Any]] = []
        self.generation = -1
        self.hv_ref: float | None = None
        self.evaluated = 0
        self._gen_stats: dict[str, int] = {}

    # ---- public -------------------------------------------------------------------------

    def run(self) -> SearchResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(self.run_dir)
        state = None
        if has_state(self.run_dir):
            if not self.resume:
                raise VacError(f"{self.run_dir} already holds a search checkpoint; pass --resume to "
                               "continue it, or choose another --out")
            state, skipped = load_state(self.run_dir)
            if skipped:  # always said, progress bar or not: a generation is evaluated again
                print(f"{'; '.join(skipped)}; resuming from the previous checkpoint, generation "
                      f"{state['generation']}: generation {state['generation'] + 1} is evaluated again",
                      file=sys.stderr)
            self._check_compatible(state)
        with isolated_rng():
            self.tracker.start(self.run_dir, self._describe(), resume_id=(state or {}).get("wandb_id"))
        if state is not None:
            self._restore(state)
            if self._evaluate_references():  # added to the recipe after the checkpoint was made
                self._checkpoint()
            with isolated_rng():  # outputs derive from the checkpoint: a kill may have cut them short
                self._write_outputs()
        else:
            self._evaluate_references()
            random.seed(self.settings.seed)
            np.random.seed(self.settings.seed)
            self.population = self._initial_population()
            self._evaluate(self.population, generation=0)
            self.population = tools.selNSGA2(self.population, self.settings.population)
            self.generation = 0
            self._end_generation()
        bar = tqdm(total=self.settings.generations, initial=self.generation, disable=not self.progress,
                   desc="search", unit="gen")
        try:
            while self.generation < self.settings.generations:
                generation = self.generation + 1
                children = make_offspring(self.population, self.settings.offspring, self.variation,
                                          self.settings.cxpb, self.settings.mutpb)
                self._evaluate(children, generation)
                self.population = tools.selNSGA2(self.population + children, self.settings.population)
                self.generation = generation
                self._end_generation(bar)
                bar.update(1)
        finally:
            bar.close()
            with isolated_rng():
                self.tracker.finish()
        return SearchResult(front=self.front, logbook=self.logbook, cache=self.cache, run_dir=self.run_dir,
                            evaluated=self.evaluated)

    # ---- evaluation ---------------------------------------------------------------------

    def _initial_population(self) -> list[Individual]:
        n = self.space.num_layers
        seeds = []
        if self.space.free_order:
            seeds = [self.space.centre_individual(make(n), self.fitness_cls) for make in SEED_ORDERS.values()]
        seeds = seeds[:self.settings.population]
        return seeds + [self.space.random_individual(self.fitness_cls)
                        for _ in range(self.settings.population - len(seeds))]

    def _evaluate_references(self) -> bool:
        """Score the references not yet scored; True when any was."""
        todo = {k: v for k, v in self.reference_configs.items() if k not in self.references}
        if not todo:
            return False
        with isolated_rng():  # an in-process evaluator must not shift the search's random stream
            results = self.executor.map([{**self.base_config, **config} for config in todo.values()])
        for (name, config), result in zip(todo.items(), results):
            self.references[name] = {**result, "config": config}
            if self.progress:
                tqdm.write(f"reference {name}: " + (f"error {result['error']}" if "error" in result else
                           f"{self.settings.metric} {result['quality']:.4g}, achieved ratio {result['ratio']:.3f}"))
        return True

    def _evaluate(self, individuals: list[Individual], generation: int) -> None:
        """Fitness for every individual; only keys never seen before go to the executor."""
        genomes = [self.space.decode(ind) for ind in individuals]
        keys = [g.key() for g in genomes]
        todo: dict[str, dict[str, Any]] = {}
        for key, genome in zip(keys, genomes):
            if key not in self.cache and key not in todo:
                todo[key] = genome.to_config()
        configs = [{**self.base_config, **config} for config in todo.values()]
        # executors with imap report each genome as it finishes; plain map() ones all at once
        stream = self.executor.imap(configs) if hasattr(self.executor, "imap") else iter(self.executor.map(configs))
        results, best = [], math.inf
        with tqdm(total=len(configs), desc=f"gen {generation} evaluations", unit="genome", leave=False,
                  disable=not self.progress or not configs) as bar:
            for result in stream:
                results.append(result)
                if "error" not in result:
                    best = min(best, result["quality"])
                    bar.set_postfix_str(f"best {self.settings.metric} {best:.4g}", refresh=False)
                bar.update(1)
        if len(results) != len(todo):
            raise VacError(f"executor returned {len(results)} results for {len(todo)} genomes")
        failures = [r for r in results if "error" in r]
        if results and len(failures) == len(results) and (generation == 0 or len(results) > 1):
            raise VacError(f"every evaluation of generation {generation} failed; first error: "
                           f"{failures[0]['error']}")
        for (key, config), result in zip(todo.items(), results):
            self.evaluated += 1
            self.cache[key] = {**result, "key": key, "generation": generation, "config": config}
            with isolated_rng():
                self.tracker.log_evaluation(len(self.cache), generation, key, config, result)
        for ind, key in zip(individuals, keys):
            entry = self.cache[key]
            ind.fitness.values = ((entry["quality"], entry["ratio"]) if self.settings.mode == "pareto"
                                  else (entry["quality"],))
        self._gen_stats = {"evals": len(todo), "hits": len(individuals) - len(todo), "failed": len(failures)}

    # ---- per-generation bookkeeping -----------------------------------------------------

    def _archive_front(self) -> list[dict[str, Any]]:
        entries = list(self.cache.values())
        if self.settings.mode == "pareto":
            return nondominated(entries)
        return best_by_quality(entries, self.settings.top_k)

    def _record(self) -> dict[str, Any]:
        fits = [ind.fitness.values for ind in self.population if ind.fitness.values[0] < FAILED_QUALITY]
        qualities = [f[0] for f in fits] or [math.nan]
        ratios = [self.cache[k]["ratio"] for k in (self.space.decode(i).key() for i in self.population)
                  if "error" not in self.cache[k]] or [math.nan]
        if self.hv_ref is None:
            finite = [e["quality"] for e in valid(self.cache.values())]
            self.hv_ref = max(finite) * 1.1 if finite else None
        return {"gen": self.generation, **self._gen_stats, "cache": len(self.cache),
                "q_min": min(qualities), "q_median": statistics.median(qualities), "q_max": max(qualities),
                "r_min": min(ratios), "r_max": max(ratios), "front": len(self.front),
                "hv": hypervolume(self.front, self.hv_ref) if self.hv_ref and self.settings.mode == "pareto"
                else math.nan,
                "best_quality": self.front[0]["quality"] if self.settings.mode == "single" and self.front
                else min((e["quality"] for e in self.front), default=math.nan)}

    def _end_generation(self, bar=None) -> None:
        self.front = self._archive_front()
        record = self._record()
        self.logbook.append(record)
        self._checkpoint()
        with isolated_rng():
            self._write_outputs()
            self.tracker.log_generation(record, self.front)
        if self.progress:
            line = (f"gen {record['gen']}/{self.settings.generations}: {record['evals']} evaluated, "
                    f"{record['hits']} cached, {record['failed']} failed | best {self.settings.metric} "
                    f"{record['q_min']:.4g}, median {record['q_median']:.4g}, max ratio {record['r_max']:.3f}, "
                    f"front {record['front']}" + (f", hv {record['hv']:.4g}" if self.settings.mode == "pareto" else "")
                    + "".join(f" | {name} {ref['quality']:.4g}" for name, ref in self.references.items()
                              if "error" not in ref))
            (bar.write if bar is not None else tqdm.write)(line)

    def _describe(self) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "space": self.space.to_dict(), "base_config": self.base_config,
                "executor": repr(self.executor)}

    # ---- checkpoint / resume ------------------------------------------------------------

    def _checkpoint(self) -> None:
        state = {"version": STATE_VERSION, "generation": self.generation,
                 "settings": asdict(self.settings), "space": self.space.to_dict(),
                 "base_config": self.base_config, "hv_ref": self.hv_ref,
                 "wandb_id": getattr(self.tracker, "run_id", None),
                 "population": [individual_to_dict(ind) for ind in self.population],
                 "cache": self.cache, "front": [e["key"] for e in self.front], "logbook": self.logbook,
                 "references": self.references,
                 "rng": rng_state()}
        save_state(self.run_dir, state)

    def _check_compatible(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise VacError(f"{self.run_dir / STATE_FILE} has checkpoint version {state.get('version')}, "
                           f"this code writes {STATE_VERSION}; start a new run (--out)")
        saved = {k: v for k, v in state["settings"].items() if k != "generations"}
        problems = []
        if saved != _jsonable(self.settings.identity()):
            problems.append(f"settings {saved} vs {self.settings.identity()}")
        if state["space"] != _jsonable(self.space.to_dict()):
            problems.append(f"space {state['space']} vs {self.space.to_dict()}")
        if state.get("base_config", {}) != _jsonable(self.base_config):
            problems.append(f"base config {state.get('base_config')} vs {self.base_config}")
        if problems:
            raise VacError("cannot resume: the checkpoint was made with a different search ("
                           + "; ".join(problems) + "). Only --generations may change on --resume.")

    def _restore(self, state: dict[str, Any]) -> None:
        self.generation = state["generation"]
        self.hv_ref = state["hv_ref"]
        self.cache = state["cache"]
        self.logbook = state["logbook"]
        self.references = {k: v for k, v in state.get("references", {}).items() if k in self.reference_configs
                           and v.get("config") == _jsonable(self.reference_configs[k])}
        self.population = [individual_from_dict(d, self.fitness_cls) for d in state["population"]]
        self.front = self._archive_front()
        set_rng_state(state["rng"])
        if self.progress:
            tqdm.write(f"resumed {self.run_dir} at generation {self.generation} "
                       f"({len(self.cache)} genomes in the cache)")

    # ---- outputs ------------------------------------------------------------------------

    def _write_outputs(self) -> None:
        """Front (or top-k) as compression YAMLs + front.json + plots; derived from the
        checkpoint, so they are rewritten (not appended) each generation."""
        pareto = self.settings.mode == "pareto"
        tmp = self.run_dir / "best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for i, entry in enumerate(self.front):
            name = f"front-{i:02d}-ratio{entry['ratio']:.3f}.yaml" if pareto else f"top-{i:02d}.yaml"
            (tmp / name).write_text(self._genome_yaml(entry))
        shutil.rmtree(self.run_dir / "best", ignore_errors=True)
        tmp.rename(self.run_dir / "best")
        if not pareto and self.front:
            atomic_write_text(self.run_dir / "best.yaml", self._genome_yaml(self.front[0]))
        atomic_write_json(self.run_dir / "front.json", {"generation": self.generation, "mode": self.settings.mode,
                                                         "front": self.front, "references": self.references})
        if self.plots:
            label = self.settings.metric
            refs = {k: v for k, v in self.references.items() if "error" not in v}
            if pareto:
                plot_pareto(list(self.cache.values()), self.front, self.run_dir / "pareto.png",
                            quality_label=f"{label} (lower is better)", references=refs)
            else:
                plot_evaluations(list(self.cache.values()), self.run_dir / "evaluations.png",
                                 quality_label=f"{label} (lower is better)", references=refs)
            plot_fitness(self.logbook, self.run_dir / "fitness.png", pareto=pareto, quality_label=label,
                         references=refs)

    def _genome_yaml(self, entry: dict[str, Any]) -> str:
        header = (f"# vac.search genome {entry['key']} (generation {entry['generation']}): "
                  f"{self.settings.metric} {entry['quality']:.6g}, achieved ratio {entry['ratio']:.4f}\n"
                  f"# use with: python -m vac.compress --config <this file>\n")
        return header + dump_config({**self.base_config, **entry["config"]})
