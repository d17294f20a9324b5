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


def main(argv: list[str] | None = None) -> int:
    """python -m vac.evaluate (see :mod:`vac.evalcli`)."""
    from vac.evalcli import main as cli

    return cli(argv)


if __name__ == "__main__":
    raise SystemExit(main())
