"""SIGKILL at random moments of compress, export, recover and search, then re-run or resume.

    OMP_NUM_THREADS=1 python experiments/bench_faults.py              # 10 kills of each kind (~15 min, 1 core)
    python experiments/bench_faults.py --kills 3 --kinds search       # a quick look at one kind

Every trial runs the real CLI in a subprocess on a small model built in code (4 decoder layers,
hidden 256, the test suite's tokenizer), kills it with SIGKILL at a random moment, looks at what
the kill left on disk, then runs the same command again (``--resume`` for recovery and the
search, ``--overwrite`` where an export may already exist) and checks the result:

- compress: killed anywhere between the first output and the end of a reference run.
- export: killed while the export is being assembled, verified or renamed (from the moment its
  staging folder appears to the end); half of the trials replace a previous export
  (``--overwrite``), which must never be lost: after the kill ``--out`` is the previous export,
  the new one, or (between the two renames) restored from the staging folder by the next run.
- recover: 60 distillation steps, a checkpoint every 10; steps lost = last step reported before
  the kill - the step the resumed run starts from (at most one checkpoint interval).
- search: the toy evaluator, 8 generations; generations lost = generations reported done before
  the kill - the generation the resumed run starts from; the resumed front must equal an
  uninterrupted run's.

A trial survives when the second run exits 0, its output is complete and valid, and no
temporary file of VAC is left anywhere in the trial's folder. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the tiny tokenizer of the test suite

#: names of VAC's temporary files and folders (export staging, atomic writes, checkpoints being written)
STRAY = re.compile(r"\..+\.(tmp|old|new)-.*|\.checkpoint\.tmp|best\.tmp|\..+\.probe-.*")
RECOVER_STEPS, CHECKPOINT_EVERY, GENERATIONS = 60, 10, 8


def make_inputs(work: Path) -> None:
    """A 4-layer model (hidden 256) and a corpus in the test tokenizer's vocabulary."""
    import torch
    import transformers
    from conftest import VOCAB, tiny_tokenizer, write_corpus

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(work / "model", safe_serialization=True)
    tiny_tokenizer().save_pretrained(work / "model")
    write_corpus(work / "corpus.txt", docs=400, words=80)


def compress_cmd(work: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vac.compress", "--model", str(work / "model"), "--calib-data",
            str(work / "corpus.txt"), "--eval-data", str(work / "corpus.txt"), "--calib-samples", "32",
            "--eval-samples", "8", "--seq-len", "64", "--batch-size", "8", "--fisher-samples", "4",
            "--ratio", "1.5", "--device", "cpu", "--out", str(out), *extra]


def recover_cmd(work: Path, trial: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vac.recover", "--student", str(work / "student"), "--teacher",
            str(work / "model"), "--out", str(trial / "recovered"), "--run-dir", str(trial / "run"),
            "--steps", str(RECOVER_STEPS), "--checkpoint-every", str(CHECKPOINT_EVERY), "--seq-len", "64",
            "--batch-size", "4", "--lr", "1e-4", "--pretrain-data", str(work / "corpus.txt"), "--eval-data",
            str(work / "corpus.txt"), "--eval-samples", "4", "--eval-every", "0", "--no-run-probes",
            "--wandb-mode", "disabled", "--device", "cpu", *extra]


def search_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vac.search", "--config", str(config), "--no-wandb", *extra]


def write_search_config(path: Path, out: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "out": str(out), "evaluator": "toy", "toy": {"delay": 0.05}, "workers": 0,
        "search": {"population": 6, "generations": GENERATIONS, "seed": 5},
        "space": {"num_layers": 8, "ratio": [1.5, 2.5], "exponent": [0.0, 0.75],
                  "multipliers": {"attention": [0.5, 2.0]}, "keep_dense": [0, 7]}}))
    return path


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}


@dataclass
class Run:
    rc: int | None
    seconds: float
    log: str
    killed: bool = False
    marks: dict[str, float] = field(default_factory=dict)


def run(cmd: list[str], log: Path, *, kill_at: float | None = None, after: Path | None = None,
        window: float = 0.0, marks: dict[str, str] | None = None) -> Run:
    """Run ``cmd``; SIGKILL it ``kill_at`` seconds after start, or (``after``) a random moment within
    ``window`` seconds of that path appearing. ``marks``: name -> text; when it first appears in the
    output is recorded (seconds from start)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
        seen: dict[str, float] = {}
        deadline = None if after is not None else kill_at
        while proc.poll() is None:
            now = time.perf_counter() - t0
            if marks:
                text = log.read_text(errors="replace")
                for name, needle in marks.items():
                    if name not in seen and needle in text:
                        seen[name] = now
            if after is not None and deadline is None and (after.exists() or any(after.parent.glob(after.name))):
                deadline = now + random.uniform(0, window)
            if deadline is not None and now >= deadline:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return Run(None, now, log.read_text(errors="replace"), killed=True, marks=seen)
            time.sleep(0.005)
    return Run(proc.returncode, time.perf_counter() - t0, log.read_text(errors="replace"), marks=seen)


def stray(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if STRAY.fullmatch(p.name))


def valid_export(out: Path) -> bool:
    from vac.outdir import is_vac_export
    from vac.validate import safetensors_header

    try:
        if not is_vac_export(out):
            return False
        for p in out.glob("*.safetensors"):
            safetensors_header(p)
        json.loads((out / "report.json").read_text())
        return True
    except Exception:  # noqa: BLE001 -- any failure means "not a valid export"
        return False


def last_int(pattern: str, text: str, default: int = 0) -> int:
    found = re.findall(pattern, text)
    return int(found[-1]) if found else default


@dataclass
class Row:
    kind: str
    trials: int = 0
    kills: int = 0
    survived: int = 0
    lost: list[int] = field(default_factory=list)
    lost_unit: str = ""
    left_after_kill: int = 0
    left_after_rerun: int = 0
    notes: list[str] = field(default_factory=list)


def trial_compress(work: Path, trial: Path, ref: Run, row: Row, export_only: bool) -> None:
    out = trial / "out"
    overwrite = export_only and random.random() < 0.5
    if overwrite:
        shutil.copytree(work / "reference-export", out)
    extra = ("--overwrite",) if overwrite else ()
    if export_only:  # from the staging folder's appearance to the rename ("wrote OUT")
        window = ref.marks["wrote"] - ref.marks["export"]
        killed = run(compress_cmd(work, out, *extra), trial / "kill.log", after=trial / ".out.tmp-*", window=window)
    else:
        killed = run(compress_cmd(work, out, *extra), trial / "kill.log",
                     kill_at=random.uniform(ref.marks["start"], ref.seconds))
    row.kills += killed.killed
    row.left_after_kill += len(stray(trial))
    if out.exists() and not valid_export(out):
        row.notes.append(f"{trial.name}: --out damaged by the kill")
    rerun = run(compress_cmd(work, out, "--overwrite"), trial / "rerun.log")
    ok = rerun.rc == 0 and valid_export(out) and not stray(trial)
    if overwrite and not out.exists():
        row.notes.append(f"{trial.name}: previous export lost")
        ok = False
    row.left_after_rerun += len(stray(trial))
    row.survived += ok
    if not ok:
        row.notes.append(f"{trial.name}: rc {rerun.rc}, {rerun.log.strip().splitlines()[-1:]}")


def trial_recover(work: Path, trial: Path, ref: Run, row: Row) -> None:
    killed = run(recover_cmd(work, trial), trial / "kill.log", kill_at=random.uniform(ref.marks["step1"], ref.seconds))
    row.kills += killed.killed
    row.left_after_kill += len(stray(trial))
    done = last_int(r"recover/kd:.*?\| *(\d+)/\d+", killed.log)
    resumed = run(recover_cmd(work, trial, "--resume", "--overwrite"), trial / "resume.log")
    start = last_int(r"resuming from \S+ at global step (\d+)", resumed.log)
    if "is unusable" in resumed.log:
        row.notes.append(f"{trial.name}: fell back to the previous checkpoint")
    row.lost.append(max(0, done - start))
    report = trial / "recovered" / "report.json"
    ok = (resumed.rc == 0 and valid_export(trial / "recovered") and not stray(trial)
          and json.loads(report.read_text())["recovery"]["steps"] == {"kd": RECOVER_STEPS})
    row.left_after_rerun += len(stray(trial))
    row.survived += ok
    if not ok:
        row.notes.append(f"{trial.name}: rc {resumed.rc}, {resumed.log.strip().splitlines()[-1:]}")


def trial_search(work: Path, trial: Path, ref: Run, row: Row, ref_front: list) -> None:
    config = write_search_config(trial / "search.yaml", trial / "run")
    killed = run(search_cmd(config), trial / "kill.log", kill_at=random.uniform(ref.marks["start"], ref.seconds))
    row.kills += killed.killed
    row.left_after_kill += len(stray(trial))
    done = last_int(rf"gen (\d+)/{GENERATIONS}:", killed.log, default=-1)
    resumed = run(search_cmd(config, "--resume"), trial / "resume.log")
    start = last_int(r"at generation (\d+)", resumed.log, default=-1)
    if "is unusable" in resumed.log:
        row.notes.append(f"{trial.name}: fell back to the previous checkpoint")
    row.lost.append(max(0, done - start))
    front_file = trial / "run" / "front.json"
    front = [e["key"] for e in json.loads(front_file.read_text())["front"]] if front_file.is_file() else None
    ok = resumed.rc == 0 and front == ref_front and not stray(trial)
    row.left_after_rerun += len(stray(trial))
    row.survived += ok
    if not ok:
        row.notes.append(f"{trial.name}: rc {resumed.rc}, same front: {front == ref_front}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=10, help="trials (kills) per kind")
    p.add_argument("--kinds", default="compress,export,recover,search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="working folder (default: a temporary one, deleted after)")
    args = p.parse_args()
    random.seed(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vac-bench-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    kinds = args.kinds.split(",")
    t_start = time.perf_counter()
    make_inputs(work)
    # reference runs: how long each takes, when its stages start, what it produces
    ref = run(compress_cmd(work, work / "reference-export"), work / "reference-compress.log",
              marks={"start": "VAC ", "export": "export:", "wrote": "wrote "})
    assert ref.rc == 0, ref.log[-2000:]
    shutil.copytree(work / "reference-export", work / "student")
    rows = []
    if "compress" in kinds or "export" in kinds:
        for kind in [k for k in ("compress", "export") if k in kinds]:
            row = Row(kind)
            for i in range(args.kills):
                trial = work / f"{kind}-{i:02d}"
                trial.mkdir()
                trial_compress(work, trial, ref, row, export_only=kind == "export")
                row.trials += 1
            rows.append(row)
    if "recover" in kinds:
        ref_r = run(recover_cmd(work, work / "reference-recover"), work / "reference-recover.log",
                    marks={"step1": f"| 1/{RECOVER_STEPS}"})
        assert ref_r.rc == 0, ref_r.log[-2000:]
        row = Row("recover", lost_unit="steps")
        for i in range(args.kills):
            trial = work / f"recover-{i:02d}"
            trial.mkdir()
            trial_recover(work, trial, ref_r, row)
            row.trials += 1
        rows.append(row)
    if "search" in kinds:
        config = write_search_config(work / "reference-search.yaml", work / "reference-search")
        ref_s = run(search_cmd(config), work / "reference-search.log", marks={"start": "vac.search:"})
        assert ref_s.rc == 0, ref_s.log[-2000:]
        ref_front = [e["key"] for e in json.loads((work / "reference-search" / "front.json").read_text())["front"]]
        row = Row("search", lost_unit="generations")
        for i in range(args.kills):
            trial = work / f"search-{i:02d}"
            trial.mkdir()
            trial_search(work, trial, ref_s, row, ref_front)
            row.trials += 1
        rows.append(row)

    print(f"\nSIGKILL at random moments, {args.kills} per kind, seed {args.seed} "
          f"({(time.perf_counter() - t_start) / 60:.1f} min)\n")
    print("| stage killed | kills | survived (re-run/resume OK, output valid) | lost per kill (max / mean) "
          "| temp files after the kill | temp files after the re-run |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lost = (f"{max(r.lost)} / {sum(r.lost) / len(r.lost):.1f} {r.lost_unit} (interval: "
                f"{CHECKPOINT_EVERY if r.kind == 'recover' else 1})" if r.lost else "nothing to lose (re-run)")
        print(f"| {r.kind} | {r.kills}/{r.trials} | {r.survived}/{r.trials} | {lost} | {r.left_after_kill} "
              f"| {r.left_after_rerun} |")
    notes = [f"{r.kind}: {n}" for r in rows for n in r.notes]
    if notes:
        print("\n" + "\n".join(f"- {n}" for n in notes))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.survived == r.trials for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
