"""The typed configuration of a compression run; its fields are the CLI.

``CompressConfig`` is loaded from YAML (``configs/*.yaml``), overridden from the command line,
validated, and then carried through the pipeline and written into ``report.json``. Each field's
help text (in its metadata) becomes ``--help``; unknown YAML keys are rejected so presets never
rot silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vac.errors import VacError

ORDERS = ("one-shot", "front-to-back", "back-to-front", "middle-out")
GRANULARITIES = ("layer", "matrix")
OBJECTIVES = ("dense-target", "compressed-input")
ALLOCATIONS = ("uniform", "knapsack")
QUANTIZATIONS = ("none", "int8", "w4")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def task_list_type(text: str) -> list[str]:
    """--eval-tasks: 'vac-offline', 'olmo3-base,piqa' or a YAML list."""
    text = text.strip()
    if text.startswith("["):
        from vac.validate import yaml_list_type

        return [str(t) for t in yaml_list_type(text)]
    return [t.strip() for t in text.split(",") if t.strip()]


def option(default, help: str, **kw):
    """A config field with its --help text (mutable defaults copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


_f = option


@dataclass
class CompressConfig:
    # --- what to compress -------------------------------------------------------------------
    model: str = _f("smollm2-135m", "HF hub id, local directory (safetensors), .gguf file, or "
                    "'smollm2-135m' (the bundled SmolLM2-135M-Instruct)")
    ratio: float = _f(1.8, "target compression ratio over the target linear layers "
                      "(dense params / compressed params, > 1)")
    # --- how ----------------------------------------------------------------------------------
    method: str = _f("kfac", "factorization method: svd | whiten | fisher | kfac (see vac/methods.py)")
    fisher_exponent: float = _f(1 / 3, "exponent e on the row/column Fisher means (method fisher)")
    kfac_out_exponent: float = _f(0.25, "output-side exponent a on G (method kfac); 0 = whitening")
    kfac_in_exponent: float = _f(0.5, "input-side exponent b on C (method kfac); 0.5 = whitening")
    damp: float = _f(0.3, "relative damping of covariances: C + damp * mean(diag C) * I. In the dense-target refit "
                     "it is a ridge that pulls the fit towards the dense weights where the calibration text is thin: "
                     "0.1 beat 0.01 on every domain, in and out of the calibration's, and 0.3 beat 0.1 on text left out "
                     "of the calibration; 1.0 loses in-domain (experiments/RESULTS.md, issue #12)")
    # Defaults measured on the bundled model at 1.8x (experiments/RESULTS.md): kfac (a=1/4, b=1/2),
    # knapsack ranks, then front-to-back per matrix, each matrix fitted to the dense model's outputs
    # from the inputs it really sees (dense-target): 3.05x dense PPL against 14.4x for one-shot
    # whitening (SVD-LLM) and 3.9x for the same allocation one-shot. Per layer, the dense-target
    # refit of o/gate/up/down is tuned to inputs that change as soon as q/k/v are compressed, and
    # is much worse (38x): sequential orders need granularity matrix.
    order: Any = _f("front-to-back", "order of sequential compression: one-shot | front-to-back | "
                    "back-to-front | middle-out | a list of layer indices")
    granularity: str = _f("matrix", "unit of sequential compression: matrix (one step per shared-input "
                          "stage, q/k/v, o, gate/up, down, so each matrix sees this layer's earlier matrices "
                          "already compressed) | layer (statistics of the whole layer from one pass)")
    objective: str = _f("dense-target", "closed-loop objective in sequential mode: dense-target "
                        "(fit dense outputs from compressed inputs) | compressed-input (fit W X~)")
    allocation: str = _f("knapsack", "rank allocation: knapsack (ranks traded across matrices by predicted "
                         "loss under one budget) | uniform (same ratio per matrix)")
    multipliers: dict = _f({}, "per-component or per-kind budget multipliers for knapsack, e.g. "
                           "{attention: 1.2, mlp: 0.9}")
    keep_dense: list = _f([], "decoder layer indices whose linears stay dense; negative counts from the end "
                              "([0,-1]: the first and the last, which the search found worth keeping)")
    compress_all: bool = _f(False, "knapsack: every target must be factorized (no 'keep dense' option)")
    rank_grid: int = _f(8, "knapsack ranks are multiples of this (use the quantization group size)")
    # --- data -----------------------------------------------------------------------------------
    calib_data: str = _f("bundled", "calibration text: 'bundled' (VAC's offline corpus: news, encyclopaedia, "
                         "literature, conversation, technical docs and code in equal shares; 'bundled:news' one "
                         "domain, 'bundled:news+code' several, 'bundled:-code' all but one; python -m vac.corpus "
                         "lists them), an HF dataset id, a .txt/.jsonl/.parquet file, or a folder of those")
    eval_data: str = _f("bundled", "evaluation text (held-out documents when the same source as calibration; the "
                        "bundled corpus is always split by document, and a bundled mixture is evaluated per domain)")
    calib_samples: int = _f(64, "number of calibration sequences")
    eval_samples: int = _f(32, "number of evaluation sequences (of every domain, for a bundled mixture)")
    own_samples: int | None = _f(None, "of --calib-samples, this many sequences are sampled from the dense model itself "
                          "(temperature 1 from a random first token, as LLM-QAT's data-free calibration) and mixed "
                          "into the calibration text: the model's own text covers what it was trained on, beyond "
                          "the calibration corpus's domains (calibrated on news, 16 of 64 cut the mean PPL / dense over "
                          "six domains from 20.7x to 5.9x at a 3%% in-domain cost; experiments/RESULTS.md). The whole "
                          "dense model samples: on --device when it fits, else under accelerate's disk offload. "
                          "Default: a quarter of --calib-samples; 0: the calibration text alone", type=int)
    fisher_samples: int = _f(8, "calibration sequences used for gradient statistics (fisher, kfac)")
    grad_rank: int | None = _f(None, "keep the top-k eigenpairs of each output-gradient covariance G and replace the "
                               "rest by their mean (trace kept): bounds the statistics store on very wide layers "
                               "(OLMo-3-32B gate/up: 27648^2 fp32 = 3 GB each). Default: exact", type=int)
    seq_len: int = _f(256, "tokens per sequence")
    batch_size: int = _f(8, "sequences per forward pass")
    seed: int = _f(0, "random seed (data sampling)")
    # --- after factorization ----------------------------------------------------------------------
    recover_steps: int = _f(0, "knowledge-distillation steps after compression (0 = none)")
    recover_minutes: float = _f(0.0, "time budget for distillation in minutes (0 = none; with --recover-steps 0 "
                                "it trains until the budget is spent)")
    recover_config: str | None = _f(None, "YAML of recovery options (see configs/recover-default.yaml)")
    quantize: str = _f("none", "quantize the factors: none | int8 | w4")
    group_size: int = _f(128, "w4 group size along the input dimension (32, 64 or 128)")
    quantize_compensate: bool = _f(False, "after quantizing each down factor, refit up on the calibration "
                                   "input covariance (closed form)")
    # --- runtime / output -------------------------------------------------------------------------
    device: str = _f("auto", "torch device: auto | cpu | cuda | cuda:N")
    dtype: str = _f("auto", "arithmetic dtype: auto (the checkpoint's own on a GPU, float32 on CPU, where bf16 "
                    "arithmetic is slow) | float32 | bfloat16 | float16. Statistics are accumulated in float32, "
                    "solves run in float32 on GPU and float64 on CPU")
    export_dtype: str = _f("auto", "dtype of the exported weights: auto (the base model's published dtype: "
                           "bfloat16 for OLMo 3 and the bundled SmolLM2) | float32 | bfloat16 | float16. The "
                           "pipeline computes with weights rounded to it, so it evaluates what it exports")
    out: str | None = _f(None, "output directory for the compressed checkpoint (omit to only evaluate)")
    overwrite: bool = _f(False, "replace a previous VAC export in --out (a folder holding anything else is refused)")
    evaluate: bool = _f(True, "evaluate dense and compressed models on the evaluation split")
    eval_tasks: list = _f([], "after the export, lm-evaluation-harness tasks or suites on the dense model and the "
                          "checkpoint, comma-separated: vac-offline (VAC's offline proxy tasks), olmo3-base, "
                          "olmo3-think, or harness task names; the table goes to OUT/eval.json and the card. Needs "
                          "--out and pip install 'vac[eval]'", type=task_list_type)
    eval_limit: float | None = _f(None, "with --eval-tasks: at most this many examples per task (a quick look)",
                                  type=float)
    work_dir: str | None = _f(None, "where the statistics store, spilled hidden states and factorized layers go "
                              "(default: OUT.work beside --out, else a temporary directory); removed after a "
                              "successful run unless --keep-work. A rerun with the same model and data reuses "
                              "its statistics")
    keep_work: bool = _f(False, "keep --work-dir after a successful run")
    hidden_ram_gb: float = _f(8.0, "host RAM for cached hidden states; past it they are spilled to --work-dir")
    dry_run: bool = _f(False, "print the planned peak device / host / disk memory and passes per stage, from "
                       "the config alone (no weights are loaded), then exit")

    def validate(self) -> "CompressConfig":
        from vac.validate import check_compress_options

        check_compress_options(self)  # types, finiteness and ranges of every option; list spellings
        r = self.ratio
        if not isinstance(r, (int, float)) or isinstance(r, bool) or math.isnan(r) or math.isinf(r) or r <= 1:
            raise VacError(f"--ratio must be a finite number > 1 (dense/compressed size), got {r!r}; "
                           "e.g. --ratio 1.8")
        from vac.methods import METHODS  # late: methods import factorize/torch

        if self.method not in METHODS:
            raise VacError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(self.order, str):
            if self.order not in ORDERS:
                raise VacError(f"unknown --order {self.order!r}; choose one of {', '.join(ORDERS)} "
                               "or give a list of layer indices")
        elif not (isinstance(self.order, list) and all(isinstance(i, int) for i in self.order)):
            raise VacError(f"--order must be a name or a list of layer indices, got {self.order!r}")
        for name, allowed in (("granularity", GRANULARITIES), ("objective", OBJECTIVES),
                              ("allocation", ALLOCATIONS), ("quantize", QUANTIZATIONS)):
            if getattr(self, name) not in allowed:
                raise VacError(f"unknown --{name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.grad_rank is not None and (isinstance(self.grad_rank, bool) or not isinstance(self.grad_rank, int)
                                           or self.grad_rank < 1):
            raise VacError(f"--grad-rank must be a positive integer, got {self.grad_rank!r}")
        for name in ("calib_samples", "eval_samples", "seq_len", "batch_size", "fisher_samples", "rank_grid"):
            if int(getattr(self, name)) < 1:
                raise VacError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.own_samples is None:  # the default: a quarter of the calibration (see the option's help) ...
            self.own_samples = 0 if self.reads_no_calibration() else int(self.calib_samples) // 4  # ... if any
        if isinstance(self.own_samples, bool) or not isinstance(self.own_samples, int) or self.own_samples < 0:
            raise VacError(f"--own-samples must be a whole number >= 0, got {self.own_samples!r}")
        if int(self.own_samples) > int(self.calib_samples):
            raise VacError(f"--own-samples {self.own_samples} is more than --calib-samples {self.calib_samples}: it is "
                           "the part of the calibration sequences the model writes itself")
        if not (isinstance(self.eval_tasks, list) and all(isinstance(t, str) and t for t in self.eval_tasks)):
            raise VacError(f"--eval-tasks must be task or suite names (e.g. vac-offline or olmo3-base,piqa), got "
                           f"{self.eval_tasks!r}")
        if self.eval_limit is not None and not (isinstance(self.eval_limit, (int, float)) and self.eval_limit > 0):
            raise VacError(f"--eval-limit must be > 0 (a count, or a fraction below 1), got {self.eval_limit!r}")
        if self.quantize == "w4" and self.group_size not in (32, 64, 128):
            raise VacError(f"--group-size must be 32, 64 or 128 for w4, got {self.group_size}")
        for name in ("dtype", "export_dtype"):
            if getattr(self, name) not in DTYPE_NAMES:
                raise VacError(f"unknown --{name.replace('_', '-')} {getattr(self, name)!r}; choose one of "
                               f"{', '.join(DTYPE_NAMES)}")
        if not (isinstance(self.hidden_ram_gb, (int, float)) and math.isfinite(self.hidden_ram_gb)
                and self.hidden_ram_gb > 0):
            raise VacError(f"--hidden-ram-gb must be a positive number of GiB, got {self.hidden_ram_gb!r}")
        return self

    def reads_no_calibration(self) -> bool:
        """Plain SVD with uniform ranks and no quantization refit reads weights only."""
        from vac.methods import METHODS

        m = METHODS.get(self.method)
        return (m is not None and not (m.needs_inputs or m.needs_output_grads or m.needs_fisher)
                and self.allocation == "uniform" and not self.quantize_compensate)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def ineffective(self, given: set[str]) -> list[str]:
        """Messages for options in ``given`` (set explicitly) whose value would change nothing in this
        combination. Only values that differ from the default count: repeating a default is harmless."""
        defaults = CompressConfig()
        why = self.no_effect()
        return [f"--{k.replace('_', '-')} {getattr(self, k)!r} has no effect: {why[k]}"
                for k in sorted(given) if k in why and getattr(self, k) != getattr(defaults, k)]

    def no_effect(self) -> dict[str, str]:
        """Option -> why it has no effect in this combination (whatever its value)."""
        from vac.methods import METHODS

        method = METHODS.get(self.method)
        sequential = self.order != "one-shot"
        why: dict[str, str] = {}
        if self.method != "fisher":
            why["fisher_exponent"] = f"it is used by --method fisher only, not {self.method}"
        if self.method != "kfac":
            why["kfac_out_exponent"] = why["kfac_in_exponent"] = f"it is used by --method kfac only, not {self.method}"
        elif sequential and self.objective == "dense-target" and self.granularity == "matrix":
            why["kfac_in_exponent"] = ("under --objective dense-target with --granularity matrix every matrix is "
                                       "refitted by the dense-target closed form, which whitens by C~ exactly "
                                       "(b = 1/2); use --objective compressed-input or --order one-shot to vary it")
        if method is not None and not method.needs_inputs:
            for k in ("order", "granularity", "objective"):
                why[k] = f"--method {self.method} reads weights only, not layer inputs"
        elif not sequential:
            why["objective"] = "--order one-shot has no closed loop: every statistic is the dense model's"
        if self.allocation != "knapsack":
            for k in ("multipliers", "rank_grid", "compress_all"):
                why[k] = "it applies to --allocation knapsack only"
            if method is not None and not (method.needs_output_grads or method.needs_fisher):
                why["fisher_samples"] = f"--method {self.method} with --allocation uniform uses no gradient statistics"
            if method is not None and not method.needs_output_grads:
                why["grad_rank"] = f"--method {self.method} with --allocation uniform uses no G"
        if self.quantize != "w4":
            why["group_size"] = "the group size applies to --quantize w4 only"
        if self.quantize == "none":
            why["quantize_compensate"] = "there is nothing to compensate without --quantize"
        if self.reads_no_calibration():
            why["own_samples"] = f"--method {self.method} with --allocation uniform reads no calibration text"
        elif self.own_samples is not None and self.own_samples == self.calib_samples:
            why["calib_data"] = "--own-samples equals --calib-samples: every calibration sequence is the model's own"
        if not self.evaluate:
            why["eval_samples"] = "--no-evaluate skips evaluation"
        if not self.eval_tasks:
            why["eval_limit"] = "it limits --eval-tasks, which is not given"
        return why


def effective(values: dict) -> dict:
    """``values`` without the options that would have no effect given the others (whatever their value):
    for configs assembled from parts, such as a search genome over a shared base."""
    cfg = CompressConfig(**coerce_numbers(CompressConfig, values))
    drop = cfg.no_effect()
    return {k: v for k, v in values.items() if k not in drop}


def load_yaml(path: str | Path, cls: type = None) -> dict:
    """Options from a YAML file, checked against the fields of ``cls`` (default CompressConfig)."""
    cls = cls or CompressConfig
    p = Path(path)
    if not p.is_file():
        raise VacError(f"config file {p} does not exist; see configs/ for the shipped presets")
    from vac.validate import read_yaml_file

    data = read_yaml_file(p, "config file") or {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise VacError(f"config file {p} must hold a mapping of option: value")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VacError(f"config file {p} has unknown keys {unknown}; valid keys: {', '.join(sorted(known))}")
    return data


def coerce_numbers(cls: type, values: dict) -> dict:
    """YAML reads 1e-4 as a string and 0 as an int: convert values of numeric fields."""
    values = dict(values)
    for f in dataclasses.fields(cls):
        v = values.get(f.name)
        if f.name in values and isinstance(f.default, (int, float)) and not isinstance(f.default, bool) \
                and isinstance(v, (str, int, float)) and not isinstance(v, bool):
            flag = "--" + f.name.replace("_", "-")
            try:
                number = float(v)
            except ValueError:
                raise VacError(f"{flag} must be a number, got {v!r}") from None
            if isinstance(f.default, int):
                if number != int(number):
                    raise VacError(f"{flag} must be an integer, got {v!r}")
                number = int(number)
            values[f.name] = number
    return values


def build_parser(prog: str = "python -m vac.compress") -> argparse.ArgumentParser:
    from vac.validate import CliParser, layers_type, yaml_mapping_type

    parser = CliParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Compress a causal LM by loss-aware low-rank factorization of its linear layers.")
    parser.add_argument("--config", help="YAML file of options (configs/*.yaml); command-line options override it")
    for f in dataclasses.fields(CompressConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = dict(dest=f.name, help=f.metadata["help"], default=argparse.SUPPRESS)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if f.name in ("order", "keep_dense"):  # one spelling for layer lists: 0,-1 or [0,-1] or 5
            kwargs["type"] = layers_type(ORDERS if f.name == "order" else ())
        elif "type" in f.metadata:
            kwargs["type"] = f.metadata["type"]
        elif isinstance(default, dict):
            kwargs["type"] = yaml_mapping_type
        elif isinstance(default, float):
            kwargs["type"] = float
        elif isinstance(default, int):
            kwargs["type"] = int
        kwargs["help"] += f" (default: {default})"
        parser.add_argument(flag, **kwargs)
    return parser


def config_from_args(argv: list[str] | None = None, prog: str = "python -m vac.compress") -> CompressConfig:
    args = vars(build_parser(prog).parse_args(argv))
    values = load_yaml(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    values.update(args)  # the command line wins over the YAML file
    return make_config(values)


def make_config(values: dict, strict: bool = True) -> CompressConfig:
    """A validated config from option values; with ``strict``, options set to values that would
    have no effect in this combination are rejected (see ``CompressConfig.ineffective``)."""
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise VacError(f"unknown options {unknown}; valid: {', '.join(sorted(_FIELDS))}")
    cfg = CompressConfig(**coerce_numbers(CompressConfig, values)).validate()
    ignored = cfg.ineffective(set(values)) if strict else []
    if ignored:
        raise VacError("; ".join(ignored) + ". Remove the option or change the combination")
    return cfg


_FIELDS = {f.name for f in dataclasses.fields(CompressConfig)}


__all__ = ["CompressConfig", "build_parser", "config_from_args", "make_config", "load_yaml", "option", "coerce_numbers",
           "effective",
           "ORDERS", "GRANULARITIES", "OBJECTIVES", "ALLOCATIONS"]
