"""Calibration domain x evaluation domain on the bundled model: how far does quality carry?

Every row compresses the bundled SmolLM2-135M at one ratio from a fresh copy of the dense model,
calibrated on one selection of the bundled corpus (a single domain, the mixture, or the mixture
without one domain), and is evaluated on the evaluation split of **every** domain (the same blocks
for every row; calibration and evaluation never share a document). Cells are PPL / dense PPL on
that domain; ``mean`` weighs the domains equally.

    # the matrix: each domain and the mixture, one-shot whitening (SVD-LLM) and the default
    python experiments/bench_domains.py --rows single mixture
    # leave one domain out: calibrate on the mixture without d, evaluate on d (default method)
    python experiments/bench_domains.py --rows lodo --methods default
    # calibration size for the default on the mixture (16k, 64k, 256k tokens), with time per stage
    python experiments/bench_domains.py --rows sizes --methods default
    # a candidate default: overrides for every row, leave-one-out on two domains only
    python experiments/bench_domains.py --rows mixture lodo --domains code encyclopedia --methods default --set damp=0.1
    # no calibration blocks written by the model itself (--own-samples 0, vac/selfgen.py); the
    # 'generated' row calibrates on the model's own text alone
    python experiments/bench_domains.py --rows lodo generated --domains news code --methods default --set own_samples=0

``--results FILE`` appends the tables (with the command line) to FILE. The leave-one-out table
sets each domain's out-of-domain cell beside its in-domain one (calibrated on that domain alone)
when both were run in the same invocation (``--rows single lodo``). ``--json FILE`` keeps every row
(cells, tokens, seconds per stage). ``--plot DIR`` draws ``DIR/matrix.png`` (calibration x evaluation
domain, log colour) and, for the 'sizes' rows, ``DIR/sizes.png`` (PPL / dense per domain and seconds
per stage against calibration tokens); ``--replot FILE...`` draws them again, without compressing,
from the rows this script printed (its logs, or tables pasted into a markdown file):

    python experiments/bench_domains.py --replot run1.log run2.log --plot figures/
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

import torch
import yaml

from vac.config import make_config
from vac.corpus import DOMAINS
from vac.compress import with_own_text
from vac.data import domain_blocks, token_blocks
from vac.evaluate import compare
from vac.models import load
from vac.pipeline import compress_
from vac.selfgen import generated_blocks

METHODS = {
    # SVD-LLM's whitening, one-shot, on the corpus alone (as published)
    "whiten": dict(method="whiten", order="one-shot", allocation="uniform", own_samples=0),
    "default": {},                                                            # the pipeline's defaults
}
SIZES = (64, 256, 1024)  # calibration blocks of 256 tokens: 16k, 64k, 256k tokens


def calibration_sources(rows: list[str], domains: list[str], sizes=SIZES) -> list[tuple[str, str, int | None]]:
    """(row kind, source, calibration blocks or None for the default) for the requested row sets;
    ``domains`` limits the single-domain and leave-one-out rows."""
    out = []
    if "single" in rows:
        out += [("single", f"bundled:{d}", None) for d in domains]
    if "mixture" in rows:
        out.append(("mixture", "bundled", None))
    if "lodo" in rows:
        out += [("lodo", f"bundled:-{d}", None) for d in domains]
    if "sizes" in rows:
        out += [("sizes", "bundled", n) for n in sizes]
    if "generated" in rows:
        out.append(("generated", "generated", None))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=["single", "mixture", "lodo", "sizes", "generated"], default=["single", "mixture"])
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["whiten", "default"])
    p.add_argument("--domains", nargs="+", choices=list(DOMAINS), default=list(DOMAINS),
                   help="limit the single-domain and leave-one-out rows to these domains")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every row (a candidate default), e.g. damp=0.1 fisher_samples=32")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES),
                   help="calibration blocks for the 'sizes' rows (of --seq-len tokens)")
    p.add_argument("--ratio", type=float, default=1.8)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=16, help="evaluation blocks per domain")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--results", default=None, help="append the tables to this markdown file")
    p.add_argument("--json", default=None, help="also write every row (cells, tokens, seconds per stage) here")
    p.add_argument("--plot", default=None, metavar="DIR", help="draw matrix.png (and sizes.png) into DIR")
    p.add_argument("--replot", nargs="+", default=None, metavar="FILE",
                   help="no compression: read the rows this script printed from FILE(s) and draw them (with --plot)")
    args = p.parse_args(argv)
    if args.replot is not None:
        if not args.plot:
            p.error("--replot draws figures: give --plot DIR")
        if args.json or args.results:
            p.error("--replot compresses nothing, so there is nothing new for --json or --results to write")
        rows = [r for f in args.replot for r in parse_rows(Path(f).read_text(errors="replace"))]
        if not rows:
            p.error(f"no rows printed by this script in {', '.join(args.replot)}")
        for path in plot(rows, Path(args.plot)):
            print(f"wrote {path}")
        return 0
    overrides = {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        overrides[key.replace("-", "_")] = yaml.safe_load(value)

    loaded = load("smollm2-135m")
    dense, tok = loaded.model, loaded.tokenizer
    eval_blocks, groups = domain_blocks("bundled", tok, args.eval_samples, args.seq_len, split="eval")
    domains = list(DOMAINS)
    header = "| method | calibrated on | tokens | " + " | ".join(domains) + " | mean | compress s |"
    rule = "|---|---|---|" + "---|" * (len(domains) + 2)
    print(header + "\n" + rule, flush=True)
    rows, cells, records = [], {}, []
    own_needed = max([args.calib_samples if "generated" in args.rows else 0]
                     + [make_config({"calib_samples": n or args.calib_samples, **METHODS[m], **overrides}).own_samples
                        for m in args.methods for _, _, n in calibration_sources(args.rows, args.domains, args.sizes)])
    own = torch.empty((0, args.seq_len), dtype=torch.long)
    if own_needed:  # the model's own text, sampled once; a row with k own blocks takes the first k
        t0 = time.perf_counter()
        own = generated_blocks(dense, tok, own_needed, args.seq_len, progress=True)
        print(f"sampled {len(own)} x {args.seq_len} tokens from the model in {time.perf_counter() - t0:.0f} s",
              flush=True)
    for method in args.methods:
        for kind, source, n_calib in calibration_sources(args.rows, args.domains, args.sizes):
            if kind == "sizes" and method != "default":
                continue
            n = n_calib or args.calib_samples
            cfg = make_config({"ratio": args.ratio, "calib_samples": n, "seq_len": args.seq_len,
                               "calib_data": "bundled" if source == "generated" else source, **METHODS[method],
                               **overrides, **({"own_samples": n} if source == "generated" else {})})
            k = cfg.own_samples  # the CLI's mixture (vac.compress.load_data_by_domain and with_own_text)
            corpus = token_blocks(source, tok, n - k, args.seq_len, split="calib") if n > k else own[:0]
            calib = with_own_text(corpus, own[:k])
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            result = compress_(model, cfg, calib, progress=False)
            seconds = time.perf_counter() - t0
            metrics = compare({"c": model}, eval_blocks, reference=dense, groups=groups, progress=False)
            ratios = {d: metrics["domains"][d]["c"]["ppl"] / metrics["domains"][d]["dense"]["ppl"] for d in domains}
            if kind != "sizes":  # the sizes rows share their source with the mixture row: not in the matrix
                cells[(method, source)] = ratios
            stages = ", ".join(f"{k} {v:.0f}" for k, v in result.timings.items())
            label = source.replace("bundled:-", "all but ").replace("bundled:", "").replace("bundled", "mixture")
            label += "".join(f", {k}={v}" for k, v in overrides.items())
            label += f" + {cfg.own_samples} own" if cfg.own_samples and source != "generated" else ""
            row = (f"| {method} | {label} | {n * args.seq_len:,} | " + " | ".join(f"{ratios[d]:.2f}x" for d in domains)
                   + f" | **{metrics['mean']['c']['ppl_ratio']:.2f}x** | {seconds:.0f} ({stages}) |")
            rows.append(row)
            records.append(dict(method=method, kind=kind, source=source, label=label, tokens=n * args.seq_len,
                                ppl_ratio=ratios, mean=metrics["mean"]["c"]["ppl_ratio"], seconds=seconds,
                                stages=dict(result.timings)))
            print(row, flush=True)
            del model
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(records, fh, indent=1)
    lines = [header, rule] + rows
    dense_ppl = ", ".join(f"{d} {metrics['domains'][d]['dense']['ppl']:.2f}" for d in domains)
    lines += ["", f"Dense PPL per domain: {dense_ppl} ({args.eval_samples} x {args.seq_len} evaluation tokens per "
              f"domain); ratio {args.ratio}."]
    if "lodo" in args.rows:
        lines += ["", "| method | domain | calibrated on it | calibrated on the others | out / in | target <= 1.5 |",
                  "|---|---|---|---|---|---|"]
        for method in args.methods:
            for d in domains:
                inside = cells.get((method, f"bundled:{d}"), {}).get(d)
                outside = cells.get((method, f"bundled:-{d}"), {}).get(d)
                if outside is None:
                    continue
                ratio = f"{outside / inside:.2f}" if inside else "–"
                ok = ("yes" if outside / inside <= 1.5 else "no") if inside else "–"
                lines.append(f"| {method} | {d} | {f'{inside:.2f}x' if inside else '–'} | {outside:.2f}x | {ratio} "
                             f"| {ok} |")
    text = "\n".join(lines)
    print("\n".join(lines[len(rows) + 2:]))
    if args.results:
        cmd = "python experiments/bench_domains.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        with open(args.results, "a") as fh:
            fh.write(f"\n`{cmd}` ({time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} CPU threads)\n\n{text}\n")
    if args.plot:
        for path in plot(records, Path(args.plot)):
            print(f"wrote {path}")
    return 0


_ROW = re.compile(r"^\| (?P<method>\w+) \| (?P<label>[^|]+?) \| (?P<tokens>[\d,]+) \| (?P<cells>(?:\*{0,2}[\d.]+x\*{0,2} \| )+)"
                  r"(?P<seconds>\d+)(?: \((?P<stages>[^)]*)\))? \|$")


def parse_rows(text: str) -> list[dict]:
    """The rows this script printed (``| method | calibrated on | tokens | <domains> | mean | compress s |``),
    as the records ``--json`` writes; the kind (single, mixture, lodo, generated) from the label: a
    'sizes' row reads back as 'mixture', which the size curve takes alike."""
    out = []
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if not m:
            continue
        values = [float(v.strip("*x ")) for v in m["cells"].split("|") if v.strip()]
        if len(values) != len(DOMAINS) + 1:
            continue
        label = m["label"]
        kind = ("lodo" if label.startswith("all but") else "mixture" if label.startswith("mixture")
                else "generated" if label.startswith("generated") else "single")
        stages = {k: float(v) for k, v in (part.split() for part in (m["stages"] or "").split(", ") if part)}
        out.append(dict(method=m["method"], kind=kind, source=label, label=label, tokens=int(m["tokens"].replace(",", "")),
                        ppl_ratio=dict(zip(DOMAINS, values[:-1])), mean=values[-1], seconds=float(m["seconds"]),
                        stages=stages))
    return out


def plot(records: list[dict], out_dir: Path) -> list[Path]:
    """matrix.png: every row against every domain (log colour, cells written in); sizes.png: the
    mixture rows of the default at several calibration sizes, PPL / dense and seconds per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.colors import LogNorm

    times = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x")  # log axes read 2x, 3x, not 2 x 10^0
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    domains = list(DOMAINS)
    if records:
        names = [f"{r['method']}: {r['label']} ({r['tokens'] // 1024}k)" for r in records]
        grid = [[r["ppl_ratio"][d] for d in domains] + [r["mean"]] for r in records]
        top = max(max(row) for row in grid)
        fig, ax = plt.subplots(figsize=(1.1 * (len(domains) + 1) + 4, 0.42 * len(records) + 1.6))
        im = ax.imshow(grid, norm=LogNorm(vmin=1.0, vmax=top), cmap="magma_r",
                       aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.1f}" if v < 100 else f"{v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if math.log(v) > 0.6 * math.log(top) else "black")
            dom = records[i]["label"].removeprefix("all but ").split(" ")[0].rstrip(",")
            if dom in domains:  # the cell the row is about: calibrated on d, or d left out
                ax.add_patch(plt.Rectangle((domains.index(dom) - 0.5, i - 0.5), 1, 1, fill=False, lw=2,
                                           ec="tab:blue"))
        ax.set_xticks(range(len(domains) + 1), domains + ["mean"], rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("evaluated on")
        ax.set_title("PPL / dense PPL at each row's ratio (boxed: the row's own domain)")
        bar = fig.colorbar(im, ax=ax, label="PPL / dense")
        bar.ax.yaxis.set_major_formatter(times)
        bar.ax.yaxis.set_minor_formatter(times)
        fig.tight_layout()
        written.append(out_dir / "matrix.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    sizes = sorted((r for r in records if r["kind"] in ("sizes", "mixture") and r["method"] == "default"),
                   key=lambda r: r["tokens"])
    if len({r["tokens"] for r in sizes}) >= 2:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=(1.2, 1))
        x = [r["tokens"] for r in sizes]
        for d in domains:
            ax.plot(x, [r["ppl_ratio"][d] for r in sizes], marker="o", label=d)
        ax.plot(x, [r["mean"] for r in sizes], marker="s", color="black", lw=2.5, label="mean")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(times)
        ax.yaxis.set_minor_formatter(times)
        ax.set_xticks(x, [f"{t // 1024}k" for t in x])
        ax.set_xlabel("calibration tokens (the mixture)")
        ax.set_ylabel("PPL / dense")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(alpha=0.3, which="both")
        bottom = [0.0] * len(sizes)
        for stage in dict.fromkeys(k for r in sizes for k in r["stages"]):
            h = [r["stages"].get(stage, 0.0) for r in sizes]
            bx.bar(range(len(sizes)), h, bottom=bottom, label=stage)
            bottom = [b + v for b, v in zip(bottom, h)]
        bx.set_xticks(range(len(sizes)), [f"{t // 1024}k" for t in x])
        bx.set_ylabel("compression seconds")
        bx.set_xlabel("calibration tokens")
        bx.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "sizes.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


if __name__ == "__main__":
    raise SystemExit(main())
