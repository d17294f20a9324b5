"""Methods x orders x ratios on the bundled model (or --model): PPL, KL, top-1 and seconds, side by side.

The model, calibration and evaluation blocks are loaded once; every run starts from a fresh copy
of the dense model, so rows are comparable. Results are printed as a markdown table and
appended (with the command line) to --results.

    python experiments/bench_methods.py --grid foundation     # svd vs whiten, one-shot, 4 ratios
    python experiments/bench_methods.py --grid core           # the loss-aware core at 1.8x
    python experiments/bench_methods.py --runs "kfac:front-to-back:1.8" "whiten:one-shot:1.8"
    python experiments/bench_methods.py --configs runs/search/smollm2-small/best/*.yaml   # found genomes
    python experiments/bench_methods.py --model "$(python -m vac.zoo path gemma3-270m)" \
        --runs "whiten:one-shot:1.5:allocation=uniform" "kfac:front-to-back:1.5" \
               "whiten:one-shot:1.8:allocation=uniform" "kfac:front-to-back:1.8"   # Gemma 3 270M

A ``--configs`` row is a compression config YAML (a search genome, a preset): its keys apply on
top of the pipeline defaults, and the calibration/evaluation sizes of this command win.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from vac.compress import load_data
from vac.config import load_yaml, make_config
from vac.evaluate import compare
from vac.models import load
from vac.pipeline import compress_

GRIDS = {
    # rows without allocation=... use the pipeline's default (knapsack); method defaults as in vac.config
    "foundation": [f"{m}:one-shot:{r}:allocation=uniform" for r in (1.25, 1.5, 1.8, 2.0) for m in ("svd", "whiten")],
    "core": ["whiten:one-shot:1.8:allocation=uniform",          # SVD-LLM's truncation-aware whitening
             "kfac:one-shot:1.8",                                # K-FAC weights + knapsack, no closed loop
             "kfac:front-to-back:1.8",                           # the default pipeline
             "kfac:front-to-back:1.8:objective=compressed-input",
             "whiten:front-to-back:1.8:allocation=uniform"],
    # the seed's lessons: orders, Fisher exponents, attention vs MLP budgets
    "seed": ["kfac:back-to-front:1.8", "kfac:middle-out:1.8",
             "fisher(e=0.3333):one-shot:1.8:allocation=uniform", "fisher(e=0.5):one-shot:1.8:allocation=uniform",
             "fisher(e=1):one-shot:1.8:allocation=uniform",
             "kfac:front-to-back:1.8:multipliers.attention=0.8", "kfac:front-to-back:1.8:multipliers.mlp=0.8"],
    "ratios": [spec.format(r) for r in (1.5, 2.0)
               for spec in ("whiten:one-shot:{}:allocation=uniform", "kfac:front-to-back:{}")],
}


def parse_run(spec: str) -> dict:
    """'method(key=value,...):order:ratio[:k=v,...]' -> config overrides."""
    parts = spec.split(":")
    method, order, ratio = parts[0], parts[1], float(parts[2])
    over: dict = {"order": order, "ratio": ratio}
    if "(" in method:
        method, args = method[:-1].split("(")
        for kv in args.split(","):
            k, v = kv.split("=")
            key = {"e": "fisher_exponent", "a": "kfac_out_exponent", "b": "kfac_in_exponent"}.get(k, k)
            over[key] = float(v)
    over["method"] = method
    for kv in parts[3:]:
        k, v = kv.split("=")
        value = json.loads(v) if v[:1] in "[{0123456789-" or v in ("true", "false") else v
        if "." in k:  # multipliers.attention=0.8 -> {"multipliers": {"attention": 0.8}}
            k, sub = k.split(".", 1)
            over.setdefault(k, {})[sub] = value
        else:
            over[k] = value
    return over


def _from_yaml(path: str) -> dict:
    """A compression config YAML as overrides; this benchmark's data sizes and I/O keys are dropped."""
    data = load_yaml(path)
    for key in ("calib_samples", "eval_samples", "seq_len", "model", "out", "evaluate"):
        data.pop(key, None)
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=sorted(GRIDS), action="append", default=[])
    p.add_argument("--runs", nargs="*", default=[], help="extra runs: method[(e=..,a=..)]:order:ratio[:key=value]")
    p.add_argument("--configs", nargs="*", default=[], help="extra runs: compression config YAMLs (search genomes)")
    p.add_argument("--model", default="smollm2-135m", help="the dense model: smollm2-135m (bundled), a .gguf, a "
                   "directory or a hub id; e.g. the Gemma 3 270M GGUF of `python -m vac.zoo path gemma3-270m`")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--granularity", default=None, help="default: the pipeline's (vac.config)")
    p.add_argument("--allocation", default=None, help="default: the pipeline's (vac.config)")
    p.add_argument("--results", default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    runs = [(parse_run, r) for g in args.grid for r in GRIDS[g]] + [(parse_run, r) for r in args.runs]
    runs += [(_from_yaml, path) for path in args.configs]
    if not runs:
        p.error("nothing to run: give --grid, --runs and/or --configs")

    base = dict(calib_samples=args.calib_samples, eval_samples=args.eval_samples, seq_len=args.seq_len)
    base.update({k: getattr(args, k) for k in ("granularity", "allocation") if getattr(args, k) is not None})
    defaults = make_config(base)
    loaded = load(args.model)
    dense = loaded.model
    calib, eval_blocks = load_data(make_config(base), loaded.tokenizer, dense)
    rows = []
    header = ("| method | order | ratio | achieved | PPL | PPL / dense | KL | top-1 | compress s |\n"
              "|---|---|---|---|---|---|---|---|---|")
    print(header, flush=True)
    dense_ppl = None
    for read, spec in runs:
        from_yaml = read is _from_yaml
        overrides = read(spec)
        cfg = make_config({**base, **overrides})
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        result = compress_(model, cfg, calib, progress=False)
        seconds = time.perf_counter() - t0
        metrics = compare({"c": model}, eval_blocks, reference=dense, progress=False)
        dense_ppl = metrics["dense"]["ppl"]
        m = metrics["c"]
        label = cfg.method + (f"(e={cfg.fisher_exponent:.3g})" if cfg.method == "fisher" else "") + \
            (f"(a={cfg.kfac_out_exponent:g},b={cfg.kfac_in_exponent:g})" if cfg.method == "kfac" else "")
        extra = {k: v for k, v in overrides.items() if k not in ("order", "ratio", "method", "fisher_exponent",
                                                                 "kfac_out_exponent", "kfac_in_exponent")}
        if from_yaml:
            label = f"{label} {Path(spec).name}"
            extra = {k: v for k, v in extra.items() if k in ("multipliers", "keep_dense")}
        if extra:
            label += " " + ",".join(f"{k}={v}" for k, v in extra.items())
        order = cfg.order if isinstance(cfg.order, str) else "[" + ",".join(map(str, cfg.order)) + "]"
        row = (f"| {label} | {order} | {cfg.ratio} | {result.linear_ratio:.3f} | {m['ppl']:.2f} | "
               f"{m['ppl'] / dense_ppl:.2f}x | {m['kl']:.3f} | {m['top1']:.1%} | {seconds:.0f} |")
        rows.append(row)
        print(row, flush=True)
        del model
    footer = (f"\nModel {Path(args.model).name}. Dense PPL {dense_ppl:.2f} on {eval_blocks.numel()} held-out tokens "
              f"({args.eval_samples} x {args.seq_len}, bundled corpus evaluation split); calibration "
              f"{args.calib_samples} x {args.seq_len}; unless a row says otherwise: granularity "
              f"{defaults.granularity}, allocation {defaults.allocation}, objective {defaults.objective}.")
    print(footer)
    if args.results:
        cmd = "python experiments/bench_methods.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        with open(args.results, "a") as fh:
            fh.write(f"\n`{cmd}` ({time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} CPU threads)\n\n")
            fh.write(header + "\n" + "\n".join(rows) + "\n" + footer + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
