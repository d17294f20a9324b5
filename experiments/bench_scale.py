"""Memory and time at scale: does the pipeline's memory stay flat with depth, and what do OLMo-3-7B
and -32B need?

Each run is the README's command, ``python -m vac.compress --ratio 1.8 --out ...`` with the default
pipeline, in a fresh child process on a random model saved as safetensors, so its peak resident
memory is its own (``wait4``'s ``ru_maxrss``); per-stage figures come from its ``report.json``.

    # depth-independence: hidden 1024, intermediate 2816, 16 heads, fp32, depths 2, 4 and 8;
    # --baseline-rev runs the same at an older commit, side by side
    python experiments/bench_scale.py depth --depths 2 4 8 --baseline-rev 76874d0
    # the same with the default's own-text sampling (a quarter of the calibration): the whole model
    # is held while it samples, so that stage grows with depth by design
    python experiments/bench_scale.py depth --depths 2 8 --own-samples 4

    # true OLMo-3-7B layer shapes at depths 1, 2, 4 (vocabulary cut to the bundled tokenizer's 49,152),
    # extrapolated to 32 layers; --shape 32b for OLMo-3-32B layers, extrapolated to 64
    python experiments/bench_scale.py shapes --shape 7b --depths 1 2 4

    # on a GPU machine: the full 7B depth in bf16, with the device's peak allocated bytes per stage
    python experiments/bench_scale.py shapes --shape 7b --depths 1 32 --dtype bfloat16 --device cuda

Every run uses the bundled tokenizer and corpus (16 x 256 calibration tokens unless --calib-samples
/ --seq-len say otherwise). Prints a markdown table; ``--results FILE`` appends it there too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "depth": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "32b": dict(hidden_size=5120, intermediate_size=27648, num_attention_heads=40, num_key_value_heads=8),
}
FULL_DEPTH = {"7b": 32, "32b": 64}
GiB = 1 << 30


def make_model(directory: Path, shape: str, depth: int, dtype: str) -> int:
    """A random OLMo-3 model with ``shape``'s layers and the bundled tokenizer; returns one layer's weight bytes.

    Built in a child process so that its memory is not counted in anyone's peak.
    """
    code = f"""
import torch
from transformers import Olmo3Config, AutoModelForCausalLM
from vac.models import _bundled_directory, load_tokenizer
tok = load_tokenizer(_bundled_directory())
cfg = Olmo3Config(**{SHAPES[shape]!r}, num_hidden_layers={depth}, vocab_size=len(tok),
                  layer_types=["full_attention"] * {depth}, max_position_embeddings=4096, tie_word_embeddings=False)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.{dtype})
model.save_pretrained({str(directory)!r}, safe_serialization=True, max_shard_size="2GB")
tok.save_pretrained({str(directory)!r})
print(sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def run_compress(model_dir: Path, out: Path, args: argparse.Namespace, pythonpath: str | None = None) -> dict:
    """One ``vac.compress`` run in a child; returns its peak RSS, wall time and report."""
    cmd = [sys.executable, "-m", "vac.compress", "--model", str(model_dir), "--ratio", "1.8", "--out", str(out),
           "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
           "--eval-samples", str(args.eval_samples), "--device", args.device]
    if pythonpath is None:
        # this tree: sampling the model's own text holds the whole model when it fits (a stage of its own,
        # "generate", before compression); by default this bench measures the layer-at-a-time compression
        cmd += ["--own-samples", str(args.own_samples)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=pythonpath or ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {out.with_suffix('.log')}")
    report = json.loads((out / "report.json").read_text())
    return {"peak_rss": usage.ru_maxrss * 1024, "seconds": seconds, "report": report}


def baseline_tree(rev: str) -> str:
    """A checkout of ``rev`` in a temporary directory, to run the old code side by side."""
    d = tempfile.mkdtemp(prefix="vac-baseline-")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", d, rev], check=True, capture_output=True)
    return d


def depth_mode(args: argparse.Namespace) -> list[str]:
    work = Path(tempfile.mkdtemp(prefix="vac-bench-depth-"))
    trees = [("this commit", None)]
    if args.baseline_rev:
        trees.insert(0, (args.baseline_rev, baseline_tree(args.baseline_rev)))
    rows, results = [], {}
    layer_bytes = 0
    try:
        for depth in args.depths:
            model_dir = work / f"m{depth}"
            layer_bytes = make_model(model_dir, "depth", depth, "float32")
            for name, tree in trees:
                r = run_compress(model_dir, work / f"out-{depth}-{len(results)}", args, pythonpath=tree)
                results[(name, depth)] = r
                print(f"{name} depth {depth}: peak {r['peak_rss'] / GiB:.2f} GiB in {r['seconds']:.0f} s", flush=True)
    finally:
        for _, tree in trees:
            if tree:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", tree], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    lo, hi = min(args.depths), max(args.depths)
    rows.append("| code | " + " | ".join(f"peak RSS, depth {d}" for d in args.depths)
                + f" | growth per layer ({lo} -> {hi}) | / one layer's weights | PPL / dense at depth {hi} |")
    rows.append("|---|" + "---|" * (len(args.depths) + 3))
    for name, _ in trees:
        peaks = [results[(name, d)]["peak_rss"] for d in args.depths]
        slope = (peaks[-1] - peaks[0]) / (hi - lo)
        ev = results[(name, hi)]["report"].get("evaluation", {})
        ppl = ev["compressed"]["ppl"] / ev["dense"]["ppl"] if ev.get("compressed") else float("nan")
        rows.append(f"| {name} | " + " | ".join(f"{p / GiB:.2f} GiB" for p in peaks)
                    + f" | {slope / (1 << 20):.0f} MiB | {slope / layer_bytes:.2f}x | {ppl:.2f}x |")
    rows.append("")
    rows.append(f"One layer's weights: {layer_bytes / (1 << 20):.0f} MiB (fp32). Target: growth <= 1.5x one layer's "
                f"weights per extra layer. Calibration {args.calib_samples} x {args.seq_len} tokens, evaluation "
                f"{args.eval_samples} x {args.seq_len}; the README command with --out (export and reload check "
                "included).")
    last = results[("this commit", hi)]["report"]
    rows.append("")
    rows += stage_table(last, f"this commit, depth {hi}, per stage")
    return rows


def stage_table(report: dict, title: str) -> list[str]:
    rows = [f"{title}:", "", "| stage | seconds | peak host GiB | disk GiB |", "|---|---|---|---|"]
    mem = report.get("memory", {})
    for name, sec in report["timings_s"].items():
        m = mem.get(name, {})
        disk = f"{m['disk_bytes'] / GiB:.2f}" if "disk_bytes" in m else "–"
        host = f"{m['host_bytes'] / GiB:.2f}" if "host_bytes" in m else "–"
        rows.append(f"| {name} | {sec:.1f} | {host} | {disk} |")
    return rows


def shapes_mode(args: argparse.Namespace) -> list[str]:
    from vac.config import make_config
    from vac.dryrun import Shapes, plan

    work = Path(tempfile.mkdtemp(prefix=f"vac-bench-{args.shape}-", dir=args.scratch))
    results = {}
    try:
        for depth in args.depths:
            model_dir = work / f"m{depth}"
            layer_bytes = make_model(model_dir, args.shape, depth, args.dtype)
            r = run_compress(model_dir, work / f"out{depth}", args)
            results[depth] = r
            print(f"{args.shape} depth {depth}: peak {r['peak_rss'] / GiB:.2f} GiB in {r['seconds']:.0f} s", flush=True)
            shutil.rmtree(model_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stages = ("compress/gradient_stats", "compress/allocation", "compress/factorize", "evaluate", "export")
    lo, hi = min(args.depths), max(args.depths)
    rows = ["| depth | peak RSS GiB | peak device GiB | " + " | ".join(f"{s} s" for s in stages) + " | total s |",
            "|---|---|---|" + "---|" * (len(stages) + 1)]
    for d in args.depths:
        t = results[d]["report"]["timings_s"]
        device = max((m.get("device_bytes", 0) for m in results[d]["report"].get("memory", {}).values()
                      if isinstance(m, dict)), default=0)
        rows.append(f"| {d} | {results[d]['peak_rss'] / GiB:.2f} | {device / GiB:.2f} | "
                    + " | ".join(f"{t.get(s, 0):.0f}" for s in stages) + f" | {results[d]['seconds']:.0f} |")
    full = FULL_DEPTH[args.shape]
    slope_mem = (results[hi]["peak_rss"] - results[lo]["peak_rss"]) / (hi - lo)
    per_layer = {s: (results[hi]["report"]["timings_s"].get(s, 0) - results[lo]["report"]["timings_s"].get(s, 0))
                 / (hi - lo) for s in stages}
    mem_full = results[hi]["peak_rss"] + slope_mem * (full - hi)
    rows.append(f"| {full} (extrapolated) | {mem_full / GiB:.2f} | "
                + " | ".join(f"{results[hi]['report']['timings_s'].get(s, 0) + per_layer[s] * (full - hi):.0f}"
                             for s in stages) + " | |")
    rows.append("")
    rows.append(f"Per extra layer: {slope_mem / (1 << 20):.0f} MiB of peak RSS ({slope_mem / layer_bytes:.2f}x one "
                f"layer's {layer_bytes / GiB:.2f} GiB of {args.dtype} weights); seconds per layer: "
                + ", ".join(f"{s} {v:.0f}" for s, v in per_layer.items()) + ".")
    # the dry-run's plan at the same settings and device, next to the measurement
    cfg = make_config(dict(ratio=1.8, calib_samples=args.calib_samples, seq_len=args.seq_len,
                           eval_samples=args.eval_samples, device=args.device))
    from transformers import Olmo3Config

    for d in (hi, full):
        config = Olmo3Config(**SHAPES[args.shape], num_hidden_layers=d, vocab_size=49152, tie_word_embeddings=False,
                             layer_types=["full_attention"] * d, dtype=args.dtype)
        p = plan(cfg, Shapes.of(config), args.device)
        measured = f"{results[d]['peak_rss'] / GiB:.2f} GiB measured" if d in results else "extrapolated above"
        rows.append(f"Dry-run plan at depth {d} on {args.device}: device {p['peak']['device'] / GiB:.2f} GiB, "
                    f"host {p['peak']['host'] / GiB:.2f} GiB ({measured}), disk {p['peak']['disk'] / GiB:.2f} GiB.")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["depth", "shapes"])
    p.add_argument("--depths", type=int, nargs="+", default=None)
    p.add_argument("--shape", choices=["7b", "32b"], default="7b")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the random checkpoint (shapes mode)")
    p.add_argument("--baseline-rev", default=None, help="also run this git revision, side by side (depth mode)")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--own-samples", type=int, default=0,
                   help="of --calib-samples, sequences sampled from the dense model (the 'generate' stage, whole "
                        "model in memory when it fits); 0: the layer-at-a-time stages alone")
    p.add_argument("--device", default="cpu", help="where vac.compress computes: cpu, or cuda on a GPU machine")
    p.add_argument("--scratch", default=None, help="where the random checkpoints go (they are large)")
    p.add_argument("--results", default=None, help="append the table to this markdown file")
    args = p.parse_args()
    args.depths = args.depths or ([2, 4, 8] if args.mode == "depth" else [1, 2, 4])
    rows = depth_mode(args) if args.mode == "depth" else shapes_mode(args)
    text = "\n".join(rows)
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write(f"`{' '.join(sys.argv)}`\n\n{text}\n\n")


if __name__ == "__main__":
    main()
