"""Recovery after factorization: distillation from the dense teacher, then optional replay.

    stage "kd":  loss = α·T²·KL(teacher_T ‖ student_T) + (1−α)·NLL on a stream of pre-training text
                 with a fraction of conversations mixed in (vac/mixing.py)
    stage "sft": supervised replay of conversations, loss on assistant tokens only (PPL recovery
                 alone does not restore chat/think behaviour)

``recover_`` trains a student in place; ``python -m vac.recover`` runs it on an exported
checkpoint and re-exports it. The loop runs through accelerate (CPU, one GPU, DDP, FSDP: see
configs/accelerate-fsdp-7b.yaml); only the main process logs and writes. Checkpoints hold the
trainable weights (safetensors), optimiser, scheduler, RNG states and the data position, are
written atomically every ``checkpoint_every`` steps and on SIGTERM/SIGINT, and ``resume``
continues a run exactly (same weights as an uninterrupted run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as Fn
import yaml
from torch import nn

from vac.errors import VacError

log = logging.getLogger(__name__)

OPTIMIZERS = ("auto", "adamw", "adamw8bit")
PRECISIONS = ("auto", "no", "bf16", "fp16")
CHECKPOINT = "checkpoint"


def _f(default, help: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RecoverConfig:
    # --- schedule ---------------------------------------------------------------------------------
    steps: int = _f(200, "optimizer steps of distillation; 0 with --max-minutes: as many as the time budget allows")
    max_minutes: float = _f(0.0, "time budget of the distillation stage in minutes (0 = none); the cosine "
                            "schedule is fitted to the budget from the speed of the first steps")
    lr: float = _f(3e-5, "peak learning rate of the MLP factors (and of norms/embeddings when trained); factor "
                   "entries are small and every step moves all of them, so keep it well below dense fine-tuning")
    attn_lr_mult: float = _f(10.0, "attention factors train at this multiple of --lr (the seed found 10x)")
    warmup_steps: int = _f(20, "linear warm-up steps before the cosine decay")
    min_lr_ratio: float = _f(0.1, "the cosine decays to this fraction of the peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay of the factors (norms and embeddings: none)")
    max_grad_norm: float = _f(1.0, "gradient clipping threshold (0 = no clipping)")
    batch_size: int = _f(4, "sequences per micro-batch and process")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    seq_len: int = _f(256, "tokens per sequence")
    # --- loss -------------------------------------------------------------------------------------------
    temperature: float = _f(2.0, "distillation temperature T")
    alpha: float = _f(0.7, "weight of the T²-scaled KL term; 1 - alpha weighs the next-token NLL")
    # --- what trains --------------------------------------------------------------------------------
    train_norms: bool = _f(True, "train the norm weights too (own parameter group, no weight decay)")
    train_embeddings: bool = _f(False, "train the input/output embeddings (tied embeddings count once)")
    optimizer: str = _f("auto", "auto (8-bit AdamW via bitsandbytes on GPU when installed, else AdamW) | "
                        "adamw | adamw8bit")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (7B+ on one GPU)")
    balance_factors: bool = _f(True, "before training, re-split every up @ down so that both factors carry the "
                               "same scale (same product); see balance_factors in vac/recover.py")
    # --- data ---------------------------------------------------------------------------------------------
    pretrain_data: str = _f("bundled", "pre-training text: 'bundled' (offline), a .txt/.jsonl/.parquet file or "
                            "folder, or an HF dataset id streamed with datasets; for OLMo 3 use "
                            "allenai/dolma3_mix-6T-1025-7B")
    chat_data: str | None = _f(None, "conversations ('messages' records) mixed into distillation and replayed "
                               "by the SFT stage: a .jsonl/.parquet file or folder, or an HF dataset id such "
                               "as allenai/Dolci-Think-SFT-7B (none offline)")
    chat_fraction: float = _f(0.2, "fraction of distillation sequences taken from --chat-data")
    eval_data: str = _f("bundled", "held-out evaluation text; its evaluation documents are never trained on "
                        "when it is also a training source")
    eval_samples: int = _f(32, "evaluation sequences (of --seq-len tokens)")
    eval_every: int = _f(50, "evaluate (PPL, KL, top-1) every this many steps (0 = only before and after)")
    periodic_eval_samples: int = _f(0, "evaluation sequences used by the evaluations during training (0 = all; "
                                    "before and after always use all)")
    # --- post-training replay -------------------------------------------------------------------------
    sft_steps: int = _f(0, "steps of supervised replay on --chat-data after distillation (loss on assistant "
                        "tokens only; 0 = no replay)")
    sft_lr: float = _f(0.0, "peak learning rate of the replay stage (0 = --lr)")
    sft_alpha: float = _f(0.0, "KL weight in the replay stage (0 = pure NLL on assistant tokens)")
    # --- runtime --------------------------------------------------------------------------------------
    checkpoint_every: int = _f(50, "write a checkpoint every this many steps (0 = only on SIGTERM/SIGINT and "
                               "at the end of a stage)")
    run_probes: bool = _f(True, "run the behaviour probes before and after recovery")
    probes: list = _f([], "behaviour probes: a list of {name, prompt, expect, regex, think, max_new_tokens}; "
                      "empty = defaults for the model type (see vac/probes.py)")
    wandb_project: str | None = _f("vac-recover", "Weights & Biases project (none = no W&B)")
    wandb_mode: str = _f("offline", "W&B mode: online | offline | disabled ($WANDB_MODE wins)")
    device: str = _f("auto", "auto (accelerate's choice) | cpu")
    mixed_precision: str = _f("auto", "auto (bf16 on a GPU that has it, else none) | no | bf16 | fp16")
    seed: int = _f(0, "random seed (data order, mixing)")

    def validate(self) -> "RecoverConfig":
        for name in ("batch_size", "grad_accum", "seq_len"):
            if int(getattr(self, name)) < 1:
                raise VacError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "warmup_steps", "eval_samples", "eval_every", "periodic_eval_samples", "sft_steps",
                     "checkpoint_every"):
            if int(getattr(self, name)) < 0:
                raise VacError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.steps == 0 and self.max_minutes <= 0:
            raise VacError("give --steps > 0 or a time budget --max-minutes > 0")
        if self.max_minutes < 0:
            raise VacError(f"--max-minutes must be >= 0, got {self.max_minutes}")
        if not (0.0 <= self.alpha <= 1.0 and 0.0 <= self.sft_alpha <= 1.0):
            raise VacError(f"--alpha and --sft-alpha must be in [0, 1], got {self.alpha}, {self.sft_alpha}")
        if not 0.0 <= self.chat_fraction <= 1.0:
            raise VacError(f"--chat-fraction must be in [0, 1], got {self.chat_fraction}")
        if self.temperature <= 0 or self.lr <= 0 or self.attn_lr_mult <= 0:
            raise VacError("--temperature, --lr and --attn-lr-mult must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise VacError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.optimizer not in OPTIMIZERS:
            raise VacError(f"unknown --optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.mixed_precision not in PRECISIONS:
            raise VacError(f"unknown --mixed-precision {self.mixed_precision!r}; choose {', '.join(PRECISIONS)}")
        if self.device not in ("auto", "cpu"):
            raise VacError(f"--device must be auto or cpu (devices come from `accelerate launch`), got {self.device!r}")
        if self.sft_steps and not self.chat_data:
            raise VacError("--sft-steps needs --chat-data (conversations with 'messages')")
        if self.chat_fraction >= 1 and not self.chat_data:
            raise VacError("--chat-fraction 1 needs --chat-data")
        if self.wandb_mode not in ("online", "offline", "disabled"):
            raise VacError(f"--wandb-mode must be online, offline or disabled, got {self.wandb_mode!r}")
        from vac.probes import probes_from_config

        probes_from_config(self.probes)  # raises on malformed probes
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: options that may change when a run is resumed: they do not alter the training trajectory
RESUMABLE_CHANGES = frozenset({"max_minutes", "eval_every", "eval_samples", "periodic_eval_samples",
                               "checkpoint_every", "run_probes",
                               "probes", "wandb_project", "wandb_mode", "device", "mixed_precision"})


def make_recover_config(values: dict) -> RecoverConfig:
    known = {f.name for f in dataclasses.fields(RecoverConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise VacError(f"unknown recovery options {unknown}; valid: {', '.join(sorted(known))}")
    for f in dataclasses.fields(RecoverConfig):  # YAML reads 1e-4 as a string, and 0 as an int
        v = values.get(f.name)
        if f.name in values and isinstance(f.default, (int, float)) and not isinstance(f.default, bool) \
                and isinstance(v, (str, int, float)) and not isinstance(v, bool):
            try:
                values[f.name] = type(f.default)(float(v)) if isinstance(f.default, int) else float(v)
            except ValueError:
                raise VacError(f"--{f.name.replace('_', '-')} must be a number, got {v!r}") from None
            if isinstance(f.default, int) and float(v) != int(float(v)):
                raise VacError(f"--{f.name.replace('_', '-')} must be an integer, got {v!r}")
    return RecoverConfig(**values).validate()


def load_recover_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise VacError(f"config file {p} does not exist; see configs/recover-default.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise VacError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise VacError(f"config file {p} must hold a mapping of option: value")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(RecoverConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VacError(f"config file {p} has unknown keys {unknown}; valid keys: {', '.join(sorted(known))}")
    return data


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
    from vac.families import find_targets

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


def _ranks(model: nn.Module) -> dict[str, int | None]:
    from vac.families import find_targets

    out = {}
    for t in find_targets(model):
        down = getattr(model.get_submodule(t.name), "down", None)
        out[t.name] = None if down is None else int(down.weight.shape[0])
    return out


def _fingerprint(student: nn.Module, teacher: nn.Module, rcfg: RecoverConfig,
                 classes: dict[str, str | None]) -> dict:
    """What a checkpoint must match to be resumed: trajectory-relevant options and the starting student."""
    # a checksum, not a hash: it only has to tell a different starting checkpoint apart (no float64 copy of 7B)
    frozen = sum(float(p.detach().sum(dtype=torch.float32)) for n, p in student.named_parameters()
                 if classes.get(n) is None)
    return {"recover": {k: v for k, v in rcfg.to_dict().items() if k not in RESUMABLE_CHANGES},
            "student": {"ranks": _ranks(student), "trainable": sorted(n for n, g in classes.items() if g),
                        "frozen_checksum": frozen},
            "teacher": {"vocab": int(teacher.get_output_embeddings().weight.shape[0]),
                        "params": sum(p.numel() for p in teacher.parameters())}}


def _fingerprint_diff(saved: dict, now: dict) -> list[str]:
    diffs = []
    for k in sorted(set(saved["recover"]) | set(now["recover"])):
        if saved["recover"].get(k) != now["recover"].get(k):
            diffs.append(f"{k}: {saved['recover'].get(k)!r} -> {now['recover'].get(k)!r}")
    a, b = saved["student"], now["student"]
    if a["ranks"] != b["ranks"] or a["trainable"] != b["trainable"]:
        diffs.append("the student's ranks / trainable parameters")
    elif not math.isclose(a["frozen_checksum"], b["frozen_checksum"], rel_tol=1e-4, abs_tol=1e-4):
        diffs.append("the student's frozen weights (a different starting checkpoint)")
    if saved["teacher"] != now["teacher"]:
        diffs.append(f"the teacher ({saved['teacher']} -> {now['teacher']})")
    return diffs


# --- checkpoints -----------------------------------------------------------------------------------------


def _json_dump(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


class Checkpointer:
    """One checkpoint per run directory, replaced atomically.

    The new checkpoint is written to a temporary sibling, then swapped in with two renames; a
    crash between them leaves the previous checkpoint under ``.checkpoint.old``, which ``find``
    falls back to. A SIGKILL at any moment therefore loses at most one checkpoint interval.
    """

    def __init__(self, run_dir: Path, accelerator):
        self.run_dir, self.acc = Path(run_dir), accelerator
        self.path, self.old = self.run_dir / CHECKPOINT, self.run_dir / f".{CHECKPOINT}.old"

    def find(self) -> Path | None:
        for p in (self.path, self.old):
            if (p / "state.json").is_file():
                return p
        return None

    def save(self, model, optimizer, scheduler, state: dict, fingerprint: dict) -> None:
        from safetensors.torch import save_file

        acc = self.acc
        tmp = self.run_dir / f".{CHECKPOINT}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if _is_fsdp(acc):
            acc.save_state(str(tmp / "accelerate"))  # sharded model + optimizer, every rank takes part
        elif acc.is_main_process:
            unwrapped = acc.unwrap_model(model)
            weights = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in unwrapped.named_parameters()
                       if p.requires_grad}
            save_file(weights, str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if acc.is_main_process:
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            _json_dump(tmp / "state.json", {**state, "python_random": random.getstate()})
            _json_dump(tmp / "config.json", fingerprint)
            if self.path.exists():
                shutil.rmtree(self.old, ignore_errors=True)
                os.replace(self.path, self.old)
            os.replace(tmp, self.path)
            shutil.rmtree(self.old, ignore_errors=True)
        acc.wait_for_everyone()

    def check(self, fingerprint: dict) -> Path | None:
        path = self.find()
        if path is None:
            return None
        saved = json.loads((path / "config.json").read_text())
        diffs = _fingerprint_diff(saved, fingerprint)
        if diffs:
            raise VacError(f"cannot resume from {path}: it was written by a different run configuration "
                           f"({'; '.join(diffs)}). Resume with the same options, or start a new --run-dir")
        return path

    def load_state(self, path: Path) -> dict:
        return json.loads((path / "state.json").read_text())

    def load_weights(self, path: Path, model, optimizer, *, mid_stage: bool) -> None:
        """Trainable weights and RNG states (from any checkpoint, a stage boundary included)."""
        from safetensors.torch import load_file

        acc = self.acc
        if _is_fsdp(acc):  # sharded model and optimizer come back together
            acc.load_state(str(path / "accelerate"))
            if not mid_stage:  # a new stage starts with fresh optimizer moments
                getattr(optimizer, "optimizer", optimizer).state.clear()
        else:
            params = dict(acc.unwrap_model(model).named_parameters())
            weights = load_file(str(path / "trainable.safetensors"))
            if set(weights) != {n for n, p in params.items() if p.requires_grad}:
                raise VacError(f"checkpoint {path} holds different trainable parameters than this run")
            with torch.no_grad():
                for n, w in weights.items():
                    params[n].copy_(w.to(params[n].device, params[n].dtype))
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        r = self.load_state(path)["python_random"]
        random.setstate((r[0], tuple(r[1]), r[2]))

    def load_optimizer(self, path: Path, optimizer, scheduler) -> None:
        """Optimizer and scheduler of the stage the checkpoint was taken in."""
        if not _is_fsdp(self.acc):  # (FSDP: loaded with the weights)
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))


def _is_fsdp(acc) -> bool:
    return str(getattr(acc, "distributed_type", "")).endswith("FSDP")


# --- signals, tracking, plots --------------------------------------------------------------------------------


class StopRequest:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop at the next step; a second one interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: checkpointing and stopping after this step (again to stop at once)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def requested(self, acc) -> bool:
        flag = self.signum is not None
        if acc.num_processes > 1:  # every rank must stop at the same step (collective checkpoint)
            t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
            flag = bool(acc.reduce(t, reduction="sum").item() > 0)
        return flag


class Tracker:
    """Weights & Biases on the main process; off when no project, mode disabled, or not main."""

    def __init__(self, rcfg: RecoverConfig, run_dir: Path | None, main: bool, run_id: str | None, config: dict):
        mode = os.environ.get("WANDB_MODE") or rcfg.wandb_mode
        self.run = None
        if main and rcfg.wandb_project and mode != "disabled":
            import wandb

            self.run = wandb.init(project=rcfg.wandb_project, mode=mode, config=config, id=run_id, resume="allow",
                                  dir=str(run_dir) if run_dir else None)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, data: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def plot_history(history: dict, path: Path) -> Path:
    """Training loss (per stage) and evaluation curves (PPL of student and teacher, KL) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for stage in sorted({r["stage"] for r in history["train"]}):
        rows = [r for r in history["train"] if r["stage"] == stage]
        xs, ys = [r["global_step"] for r in rows], [r["loss"] for r in rows]
        (raw,) = ax1.plot(xs, ys, lw=0.6, alpha=0.35)
        k = max(1, len(ys) // 25)  # running mean for readability
        smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
        ax1.plot(xs, smooth, lw=1.5, color=raw.get_color(), label=f"{stage} loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ev = history["eval"]
    if ev:
        xs = [r["global_step"] for r in ev]
        ax2.plot(xs, [r["ppl"] for r in ev], marker="o", label="student PPL")
        if ev[0].get("dense_ppl"):
            ax2.axhline(ev[0]["dense_ppl"], color="k", ls="--", lw=1, label="teacher PPL")
        ax2.set_xlabel("step")
        ax2.set_ylabel("perplexity (held-out)")
        ax2.grid(alpha=0.3)
        ax3 = ax2.twinx()
        ax3.plot(xs, [r["kl"] for r in ev], color="tab:red", marker="s", ms=3, label="KL(teacher‖student)")
        ax3.set_ylabel("KL")
        h1, l1 = ax2.get_legend_handles_labels()
        h2, l2 = ax3.get_legend_handles_labels()
        ax2.legend(h1 + h2, l1 + l2, fontsize=8)
    fig.suptitle("VAC recovery")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the loop --------------------------------------------------------------------------------------------------


def make_accelerator(rcfg: RecoverConfig):
    from accelerate import Accelerator

    cpu = rcfg.device == "cpu"
    precision = rcfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(cpu=cpu, mixed_precision=precision)


@dataclass
class _Stage:
    name: str
    steps: int  # 0: set by the time budget
    lr: float
    alpha: float
    minutes: float


def _stages(rcfg: RecoverConfig) -> list[_Stage]:
    stages = [_Stage("kd", rcfg.steps, rcfg.lr, rcfg.alpha, rcfg.max_minutes)]
    if rcfg.sft_steps:
        stages.append(_Stage("sft", rcfg.sft_steps, rcfg.sft_lr or rcfg.lr, rcfg.sft_alpha, 0.0))
    return stages


def _stage_mix(stage: _Stage, rcfg: RecoverConfig, tokenizer):
    from vac.mixing import distillation_mix, replay_mix

    if stage.name == "kd":
        return distillation_mix(tokenizer, pretrain=rcfg.pretrain_data, chat=rcfg.chat_data,
                                chat_fraction=rcfg.chat_fraction, seq_len=rcfg.seq_len, seed=rcfg.seed,
                                eval_source=rcfg.eval_data)
    return replay_mix(tokenizer, chat=rcfg.chat_data, seq_len=rcfg.seq_len, seed=rcfg.seed,
                      eval_source=rcfg.eval_data)


def _evaluate(acc, model, teacher, eval_blocks, batch_size: int, progress: bool) -> dict:
    from vac.evaluate import compare

    was_training = model.training
    model.eval()
    with acc.autocast():
        res = compare({"student": model}, eval_blocks, reference=teacher, batch_size=batch_size, progress=progress)
    model.train(was_training)
    return res


def _probe(acc, model, tokenizer, probes) -> list[dict]:
    from vac.probes import run_probes

    unwrapped = acc.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    with acc.autocast():
        out = run_probes(unwrapped, tokenizer, probes)
    unwrapped.train(was_training)
    return out


def recover_(student: nn.Module, teacher: nn.Module, tokenizer, rcfg: RecoverConfig, *,
             eval_blocks: torch.Tensor | None = None, run_dir: str | Path | None = None, progress: bool = True,
             resume: bool = False, accelerator=None,
             on_step: Callable[[str, int], None] | None = None) -> dict:
    """Distil ``teacher`` into ``student`` in place (then replay conversations if ``sft_steps``).

    ``eval_blocks`` (token ids, held out from training) are evaluated before, every
    ``eval_every`` steps and after; without them, ``eval_samples`` blocks of ``eval_data``'s
    evaluation split are used. ``run_dir`` receives checkpoints, ``recover.json`` and
    ``recover_curves.png``; with ``resume`` the run continues from its checkpoint there.
    ``on_step(stage, step)`` is called after every optimizer step (tests use it to interrupt).

    Returns ``config``, ``before`` / ``after`` ({"dense", "student"} metrics), ``history``
    (train and eval rows), ``probes`` (teacher / before / after), ``steps`` per stage, ``tokens``,
    ``interrupted`` (and the ``signal``) and ``timings_s``.
    """
    from vac.probes import default_probes, probes_from_config

    rcfg.validate()
    check_compatible(student, teacher)
    acc = accelerator or make_accelerator(rcfg)
    main = acc.is_main_process
    run_dir = Path(run_dir) if run_dir is not None else None
    if resume and run_dir is None:
        raise VacError("resuming needs the run directory that holds the checkpoint")
    random.seed(rcfg.seed)
    torch.manual_seed(rcfg.seed)
    if eval_blocks is None and rcfg.eval_samples:
        from vac.data import token_blocks

        shared = rcfg.eval_data in (rcfg.pretrain_data, rcfg.chat_data)
        eval_blocks = token_blocks(rcfg.eval_data, tokenizer, rcfg.eval_samples, rcfg.seq_len, split="eval",
                                   shared=shared, seed=rcfg.seed)
    probes = probes_from_config(rcfg.probes) or default_probes(tokenizer)

    # --- the run's state: fresh, or from the checkpoint ---
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    classes = classify_parameters(student, train_norms=rcfg.train_norms, train_embeddings=rcfg.train_embeddings)
    fingerprint = _fingerprint(student, teacher, rcfg, classes)
    ckpt = Checkpointer(run_dir, acc) if run_dir is not None else None
    path = None
    if ckpt is not None:
        if resume:
            path = ckpt.check(fingerprint)
            if path is None:
                log.warning("no checkpoint in %s: starting from the beginning", run_dir)
        elif ckpt.find() is not None:
            raise VacError(f"{run_dir} already holds a recovery checkpoint; resume it (--resume) or choose "
                           "another run directory")
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = ckpt.load_state(path) if path is not None else {
        "stage": 0, "step": 0, "global_step": 0, "data": None, "clock": 0.0, "done": False, "tokens": 0,
        "history": {"train": [], "eval": []}, "before": None, "probes": {}, "wandb_id": None}
    history = state["history"]
    stages = _stages(rcfg)
    first = min(state["stage"], len(stages) - 1)
    # data streams up front: a source without usable text fails before minutes of evaluation
    mixes = {si: _stage_mix(stage, rcfg, tokenizer) for si, stage in enumerate(stages)
             if si >= state["stage"] and not state["done"]}
    if main:
        log.info("recovery config: %s", json.dumps(rcfg.to_dict()))

    # --- model and first optimizer go through accelerate together (FSDP2 shards both at once) ---
    if rcfg.balance_factors:  # (a resumed run overwrites the factors from its checkpoint right after)
        balance_factors_(student)
    teacher.eval().requires_grad_(False)
    teacher.to(acc.device)
    if rcfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = param_groups(student, rcfg, lr=stages[first].lr, classes=classes)
    check_param_groups(student, groups)
    student.train()
    model, optimizer = acc.prepare(student, make_optimizer(groups, rcfg, acc.device))
    if path is not None:
        ckpt.load_weights(path, model, optimizer, mid_stage=state["step"] > 0)
    tracker = Tracker(rcfg, run_dir, main, state.get("wandb_id"), rcfg.to_dict())
    state["wandb_id"] = tracker.run_id or state.get("wandb_id")
    timings: dict[str, float] = {}
    stop = StopRequest()
    interrupted, after = False, None

    def eval_row(stage_name: str, step: int, global_step: int, periodic: bool = False) -> dict:
        t0 = time.perf_counter()
        blocks = eval_blocks[: rcfg.periodic_eval_samples] if periodic and rcfg.periodic_eval_samples else eval_blocks
        res = _evaluate(acc, model, teacher, blocks, rcfg.batch_size, progress and main)
        timings["evaluate"] = timings.get("evaluate", 0.0) + time.perf_counter() - t0
        row = {"stage": stage_name, "step": step, "global_step": global_step, "dense_ppl": res["dense"]["ppl"],
               "blocks": int(blocks.shape[0]), **{k: res["student"][k] for k in ("ppl", "kl", "top1")}}
        history["eval"].append(row)
        tracker.log({f"eval/{k}": row[k] for k in ("ppl", "kl", "top1")}, step=global_step)
        if main:
            log.info("eval %s step %d: ppl %.3f (teacher %.3f), kl %.4f, top-1 %.2f%%", stage_name, step,
                     row["ppl"], row["dense_ppl"], row["kl"], 100 * row["top1"])
        return res

    try:
        with stop:
            t_eval = 0.0
            if state["before"] is None and eval_blocks is not None:
                state["before"] = eval_row("before", 0, 0)
                n_periodic = rcfg.periodic_eval_samples or len(eval_blocks)
                t_eval = timings["evaluate"] * min(1.0, n_periodic / len(eval_blocks))  # for a time budget
            if rcfg.run_probes and not state["probes"]:
                state["probes"] = {"teacher": _probe(acc, teacher, tokenizer, probes),
                                   "before": _probe(acc, model, tokenizer, probes)}
            for si, stage in enumerate(stages):
                if si < state["stage"] or state["done"]:
                    continue
                if si != first:  # a later stage: its own optimizer and schedule
                    if _is_fsdp(acc) and optimizer in acc._optimizers:
                        acc._optimizers.remove(optimizer)  # keep save_state/load_state to one optimizer
                    groups = param_groups(model, rcfg, lr=stage.lr, classes=classes)
                    check_param_groups(model, groups)
                    optimizer = acc.prepare_optimizer(make_optimizer(groups, rcfg, acc.device))
                interrupted = _run_stage(
                    stage, si, acc=acc, model=model, teacher=teacher, mix=mixes[si], optimizer=optimizer,
                    rcfg=rcfg, state=state, ckpt=ckpt, path=path if si == first else None, fingerprint=fingerprint,
                    tracker=tracker, stop=stop, on_step=on_step, eval_row=eval_row, t_eval=t_eval,
                    has_eval=eval_blocks is not None, progress=progress and main, timings=timings)
                if interrupted:
                    break
                if si < len(stages) - 1 and eval_blocks is not None:
                    eval_row(stage.name, state[f"steps_{stage.name}"], state["global_step"])
                state.update(stage=si + 1, step=0, clock=0.0, data=None, done=si == len(stages) - 1)
                if ckpt is not None:  # stage boundary: a resume starts the next stage (or only evaluates)
                    ckpt.save(model, optimizer, None, state, fingerprint)
            if not interrupted:
                if eval_blocks is not None:
                    last = history["train"][-1] if history["train"] else {"stage": "before", "step": 0,
                                                                            "global_step": 0}
                    after = eval_row(last["stage"], last["step"], last["global_step"])
                if rcfg.run_probes:
                    state["probes"]["after"] = _probe(acc, model, tokenizer, probes)
    finally:
        tracker.finish()
        acc.unwrap_model(model, keep_fp32_wrapper=False)
        for n, p in student.named_parameters():
            p.requires_grad_(flags.get(n, False))
        if rcfg.gradient_checkpointing:
            student.gradient_checkpointing_disable()
        student.eval()

    result = {
        "config": rcfg.to_dict(),
        "before": state["before"],
        "after": after,
        "history": history,
        "probes": state["probes"] or None,
        "steps": {s.name: state.get(f"steps_{s.name}", 0) for s in stages},
        "tokens": state["tokens"],
        "interrupted": interrupted,
        "signal": stop.signum,
        "timings_s": timings,
    }
    if main and run_dir is not None:
        if history["train"]:
            result["plot"] = str(plot_history(history, run_dir / "recover_curves.png"))
        _json_dump(run_dir / "recover.json", result)
    return result


def _run_stage(stage: _Stage, si: int, *, acc, model, teacher, mix, optimizer, rcfg: RecoverConfig,
               state: dict, ckpt, path, fingerprint, tracker, stop, on_step, eval_row, t_eval: float,
               has_eval: bool, progress: bool, timings: dict) -> bool:
    """Train one stage to its horizon (or time budget); True if a signal stopped it."""
    from tqdm.auto import tqdm

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(rcfg.warmup_steps, stage.steps or 10 ** 9, rcfg.min_lr_ratio))
    resumed = path is not None and state["stage"] == si and state["step"] > 0
    if resumed:
        ckpt.load_optimizer(path, optimizer, scheduler)
        mix.load(state["data"])
        step, clock = state["step"], state["clock"]
    else:
        step, clock = 0, 0.0
        state.update(stage=si, step=0, clock=0.0, data=mix.state())
    lam = scheduler.lr_lambdas[0]
    budget = stage.minutes * 60
    base_step = state["global_step"] - step
    # a time budget fixes the horizon after two timed steps (the first pays for warm-up allocations)
    fit_at = step + 3 if budget and (lam.total >= 10 ** 9 or not resumed) else -1
    bar = tqdm(total=lam.total if lam.total < 10 ** 9 else None, initial=step, desc=f"recover/{stage.name}",
               disable=not progress, unit="step", dynamic_ncols=True)
    t_stage = time.perf_counter() - clock
    marks: dict[int, float] = {}
    interrupted = False
    while step < lam.total and not (budget and time.perf_counter() - t_stage >= budget):
        metrics = _train_step(acc, model, teacher, mix, rcfg, stage.alpha)
        if rcfg.max_grad_norm > 0:
            metrics["grad_norm"] = float(acc.clip_grad_norm_(model.parameters(), rcfg.max_grad_norm))
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        state["global_step"] = gstep = base_step + step
        state["tokens"] += metrics["tokens"]
        state[f"steps_{stage.name}"] = step
        row = {"stage": stage.name, "step": step, "global_step": gstep, "lr": lrs.get("mlp"), **metrics}
        state["history"]["train"].append(row)
        tracker.log({f"train/{k}": v for k, v in row.items() if isinstance(v, (int, float))}, step=gstep)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lrs.get('mlp', 0):.2e}")
        now = marks[step] = time.perf_counter() - t_stage
        if step == fit_at:
            per_step = (marks[step] - marks[step - 2]) / 2
            if rcfg.eval_every and has_eval:
                per_step += t_eval / rcfg.eval_every
            fit = step + max(0, int((budget - now) / max(per_step, 1e-9)))
            lam.total = min(stage.steps, fit) if stage.steps else fit
            bar.total = lam.total
            log.info("time budget %.1f min at %.2f s/step: %d steps", stage.minutes, per_step, lam.total)
        if rcfg.eval_every and has_eval and step % rcfg.eval_every == 0 and step < lam.total:
            eval_row(stage.name, step, gstep, periodic=True)
        if on_step is not None:
            on_step(stage.name, step)
        stopping = stop.requested(acc)
        if ckpt is not None and (stopping or (rcfg.checkpoint_every and step % rcfg.checkpoint_every == 0)):
            state.update(step=step, clock=time.perf_counter() - t_stage, data=mix.state())
            ckpt.save(model, optimizer, scheduler, state, fingerprint)
        if stopping:
            interrupted = True
            break
    bar.close()
    state[f"steps_{stage.name}"] = step
    timings[stage.name] = timings.get(stage.name, 0.0) + time.perf_counter() - t_stage - clock
    return interrupted


def _train_step(acc, model, teacher, mix, rcfg: RecoverConfig, alpha: float) -> dict:
    """One optimizer step's forward/backward over ``grad_accum`` micro-batches (no optimizer update)."""
    n_local = rcfg.batch_size
    rows = n_local * acc.num_processes
    lo = acc.process_index * n_local
    # every process draws the same global micro-batches and keeps its slice: one data position for all
    micro = [tuple(t[lo: lo + n_local] for t in mix.next_batch(rows)) for _ in range(rcfg.grad_accum)]
    local_tokens = sum(int(m[:, 1:].sum()) for _, m in micro)
    total = torch.tensor([float(local_tokens)], device=acc.device)
    if acc.num_processes > 1:
        total = acc.reduce(total, reduction="sum")
    total_tokens = max(1.0, float(total.item()))
    sums = torch.zeros(3, dtype=torch.float64)
    for i, (ids, mask) in enumerate(micro):
        ids, mask = ids.to(acc.device), mask.to(acc.device)
        sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(model)
        with sync:
            teacher_logits = None
            if alpha > 0:
                with torch.no_grad(), acc.autocast():
                    teacher_logits = teacher(input_ids=ids, use_cache=False).logits
            logits = model(input_ids=ids, use_cache=False).logits
            loss, parts = distillation_loss(logits, teacher_logits, ids, mask, temperature=rcfg.temperature,
                                            alpha=alpha)
            # DDP averages gradients over processes: scale so the result is the global per-token mean
            acc.backward(loss * (acc.num_processes / total_tokens))
            sums += torch.tensor([loss.item(), parts["kl"].item(), parts["nll"].item()], dtype=torch.float64)
            del logits, teacher_logits, loss
    if acc.num_processes > 1:
        sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
    loss, kl, nll = (sums / total_tokens).tolist()
    return {"loss": loss, "kl": kl, "nll": nll, "tokens": int(total_tokens)}


# --- CLI ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vac.recover", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Recover a VAC-compressed checkpoint by distillation from its dense teacher, and re-export it. "
                    "Several GPUs: `accelerate launch [--config_file configs/accelerate-fsdp-7b.yaml] -m vac.recover ...`.")
    p.add_argument("--student", required=True, help="directory of a checkpoint exported by `python -m vac.compress`")
    p.add_argument("--teacher", required=True, help="the dense model it was compressed from (hub id, directory, "
                   ".gguf, or 'smollm2-135m')")
    p.add_argument("--out", help="output directory of the recovered checkpoint (default: STUDENT-recovered)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--run-dir", help="checkpoints, curves and W&B files (default: OUT.run)")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --run-dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights of the student (trained: keep float32 master weights under bf16 autocast)")
    p.add_argument("--teacher-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights of the teacher (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--config", help="YAML file of recovery options (configs/recover-default.yaml); the command "
                   "line overrides it")
    for f in dataclasses.fields(RecoverConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"] + f" (default: {default})")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, (list, dict)):
            p.add_argument(flag, type=yaml.safe_load, **kw)
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

    from vac.models import DTYPES, load_tokenizer

    d = Path(directory).expanduser()
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise VacError(f"--student {d}: no config.json; point it at a directory written by `python -m vac.compress`")
    if "vac" not in json.loads(cfg_path.read_text()):
        raise VacError(f"--student {d} is not a VAC checkpoint (config.json has no 'vac' entry); compress it first "
                       "with `python -m vac.compress --out DIR`")
    tok = load_tokenizer(d)
    try:
        model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=DTYPES[dtype])
    except Exception as e:
        raise VacError(f"could not load the student from {d} ({type(e).__name__}: {e})") from e
    model.config.use_cache = False
    return model.eval(), tok


def run_cli(args: argparse.Namespace, rcfg: RecoverConfig) -> int:
    from vac import __version__
    from vac.data import token_blocks
    from vac.export import check_out_dir, export, write_json
    from vac.models import load

    student_dir = Path(args.student).expanduser()
    out = Path(args.out).expanduser() if args.out else student_dir.with_name(student_dir.name + "-recovered")
    run_dir = Path(args.run_dir).expanduser() if args.run_dir else out.with_name(out.name + ".run")
    check_out_dir(out, args.overwrite)
    acc = make_accelerator(rcfg)
    student, tok = load_student(student_dir, args.dtype)
    tdtype = args.teacher_dtype
    if tdtype == "auto":
        tdtype = "bfloat16" if acc.device.type == "cuda" else "float32"
    teacher_loaded = load(args.teacher, tdtype, "cpu")
    check_compatible(student, teacher_loaded.model, tok, teacher_loaded.tokenizer)
    eval_blocks = None
    if rcfg.eval_samples:
        shared = rcfg.eval_data in (rcfg.pretrain_data, rcfg.chat_data)
        eval_blocks = token_blocks(rcfg.eval_data, tok, rcfg.eval_samples, rcfg.seq_len, split="eval",
                                   shared=shared, seed=rcfg.seed)
    result = recover_(student, teacher_loaded.model, tok, rcfg, eval_blocks=eval_blocks, run_dir=run_dir,
                      resume=args.resume, accelerator=acc)
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
        ev = report.setdefault("evaluation", {})
        ev.setdefault("data", rcfg.eval_data)
        ev.setdefault("dense", result["after"]["dense"])
        ev.setdefault("compressed", result["before"]["student"] if result["before"] else None)
        ev["recovered"] = result["after"]["student"]
    vac_meta = dict(student.config.vac)
    vac_meta["recovered"] = {"teacher": args.teacher, "steps": result["steps"], "tokens": result["tokens"]}

    def extras(tmp: Path) -> None:
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(_prior_markdown(student_dir) + recovery_markdown(result))
        if result.get("plot"):
            shutil.copy2(result["plot"], tmp / "recover_curves.png")

    verify = eval_blocks[:1, :64] if eval_blocks is not None else None
    export(student, tok, out, vac_meta=vac_meta, overwrite=args.overwrite, write_extras=extras, verify_ids=verify)
    print(recovery_markdown(result))
    print(f"wrote {out}")
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
        lines += ["| probe | teacher | before | after |", "|---|---|---|---|"]
        pr = result["probes"]
        for i, p in enumerate(pr.get("teacher", [])):
            cells = [("pass" if pr[k][i]["passed"] else "fail") if k in pr else "–" for k in ("teacher", "before", "after")]
            lines.append(f"| {p['name']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    opts = {f.name: getattr(args, f.name) for f in dataclasses.fields(RecoverConfig) if hasattr(args, f.name)}
    try:
        values = load_recover_yaml(args.config) if args.config else {}
        values.update(opts)  # the command line wins over the YAML file
        rcfg = make_recover_config(values)
        return run_cli(args, rcfg)
    except VacError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["RecoverConfig", "recover_", "make_recover_config", "load_recover_yaml", "distillation_loss",
           "classify_parameters", "param_groups", "check_param_groups", "make_optimizer", "WarmupCosine",
           "balance_factors", "balance_factors_",
           "check_compatible", "plot_history", "load_student", "main"]
