"""Training pieces: the distillation loss, parameter groups, factor balancing, optimizer, schedule."""

from __future__ import annotations

import importlib.util
import logging
import math

import torch
import torch.nn.functional as Fn
from torch import nn

from vac.errors import VacError
from vac.recover.config import RecoverConfig

log = logging.getLogger("vac.recover")


# --- the loss (plain tensors) -------------------------------------------------------------------------


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, input_ids: torch.Tensor,
                      loss_mask: torch.Tensor, *, temperature: float, alpha: float) -> tuple[torch.Tensor, dict]:
    """Sum over target tokens of α·T²·KL(p_t^T ‖ p_s^T) + (1−α)·NLL.

    Position ``i`` predicts token ``i+1``; it counts iff ``loss_mask[:, i+1]`` (padding and, in
    replay, non-assistant tokens are masked). Returns the *sum* and its parts so that the caller
    divides by the number of target tokens of the whole optimizer step (all micro-batches, all
    processes): the per-token average stays right under gradient accumulation and uneven masks.
    The T² factor keeps the KL gradients on the scale of the NLL's as T changes (Hinton et al.).
    """
    target = loss_mask[:, 1:]
    s = student_logits[:, :-1][target].float()
    labels = input_ids[:, 1:][target]
    nll = Fn.cross_entropy(s, labels, reduction="sum")
    if teacher_logits is None or alpha == 0:
        kl = s.new_zeros(())
    else:
        t = teacher_logits[:, :-1][target].float()
        kl = Fn.kl_div(Fn.log_softmax(s / temperature, -1), Fn.log_softmax(t / temperature, -1),
                       log_target=True, reduction="sum")
    total = alpha * temperature ** 2 * kl + (1 - alpha) * nll
    return total, {"kl": kl.detach(), "nll": nll.detach(), "tokens": int(target.sum())}


# --- parameter groups ----------------------------------------------------------------------------------


def _clean_name(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (DDP ``module.``, FSDP, checkpointing)."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name[len("module."):] if name.startswith("module.") else name


def classify_parameters(model: nn.Module, *, train_norms: bool, train_embeddings: bool) -> dict[str, str | None]:
    """Parameter name -> group (attention | mlp | norms | embeddings) or None (frozen).

    Target linears (factorized or kept dense) take their component from the family table;
    their factors' ``up``/``down`` weights and bias follow the target. Embeddings are found
    through the model's accessors, so tied input/output embeddings are one parameter. Every
    other parameter of these families is a 1-D norm weight.
    """
    from vac.families import find_targets, get_family

    # the decoder's own module (model. for Llama-like models, model.language_model. under a multimodal
    # wrapper): what lies outside it (a vision tower, its projector) is not the language model, and stays frozen
    text_root = get_family(model).layers_path.rsplit(".", 1)[0] + "."
    groups: dict[int, str | None] = {}
    for t in find_targets(model):
        for p in model.get_submodule(t.name).parameters():
            groups[id(p)] = t.component
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        if emb is not None:
            groups[id(emb.weight)] = "embeddings" if train_embeddings else None
    out: dict[str, str | None] = {}
    for name, p in model.named_parameters():
        if id(p) in groups:
            out[name] = groups[id(p)]
        elif not name.startswith(text_root):
            out[name] = None
        elif p.ndim == 1:
            out[name] = "norms" if train_norms else None
        else:
            log.warning("parameter %s (%s) is neither a target, an embedding nor a norm: frozen", name,
                        tuple(p.shape))
            out[name] = None
    return out


def param_groups(model: nn.Module, rcfg: RecoverConfig, lr: float | None = None,
                 classes: dict[str, str | None] | None = None) -> list[dict]:
    """Optimizer groups (and ``requires_grad``) from the family table.

    attention: lr × attn_lr_mult; mlp: lr; norms and embeddings: lr, no weight decay. Each group
    carries its ``name`` and parameter ``names``. ``model`` may be wrapped (DDP/FSDP): names are
    matched without the wrappers' prefixes against ``classes`` (from the unwrapped model).
    """
    lr = rcfg.lr if lr is None else lr
    if classes is None:
        classes = classify_parameters(model, train_norms=rcfg.train_norms, train_embeddings=rcfg.train_embeddings)
    settings = {"attention": (lr * rcfg.attn_lr_mult, rcfg.weight_decay), "mlp": (lr, rcfg.weight_decay),
                "norms": (lr, 0.0), "embeddings": (lr, 0.0)}
    members: dict[str, tuple[list, list]] = {g: ([], []) for g in settings}
    for name, p in model.named_parameters():
        group = classes.get(_clean_name(name))
        p.requires_grad_(group is not None)
        if group is not None:
            members[group][0].append(p)
            members[group][1].append(_clean_name(name))
    return [{"name": g, "params": ps, "names": ns, "lr": settings[g][0], "weight_decay": settings[g][1]}
            for g, (ps, ns) in members.items() if ps]


def check_param_groups(model: nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter is in exactly one group, and no frozen one is in any (nanochat's check)."""
    where: dict[int, str] = {}
    for g in groups:
        for p in g["params"]:
            if id(p) in where:
                raise AssertionError(f"a parameter is in two optimizer groups: {where[id(p)]} and {g['name']}")
            where[id(p)] = g["name"]
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    missing = [names[i] for i in trainable - set(where)]
    frozen = [names.get(i, "?") for i in set(where) - trainable]
    if missing or frozen:
        raise AssertionError(f"optimizer groups disagree with requires_grad: trainable but in no group "
                             f"{missing[:5]}, in a group but frozen {frozen[:5]}")


@torch.no_grad()
def balance_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product ``up @ down``, re-split so that ``upᵀ up = down downᵀ = Σ`` (diagonal).

    Why: the weighted SVDs unweight their factors (``up = Lo⁻¹ U √S``, ``down = √S Vᵀ Li⁻¹``),
    so with large activations one factor ends up orders of magnitude smaller than the other
    (on SmolLM2 at 1.8x, ``down`` entries ~1e-3 against ``up`` entries ~1). Adam moves every
    entry by about the learning rate whatever its scale, so its very first steps wreck the
    small factor: one step at lr 1e-5 tripled the perplexity. The balanced split makes one
    learning rate fit both factors. Exact up to rounding: QR of both factors, SVD of the r x r core.
    """
    dtype = up.dtype
    q1, r1 = torch.linalg.qr(up.double())
    q2, r2 = torch.linalg.qr(down.double().T)
    u, sv, vh = torch.linalg.svd(r1 @ r2.T)
    root = sv.sqrt()
    return ((q1 @ u) * root).to(dtype), (root[:, None] * (vh @ q2.T)).to(dtype)


@torch.no_grad()
def balance_factors_(model: nn.Module) -> int:
    """Balance every factorized target of ``model`` in place (any module with ``up``/``down`` linears)."""
    from vac.families import find_targets

    n = 0
    for t in find_targets(model):
        module = model.get_submodule(t.name)
        up, down = getattr(module, "up", None), getattr(module, "down", None)
        if up is None or down is None:
            continue
        new_up, new_down = balance_factors(up.weight, down.weight)
        up.weight.copy_(new_up)
        down.weight.copy_(new_down)
        n += 1
    return n


def make_optimizer(groups: list[dict], rcfg: RecoverConfig, device: torch.device) -> torch.optim.Optimizer:
    kind = rcfg.optimizer
    if kind == "auto":
        kind = "adamw8bit" if device.type == "cuda" and importlib.util.find_spec("bitsandbytes") else "adamw"
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise VacError("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes) and a GPU") from None
        return bnb.optim.AdamW8bit(groups, betas=(0.9, 0.95), weight_decay=rcfg.weight_decay)
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, weight_decay=rcfg.weight_decay)


class WarmupCosine:
    """Learning-rate factor: linear warm-up, then cosine from 1 to ``floor`` at step ``total``.

    A callable object (not a lambda) so that LambdaLR saves ``total`` with the scheduler: a time
    budget fixes it after the first steps, and a resumed run must keep the same horizon.
    """

    def __init__(self, warmup: int, total: int, floor: float):
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, step: int) -> float:
        warmup = min(self.warmup, self.total // 4)  # short runs: warm-up never takes most of the schedule
        if step < warmup:
            return (step + 1) / (warmup + 1)
        span = max(1, self.total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --- compatibility checks ----------------------------------------------------------------------------


def check_compatible(student: nn.Module, teacher: nn.Module, student_tokenizer=None, teacher_tokenizer=None) -> None:
    """Student and teacher must share the vocabulary: distillation compares their distributions token by token."""
    vs = student.get_output_embeddings().weight.shape[0]
    vt = teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise VacError(f"student and teacher vocabularies differ ({vs} vs {vt} output tokens); distillation needs "
                       "the teacher the student was compressed from (same tokenizer)")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        a, b = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if a != b:
            diff = sorted(set(a.items()) ^ set(b.items()))[:3]
            raise VacError(f"student and teacher tokenizers differ ({len(a)} vs {len(b)} entries, e.g. {diff}); "
                           "distillation needs the teacher the student was compressed from")
