"""``python -m vac.search``: evolutionary search over compression strategies.

Example::

    python -m vac.search --config configs/search/smollm2-small.yaml
    python -m vac.search --config configs/search/smollm2-small.yaml --resume
    python -m vac.search --config configs/search/olmo3-7b-cluster.yaml --executor ray --address auto
    python -m vac.search --config configs/search/smollm2-small.yaml --evaluator toy --out /tmp/toy

The run directory (``--out``, else ``out:`` of the config) receives ``state.json`` (the
checkpoint), ``front.json``, ``best/*.yaml`` (usable as ``python -m vac.compress --config``),
``pareto.png`` (two objectives) or ``evaluations.png`` (one), ``fitness.png`` and
``search.yaml`` (the resolved config).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from vac.errors import VacError
from vac.validate import CliParser, one_line, validate_search

from .config import SearchConfig
from .executors import make_executor
from .loop import Search
from .tracking import NullTracker, WandbTracker


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m vac.search",
                                description="Evolutionary (NSGA-II) search over compression strategies. "
                                            "Options left out take their value from --config.")
    p.add_argument("--config", required=True, help="search recipe YAML (see configs/search/)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in the run directory")
    p.add_argument("--out", help="run directory (default: 'out' of the config)")
    p.add_argument("--executor", choices=["local", "ray"], help="where evaluations run (default: config)")
    p.add_argument("--address", help="Ray cluster address for --executor ray (e.g. auto, ray://head:10001)")
    p.add_argument("--workers", type=int,
                   help="local: processes (0 = in this process; default one per GPU, else 1); "
                        "ray: number of actors (default one per GPU)")
    p.add_argument("--generations", type=int, help="generations after the initial population")
    p.add_argument("--population", type=int, help="population size")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--evaluator", help="compression | toy | package.module:Class (default: config)")
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-generation lines")
    return p


def resolve(args: argparse.Namespace) -> SearchConfig:
    cfg = SearchConfig.load(args.config)
    settings = {k: getattr(args, k) for k in ("generations", "population", "seed") if getattr(args, k) is not None}
    if "population" in settings and cfg.search.offspring == cfg.search.population:
        settings["offspring"] = settings["population"]  # offspring followed the population: keep it so
    if settings:
        cfg.search = replace(cfg.search, **settings)
    for key in ("out", "executor", "address", "workers", "evaluator"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    return cfg


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        cfg = resolve(args)
        run_dir = Path(cfg.out).expanduser()
        validate_search(cfg, run_dir, args.resume)  # recipe, model, data, run folder: before writing anything
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        if not args.no_progress:
            print(f"vac.search: {args.config} -> {run_dir}\n{resolved}", flush=True)
        (run_dir / "search.yaml").write_text(resolved)
        wandb_opts = dict(cfg.wandb)
        enabled = wandb_opts.pop("enabled", True) and not args.no_wandb
        tracker = WandbTracker(name=run_dir.name, **wandb_opts) if enabled else NullTracker()
        spec = cfg.evaluator_spec()
        if spec.kind == "compression" and cfg.executor == "local":
            # one statistics store for the machine's workers: the dense model is profiled once per run
            spec.options.setdefault("stats_dir", str(run_dir / "stats"))
        executor = make_executor(cfg.executor, spec, workers=cfg.workers, address=cfg.address,
                                 gpus_per_actor=cfg.gpus_per_actor, cpus_per_actor=cfg.cpus_per_actor,
                                 runtime_env=cfg.runtime_env)
        try:
            search = Search(cfg.space, executor, run_dir, cfg.search, base_config=cfg.compress_base,
                            references=cfg.references,
                            tracker=tracker, resume=args.resume, progress=not args.no_progress)
            result = search.run()
        finally:
            executor.close()
    except VacError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume (the last finished generation is saved)", file=sys.stderr)
        return 130
    print(f"done: {len(result.front)} genome(s) on the front, {result.evaluated} evaluated in this run; "
          f"YAMLs in {run_dir / 'best'}")
    return 0
