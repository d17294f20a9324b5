"""Command line: ``python -m vac.recover`` loads an exported student, recovers it and re-exports it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from vac.errors import VacError
from vac.recover.checkpoint import _is_fsdp
from vac.recover.config import RecoverConfig, load_recover_yaml, make_recover_config
from vac.recover.loop import make_accelerator, recover_
from vac.recover.training import check_compatible


def build_parser() -> argparse.ArgumentParser:
    from vac.validate import CliParser, yaml_list_type, yaml_mapping_type

    p = CliParser(
        prog="python -m vac.recover", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Recover a VAC-compressed checkpoint by distillation from its dense teacher, and re-export it. "
                    "Several GPUs: `accelerate launch [--config_file configs/accelerate-fsdp-7b.yaml] -m vac.recover ...`.")
    p.add_argument("--student", required=True, help="directory of a checkpoint exported by `python -m vac.compress`")
    p.add_argument("--teacher", required=True, help="the dense model it was compressed from (hub id, directory, "
                   ".gguf, or 'smollm2-135m')")
    p.add_argument("--out", help="output directory of the recovered checkpoint (default: STUDENT-recovered)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous VAC export in --out (a folder holding anything else is refused)")
    p.add_argument("--run-dir", help="checkpoints, curves and W&B files (default: OUT.run)")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --run-dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights of the student (trained: keep float32 master weights under bf16 autocast)")
    p.add_argument("--teacher-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights of the teacher (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--config", help="YAML file of recovery options (configs/recover-default.yaml); the command "
                   "line overrides it")
    from vac.config import task_list_type

    p.add_argument("--eval-tasks", type=task_list_type, default=None,
                   help="after the export, lm-evaluation-harness tasks or suites (vac-offline, olmo3-base, olmo3-think, "
                   "or harness task names, comma-separated) on the teacher, the student and the recovered checkpoint; "
                   "the table goes to OUT/eval.json and the card. Needs pip install 'vac[eval]'")
    p.add_argument("--eval-limit", type=float, default=None,
                   help="with --eval-tasks: at most this many examples per task (a quick look)")
    for f in dataclasses.fields(RecoverConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"] + f" (default: {default})")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            p.add_argument(flag, type=yaml_list_type, **kw)
        elif isinstance(default, dict):
            p.add_argument(flag, type=yaml_mapping_type, **kw)
        elif isinstance(default, float):
            p.add_argument(flag, type=float, **kw)
        elif isinstance(default, int):
            p.add_argument(flag, type=int, **kw)
        else:
            p.add_argument(flag, type=lambda s: None if s.lower() in ("none", "null", "") else s, **kw)
    return p


def load_student(directory: str | Path, dtype: str = "float32"):
    """An exported VAC checkpoint (its own modeling code builds the factorized modules) + tokenizer."""
    from transformers import AutoModelForCausalLM

    from vac.checks import scan_safetensors
    from vac.models import DTYPES, load_tokenizer
    from vac.validate import check_student

    d = Path(directory).expanduser()
    check_student(d)
    scan_safetensors(d)  # a NaN in the student would only show as a NaN loss
    tok = load_tokenizer(d)
    try:
        model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=DTYPES[dtype])
    except Exception as e:
        raise VacError(f"could not load the student from {d} ({type(e).__name__}: {e})") from e
    model.config.use_cache = False
    return model.eval(), tok


def run_cli(args: argparse.Namespace, rcfg: RecoverConfig) -> int:
    from vac import __version__
    from vac.evaluate import merge_model_evaluation
    from vac.data import evaluation_blocks
    from vac.export import export
    from vac.files import write_json
    from vac.models import load
    from vac.public import public
    from vac.validate import validate_recover

    student_dir = Path(args.student).expanduser()
    out = Path(args.out).expanduser() if args.out else student_dir.with_name(student_dir.name + "-recovered")
    run_dir = Path(args.run_dir).expanduser() if args.run_dir else out.with_name(out.name + ".run")
    validate_recover(args, rcfg, out, run_dir)  # inputs, data, --out and --run-dir before loading anything
    if args.eval_limit is not None and not args.eval_tasks:
        raise VacError("--eval-limit limits --eval-tasks, which is not given; add --eval-tasks or drop --eval-limit")
    if args.eval_limit is not None and not args.eval_limit > 0:
        raise VacError(f"--eval-limit must be > 0 (a count, or a fraction below 1), got {args.eval_limit}")
    if args.eval_tasks:
        from vac.harness import check_tasks

        check_tasks(args.eval_tasks)  # the extra is installed and the names are known, before training
        if student_dir.name == out.name or "dense" in (student_dir.name, out.name):
            raise VacError(f"--eval-tasks puts the student ({student_dir.name!r}) and --out ({out.name!r}) in one table "
                           "by folder name: give --out a name of its own (not 'dense')")
    acc = make_accelerator(rcfg)
    if args.eval_tasks and acc.num_processes > 1:
        raise VacError(f"--eval-tasks runs on one process, and this run has {acc.num_processes}: drop it and run "
                       f"`python -m vac.evaluate {student_dir} {out} --reference {args.teacher} --tasks ...` afterwards")
    student, tok = load_student(student_dir, args.dtype)
    tdtype = args.teacher_dtype
    if tdtype == "auto":
        tdtype = "bfloat16" if acc.device.type == "cuda" else "float32"
    teacher_loaded = load(args.teacher, tdtype, "cpu")
    check_compatible(student, teacher_loaded.model, tok, teacher_loaded.tokenizer)
    eval_blocks = eval_groups = None
    if rcfg.eval_samples:
        shared = rcfg.eval_data in (rcfg.pretrain_data, rcfg.chat_data)
        eval_blocks, eval_groups = evaluation_blocks(rcfg.eval_data, tok, rcfg.eval_samples, rcfg.seq_len,
                                                     shared=shared, seed=rcfg.seed)
    result = recover_(student, teacher_loaded.model, tok, rcfg, eval_blocks=eval_blocks, eval_groups=eval_groups,
                      run_dir=run_dir, resume=args.resume, accelerator=acc)
    if result["interrupted"]:
        print(f"stopped by signal; checkpoint in {run_dir}. Continue with the same command plus --resume",
              file=sys.stderr)
        return 128 + (result["signal"] or signal.SIGINT)
    if _is_fsdp(acc):  # gather the sharded weights into one full model on the main process
        full = acc.get_state_dict(acc._models[0])
        if acc.is_main_process:
            student, _ = load_student(student_dir, args.dtype)
            student.load_state_dict(full)
    if not acc.is_main_process:
        return 0
    student.to("cpu")
    prior = student_dir / "report.json"
    report = json.loads(prior.read_text()) if prior.is_file() else {"vac_version": __version__,
                                                                    "base_model": teacher_loaded.base_model}
    report["recovery"] = {"student": str(student_dir), "teacher": args.teacher, **result}
    if result["after"]:
        ev = report.get("evaluation") or {}
        same = (ev.get("data"), ev.get("tokens")) == (rcfg.eval_data, result["after"]["dense"]["tokens"])
        if not same:  # the compression's figures are on other blocks: report this run's before and after
            ev = {"data": rcfg.eval_data, "split": "eval", "seq_len": rcfg.seq_len,
                  "tokens": result["after"]["dense"]["tokens"], "dense": result["after"]["dense"],
                  **({k: result["after"][k] for k in ("domains", "mean") if k in result["after"]})}
            if result["before"]:
                merge_model_evaluation(ev, result["before"], "student", "compressed")
        report["evaluation"] = ev
        merge_model_evaluation(ev, result["after"], "student", "recovered")
    vac_meta = dict(student.config.vac)
    vac_meta["recovered"] = {"teacher": args.teacher, "steps": result["steps"], "tokens": result["tokens"]}
    report, vac_meta = public(report), public(vac_meta)  # no local paths in what gets published

    def extras(tmp: Path) -> None:
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(_prior_markdown(student_dir) + recovery_markdown(result))
        if result.get("plot"):
            shutil.copy2(result["plot"], tmp / "recover_curves.png")

    verify = eval_blocks[:1, :64] if eval_blocks is not None else None
    export(student, tok, out, vac_meta=vac_meta, overwrite=args.overwrite, write_extras=extras, verify_ids=verify)
    print(recovery_markdown(result))
    print(f"wrote {out}")
    if args.eval_tasks:
        from vac.evalcli import evaluate_export

        del student, teacher_loaded
        acc.free_memory()  # the optimizer state and prepared models, before the harness loads its own
        evaluate_export([student_dir, out], args.teacher, args.eval_tasks, args.eval_limit, rcfg.device, into=out)
    return 0


def _prior_markdown(student_dir: Path) -> str:
    p = student_dir / "report.md"
    return p.read_text() + "\n" if p.is_file() else ""


def recovery_markdown(result: dict) -> str:
    lines = ["## Recovery", ""]
    steps = ", ".join(f"{k} {v}" for k, v in result["steps"].items())
    lines += [f"- steps: {steps}; tokens: {result['tokens']:,}; T = {result['config']['temperature']}, "
              f"alpha = {result['config']['alpha']}, lr {result['config']['lr']:g} "
              f"(attention x{result['config']['attn_lr_mult']:g})", ""]
    if result["before"] and result["after"]:
        b, a = result["before"], result["after"]
        lines += ["| model | PPL | KL(dense‖model) | top-1 agreement |", "|---|---|---|---|",
                  f"| dense | {a['dense']['ppl']:.3f} | – | – |"]
        for name, m in (("compressed", b["student"]), ("recovered", a["student"])):
            lines.append(f"| {name} | {m['ppl']:.3f} | {m['kl']:.4f} | {m['top1']:.2%} |")
        lines.append("")
    if result.get("probes"):
        pr = result["probes"]
        kinds = [k for k in ("teacher", "before", "after") if k in pr]
        lines += ["| behaviour probes passed | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|",
                  "| greedy, chat template | " + " | ".join(f"{sum(r['passed'] for r in pr[k])} / {len(pr[k])}"
                                                      for k in kinds) + " |", ""]
        if "teacher" in pr and "after" in pr:
            lost = [t["name"] for t, a in zip(pr["teacher"], pr["after"]) if t["passed"] and not a["passed"]]
            lines += [f"Passed by the teacher, failed after recovery: {', '.join(lost) or 'none'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from vac.validate import one_line

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = build_parser().parse_args(argv)
        opts = {f.name: getattr(args, f.name) for f in dataclasses.fields(RecoverConfig) if hasattr(args, f.name)}
        values = load_recover_yaml(args.config) if args.config else {}
        values.update(opts)  # the command line wins over the YAML file
        rcfg = make_recover_config(values)
        return run_cli(args, rcfg)
    except VacError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
