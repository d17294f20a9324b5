"""Quality of a compressed model against its dense reference on held-out token blocks.

Perplexity, mean per-token KL(dense || compressed) and top-1 next-token agreement, computed
batch by batch: neither model's logits are held beyond one batch, and the reference's logits
serve both its own perplexity and the comparison.

:func:`compare` takes models in memory; :func:`compare_home` takes a model's home and streams
both the dense and the compressed model through it one decoder layer at a time (the dense
reference is the original checkpoint, never a second model in memory), then applies the shared
head to the two final hidden states, one sequence at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), use_cache=False).logits.float()


class _Meter:
    def __init__(self):
        self.nll = self.kl = 0.0
        self.agree = self.count = 0

    def result(self, with_reference: bool) -> dict:
        out = {"nll": self.nll / self.count, "ppl": math.exp(self.nll / self.count), "tokens": self.count}
        if with_reference:
            out.update(kl=self.kl / self.count, top1=self.agree / self.count)
        return out


def _nll(logp: torch.Tensor, target: torch.Tensor) -> float:
    return -logp.gather(-1, target[..., None]).sum().item()


def _check_groups(groups: list[str] | None, blocks: torch.Tensor) -> None:
    if groups is not None and len(groups) != len(blocks):
        raise ValueError(f"{len(groups)} group labels for {len(blocks)} evaluation blocks: one label per block")


def _grouped(meters: dict, groups: dict, group: str | None) -> list[dict]:
    """The meters a batch adds to: the overall ones and, with a group, that group's."""
    if group is None:
        return [meters]
    if group not in groups:
        groups[group] = {name: _Meter() for name in meters}
    return [meters, groups[group]]


def _results(meters: dict, groups: dict) -> dict:
    """{"dense": ..., model: ...} over every token and, with groups, ``"domains"``: the same per group
    and ``"mean"``: the mean over groups of each model's PPL / dense and KL, and of top-1."""
    out = {name: m.result(with_reference=name != "dense") for name, m in meters.items()}
    if groups:
        out["domains"] = {g: {name: m.result(with_reference=name != "dense") for name, m in gm.items()}
                          for g, gm in groups.items()}
        out["mean"] = mean_over_domains(out["domains"])
    return out


def mean_over_domains(domains: dict) -> dict:
    """Per model: the mean over domains of PPL / dense PPL, KL and top-1 (each domain weighs the same)."""
    models = [name for name in next(iter(domains.values())) if name != "dense"]
    mean = {}
    for name in models:
        rows = [d[name] for d in domains.values()]
        ratios = [r["ppl"] / d["dense"]["ppl"] for r, d in zip(rows, domains.values())]
        mean[name] = {"ppl_ratio": sum(ratios) / len(rows), "kl": sum(r["kl"] for r in rows) / len(rows),
                      "top1": sum(r["top1"] for r in rows) / len(rows)}
    return mean


def merge_model_evaluation(evaluation: dict, result: dict, name: str, as_name: str) -> None:
    """Put model ``name`` of an evaluation ``result`` into ``evaluation`` as ``as_name``: overall, per
    domain and in the mean over domains (when both have them)."""
    evaluation[as_name] = result[name]
    for domain, row in (result.get("domains") or {}).items():
        if domain in (evaluation.get("domains") or {}):
            evaluation["domains"][domain][as_name] = row[name]
    if "mean" in result and "mean" in evaluation:
        evaluation["mean"][as_name] = result["mean"][name]


def _accumulate(meters: dict, target: torch.Tensor, ref_logits: torch.Tensor, logits: dict) -> None:
    """Add one batch: the reference's NLL, and each model's NLL, KL to the reference and top-1 agreement."""
    ref_logp = Fn.log_softmax(ref_logits[:, :-1].float(), dim=-1).cpu()
    meters["dense"].nll += _nll(ref_logp, target)
    meters["dense"].count += target.numel()
    ref_p, ref_top = ref_logp.exp(), ref_logp.argmax(-1)
    for name, lg in logits.items():
        logp = Fn.log_softmax(lg[:, :-1].float(), dim=-1).cpu()
        m = meters[name]
        m.nll += _nll(logp, target)
        m.kl += (ref_p * (ref_logp - logp)).sum().item()
        m.agree += (ref_top == logp.argmax(-1)).sum().item()
        m.count += target.numel()


@torch.no_grad()
def compare_home(home, blocks: torch.Tensor, batch_size: int = 4, progress: bool = True,
                 models: dict[str, nn.Module] | None = None, groups: list[str] | None = None) -> dict[str, dict]:
    """{"dense": {ppl, ...}, "compressed": {ppl, kl, top1, ...}} of the model behind ``home``.

    Two streams advance together, one decoder layer at a time: the dense layer l on the dense
    hidden states and the current (compressed) layer l on the compressed ones. With ``models``
    (in memory, e.g. a quantized copy), those are compared with the streamed dense model instead.
    ``groups`` names the group (domain) of each block: the result then has ``"domains"`` and ``"mean"``.
    """
    from tqdm.auto import tqdm

    _check_groups(groups, blocks)
    dense, inputs = home.capture(blocks, batch_size)
    current = None if models else dense
    for l in tqdm(range(home.num_layers), desc="evaluate", disable=not progress, unit="layer"):
        new_dense = home.run_all(home.dense_layer(l), dense, inputs)
        if current is not None:
            changed = home.changed(l) or current is not dense
            current = home.run_all(home.current_layer(l), current, inputs) if changed else new_dense
        dense = new_dense
        home.release(l)
    names = list(models) if models else ["compressed"]
    meters, by_group = {"dense": _Meter(), **{name: _Meter() for name in names}}, {}
    for b, ids in enumerate(blocks.split(batch_size)):
        for i in range(ids.shape[0]):  # one sequence at a time: a batch of full-vocabulary logits is large
            seq = ids[i: i + 1]
            ref = home.logits(dense[b][i: i + 1])
            if models:
                got = {name: logits_of(m, seq) for name, m in models.items()}
            else:
                got = {"compressed": ref if current is dense else home.logits(current[b][i: i + 1])}
            group = groups[b * batch_size + i] if groups else None
            for m in _grouped(meters, by_group, group):
                _accumulate(m, seq[:, 1:], ref, got)
    return _results(meters, by_group)


@torch.no_grad()
def compare(models: dict[str, nn.Module], blocks: torch.Tensor, reference: nn.Module, batch_size: int = 4,
            progress: bool = True, groups: list[str] | None = None) -> dict[str, dict]:
    """Metrics of the reference ("dense": ppl) and of each model (ppl, kl, top1) in one pass;
    ``groups`` (the domain of each block) adds ``"domains"`` and ``"mean"`` as in :func:`compare_home`."""
    _check_groups(groups, blocks)
    meters, by_group = {"dense": _Meter(), **{name: _Meter() for name in models}}, {}
    if groups:
        batch_size = 1  # a batch's metrics belong to one group
    for b, ids in enumerate(tqdm(blocks.split(batch_size), desc="evaluate", disable=not progress, unit="batch")):
        ref, got = logits_of(reference, ids), {name: logits_of(model, ids) for name, model in models.items()}
        for m in _grouped(meters, by_group, groups[b] if groups else None):
            _accumulate(m, ids[:, 1:], ref, got)
    return _results(meters, by_group)


@torch.no_grad()
def evaluate(model: nn.Module, blocks: torch.Tensor, reference: nn.Module | None = None,
             batch_size: int = 4, desc: str = "evaluate", progress: bool = True) -> dict:
    """{"ppl", "nll", "tokens"} and, with a reference, {"kl", "top1"} over next-token positions."""
    if reference is not None:
        return compare({"model": model}, blocks, reference, batch_size, progress)["model"]
    m = _Meter()
    for ids in tqdm(blocks.split(batch_size), desc=desc, disable=not progress, unit="batch"):
        m.nll += _nll(Fn.log_softmax(logits_of(model, ids)[:, :-1], dim=-1).cpu(), ids[:, 1:])
        m.count += ids[:, 1:].numel()
    return m.result(with_reference=False)


# --- python -m vac.evaluate ----------------------------------------------------------------------

CARD_BEGIN, CARD_END = "<!-- vac.evaluate: begin -->", "<!-- vac.evaluate: end -->"


def _by_domain(model: nn.Module, blocks: torch.Tensor, groups: list[str] | None, batch_size: int,
               progress: bool) -> dict:
    """Perplexity alone (no reference), overall and per group."""
    out = {"model": evaluate(model, blocks, batch_size=batch_size, progress=progress)}
    if groups:
        out["domains"] = {g: {"model": evaluate(model, blocks[[i for i, x in enumerate(groups) if x == g]],
                                                batch_size=batch_size, progress=False)}
                          for g in dict.fromkeys(groups)}
    return out


def evaluation_table(result: dict, names: list[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per domain (or one 'all' row), per model its PPL and, against a dense
    reference, PPL / dense, KL and top-1; the mean over domains last."""
    with_reference = "dense" in result
    header = ["domain"] + (["dense PPL"] if with_reference else [])
    for name in names:
        header += [f"{name} PPL"] + (["x dense", "KL", "top-1"] if with_reference else [])

    def cells(row: dict) -> list[str]:
        out = [f"{row['dense']['ppl']:.3f}"] if with_reference else []
        for name in names:
            m = row[name]
            out.append(f"{m['ppl']:.3f}")
            if with_reference:
                out += [f"{m['ppl'] / row['dense']['ppl']:.2f}x", f"{m['kl']:.4f}", f"{m['top1']:.2%}"]
        return out

    domains = result.get("domains") or {}
    rows = [[d] + cells(row) for d, row in domains.items()]
    if domains and with_reference:
        mean = result["mean"]
        rows.append(["mean", ""] + [c for name in names for c in
                                    ("", f"{mean[name]['ppl_ratio']:.2f}x", f"{mean[name]['kl']:.4f}",
                                     f"{mean[name]['top1']:.2%}")])
    rows.append(["all tokens"] + cells(result))
    return header, rows


def _card_section(result: dict, names: list[str], data: str, command: str) -> str:
    header, rows = evaluation_table(result, names)
    lines = [CARD_BEGIN, "## Evaluation (`vac.evaluate`)", "",
             f"`{command}` on `{data}` (held-out documents, {result[names[0]]['tokens']:,} predicted tokens per "
             "model; KL is KL(reference ‖ model) per token, top-1 the share of positions where the model's most "
             "likely next token is the reference's):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + ["", CARD_END]) + "\n"


def _with_section(card: str, section: str) -> str:
    """The card with ``section`` in place of an earlier one, or appended."""
    if CARD_BEGIN in card and CARD_END in card:
        head, _, rest = card.partition(CARD_BEGIN)
        return head + section + rest.partition(CARD_END)[2].lstrip("\n")
    return card.rstrip("\n") + "\n\n" + section


def main(argv: list[str] | None = None) -> int:
    """Evaluate VAC checkpoints (and the dense model they came from) per domain; eval.json + card."""
    import argparse
    import shlex
    import sys

    from vac.errors import VacError
    from vac.public import public

    p = argparse.ArgumentParser(prog="python -m vac.evaluate", description=(
        "Evaluate one or more VAC checkpoints on held-out text, per domain for the bundled corpus: perplexity "
        "and, with --reference (the dense model they came from), PPL / dense, KL and top-1 agreement. Writes "
        "eval.json into the first checkpoint and a table into its model card."))
    p.add_argument("checkpoints", nargs="+", help="VAC checkpoint folders (e.g. compressed, then recovered)")
    p.add_argument("--reference", default=None, help="the dense model: a hub id, a local folder, a .gguf, or "
                                                     "smollm2-135m (the bundled model)")
    p.add_argument("--data", default="bundled", help="evaluation text, as --eval-data of vac.compress")
    p.add_argument("--eval-samples", type=int, default=32, help="blocks (of every domain, for a bundled mixture)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-card", action="store_true", help="write eval.json only, leave the model card alone")
    args = p.parse_args(argv)
    try:
        # the command as a reader of the card can use it: local paths become local:NAME
        words = [public(a) for a in (argv if argv is not None else sys.argv[1:])]
        return _run_cli(args, command="python -m vac.evaluate " + " ".join(shlex.quote(w) for w in words))
    except VacError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run_cli(args, command: str) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from vac.data import check_source, evaluation_blocks
    from vac.errors import VacError
    from vac.export import write_json, write_text
    from vac.models import load
    from vac.public import public
    from vac.recover.cli import load_student
    from vac.validate import check_student

    if args.eval_samples < 1 or args.seq_len < 2 or args.batch_size < 1:
        raise VacError("--eval-samples and --batch-size must be >= 1 and --seq-len >= 2")
    dirs = [Path(d).expanduser() for d in args.checkpoints]
    for d in dirs:
        check_student(d, flag="checkpoint")
    check_source(args.data, "--data")
    names = list(dict.fromkeys(d.name or str(d) for d in dirs))
    if len(names) != len(dirs):
        raise VacError("two checkpoints have the same folder name; give folders with distinct names")
    models, tokenizer = {}, None
    for name, d in zip(names, dirs):
        models[name], tok = load_student(d)
        tokenizer = tokenizer or tok
    blocks, groups = evaluation_blocks(args.data, tokenizer, args.eval_samples, args.seq_len, shared=False,
                                       seed=args.seed)
    if args.reference:
        reference = load(args.reference)
        if reference.model.config.vocab_size != next(iter(models.values())).config.vocab_size:
            raise VacError(f"--reference {args.reference} has another vocabulary than the checkpoints; give the "
                           "dense model they were compressed from")
        result = compare(models, blocks, reference.model, batch_size=args.batch_size, groups=groups)
    else:
        result = {}
        for name, model in models.items():
            one = _by_domain(model, blocks, groups, args.batch_size, progress=True)
            result[name] = one["model"]
            for d, row in (one.get("domains") or {}).items():
                result.setdefault("domains", {}).setdefault(d, {})[name] = row["model"]
    header, rows = evaluation_table(result, names)
    table = Table(title=f"vac.evaluate on {args.data}")
    for c in header:
        table.add_column(c, justify="left" if c == "domain" else "right", no_wrap=c == "domain")
    for r in rows:
        table.add_row(*r, style="bold" if r[0] in ("mean", "all tokens") else None)
    Console().print(table)
    record = public({"data": args.data, "seq_len": args.seq_len, "eval_samples": args.eval_samples,
                     "reference": args.reference, "checkpoints": names, "perplexity": result}) | {"command": command}
    write_json(dirs[0] / "eval.json", record)
    card = dirs[0] / "README.md"
    if not args.no_card:
        text = card.read_text(encoding="utf-8") if card.is_file() else ""
        write_text(card, _with_section(text, _card_section(result, names, public(args.data), command)))
    print(f"wrote {dirs[0] / 'eval.json'}" + ("" if args.no_card else f" and the table in {card}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
