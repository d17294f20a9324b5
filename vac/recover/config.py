"""Recovery options: ``RecoverConfig``, building it from a dict, and reading the YAML file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from vac.config import coerce_numbers, load_yaml, option
from vac.errors import VacError

OPTIMIZERS = ("auto", "adamw", "adamw8bit")
PRECISIONS = ("auto", "no", "bf16", "fp16")


_f = option


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
    pretrain_data: str = _f("bundled", "pre-training text: 'bundled' (offline, every domain in its share; its "
                            "evaluation documents are never trained on), a .txt/.jsonl/.parquet file or "
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
        from vac.validate import check_recover_options

        check_recover_options(self)  # types, finiteness and ranges of every option
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
    return RecoverConfig(**coerce_numbers(RecoverConfig, values)).validate()


def from_compress_config(cfg) -> RecoverConfig:
    """The recovery options of ``vac.compress --recover-steps/--recover-minutes``: its data and
    sequence length, then --recover-config, then its step and time budget."""
    values = {"pretrain_data": cfg.calib_data, "eval_data": cfg.eval_data, "seq_len": cfg.seq_len,
              "eval_samples": cfg.eval_samples, "seed": cfg.seed}
    values.update(load_recover_yaml(cfg.recover_config) if cfg.recover_config else {})
    values.update(steps=cfg.recover_steps, max_minutes=cfg.recover_minutes)
    return make_recover_config(values)


def load_recover_yaml(path: str | Path) -> dict:
    if not Path(path).is_file():
        raise VacError(f"config file {path} does not exist; see configs/recover-default.yaml")
    return load_yaml(path, RecoverConfig)
