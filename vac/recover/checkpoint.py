"""Run state: fingerprint, RNG state, atomic checkpoints, stop signals, W&B tracking and plots."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import threading
from pathlib import Path

import torch
from torch import nn

from vac.checks import check_finite
from vac.errors import VacError
from vac.files import fsync_dir, sha256_file
from vac.recover.config import RESUMABLE_CHANGES, RecoverConfig

log = logging.getLogger("vac.recover")

CHECKPOINT = "checkpoint"
PREVIOUS = "checkpoint-previous"
MANIFEST = "manifest.json"


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


def write_manifest(directory: Path, summary: dict) -> None:
    """Flush every file of ``directory`` to disk, then record its size and sha256 in the manifest,
    written last: a checkpoint without a manifest that verifies is incomplete or damaged."""
    files = {}
    for p in sorted(q for q in directory.rglob("*") if q.is_file() and q.name != MANIFEST):
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
        files[p.relative_to(directory).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    with open(directory / MANIFEST, "w") as f:
        f.write(json.dumps({**summary, "files": files}, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(directory)


def verify_checkpoint(directory: Path) -> str | None:
    """What is wrong with a checkpoint directory (None: every file is there, intact)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (an interrupted write, or an older VAC)"
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest is damaged"
    if "state.json" not in files:
        return "the manifest lists no state.json"
    for name, meta in files.items():
        p = directory / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{name} has {p.stat().st_size:,} bytes, the manifest says {meta['bytes']:,} (truncated?)"
        if sha256_file(p) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def checkpoint_step(directory: Path) -> str:
    """'global step 40 (stage 0, step 40)' from a checkpoint's manifest ('step unknown' if unreadable)."""
    try:
        m = json.loads((directory / MANIFEST).read_text())
        return f"global step {m['global_step']} (stage {m['stage']}, step {m['step']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "step unknown"


def _global_step(directory: Path) -> int | None:
    try:
        return int(json.loads((directory / MANIFEST).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


#: what a recovery run folder holds: checkpoints, the run's results, W&B's offline files
RUN_ENTRIES = frozenset({CHECKPOINT, PREVIOUS, f".{CHECKPOINT}.tmp", "recover.json", "recover_curves.png", "wandb"})


def foreign_run_entries(run_dir: Path) -> list[str]:
    """Entries of a recovery run folder that a run does not write (before deleting it for a fresh start)."""
    return sorted(p.name for p in Path(run_dir).iterdir() if p.name not in RUN_ENTRIES)


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds any checkpoint, usable or not (a run to resume, not to overwrite)."""
    return any((Path(run_dir) / name).is_dir() for name in (CHECKPOINT, PREVIOUS))



def _json_dump(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


class Checkpointer:
    """The run directory's checkpoints: the newest and the one before it, each verifiable.

    A checkpoint is written into ``.checkpoint.tmp``, closed by ``manifest.json`` (the size and
    sha256 of every file, written last), verified, and only then rotated in: the newest becomes
    ``checkpoint-previous`` and the new one ``checkpoint``. A SIGKILL at any moment therefore
    leaves at least one complete checkpoint, and a checkpoint damaged later (a truncated or
    altered file) is found by its manifest: resuming falls back to the previous one and says
    which steps are trained again. Two checkpoints are kept on disk.
    """

    def __init__(self, run_dir: Path, accelerator):
        self.run_dir, self.acc = Path(run_dir), accelerator
        self.path, self.previous = self.run_dir / CHECKPOINT, self.run_dir / PREVIOUS
        self.skipped: list[str] = []  # why newer checkpoints were passed over by the last find()

    def candidates(self) -> list[Path]:
        return [p for p in (self.path, self.previous) if p.is_dir()]

    def find(self) -> Path | None:
        """The newest checkpoint that verifies against its manifest (None when there is none at all).

        Raises when checkpoints exist but none is usable: starting over silently would throw
        away a run the user asked to resume."""
        self.skipped = []
        for p in self.candidates():
            problem = verify_checkpoint(p)
            if problem is None:
                return p
            self.skipped.append(f"{p.name} ({checkpoint_step(p)}) is unusable: {problem}")
        if self.skipped:
            raise VacError(f"no usable recovery checkpoint in {self.run_dir}: {'; '.join(self.skipped)}. Start "
                           "over without resuming (a new --run-dir, or --overwrite with vac.compress)")
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
            # an update can overflow even when the loss and gradients were finite: such weights
            # must not replace the last good checkpoint
            try:
                check_finite(weights.items(), f"the trained weights at global step {state.get('global_step')}",
                             f"the checkpoint was not written; the last good one is kept in {self.path}. Lower "
                             "--lr and start again")
            except VacError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            save_file(weights, str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            _json_dump(tmp / "state.json", {**state, "python_random": random.getstate()})
            _json_dump(tmp / "config.json", fingerprint)
            write_manifest(tmp, {k: state.get(k) for k in ("stage", "step", "global_step")})
            problem = verify_checkpoint(tmp)
            if problem is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                raise VacError(f"the checkpoint written to {tmp} does not verify ({problem}); the previous "
                               f"checkpoint is kept. Check the disk under {self.run_dir}")
            # the newest becomes the previous one only now that the new one is complete and verified
            if self.path.exists():
                shutil.rmtree(self.previous, ignore_errors=True)
                os.replace(self.path, self.previous)
            os.replace(tmp, self.path)
            fsync_dir(self.run_dir)
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
        where = checkpoint_step(path)
        if self.skipped:
            newest, here = _global_step(self.path), _global_step(path)
            lost = (f"global steps {here + 1}..{newest} are trained again" if newest is not None and here is not None
                    else "the steps after it are trained again")
            log.warning("%s; resuming from %s at %s: %s", "; ".join(self.skipped), path.name, where, lost)
        else:
            log.info("resuming from %s at %s", path, where)
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
