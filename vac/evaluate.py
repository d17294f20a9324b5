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
                 models: dict[str, nn.Module] | None = None) -> dict[str, dict]:
    """{"dense": {ppl, ...}, "compressed": {ppl, kl, top1, ...}} of the model behind ``home``.

    Two streams advance together, one decoder layer at a time: the dense layer l on the dense
    hidden states and the current (compressed) layer l on the compressed ones. With ``models``
    (in memory, e.g. a quantized copy), those are compared with the streamed dense model instead.
    """
    from tqdm.auto import tqdm

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
    meters = {"dense": _Meter(), **{name: _Meter() for name in names}}
    for b, ids in enumerate(blocks.split(batch_size)):
        for i in range(ids.shape[0]):  # one sequence at a time: a batch of full-vocabulary logits is large
            seq = ids[i: i + 1]
            ref = home.logits(dense[b][i: i + 1])
            if models:
                got = {name: logits_of(m, seq) for name, m in models.items()}
            else:
                got = {"compressed": ref if current is dense else home.logits(current[b][i: i + 1])}
            _accumulate(meters, seq[:, 1:], ref, got)
    return {name: m.result(with_reference=name != "dense") for name, m in meters.items()}


@torch.no_grad()
def compare(models: dict[str, nn.Module], blocks: torch.Tensor, reference: nn.Module, batch_size: int = 4,
            progress: bool = True) -> dict[str, dict]:
    """Metrics of the reference ("dense": ppl) and of each model (ppl, kl, top1) in one pass."""
    meters = {"dense": _Meter(), **{name: _Meter() for name in models}}
    for ids in tqdm(blocks.split(batch_size), desc="evaluate", disable=not progress, unit="batch"):
        _accumulate(meters, ids[:, 1:], logits_of(reference, ids),
                    {name: logits_of(model, ids) for name, model in models.items()})
    return {name: m.result(with_reference=name != "dense") for name, m in meters.items()}


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
