"""Downstream tasks through lm-evaluation-harness: dense vs compressed vs recovered, task by task.

VAC checkpoints are evaluated the way their users judge models: ``lm_eval.simple_evaluate`` on
the harness's own ``hf`` model class, each checkpoint loaded by it with ``trust_remote_code=True``
(the exported modeling code), the dense reference handed over as a model object (it may be the
bundled GGUF or any hub id, loaded by :func:`vac.models.load`).

Task names are the harness's own, or a suite:

* ``vac-offline`` — two multiple-choice tasks built from the *evaluation* documents of the bundled
  corpus (never calibration text), one set per domain: ``vac_continuation`` (which of four spans
  really follows the passage; the others are spans of other documents of the same domain) and
  ``vac_wordorder`` (which of four copies of the next words is the original; the others have two
  adjacent words swapped). They are **proxies**: no package on the registries this project can
  reach ships the data of a real benchmark (GSM8K, MMLU, HellaSwag, ARC, PIQA, WinoGrande were
  looked for), so they measure what compression costs on held-out text the way a cloze benchmark
  does, with a known chance level (25%), and nothing more. They run offline: the harness reads them
  from local JSON files (``dataset_path: json``) written under ``cache_dir()/harness``.
* ``olmo3-base`` — MMLU, GSM8K, HellaSwag, ARC-Easy/Challenge, PIQA, WinoGrande (needs the Hub).
* ``olmo3-think`` — GSM8K, MATH (minerva), BBH (CoT few-shot), IFEval, through the chat template
  with a generation budget (needs the Hub).

``lm-eval`` is an optional extra (``pip install 'vac[eval]'``) imported only here.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from vac.errors import VacError

EXTRA_HINT = "pip install 'vac[eval]'  (from a checkout: pip install -e '.[eval]')"


@dataclass(frozen=True)
class Suite:
    tasks: tuple[str, ...]
    description: str
    #: render prompts through the chat template, few-shot examples as turns
    chat: bool = False
    #: generation budget of generative tasks (max_gen_toks), None: each task's own
    max_gen_toks: int | None = None
    needs_hub: bool = True


OFFLINE_TASKS = ("vac_continuation", "vac_wordorder")
SUITES = {
    "vac-offline": Suite(OFFLINE_TASKS, "proxy multiple-choice tasks from the bundled corpus's evaluation documents "
                         "(offline)", needs_hub=False),
    "olmo3-base": Suite(("mmlu", "gsm8k", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande"),
                        "the OLMo 3 base suite"),
    "olmo3-think": Suite(("gsm8k", "minerva_math", "bbh_cot_fewshot", "ifeval"),
                         "the OLMo 3 Think suite: chat template, few-shot as turns, 2048-token generation budget",
                         chat=True, max_gen_toks=2048),
}
#: the metric a table shows for a task, first present wins (every metric goes to eval.json)
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match", "prompt_level_strict_acc", "inst_level_strict_acc", "pass@1",
                   "word_perplexity", "f1")
CHANCE = {"vac_continuation": 0.25, "vac_wordorder": 0.25}

# the proxy tasks: words of a passage, with the whitespace that follows each kept (code stays code)
CONTEXT_WORDS, CHOICE_WORDS, CHOICES = 48, 12, 4
ITEMS_PER_DOMAIN = 40
OFFLINE_VERSION = 1  # bump when the construction changes: the cached files are rebuilt


def require_lm_eval():
    """The ``lm_eval`` module, or a clear error saying how to install the extra."""
    try:
        import lm_eval
    except ImportError as e:
        raise VacError(f"downstream tasks need lm-evaluation-harness, which is not installed ({e}); install the "
                       f"extra: {EXTRA_HINT}") from e
    return lm_eval


def expand_tasks(specs: list[str] | str | None) -> list[str]:
    """Task names from suite names, task names and comma-separated lists, in order, without repeats."""
    if specs is None:
        return []
    words = [w.strip() for s in ([specs] if isinstance(specs, str) else specs) for w in str(s).split(",")]
    out: list[str] = []
    for w in filter(None, words):
        out += list(SUITES[w].tasks) if w in SUITES else [w]
    return list(dict.fromkeys(out))


def suite_settings(specs: list[str] | str | None) -> Suite | None:
    """The chat / generation settings of the suites named in ``specs`` (one kind only)."""
    named = [SUITES[w.strip()] for s in ([specs] if isinstance(specs, str) else specs or [])
             for w in str(s).split(",") if w.strip() in SUITES]
    chat = {s.chat for s in named}
    if len(chat) > 1:
        raise VacError("olmo3-think runs through the chat template and the other suites do not: evaluate them in "
                       "two commands")
    return named[0] if named else None


def check_tasks(specs: list[str] | str | None) -> list[str]:
    """Expand and check task names before any expensive work: the extra is installed and every name
    is a suite, one of VAC's offline tasks or a task/group the harness knows."""
    tasks = expand_tasks(specs)
    if not tasks:
        raise VacError("no tasks given; name a suite (" + ", ".join(SUITES) + ") or harness task names")
    suite_settings(specs)
    require_lm_eval()
    others = [t for t in tasks if t not in OFFLINE_TASKS]
    if others:
        manager = _task_manager(with_defaults=True, offline_root=None)
        tags = set(manager.all_tags)
        tagged = [t for t in others if t in tags]
        if tagged:  # a tag runs its tasks but has no result of its own: name the tasks (or a group)
            raise VacError(f"{', '.join(map(repr, tagged))} is an lm-evaluation-harness tag, not a task or group: give "
                           "its tasks by name (python -m lm_eval ls tags lists them)")
        known = set(manager.all_subtasks) | set(manager.all_groups)
        unknown = [t for t in others if t not in known]
        if unknown:
            raise VacError(f"unknown task(s) {', '.join(map(repr, unknown))}: not a VAC suite ({', '.join(SUITES)}) "
                           "and not a task lm-evaluation-harness knows (python -m lm_eval ls tasks lists them)")
    return tasks


def _task_manager(with_defaults: bool, offline_root: Path | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR", include_path=str(offline_root) if offline_root else None,
                       include_defaults=with_defaults)


# --- the offline proxy tasks ------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text)


def _span(words: list[str], start: int, n: int) -> str:
    return "".join(words[start:start + n]).rstrip()


def _swap(words: list[str], i: int) -> str:
    """The span with the bodies of words i and i+1 swapped (whitespace stays where it was)."""
    bodies = [w.rstrip() for w in words]
    gaps = [w[len(b):] for w, b in zip(words, bodies)]
    bodies[i], bodies[i + 1] = bodies[i + 1], bodies[i]
    return "".join(b + g for b, g in zip(bodies, gaps)).rstrip()


def offline_items(documents: dict[str, list[str]], per_domain: int = ITEMS_PER_DOMAIN, seed: int = 0) -> dict:
    """{task: [item, ...]} from evaluation documents per domain. An item is ``context`` (a passage),
    ``choices`` (each starting with the whitespace that follows the passage), ``gold`` (index) and
    ``domain``. Passages do not overlap; documents are taken in a seeded order."""
    rng = random.Random(seed)
    need = CONTEXT_WORDS + CHOICE_WORDS
    out: dict[str, list[dict]] = {t: [] for t in OFFLINE_TASKS}
    for domain, docs in documents.items():
        split = [_words(d) for d in docs]
        usable = [i for i, w in enumerate(split) if len(w) >= need + 1]
        if len(usable) < CHOICES:
            raise VacError(f"bundled domain {domain!r} has {len(usable)} evaluation documents of {need + 1}+ words; "
                           f"the offline tasks need {CHOICES}")
        rng.shuffle(usable)
        # non-overlapping passages, taken round-robin over the documents (small domains give several
        # passages per document, large ones one each)
        windows = {i: list(range(CONTEXT_WORDS, len(split[i]) - CHOICE_WORDS + 1, need)) for i in usable}
        for ws in windows.values():
            rng.shuffle(ws)
        picks = [(i, windows[i][k]) for k in range(max(map(len, windows.values()))) for i in usable
                 if k < len(windows[i])][:per_domain]
        for i, p in picks:
            words = split[i]
            passage = "".join(words[p - CONTEXT_WORDS:p])
            context = passage.rstrip()
            gap = passage[len(context):] or " "
            gold_words = words[p:p + CHOICE_WORDS]
            gold = _span(words, p, CHOICE_WORDS)
            # continuation: spans of three other documents of the same domain
            others = rng.sample([j for j in usable if j != i], CHOICES - 1)
            wrong = []
            for j in others:
                q = rng.randint(0, len(split[j]) - CHOICE_WORDS)
                wrong.append(_span(split[j], q, CHOICE_WORDS))
            out["vac_continuation"].append(_item(rng, domain, context, gap, gold, wrong))
            # word order: the same words, two neighbours swapped at three different places
            bodies = [w.rstrip() for w in gold_words]
            places = [k for k in range(CHOICE_WORDS - 1) if bodies[k] != bodies[k + 1]]
            if len(places) >= CHOICES - 1:
                swaps = [_swap(gold_words, k) for k in rng.sample(places, CHOICES - 1)]
                out["vac_wordorder"].append(_item(rng, domain, context, gap, gold, swaps))
    # domains interleaved, so that --limit N looks at every domain
    return {task: _interleave(items) for task, items in out.items()}


def _interleave(items: list[dict]) -> list[dict]:
    by_domain: dict[str, list[dict]] = {}
    for it in items:
        by_domain.setdefault(it["domain"], []).append(it)
    rows = max((len(v) for v in by_domain.values()), default=0)
    return [v[k] for k in range(rows) for v in by_domain.values() if k < len(v)]


def _item(rng: random.Random, domain: str, context: str, gap: str, gold: str, wrong: list[str]) -> dict:
    choices = [gold] + wrong
    order = list(range(len(choices)))
    rng.shuffle(order)
    return {"domain": domain, "context": context, "choices": [gap + choices[k] for k in order],
            "gold": order.index(0)}


_YAML = """\
# written by VAC ({module}); a proxy task built from the bundled corpus's evaluation documents
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


def offline_task_dir(root: Path | None = None, documents: dict[str, list[str]] | None = None) -> Path:
    """The folder of the offline tasks' YAML and JSON files (built once, then reused); ``documents``
    (domain -> evaluation documents) replaces the bundled corpus (tests)."""
    from vac.models import cache_dir

    if documents is None:
        from vac.corpus import DOMAINS
        from vac.data import bundled_documents

        documents = {d: bundled_documents(f"bundled:{d}", "eval") for d in DOMAINS}
    root = Path(root) if root is not None else cache_dir() / "harness" / f"v{OFFLINE_VERSION}"
    digest = _digest(documents)
    stamp = root / "BUILT"
    if stamp.is_file() and stamp.read_text().strip() == digest and all(
            (root / f"{t}.yaml").is_file() for t in OFFLINE_TASKS):
        return root
    from vac.files import write_text

    root.mkdir(parents=True, exist_ok=True)
    for task, items in offline_items(documents).items():
        data = root / f"{task}.jsonl"
        write_text(data, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
        write_text(root / f"{task}.yaml", _YAML.format(module=__name__, task=task, data=json.dumps(str(data)),
                                                       version=OFFLINE_VERSION))
    write_text(stamp, digest + "\n")
    return root


def _digest(documents: dict[str, list[str]]) -> str:
    import hashlib

    h = hashlib.sha256(f"v{OFFLINE_VERSION} {CONTEXT_WORDS} {CHOICE_WORDS} {ITEMS_PER_DOMAIN}".encode())
    for domain, docs in documents.items():
        h.update(domain.encode())
        for d in docs:
            h.update(hashlib.sha256(d.encode()).digest())
    return h.hexdigest()


# --- running ------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    metric: str
    score: float
    stderr: float | None
    seconds: float
    samples: int | None
    metrics: dict = field(default_factory=dict)


def harness_model(model=None, tokenizer=None, path: str | Path | None = None, batch_size: int = 8,
                  device: str = "cpu", dtype: str = "float32"):
    """The harness's ``hf`` model: from a checkpoint folder (loaded by the harness, trust_remote_code)
    or around a model object already in memory (with its tokenizer)."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if path is not None:
        return HFLM(pretrained=str(path), trust_remote_code=True, batch_size=batch_size, device=device, dtype=dtype)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)


def _primary(metrics: dict) -> tuple[str, float, float | None]:
    """(name, value, stderr) of the table's metric among the harness's ``"name,filter"`` keys."""
    values = {k: v for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    if not values:
        raise VacError(f"the harness returned no metric ({sorted(metrics)})")
    # one filter per metric, chosen on purpose: none, then strict-match (GSM8K's exact answer format), then any
    rank = lambda k: {"none": 0, "strict-match": 1}.get(k.split(",", 1)[1], 2)  # noqa: E731
    by_name: dict[str, str] = {}
    for k in sorted(values, key=rank):
        by_name.setdefault(k.split(",")[0], k)
    key = next((by_name[m] for m in PRIMARY_METRICS if m in by_name), next(iter(values)))
    name, filt = key.split(",", 1)
    stderr = metrics.get(f"{name}_stderr,{filt}")
    stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
    label = name if filt == "none" else f"{name} ({filt})"
    return label, float(values[key]), stderr


def run_tasks(lm, tasks: list[str], limit: float | None = None, suite: Suite | None = None,
              num_fewshot: int | None = None, offline_root: Path | None = None, seed: int = 0,
              progress=print) -> dict[str, TaskResult]:
    """Each task through ``lm_eval.simple_evaluate`` on one harness model, timed task by task."""
    lm_eval = require_lm_eval()
    only_offline = all(t in OFFLINE_TASKS for t in tasks)
    if any(t in OFFLINE_TASKS for t in tasks) and offline_root is None:
        offline_root = offline_task_dir()
    manager = _task_manager(with_defaults=not only_offline, offline_root=offline_root)
    extra = {}
    if suite is not None and suite.chat:
        extra.update(apply_chat_template=True, fewshot_as_multiturn=True)
    if suite is not None and suite.max_gen_toks:
        extra["gen_kwargs"] = {"max_gen_toks": suite.max_gen_toks}
    out = {}
    for task in tasks:
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, log_samples=False, bootstrap_iters=1000,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, verbosity="ERROR", **extra)
        seconds = time.perf_counter() - t0
        if res is None:
            raise VacError(f"lm-evaluation-harness returned nothing for {task!r}")
        metrics = dict(res["results"].get(task) or {})
        if not metrics:
            raise VacError(f"lm-evaluation-harness gave no result for {task!r} (results for "
                           f"{sorted(res['results'])})")
        name, score, stderr = _primary(metrics)
        samples = (res.get("n-samples") or {}).get(task, {}).get("effective")
        out[task] = TaskResult(name, score, stderr, seconds, samples,
                               {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        progress(f"  {task}: {name} {score:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
                 + f"  ({seconds:.0f} s)")
    return out


def tasks_record(results: dict[str, dict[str, TaskResult]], reference: str | None = "dense") -> dict:
    """eval.json's ``tasks``: task -> {metric, chance, models: {name: score, stderr, seconds, ...},
    retained: {name: score / reference score}}."""
    tasks = list(dict.fromkeys(t for per in results.values() for t in per))
    out = {}
    for task in tasks:
        rows = {name: per[task] for name, per in results.items() if task in per}
        first = next(iter(rows.values()))
        entry = {"metric": first.metric, "models": {
            name: {"score": r.score, "stderr": r.stderr, "seconds": round(r.seconds, 1), "samples": r.samples,
                   "metrics": r.metrics} for name, r in rows.items()}}
        if task in CHANCE:
            entry["chance"] = CHANCE[task]
        if reference in rows:  # undefined (None) where the reference scores 0
            base = rows[reference].score
            entry["retained"] = {name: r.score / base if base else None for name, r in rows.items() if name != reference}
        out[task] = entry
    return out


def tasks_table(record: dict, names: list[str], reference: str | None = "dense") -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the task table: a score (± stderr) column per model, then retained fractions."""
    others = [n for n in names if n != reference] if reference in names else []
    header = ["task", "metric"] + names + [f"{n} / {reference}" for n in others] + ["s per model"]
    rows = []
    for task, entry in record.items():
        cells = [task + (" (proxy)" if task in OFFLINE_TASKS else ""), entry["metric"]]
        for n in names:
            m = entry["models"].get(n)
            cells.append("" if m is None else f"{m['score']:.4f}" + (f" ± {m['stderr']:.4f}" if m["stderr"] else ""))
        for n in others:
            r = (entry.get("retained") or {}).get(n)
            cells.append("" if r is None else f"{r:.1%}")
        secs = [m["seconds"] for m in entry["models"].values()]
        cells.append(f"{sum(secs) / len(secs):.0f}")
        rows.append(cells)
    return header, rows


__all__ = ["SUITES", "OFFLINE_TASKS", "EXTRA_HINT", "require_lm_eval", "expand_tasks", "check_tasks",
           "suite_settings", "offline_items", "offline_task_dir", "harness_model", "run_tasks", "tasks_record",
           "tasks_table", "TaskResult"]
