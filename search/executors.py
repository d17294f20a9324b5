"""Where evaluations run: local processes or Ray actors, behind one ``map``.

Both executors build the evaluator once per worker from a picklable factory (normally an
:class:`~vac.search.evaluators.EvaluatorSpec`) and keep it, so a worker loads the base
model and calibration data once and then evaluates genome after genome. ``map(configs)``
returns one fitness dict per config, in order (``imap(configs)`` yields them as they finish,
for progress); a genome whose evaluation raises gets a
failed fitness (see :func:`~vac.search.evaluators.safe_evaluate`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterator

from vac.errors import VacError

from .evaluators import safe_evaluate

Factory = Callable[[], Callable[[dict], dict]]


def visible_gpus() -> list[str]:
    """Ids of the CUDA devices this process may use (respecting CUDA_VISIBLE_DEVICES)."""
    try:
        import torch
        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 -- no torch or a broken driver both mean "no GPU"
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in env.split(",") if d.strip()] if env else [str(i) for i in range(count)]
    return ids[:count]


# One evaluator per worker process. This lives at module level only inside pool workers
# (set by the initializer); the parent never touches it.
_WORKER_EVALUATOR = None


def _init_worker(factory: Factory, gpu_queue, cpu_threads: int | None = None) -> None:
    global _WORKER_EVALUATOR
    if gpu_queue is not None:
        # before anything imports torch in this process: pin it to one GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_queue.get()
    if cpu_threads is not None:
        # CPU-only workers share the cores instead of each starting one thread per core
        import torch
        torch.set_num_threads(cpu_threads)
    _WORKER_EVALUATOR = factory()


def _worker_evaluate(config: dict) -> dict:
    return safe_evaluate(_WORKER_EVALUATOR, config)


class LocalExecutor:
    """Evaluations in processes on this machine.

    ``workers``: number of processes; ``None`` = one per visible GPU when there are
    several (each pinned to its own GPU), else one; ``0`` = in this process (no pool; handy
    for tests and debugging). Without GPUs the CPU cores are split evenly between the
    processes (``torch.set_num_threads``). Processes are started with ``spawn`` (CUDA and fork do not mix)
    on the first ``map`` and live until :meth:`close`.
    """

    def __init__(self, factory: Factory, workers: int | None = None):
        self.factory = factory
        self.gpus = visible_gpus() if workers != 0 else []
        if workers is None:
            workers = len(self.gpus) if len(self.gpus) > 1 else 1
        if workers < 0:
            raise VacError(f"--workers must be >= 0, got {workers}")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._evaluator = None

    def __repr__(self) -> str:
        gpus = f", gpus={self.gpus[:self.workers]}" if len(self.gpus) > 1 else ""
        return f"LocalExecutor(workers={self.workers}{gpus})"

    def _start(self) -> ProcessPoolExecutor:
        ctx = mp.get_context("spawn")
        queue = None
        if len(self.gpus) > 1:
            if self.workers > len(self.gpus):
                raise VacError(f"{self.workers} workers for {len(self.gpus)} GPUs: use at most one "
                               "evaluation per GPU (--workers)")
            queue = ctx.Queue()
            for gpu in self.gpus[:self.workers]:
                queue.put(gpu)
        threads = (None if self.gpus or os.environ.get("OMP_NUM_THREADS")  # the user's setting wins
                   else max(1, (os.cpu_count() or 1) // self.workers))
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx,
                                   initializer=_init_worker, initargs=(self.factory, queue, threads))

    def imap(self, configs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Results in the order of ``configs``, each as soon as it (and those before it) is done."""
        if not configs:
            return iter(())
        if self.workers == 0:
            if self._evaluator is None:
                self._evaluator = self.factory()
            return (safe_evaluate(self._evaluator, c) for c in configs)
        if self._pool is None:
            self._pool = self._start()
        return self._pool.map(_worker_evaluate, configs)

    def map(self, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(self.imap(configs))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._evaluator = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _EvaluatorActor:
    """Body of a Ray actor: holds one evaluator (model and data loaded) for its lifetime."""

    def __init__(self, factory: Factory):
        self.evaluator = factory()

    def evaluate(self, config: dict) -> dict:
        return safe_evaluate(self.evaluator, config)

    def ready(self) -> bool:
        return True


class RayExecutor:
    """Evaluations on Ray actors: one per GPU (``gpus_per_actor`` each), or one per
    ``cpus_per_actor`` CPUs when the cluster has no GPU.

    ``address``: an existing cluster (``ray://host:10001`` or ``auto``); ``None`` joins the
    Ray instance this process already started, or starts a local one. On a cluster every
    node must be able to import ``vac`` (install it there, or pass
    ``runtime_env={"working_dir": ...}``).
    """

    def __init__(self, factory: Factory, address: str | None = None, num_actors: int | None = None,
                 gpus_per_actor: float | None = None, cpus_per_actor: float = 1,
                 runtime_env: dict | None = None):
        try:
            import ray
            from ray.util import ActorPool
        except ImportError as exc:
            raise VacError("--executor ray needs Ray: pip install 'vac[ray]'") from exc
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            try:
                ray.init(address=address, runtime_env=runtime_env, log_to_driver=False,
                         include_dashboard=False)
            except ConnectionError as exc:
                raise VacError(f"could not connect to the Ray cluster at {address!r}: {exc}") from exc
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
        if gpus_per_actor is None:
            gpus_per_actor = 1.0 if gpus >= 1 else 0.0
        if num_actors is None:
            num_actors = int(gpus // gpus_per_actor) if gpus_per_actor else int(cpus // cpus_per_actor)
        if num_actors < 1:
            raise VacError(f"the Ray cluster ({resources}) has room for no evaluator actor with "
                           f"{gpus_per_actor} GPU and {cpus_per_actor} CPU each")
        actor_cls = ray.remote(_EvaluatorActor).options(num_gpus=gpus_per_actor, num_cpus=cpus_per_actor)
        self.actors = [actor_cls.remote(factory) for _ in range(num_actors)]
        ray.get([a.ready.remote() for a in self.actors])  # surface construction errors now
        self.num_actors, self.gpus_per_actor = num_actors, gpus_per_actor
        self._pool = ActorPool(self.actors)

    def __repr__(self) -> str:
        return f"RayExecutor(actors={self.num_actors}, gpus_per_actor={self.gpus_per_actor})"

    def imap(self, configs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Results in the order of ``configs``; idle actors pick up the next config."""
        if not configs:
            return iter(())
        return self._pool.map(lambda actor, config: actor.evaluate.remote(config), configs)

    def map(self, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(self.imap(configs))

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            self._ray.kill(actor)
        self.actors = []
        if getattr(self, "_owns_ray", False) and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_executor(kind: str, factory: Factory, *, workers: int | None = None, address: str | None = None,
                  **ray_options) -> LocalExecutor | RayExecutor:
    if kind == "local":
        return LocalExecutor(factory, workers=workers)
    if kind == "ray":
        return RayExecutor(factory, address=address, num_actors=ray_options.pop("num_actors", workers),
                           **ray_options)
    raise VacError(f"unknown executor {kind!r}; use 'local' or 'ray'")
