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

from vac.recover.checkpoint import (  # noqa: F401
    CHECKPOINT, Checkpointer, StopRequest, Tracker, _fingerprint, _fingerprint_diff,
    _is_fsdp, _json_dump, _ranks, _rng_state, plot_history)
from vac.recover.cli import (  # noqa: F401
    _prior_markdown, build_parser, load_student, main, recovery_markdown, run_cli)
from vac.recover.config import (  # noqa: F401
    OPTIMIZERS, PRECISIONS, RESUMABLE_CHANGES, RecoverConfig, _f, load_recover_yaml,
    make_recover_config)
from vac.recover.loop import (  # noqa: F401
    _evaluate, _probe, _run_stage, _Stage, _stage_mix, _stages, _train_step,
    log, make_accelerator, recover_)
from vac.recover.training import (  # noqa: F401
    WarmupCosine, _clean_name, balance_factors, balance_factors_, check_compatible,
    check_param_groups, classify_parameters, distillation_loss, make_optimizer,
    param_groups)

__all__ = ["RecoverConfig", "recover_", "make_recover_config", "load_recover_yaml", "distillation_loss",
           "classify_parameters", "param_groups", "check_param_groups", "make_optimizer", "WarmupCosine",
           "balance_factors", "balance_factors_",
           "check_compatible", "plot_history", "load_student", "main"]
