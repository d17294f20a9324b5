"""Benchmark of the rank allocator (multiple-choice knapsack) on LLM-shaped instances.

Instances are built from matrix shapes of real decoder layers (q, k, v, o, gate, up, down)
with synthetic weighted spectra: sigma_k = s * (k + k0)^-alpha with a per-matrix exponent
alpha and a per-matrix sensitivity s drawn log-uniformly over six orders of magnitude, so
the rank/loss curves are convex, decreasing and span many orders of magnitude, as the tail
energies of real weighted spectra do. Options are the grid-8 ranks cheaper than dense
(evenly subsampled to a fixed count where asked) plus dense; budget = dense / ratio.

    python experiments/bench_knapsack.py            # all instances
    python experiments/bench_knapsack.py --quick    # skip the 1000-matrix stress instance

Prints a markdown table: CP-SAT, greedy, and the exact DP on a small instance.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vac.allocate import Group, dp_exact, greedy, rank_options, solve  # noqa: E402
from vac.factorize import tail_energy  # noqa: E402
from ortools.sat.python import cp_model  # noqa: E402,F401  (import cost kept out of the timings)

# (name, component, out, in) of one decoder layer
SMOL = [("q", "attention", 576, 576), ("k", "attention", 192, 576), ("v", "attention", 192, 576),
        ("o", "attention", 576, 576), ("gate", "mlp", 1536, 576), ("up", "mlp", 1536, 576),
        ("down", "mlp", 576, 1536)]
LLAMA7B = [("q", "attention", 4096, 4096), ("k", "attention", 4096, 4096), ("v", "attention", 4096, 4096),
           ("o", "attention", 4096, 4096), ("gate", "mlp", 11008, 4096), ("up", "mlp", 11008, 4096),
           ("down", "mlp", 4096, 11008)]
GQA8B = [("q", "attention", 4096, 4096), ("k", "attention", 1024, 4096), ("v", "attention", 1024, 4096),
         ("o", "attention", 4096, 4096), ("gate", "mlp", 14336, 4096), ("up", "mlp", 14336, 4096),
         ("down", "mlp", 4096, 14336)]
TINY = [("q", "attention", 48, 48), ("k", "attention", 16, 48), ("o", "attention", 48, 48),
        ("up", "mlp", 96, 48), ("down", "mlp", 48, 96)]


@dataclass
class Instance:
    name: str
    groups: list[Group]
    budget: int


def synthetic_tail(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    k = torch.arange(min(m, n), dtype=torch.float64)
    alpha = 0.3 + 0.9 * torch.rand((), generator=gen, dtype=torch.float64)
    k0 = 1 + 20 * torch.rand((), generator=gen, dtype=torch.float64)
    scale = 10 ** (6 * torch.rand((), generator=gen, dtype=torch.float64) - 3)
    noise = torch.exp(0.05 * torch.randn(len(k), generator=gen, dtype=torch.float64))
    spectrum = torch.sort(scale * (k + k0) ** -alpha * noise, descending=True).values
    return tail_energy(spectrum)


def build(name: str, layer: list, n_groups: int, options: int | None, grid: int, ratio: float,
          seed: int) -> Instance:
    """n_groups matrices cycling through ``layer``'s shapes; ``options`` = ranks kept + dense."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for i in range(n_groups):
        part, comp, m, n = layer[i % len(layer)]
        opts = rank_options(m, n, synthetic_tail(m, n, gen), grid=grid)
        ranks, dense = opts[:-1], opts[-1]
        if options is not None and len(ranks) > options - 1:
            # evenly spaced subset of the grid ranks, always keeping the smallest and largest
            idx = sorted({round(j * (len(ranks) - 1) / (options - 2)) for j in range(options - 1)})
            ranks = [ranks[j] for j in idx]
        groups.append(Group(f"layers.{i // len(layer)}.{part}", comp, ranks + [dense]))
    dense_total = sum(g.options[-1].params for g in groups)
    return Instance(name, groups, int(dense_total / ratio))


def timed(fn, *args, **kwargs):
    """(result, cpu seconds of this process, all threads): wall seconds are in result.seconds.
    CPU time is the load-robust number when other jobs share the cores."""
    cpu = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - cpu


def row(inst: Instance, solver: str, alloc, cpu: float, best: float) -> str:
    n_opt = sum(len(g.options) for g in inst.groups) / len(inst.groups)
    rel = (alloc.total_loss - best) / best if best > 0 else 0.0
    return (f"| {inst.name} | {len(inst.groups)} x {n_opt:.0f} | {solver} | {alloc.status} | "
            f"{alloc.total_loss:.6g} | {rel:.1e} | {alloc.gap:.1e} | {alloc.seconds:.2f} | {cpu:.2f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the 1000 x 64 stress instance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratio", type=float, default=1.8, help="budget = dense params / ratio")
    ap.add_argument("--workers", type=int, default=None, help="CP-SAT workers (default: all cores)")
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--seeds", type=int, default=None,
                    help="instances per family in the robustness table (default 5, --quick 3)")
    args = ap.parse_args(argv)

    # (instance, CP-SAT relative gap limit): 0 demands a proof of optimality
    cases = [
        (build("tiny-dp", TINY, 12, None, 4, args.ratio, args.seed), 0.0),
        (build("smol-30L", SMOL, 210, None, 8, args.ratio, args.seed + 1), 0.0),
        (build("llama7b-32L", LLAMA7B, 224, 32, 8, args.ratio, args.seed + 2), 0.0),
        (build("llama7b-32L", LLAMA7B, 224, 32, 8, args.ratio, args.seed + 2), 1e-4),
    ]
    if not args.quick:
        cases.append((build("gqa8b-1000", GQA8B, 1000, 64, 8, args.ratio, args.seed + 3), 1e-4))

    print(f"ratio {args.ratio}, workers {args.workers or len(os.sched_getaffinity(0))}, "
          f"time limit {args.time_limit} s, seed {args.seed}, load average {os.getloadavg()[0]:.1f}\n")
    print("| instance | groups x options | solver | status | objective | vs best | gap vs bound | wall s | cpu s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for inst, rel_gap in cases:
        results = [(f"CP-SAT gap<={rel_gap:g}",
                    *timed(solve, inst.groups, inst.budget, time_limit=args.time_limit, workers=args.workers,
                           rel_gap=rel_gap)),
                   ("greedy", *timed(greedy, inst.groups, inst.budget))]
        if inst.name == "tiny-dp":
            results.append(("dp_exact", *timed(dp_exact, inst.groups, inst.budget)))
        best = min(a.total_loss for _, a, _ in results)
        for label, alloc, cpu in results:
            print(row(inst, label, alloc, cpu, best), flush=True)

    # robustness: the same families over several seeds (CP-SAT timings vary run to run)
    n_seeds = args.seeds or (3 if args.quick else 5)
    families = [("llama7b-32L", LLAMA7B, 224, 32, 0.0)]
    if not args.quick:
        families.append(("gqa8b-1000", GQA8B, 1000, 64, 1e-4))
    print("\n| family | groups x options | CP-SAT gap limit | seeds | statuses | max gap | median wall s | max wall s "
          "| max cpu s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, layer, n_groups, n_opts, rel_gap in families:
        allocs, cpus = [], []
        for k in range(n_seeds):
            inst = build(name, layer, n_groups, n_opts, 8, args.ratio, 100 + k)
            alloc, cpu = timed(solve, inst.groups, inst.budget, time_limit=args.time_limit, workers=args.workers,
                               rel_gap=rel_gap)
            allocs.append(alloc)
            cpus.append(cpu)
        secs = sorted(a.seconds for a in allocs)
        statuses = ", ".join(f"{s} x{sum(a.status == s for a in allocs)}"
                             for s in ("OPTIMAL", "FEASIBLE", "GREEDY") if any(a.status == s for a in allocs))
        print(f"| {name} | {n_groups} x {n_opts} | {rel_gap:g} | {n_seeds} | {statuses} | "
              f"{max(a.gap for a in allocs):.1e} | {secs[len(secs) // 2]:.2f} | {secs[-1]:.2f} | {max(cpus):.2f} |",
              flush=True)


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"\ntotal {time.perf_counter() - t:.1f} s")
