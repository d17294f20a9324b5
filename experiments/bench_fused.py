"""Fused projections: factorize a fused matrix (Phi-3's qkv_proj, gate_up_proj) whole, or its parts apart?

A fused linear stacks the rows of projections that read the same input. Factorized whole, its parts
share one ``down`` basis (r x n, stored once); split, each part has its own basis but the ranks can
differ. At the same parameter count, which loses less of the layer's output? Measured on the bundled
SmolLM2-135M's real q/k/v and gate/up weights and real calibration inputs (the bundled mixture), with
activation whitening, where the output error of a truncation is exactly the sum of the dropped squared
singular values of W L (C = L L^T):

* whole: rank r of [W_a; W_b; ...] L, cost r (sum m_i + n);
* split: ranks r_i of each W_i L, cost sum r_i (m_i + n), chosen greedily by dropped error per
  parameter (optimal up to one rank step for these convex spectra) under the same budget.

Reported: the output error relative to ||W X||^2 summed over layers, per group and ratio.

    python experiments/bench_fused.py [--samples 32] [--ratios 1.5 1.8 2.5] [--results experiments/RESULTS.md]
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from vac.data import domain_blocks
from vac.factorize import damped
from vac.models import load

GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "gate_up": ("mlp.gate_proj", "mlp.up_proj")}


def input_covariances(model, blocks: torch.Tensor, batch_size: int = 4) -> dict[tuple[int, str], torch.Tensor]:
    """X X^T of the input of each group (the input of its first member), per layer, float64."""
    cov, hooks = {}, []
    for l, layer in enumerate(model.model.layers):
        for g, members in GROUPS.items():
            def hook(module, args, l=l, g=g):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                cov[(l, g)] = cov.get((l, g), 0) + x.T @ x
            hooks.append(layer.get_submodule(members[0]).register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in blocks.split(batch_size):
            model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return cov


def errors(Ws: list[torch.Tensor], C: torch.Tensor, ratio: float) -> tuple[float, float, float]:
    """(whole error, split error, ||W X||^2) at the budget sum m_i n / ratio."""
    L = torch.linalg.cholesky(damped(C, 1e-2))
    n = C.shape[0]
    ms = [W.shape[0] for W in Ws]
    budget = sum(ms) * n / ratio
    total = sum(float(((W.double() @ L) ** 2).sum()) for W in Ws)
    # whole
    s = torch.linalg.svdvals(torch.cat([W.double() for W in Ws]) @ L) ** 2
    r = int(budget // (sum(ms) + n))
    whole = float(s[r:].sum())
    # split: take singular directions by kept energy per parameter, greedily
    spectra = [torch.linalg.svdvals(W.double() @ L) ** 2 for W in Ws]
    ranks, spent = [0] * len(Ws), 0.0
    while True:
        best, gain = None, 0.0
        for i, sp in enumerate(spectra):
            cost = ms[i] + n
            if ranks[i] < len(sp) and spent + cost <= budget and float(sp[ranks[i]]) / cost > gain:
                best, gain = i, float(sp[ranks[i]]) / cost
        if best is None:
            break
        spent += ms[best] + n
        ranks[best] += 1
    split = sum(float(sp[r:].sum()) for sp, r in zip(spectra, ranks))
    return whole, split, total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32, help="calibration blocks of 256 tokens (bundled mixture)")
    p.add_argument("--ratios", type=float, nargs="+", default=[1.5, 1.8, 2.5])
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    loaded = load("smollm2-135m")
    model = loaded.model
    blocks, _ = domain_blocks("bundled", loaded.tokenizer, args.samples, 256, split="calib", per_domain=False)
    cov = input_covariances(model, blocks)
    lines = ["| group | ratio | whole: error / ‖WX‖² | split: error / ‖WX‖² | split / whole |", "|---|---|---|---|---|"]
    for g, members in GROUPS.items():
        for ratio in args.ratios:
            tw = ts = tt = 0.0
            for l, layer in enumerate(model.model.layers):
                Ws = [layer.get_submodule(m).weight.detach() for m in members]
                w, s, t = errors(Ws, cov[(l, g)], ratio)
                tw, ts, tt = tw + w, ts + s, tt + t
            lines.append(f"| {g} | {ratio} | {tw / tt:.4f} | {ts / tt:.4f} | {ts / tw:.2f} |")
            print(lines[-1], flush=True)
    command = "python experiments/bench_fused.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.results:
        with open(args.results, "a") as f:
            f.write(f"\n`{command}` ({len(model.model.layers)} layers of SmolLM2-135M, {args.samples} x 256 calibration "
                    "tokens of the bundled mixture, whitening, equal parameters):\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
