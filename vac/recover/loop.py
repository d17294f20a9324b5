"""The training loop: ``recover_`` and its stages and steps."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vac.errors import VacError
from vac.recover.checkpoint import (Checkpointer, StopRequest, Tracker, _fingerprint, _is_fsdp, _json_dump,
                                    checkpoint_step, has_checkpoint, plot_history)
from vac.recover.config import RecoverConfig
from vac.recover.training import (WarmupCosine, balance_factors_, check_compatible, check_param_groups,
                                  classify_parameters, distillation_loss, make_optimizer, param_groups)

log = logging.getLogger("vac.recover")


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


def _evaluate(acc, model, teacher, eval_blocks, batch_size: int, progress: bool, groups=None) -> dict:
    from vac.evaluate import compare

    was_training = model.training
    model.eval()
    with acc.autocast():
        res = compare({"student": model}, eval_blocks, reference=teacher, batch_size=batch_size, progress=progress,
                      groups=groups)
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
             eval_blocks: torch.Tensor | None = None, eval_groups: list[str] | None = None,
             run_dir: str | Path | None = None, progress: bool = True,
             resume: bool = False, accelerator=None,
             on_step: Callable[[str, int], None] | None = None) -> dict:
    """Distil ``teacher`` into ``student`` in place (then replay conversations if ``sft_steps``).

    ``eval_blocks`` (token ids, held out from training) are evaluated before, every
    ``eval_every`` steps and after; without them, ``eval_samples`` blocks of ``eval_data``'s
    evaluation split are used (of every domain, for a bundled mixture). ``eval_groups`` (the domain
    of each block) adds a per-domain evaluation before and after. ``run_dir`` receives checkpoints, ``recover.json`` and
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
        from vac.data import evaluation_blocks

        shared = rcfg.eval_data in (rcfg.pretrain_data, rcfg.chat_data)
        eval_blocks, eval_groups = evaluation_blocks(rcfg.eval_data, tokenizer, rcfg.eval_samples, rcfg.seq_len,
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
        elif has_checkpoint(run_dir):
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
        # (an interleaved prefix of a per-domain evaluation is itself mixed; the full one is reported per domain)
        groups = eval_groups if eval_groups is not None and len(blocks) == len(eval_blocks) else None
        res = _evaluate(acc, model, teacher, blocks, rcfg.batch_size, progress and main, groups=groups)
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
        # the norm is measured even without clipping (max norm inf): a NaN gradient must be seen
        # before the optimizer writes it into the weights
        metrics["grad_norm"] = float(acc.clip_grad_norm_(model.parameters(), rcfg.max_grad_norm or float("inf")))
        try:
            _check_finite_step(metrics, stage.name, step + 1, ckpt)
        except VacError:
            bar.close()  # (so that the error starts on a line of its own)
            raise
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


def _check_finite_step(metrics: dict, stage: str, step: int, ckpt) -> None:
    """Stop on a NaN/Inf loss or gradient norm, before the optimizer step and before any checkpoint:
    the weights in memory and the last checkpoint on disk are then both from the last good step."""
    from vac.checks import check_loss

    if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
        return
    kept = (f"the last good checkpoint is kept in {ckpt.path} ({checkpoint_step(ckpt.path)})"
            if ckpt is not None and ckpt.path.is_dir() else "no checkpoint was written before it")
    hint = (f"training stopped and nothing was saved from this step; {kept}. Lower --lr or --attn-lr-mult, or "
            "check --temperature and the student's weights, then start again")
    check_loss(metrics["loss"], f"recovery {stage} step {step}: the training loss", hint)
    check_loss(metrics["grad_norm"], f"recovery {stage} step {step}: the gradient norm", hint)


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
