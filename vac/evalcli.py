"""``python -m vac.evaluate``: checkpoints against their dense model, in one table per kind of evidence.

Three kinds, each optional: VAC's own held-out perplexity / KL / top-1 (per domain of the bundled
corpus), behaviour probes (dozens of prompts, pass counts per model), and downstream tasks through
lm-evaluation-harness (:mod:`vac.harness`). Everything lands in ``eval.json`` of the first
checkpoint (merged with an earlier one: a part this run did not compute is kept) and, rendered from
that record, in a replaceable section of its model card.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
from pathlib import Path

from vac.errors import VacError
from vac.evaluate import CARD_BEGIN, CARD_END, _by_domain, compare, evaluation_table

REFERENCE = "dense"


def parser() -> argparse.ArgumentParser:
    from vac.harness import SUITES

    suites = "; ".join(f"{name}: {s.description}" for name, s in SUITES.items())
    p = argparse.ArgumentParser(prog="python -m vac.evaluate", description=(
        "Evaluate VAC checkpoints (e.g. compressed, then recovered) and, with --reference, the dense model they came "
        "from: held-out perplexity per domain (PPL / dense, KL, top-1), behaviour probes, and with --tasks "
        "lm-evaluation-harness tasks. Writes eval.json into the first checkpoint and the tables into its model card."))
    p.add_argument("checkpoints", nargs="+", help="VAC checkpoint folders (e.g. compressed, then recovered)")
    p.add_argument("--reference", default=None, help="the dense model: a hub id, a local folder, a .gguf, or "
                                                     "smollm2-135m (the bundled model)")
    p.add_argument("--data", default="bundled", help="evaluation text, as --eval-data of vac.compress")
    p.add_argument("--eval-samples", type=int, default=32, help="blocks (of every domain, for a bundled mixture)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (perplexity and tasks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help=f"lm-evaluation-harness task names or suites ({suites}); needs pip install 'vac[eval]'")
    p.add_argument("--limit", type=float, default=None,
                   help="with --tasks: at most this many examples per task (a fraction if < 1), for a quick look")
    p.add_argument("--num-fewshot", type=int, default=None, help="with --tasks: few-shot examples (default: each "
                                                                 "task's own)")
    p.add_argument("--no-perplexity", action="store_true", help="skip the held-out perplexity")
    p.add_argument("--no-probes", action="store_true", help="skip the behaviour probes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-card", action="store_true", help="write eval.json only, leave the model card alone")
    return p


def main(argv: list[str] | None = None) -> int:
    from vac.public import public

    args = parser().parse_args(argv)
    try:
        # the command as a reader of the card can use it: local paths become local:NAME
        words = [public(a) for a in (argv if argv is not None else sys.argv[1:])]
        return run(args, command="python -m vac.evaluate " + " ".join(shlex.quote(w) for w in words))
    except VacError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def check_args(args) -> tuple[list[Path], list[str], list[str]]:
    """(checkpoint folders, their names, tasks): every check that needs no model, before any is loaded."""
    from vac.data import check_source
    from vac.harness import check_tasks
    from vac.validate import check_student

    if args.eval_samples < 1 or args.seq_len < 2 or args.batch_size < 1:
        raise VacError("--eval-samples and --batch-size must be >= 1 and --seq-len >= 2")
    if args.tasks is None:
        for flag, value in (("--limit", args.limit), ("--num-fewshot", args.num_fewshot)):
            if value is not None:
                raise VacError(f"{flag} applies to --tasks; give --tasks (e.g. --tasks vac-offline) or drop {flag}")
    if args.limit is not None and not args.limit > 0:
        raise VacError(f"--limit must be > 0 (a count, or a fraction below 1), got {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise VacError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.no_perplexity and args.no_probes and args.tasks is None:
        raise VacError("nothing to evaluate: --no-perplexity and --no-probes without --tasks")
    dirs = [Path(d).expanduser() for d in args.checkpoints]
    for d in dirs:
        check_student(d, flag="checkpoint")
    if not args.no_perplexity:
        check_source(args.data, "--data")
    names = list(dict.fromkeys(d.name or str(d) for d in dirs))
    if len(names) != len(dirs) or REFERENCE in names:
        raise VacError(f"checkpoints need distinct folder names other than {REFERENCE!r} (the reference's column)")
    tasks = check_tasks(args.tasks) if args.tasks is not None else []
    return dirs, names, tasks


def evaluate_export(checkpoints: list[Path], reference: str, tasks: list[str], limit: float | None = None,
                    device: str = "auto", into: Path | None = None) -> dict:
    """The harness tasks of ``vac.compress --eval-tasks`` / ``vac.recover --eval-tasks``: the dense
    model and the checkpoints, recorded in ``into`` (default: the first checkpoint). Returns the record."""
    from vac.public import public

    argv = [str(c) for c in checkpoints] + ["--reference", reference, "--tasks", *tasks, "--no-perplexity",
                                            "--no-probes", "--device", device]
    if limit is not None:
        argv += ["--limit", str(limit)]
    command = "python -m vac.evaluate " + " ".join(shlex.quote(public(w)) for w in argv)
    run(parser().parse_args(argv), command=command, into=into)
    import json

    return json.loads(((into or Path(checkpoints[0])) / "eval.json").read_text(encoding="utf-8"))


def run(args, command: str, into: Path | None = None) -> int:
    """Evaluate as ``args`` say; the record and the card section go to ``into`` (default: the first checkpoint).
    An earlier eval.json there is merged when it is about the same models (a part this run skips is kept)."""
    from vac.files import write_json, write_text
    from vac.models import load, resolve_device
    from vac.public import public
    from vac.recover.cli import load_student

    dirs, names, tasks = check_args(args)
    device = str(resolve_device(args.device))
    into = Path(into) if into is not None else dirs[0]
    record = _earlier_record(into)
    if (record.get("checkpoints"), record.get("reference")) != (names, public(args.reference)):
        record = {}  # another set of models: nothing of that evaluation belongs beside this one
    record.update(command=command, checkpoints=names, reference=public(args.reference))

    dtype = "float32" if device == "cpu" else "bfloat16"  # bf16 arithmetic is slow on CPUs
    reference = load(args.reference, dtype=dtype, device=device) if args.reference else None
    models, tokenizer = {}, None
    if not (args.no_perplexity and args.no_probes):
        for name, d in zip(names, dirs):
            models[name], tok = load_student(d)
            models[name].to(device)
            tokenizer = tokenizer or tok
        vocab = lambda m: m.get_input_embeddings().weight.shape[0]  # noqa: E731 (configs nest it differently)
        if reference is not None and vocab(reference.model) != vocab(next(iter(models.values()))):
            raise VacError(f"--reference {args.reference} has another vocabulary than the checkpoints; give the "
                           "dense model they were compressed from")
    if not args.no_perplexity:
        record["perplexity"] = _perplexity(args, models, tokenizer, reference)
        record["perplexity_data"] = public(args.data)
        _print(*evaluation_table(record["perplexity"], names), f"perplexity on {args.data}")
    if not args.no_probes:
        record["probes"] = _probes(models, tokenizer, reference)
        _print(*probes_table(record["probes"]), "behaviour probes (greedy)")
    models.clear()
    gc.collect()
    if tasks:
        record["tasks"] = _tasks(args, tasks, dirs, names, reference, device)
        record["harness"] = _harness_info(args)
        from vac.harness import tasks_table

        _print(*tasks_table(record["tasks"], ([REFERENCE] if reference else []) + names), "lm-evaluation-harness")
    write_json(into / "eval.json", record)
    card = into / "README.md"
    if not args.no_card:
        text = card.read_text(encoding="utf-8") if card.is_file() else ""
        write_text(card, with_section(text, card_section(record)))
    print(f"wrote {into / 'eval.json'}" + ("" if args.no_card else f" and the tables in {card}"))
    return 0


def _earlier_record(directory: Path) -> dict:
    import json

    path = directory / "eval.json"
    try:
        earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}  # unreadable: replaced by this run's record
    return earlier if isinstance(earlier, dict) else {}


def _perplexity(args, models: dict, tokenizer, reference) -> dict:
    from vac.data import evaluation_blocks

    blocks, groups = evaluation_blocks(args.data, tokenizer, args.eval_samples, args.seq_len, shared=False,
                                       seed=args.seed)
    if reference is not None:
        return compare(models, blocks, reference.model, batch_size=args.batch_size, groups=groups)
    result: dict = {}
    for name, model in models.items():
        one = _by_domain(model, blocks, groups, args.batch_size, progress=True)
        result[name] = one["model"]
        for d, row in (one.get("domains") or {}).items():
            result.setdefault("domains", {}).setdefault(d, {})[name] = row["model"]
    return result


def _probes(models: dict, tokenizer, reference) -> dict:
    """{"probes": [names], "models": {name: {"passed", "total", "passed_of_reference", "records"}}}."""
    from vac.probes import default_probes, run_probes

    probes = default_probes(tokenizer)
    runs = {}
    if reference is not None:
        runs[REFERENCE] = run_probes(reference.model, reference.tokenizer, probes)
    for name, model in models.items():
        runs[name] = run_probes(model, tokenizer, probes)
    ref_passed = {r["name"] for r in runs.get(REFERENCE, []) if r["passed"]}
    out = {"probes": [p.name for p in probes], "models": {}}
    for name, records in runs.items():
        entry = {"passed": sum(r["passed"] for r in records), "total": len(records), "records": records}
        if reference is not None:
            entry["passed_of_reference"] = sum(r["passed"] for r in records if r["name"] in ref_passed)
            entry["reference_passed"] = len(ref_passed)
        out["models"][name] = entry
    return out


def probes_table(probes: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "passed", "of those the reference passes"]
    rows = []
    for name, e in probes["models"].items():
        of_ref = f"{e['passed_of_reference']} / {e['reference_passed']}" if "passed_of_reference" in e else ""
        rows.append([name, f"{e['passed']} / {e['total']}", of_ref])
    return header, rows


def _tasks(args, tasks: list[str], dirs: list[Path], names: list[str], reference, device: str) -> dict:
    from vac.harness import harness_model, run_tasks, suite_settings, tasks_record

    suite = suite_settings(args.tasks)
    results = {}
    if reference is not None:
        print(f"lm-evaluation-harness: {REFERENCE} ({args.reference})")
        lm = harness_model(reference.model, reference.tokenizer, batch_size=args.batch_size, device=device)
        results[REFERENCE] = run_tasks(lm, tasks, limit=_limit(args.limit), suite=suite, num_fewshot=args.num_fewshot,
                                       seed=args.seed)
        del lm
        reference.model.to("cpu")  # not needed on the device while the checkpoints run
    for name, d in zip(names, dirs):
        print(f"lm-evaluation-harness: {name}")
        # the checkpoint's own dtype on a GPU; float32 on a CPU, where bf16 arithmetic is slow
        lm = harness_model(path=d, batch_size=args.batch_size, device=device,
                           dtype="float32" if device == "cpu" else "auto")
        results[name] = run_tasks(lm, tasks, limit=_limit(args.limit), suite=suite, num_fewshot=args.num_fewshot,
                                  seed=args.seed)
        del lm
        gc.collect()
    return tasks_record(results, REFERENCE if reference is not None else None)


def _limit(limit: float | None) -> float | int | None:
    return int(limit) if limit is not None and limit >= 1 else limit


def _harness_info(args) -> dict:
    from importlib.metadata import version

    return {"lm_eval": version("lm_eval"), "tasks_given": list(args.tasks), "limit": _limit(args.limit),
            "num_fewshot": args.num_fewshot}


def _print(header: list[str], rows: list[list[str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    # a log file or a pipe gets the whole table (rich would fit it to 80 columns and cut the cells)
    console = Console() if sys.stdout.isatty() else Console(width=max(120, 16 * len(header)))
    for i, c in enumerate(header):
        table.add_column(c, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for r in rows:
        table.add_row(*r, style="bold" if r[0] in ("mean", "all tokens") else None)
    console.print(table)


# --- the card section ---------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def card_section(record: dict) -> str:
    """The card's evaluation section, rendered from an eval.json record."""
    lines = [CARD_BEGIN, "## Evaluation (`vac.evaluate`)", "", f"`{record['command']}`", ""]
    ref = record.get("reference")
    if "perplexity" in record:
        result = record["perplexity"]
        names = [n for n in record["checkpoints"] if n in result] or [n for n in result if n not in
                                                                       ("dense", "domains", "mean")]
        lines += [f"**Held-out text** (`{record.get('perplexity_data', 'bundled')}`, held-out documents, "
                  f"{result[names[0]]['tokens']:,} predicted tokens per model"
                  + ("; KL is KL(dense ‖ model) per token, top-1 the share of positions where the model's most likely "
                     "next token is the dense model's" if "dense" in result else "") + "):", ""]
        lines += _md_table(*evaluation_table(result, names)) + [""]
    if "probes" in record:
        probes = record["probes"]
        lines += [f"**Behaviour probes**: {len(probes['probes'])} prompts through the chat template, greedy; a probe "
                  "passes when the answer matches its check" + (f" (reference: `{ref}`)" if ref else "") + ".", ""]
        lines += _md_table(*probes_table(probes)) + [""]
        lines += _sample(probes)
    if "tasks" in record:
        from vac.harness import OFFLINE_TASKS, tasks_table

        info = record.get("harness", {})
        names = ([REFERENCE] if ref else []) + record["checkpoints"]
        names = [n for n in names if any(n in e["models"] for e in record["tasks"].values())]
        lines += [f"**lm-evaluation-harness** {info.get('lm_eval', '')} (`--tasks {' '.join(info.get('tasks_given', []))}`"
                  + (f", `--limit {info['limit']}`" if info.get("limit") else "") + "); score ± stderr, retained = model / "
                  "dense:", ""]
        lines += _md_table(*tasks_table(record["tasks"], names, REFERENCE if ref else None)) + [""]
        if any(t in OFFLINE_TASKS for t in record["tasks"]):
            lines += ["Tasks marked *proxy* are VAC's offline multiple-choice tasks from held-out documents of its "
                      "bundled corpus (chance 25%), not published benchmarks.", ""]
    return "\n".join(lines + [CARD_END]) + "\n"


def _sample(probes: dict) -> list[str]:
    """One generation of every model on the first probe, as a reader would see it."""
    models = probes["models"]
    first = next(iter(models.values()))["records"]
    if not first:
        return []
    lines = [f"A chat-template generation (greedy) for the prompt *{first[0]['prompt']}*:", ""]
    for name, e in models.items():
        out = " ".join(e["records"][0]["output"].split())[:300]
        lines += [f"- **{name}**: {out!r}"]
    return lines + [""]


def with_section(card: str, section: str) -> str:
    """The card with ``section`` in place of an earlier one, or appended."""
    if CARD_BEGIN in card and CARD_END in card:
        head, _, rest = card.partition(CARD_BEGIN)
        return head + section + rest.partition(CARD_END)[2].lstrip("\n")
    return card.rstrip("\n") + "\n\n" + section
