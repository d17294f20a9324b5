"""Quality of a compressed model against its dense reference on held-out token blocks.

Perplexity, mean per-token KL(dense || compressed) and top-1 next-token agreement, computed
batch by batch: neither model's logits are held beyond one batch, and the reference's logits
serve both its own perplexity and the comparison.
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


@torch.no_grad()
def compare(models: dict[str, nn.Module], blocks: torch.Tensor, reference: nn.Module, batch_size: int = 4,
            progress: bool = True) -> dict[str, dict]:
    """Metrics of the reference ("dense": ppl) and of each model (ppl, kl, top1) in one pass."""
    meters = {"dense": _Meter(), **{name: _Meter() for name in models}}
    for ids in tqdm(blocks.split(batch_size), desc="evaluate", disable=not progress, unit="batch"):
        target = ids[:, 1:]
        ref_logp = Fn.log_softmax(logits_of(reference, ids)[:, :-1], dim=-1).cpu()
        meters["dense"].nll += _nll(ref_logp, target)
        meters["dense"].count += target.numel()
        ref_p, ref_top = ref_logp.exp(), ref_logp.argmax(-1)
        for name, model in models.items():
            logp = Fn.log_softmax(logits_of(model, ids)[:, :-1], dim=-1).cpu()
            m = meters[name]
            m.nll += _nll(logp, target)
            m.kl += (ref_p * (ref_logp - logp)).sum().item()
            m.agree += (ref_top == logp.argmax(-1)).sum().item()
            m.count += target.numel()
            del logp
        del ref_logp, ref_p
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
