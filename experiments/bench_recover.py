"""Benchmark of recovery: the bundled SmolLM2-135M compressed at 1.8x, then distilled on CPU.

    python experiments/bench_recover.py                       # compress (default pipeline), distil 20 min
    python experiments/bench_recover.py --student DIR         # reuse a checkpoint from python -m vac.compress
    python experiments/bench_recover.py --minutes 2 --quick   # a smoke run (8 evaluation blocks)

The student comes from the default pipeline (``python -m vac.compress`` with ``--ratio 1.8``,
everything else default) and is cached in ``--work`` (an exported checkpoint, so later runs
skip compression). Distillation runs for a fixed wall-clock budget with the schedule fitted
to it; the teacher is the dense model. Evaluation: the pipeline's held-out blocks (bundled
corpus, evaluation documents, which recovery never trains on), before, every
``--eval-every`` steps, and after.

Prints a markdown table (PPL / KL / top-1 for dense, compressed, recovered, and the PPL
ratio to dense) and writes ``results.json``, ``results.md`` and ``recover_curves.png`` to
``--out``. The target of the issue is recovered PPL <= 1.35x dense.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vac.config import make_config  # noqa: E402
from vac.recover import make_recover_config, recover_  # noqa: E402

HERE = Path(__file__).resolve().parent


#: options of the compression that do not change the compressed model
NOT_KEY = {"out", "overwrite", "evaluate", "eval_samples", "eval_data", "device", "recover_steps"}


def pipeline_key(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in NOT_KEY and not k.startswith("recover")}


def student_checkpoint(args, teacher, tok, calib) -> Path:
    """The student from the default pipeline at --ratio, exported into --work once and reused
    while the pipeline's defaults stay the same (``bench_pipeline.json`` holds them)."""
    from vac.export import export
    from vac.pipeline import compress_

    if args.student:
        directory = Path(args.student)
        if not (directory / "config.json").is_file():
            raise SystemExit(f"--student {directory} has no config.json")
        return directory
    cfg = make_config({"ratio": args.ratio})
    directory = Path(args.work) / f"smollm2-{args.ratio}x"
    stamp = directory / "bench_pipeline.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(pipeline_key(cfg))):
        return directory
    model = copy.deepcopy(teacher)
    t0 = time.perf_counter()
    result = compress_(model, cfg, calib, progress=True)
    print(f"compressed at {cfg.ratio}x ({cfg.method}, {cfg.order}) in {time.perf_counter() - t0:.0f} s", flush=True)

    def extras(tmp: Path) -> None:
        (tmp / "bench_pipeline.json").write_text(json.dumps(pipeline_key(cfg), indent=1))

    export(model, tok, directory, vac_meta={"ranks": result.ranks, "method": cfg.method, "ratio": cfg.ratio,
                                            "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
           overwrite=True, write_extras=extras)
    return directory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="distillation time budget (wall clock)")
    p.add_argument("--ratio", type=float, default=1.8)
    p.add_argument("--student", help="an exported compressed checkpoint to start from (skips compression)")
    p.add_argument("--work", default=str(Path(os.environ.get("VAC_CACHE", Path.home() / ".cache" / "vac")) / "bench"),
                   help="where the compressed student is cached")
    p.add_argument("--out", default=str(HERE / "results" / "recover"), help="results directory")
    p.add_argument("--quick", action="store_true", help="8 evaluation blocks instead of 32 (smoke runs)")
    p.add_argument("--lr", type=float, default=3e-5, help="MLP factors; attention x --attn-lr-mult")
    p.add_argument("--attn-lr-mult", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, default=2, help="a CPU step of 2 x 256 tokens takes ~30 s here")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--periodic-eval-samples", type=int, default=8, help="blocks of the evaluations during training")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"],
                   help="bf16 autocast (CPUs with AMX/AVX512-bf16 run matmuls faster in bf16)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")

    from vac.compress import load_data
    from vac.models import load
    from vac.recover import load_student

    pipeline = make_config({"ratio": args.ratio, **({"eval_samples": 8} if args.quick else {})})
    loaded = load(pipeline.model)
    teacher, tok = loaded.model, loaded.tokenizer
    calib, eval_blocks = load_data(pipeline, tok, teacher)  # the pipeline's own calibration / held-out blocks
    directory = student_checkpoint(args, teacher, tok, calib)
    student, _ = load_student(directory)

    rcfg = make_recover_config(dict(
        steps=0, max_minutes=args.minutes, lr=args.lr, attn_lr_mult=args.attn_lr_mult, batch_size=args.batch_size,
        seq_len=args.seq_len, alpha=args.alpha, temperature=args.temperature, warmup_steps=args.warmup_steps,
        eval_every=args.eval_every, periodic_eval_samples=args.periodic_eval_samples, eval_data=pipeline.eval_data,
        pretrain_data=pipeline.calib_data,
        checkpoint_every=0, device="cpu", mixed_precision=args.mixed_precision, wandb_mode="disabled"))
    out = Path(args.out)
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    res = recover_(student, teacher, tok, rcfg, eval_blocks=eval_blocks, run_dir=run_dir)
    wall = time.perf_counter() - t0

    dense, before, after = res["after"]["dense"], res["before"]["student"], res["after"]["student"]
    rows = [("dense", dense, None), ("compressed (1.8x)", before, before["ppl"] / dense["ppl"]),
            (f"recovered ({args.minutes:g} min)", after, after["ppl"] / dense["ppl"])]
    lines = [f"Recovery of SmolLM2-135M at {args.ratio}x on CPU ({torch.get_num_threads()} threads): "
             f"{res['steps']['kd']} steps, {res['tokens']:,} tokens in {res['timings_s'].get('kd', 0) / 60:.1f} min "
             f"(wall {wall / 60:.1f} min with evaluations); eval: {int(eval_blocks.shape[0])} held-out blocks of "
             f"{int(eval_blocks.shape[1])} tokens", "",
             "| model | PPL | PPL / dense | KL(dense‖model) | top-1 agreement |", "|---|---|---|---|---|"]
    for name, m, ratio in rows:
        kl = f"{m['kl']:.4f}" if "kl" in m else "–"
        top1 = f"{m['top1']:.2%}" if "top1" in m else "–"
        lines.append(f"| {name} | {m['ppl']:.3f} | {'1.000' if ratio is None else f'{ratio:.3f}'} | {kl} | {top1} |")
    curve = ["", "| step | PPL | KL | top-1 |", "|---|---|---|---|"] + [
        f"| {r['global_step']} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.2%} |" for r in res["history"]["eval"]]
    probes = res.get("probes") or {}
    probe_lines = ["", "| probe | teacher | compressed | recovered |", "|---|---|---|---|"] + [
        f"| {t['name']} | " + " | ".join(("pass" if probes[k][i]["passed"] else "fail") if k in probes else "–"
                                         for k in ("teacher", "before", "after")) + " |"
        for i, t in enumerate(probes.get("teacher", []))]
    target = after["ppl"] / dense["ppl"]
    verdict = f"\nrecovered PPL = {target:.3f}x dense (target <= 1.35x: {'met' if target <= 1.35 else 'not met'})"
    text = "\n".join(lines + curve + probe_lines) + "\n" + verdict + "\n"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "student": str(directory), **res}, indent=1,
                                                 default=str))
    if res.get("plot"):
        shutil.copy2(res["plot"], out / "recover_curves.png")
        print(f"curves: {out / 'recover_curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
