"""Everything a run can check before it loads a model, in one place.

Each CLI calls one function here first (:func:`validate_compress`, :func:`validate_recover`,
:func:`validate_search`): every option finite, of its type and in range, list options spelled the
same way everywhere, YAML/JSON that parses (errors name the option or the file), a device that
exists, inputs that exist and look like what they claim to be, and an output location that can
really be written (its parent is a folder, a temporary folder can be created there, the disk has
room for the expected export) and that VAC may replace. A bad input then costs a second, not a
run: it stops with one ``error:`` line and exit status 2, and nothing has been written.

The option tables (:data:`COMPRESS_BOUNDS`, :data:`RECOVER_BOUNDS`, :data:`SEARCH_BOUNDS`) say the
valid range of each numeric option; every float option must in any case be finite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vac.errors import VacError

# --- messages and command lines ------------------------------------------------------------------


def one_line(error: BaseException | str) -> str:
    """An error message on one line (YAML and library messages span several)."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


class CliParser(argparse.ArgumentParser):
    """argparse whose errors are VacErrors: the CLI prints them as one ``error:`` line, exit 2.

    (argparse's own error prints the whole usage block, 40 options long for vac.compress, before
    the one line that matters.)
    """

    def error(self, message: str):
        raise VacError(f"{one_line(message)} (see {self.prog} --help)")


def yaml_error_text(e: Exception) -> str:
    """'expected ',' or '}' at line 1, column 5' from a PyYAML error (whose str spans lines)."""
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or one_line(e)
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def parse_yaml(text: str, what: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise VacError(f"{what} is not valid YAML ({yaml_error_text(e)})") from None


def read_yaml_file(path: Path, what: str) -> Any:
    """YAML from ``path``; a file that is not UTF-8 text or not YAML is a VacError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise VacError(f"{what} {path} is not UTF-8 text; is it the right file?") from None
    except OSError as e:
        raise VacError(f"cannot read {what} {path}: {e.strerror}") from None
    return parse_yaml(text, f"{what} {path}")


def read_json_file(path: Path, what: str) -> Any:
    """JSON from ``path``; unreadable or invalid JSON is a VacError naming the file, line and column."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise VacError(f"{path} ({what}) is not UTF-8 text; is it the right file?") from None
    except OSError as e:
        raise VacError(f"cannot read {path} ({what}): {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise VacError(f"{path} ({what}) is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
                       "the file may be truncated: re-download or re-export it") from None


# argparse types: argparse prefixes their messages with "argument --flag: "


def yaml_mapping_type(text: str) -> dict:
    """A mapping option given as YAML/JSON text, e.g. --multipliers '{attention: 1.2}'."""
    value = _yaml_argument(text)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"takes a mapping such as '{{attention: 1.2, mlp: 0.9}}', got {text!r}")
    return value


def yaml_list_type(text: str) -> list:
    """A list option given as YAML/JSON text, e.g. --probes '[{name: a, prompt: b}]'."""
    value = _yaml_argument(text)
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"takes a YAML list such as '[...]', got {text!r}")
    return value


def _yaml_argument(text: str):
    try:
        return parse_yaml(text, repr(text))
    except VacError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# --- layer lists: '0,-1', '5', '[0, -1]' all mean the same everywhere --------------------------------


def parse_layers(text: str, flag: str | None, names: Iterable[str] = ()) -> list[int] | str:
    """'0,-1', '5', '[0, -1]', '[]' -> a list of layer indices; one of ``names`` stays a string.
    (``flag`` names the option in the message; None when argparse names it.)"""
    s = text.strip()
    names = tuple(names)
    if s in names:
        return s
    body = s[1:-1] if s.startswith("[") and s.endswith("]") else s
    items = [t.strip() for t in body.split(",")] if body.strip() else []
    try:
        return [int(t) for t in items]
    except ValueError:
        alt = f", or one of {', '.join(names)}" if names else ""
        raise VacError(f"{flag + ' ' if flag else ''}takes layer indices such as 0,-1 or [0,-1]{alt}; "
                       f"got {text!r}") from None


def layers_type(names: Iterable[str] = ()) -> Callable[[str], list[int] | str]:
    """argparse type of a layer-list option (and of --order, whose ``names`` are the named orders)."""
    def parse(text: str):
        try:
            return parse_layers(text, None, names)
        except VacError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def as_layers(value, flag: str, names: Iterable[str] = ()) -> list[int] | str:
    """A layer list from YAML or Python: an int, a list of ints, or any spelling of parse_layers."""
    if isinstance(value, bool):
        raise VacError(f"{flag} takes layer indices such as [0, -1], got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        return parse_layers(value, flag, names)
    if isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return list(value)
    raise VacError(f"{flag} takes layer indices such as [0, -1], got {value!r}")


# --- numbers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """The valid range of a number: ``low`` / ``high`` (None: unbounded), each included unless open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return not (self.high is not None and (x >= self.high if self.high_open else x > self.high))

    def text(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Bounds(0, low_open=True)
NON_NEGATIVE = Bounds(0)
AT_LEAST_ONE = Bounds(1)
UNIT = Bounds(0, 1)
#: exponents of the loss weighting: 1/2 is K-FAC's exact square root; above 1 the weighting
#: over-counts the Fisher itself, below 0 it inverts it
EXPONENT = Bounds(0, 1)


def check_number(flag: str, value, bounds: Bounds | None = None, *, integer: bool = False) -> None:
    """``value`` is a finite (integer, if asked) number within ``bounds``."""
    kind = "an integer" if integer else "a finite number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise VacError(f"{flag} must be {kind}{' ' + bounds.text() if bounds else ''}, got {value!r}")
    if bounds is not None and not bounds.contains(value):
        raise VacError(f"{flag} must be {kind} {bounds.text()}, got {value!r}")


def _kinds(f: dataclasses.Field) -> set[str]:
    """Type names of a dataclass field, from its annotation ('str | None' -> {'str', 'None'})."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return {part.strip() for part in t.split("|")}


def check_fields(cfg, bounds: dict[str, Bounds], flag: Callable[[str], str] = lambda n: "--" + n.replace("_", "-")
                 ) -> None:
    """Every field of the dataclass ``cfg`` has its annotated type; floats are finite; ``bounds`` hold."""
    for f in dataclasses.fields(cfg):
        value, kinds, name = getattr(cfg, f.name), _kinds(f), flag(f.name)
        if value is None and "None" in kinds:
            continue
        if "bool" in kinds:
            if not isinstance(value, bool):
                raise VacError(f"{name} must be true or false, got {value!r}")
        elif "int" in kinds or "float" in kinds:
            check_number(name, value, bounds.get(f.name), integer="float" not in kinds)
        elif "str" in kinds:
            if not isinstance(value, str) or not value.strip():
                raise VacError(f"{name} must be a non-empty string, got {value!r}")
        elif "list" in kinds and not isinstance(value, list):
            raise VacError(f"{name} must be a list, got {value!r}")
        elif "dict" in kinds and not isinstance(value, dict):
            raise VacError(f"{name} must be a mapping, got {value!r}")


# --- option tables ------------------------------------------------------------------------------------

COMPRESS_BOUNDS = {
    "ratio": Bounds(1, low_open=True),
    "fisher_exponent": EXPONENT, "kfac_out_exponent": EXPONENT, "kfac_in_exponent": EXPONENT,
    "damp": NON_NEGATIVE,
    "calib_samples": AT_LEAST_ONE, "eval_samples": AT_LEAST_ONE, "fisher_samples": AT_LEAST_ONE,
    "seq_len": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "rank_grid": AT_LEAST_ONE,
    "recover_steps": NON_NEGATIVE, "recover_minutes": NON_NEGATIVE,
}

RECOVER_BOUNDS = {
    "steps": NON_NEGATIVE, "max_minutes": NON_NEGATIVE, "lr": POSITIVE, "attn_lr_mult": POSITIVE,
    "warmup_steps": NON_NEGATIVE, "min_lr_ratio": UNIT, "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE, "batch_size": AT_LEAST_ONE, "grad_accum": AT_LEAST_ONE,
    "seq_len": AT_LEAST_ONE, "temperature": POSITIVE, "alpha": UNIT, "chat_fraction": UNIT,
    "eval_samples": NON_NEGATIVE, "eval_every": NON_NEGATIVE, "periodic_eval_samples": NON_NEGATIVE,
    "sft_steps": NON_NEGATIVE, "sft_lr": NON_NEGATIVE, "sft_alpha": UNIT, "checkpoint_every": NON_NEGATIVE,
}

SEARCH_BOUNDS = {
    "population": Bounds(2), "generations": NON_NEGATIVE, "offspring": AT_LEAST_ONE, "cxpb": UNIT,
    "mutpb": UNIT, "eta_cx": POSITIVE, "eta_mut": POSITIVE, "indpb": UNIT, "top_k": AT_LEAST_ONE,
}


def multiplier_keys() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(components, matrix kinds) a multiplier may name, from the families table."""
    from vac.families import ATTENTION, MLP, kinds

    return (ATTENTION, MLP), kinds()


def check_multipliers(multipliers, where: str = "--multipliers") -> None:
    """Budget multipliers: components (attention, mlp) or matrix kinds (q_proj, ...), never both,
    each a finite number > 0."""
    if not isinstance(multipliers, dict):
        raise VacError(f"{where} must be a mapping such as {{attention: 1.2, mlp: 0.9}}, got {multipliers!r}")
    components, kinds = multiplier_keys()
    bad = sorted(str(k) for k in multipliers if k not in components + kinds)
    if bad:
        raise VacError(f"{where}: unknown keys {bad}; use components ({', '.join(components)}) or matrix kinds "
                       f"({', '.join(kinds)})")
    if any(k in components for k in multipliers) and any(k in kinds for k in multipliers):
        raise VacError(f"{where} mixes components and matrix kinds ({sorted(multipliers)}); use one or the other")
    for k, v in multipliers.items():
        check_number(f"{where} {k}", v, POSITIVE)


def check_compress_options(cfg) -> None:
    """Types and ranges of every CompressConfig option; list options are normalised in place."""
    from vac.config import ORDERS

    # one spelling rule for both layer lists: '0,-1', 5, [0, -1] (YAML, Python or the command line)
    cfg.keep_dense = as_layers(cfg.keep_dense, "--keep-dense")
    cfg.order = as_layers(cfg.order, "--order", ORDERS)
    check_fields(cfg, COMPRESS_BOUNDS)
    check_multipliers(cfg.multipliers)
    if cfg.group_size not in (32, 64, 128):  # also sizes the w4 row of every report, quantized or not
        raise VacError(f"--group-size must be 32, 64 or 128, got {cfg.group_size!r}")


def check_recover_options(rcfg) -> None:
    check_fields(rcfg, RECOVER_BOUNDS)


def check_search_settings(settings) -> None:
    check_fields(settings, SEARCH_BOUNDS, flag=lambda n: f"search setting {n!r}")


def check_layers(cfg, num_layers: int | None) -> None:
    """--keep-dense and an explicit --order against the model's depth (read from config.json)."""
    if num_layers is None:
        return
    bad = [i for i in cfg.keep_dense if not -num_layers <= i < num_layers]
    if bad:
        raise VacError(f"--keep-dense layers {bad} out of range: the model has {num_layers} decoder layers "
                       f"(0..{num_layers - 1}, or -1 for the last)")
    if isinstance(cfg.order, list) and sorted(cfg.order) != list(range(num_layers)):
        raise VacError(f"--order list must be a permutation of 0..{num_layers - 1} (the model has {num_layers} "
                       f"decoder layers), got {cfg.order}")


# --- devices ------------------------------------------------------------------------------------------


def check_device(device: str, flag: str = "--device") -> None:
    """``device`` exists on this machine ('auto' always does)."""
    import torch

    if device == "auto":
        return
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise VacError(f"unknown {flag} {device!r}; use auto, cpu, cuda or cuda:N") from None
    if d.type == "cpu":
        return
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None else
                   "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?)")
            raise VacError(f"{flag} {device}: {why} (torch {torch.__version__}); use --device cpu or auto")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise VacError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                           f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return
    backend = getattr(torch.backends, d.type, None) if d.type == "mps" else getattr(torch, d.type, None)
    if d.type != "meta" and backend is not None and getattr(backend, "is_available", lambda: False)():
        return
    raise VacError(f"{flag} {device}: no such device on this machine; use cpu, cuda or auto")


# --- models -------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """What can be learnt about a model without loading it."""

    directory: Path | None = None  # a safetensors directory, when it is one
    config: dict | None = None
    tensors: dict[str, tuple[str, list[int]]] | None = None  # name -> (dtype, shape), from the headers

    @property
    def num_layers(self) -> int | None:
        config = self.config or {}
        n = config.get("num_hidden_layers", (config.get("text_config") or {}).get("num_hidden_layers"))
        return n if isinstance(n, int) and not isinstance(n, bool) else None


def safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor names, dtypes and shapes from a safetensors header, and a size check: a truncated
    or corrupt file is found here, in milliseconds, instead of by the loader."""
    size = path.stat().st_size
    corrupt = (f"weights file {path} is truncated or corrupt ({{}}); the files may be incomplete: re-download "
               "or re-export them")
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise VacError(corrupt.format(f"{size} bytes, no valid header"))
        try:
            meta = json.loads(f.read(n))
            entries = {k: (v["dtype"], list(v["shape"])) for k, v in meta.items() if k != "__metadata__"}
            end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            raise VacError(corrupt.format("unreadable header")) from None
    if 8 + n + end != size:
        raise VacError(corrupt.format(f"the header describes {8 + n + end:,} bytes, the file holds {size:,}"))
    return entries


def inspect_model(spec, flag: str = "--model") -> ModelInfo:
    """Check a model spec before loading it: the path exists, config.json parses and names a
    supported family, the safetensors headers are intact. Hub ids are left to the loader."""
    from vac.families import get_family
    from vac.models import BUNDLED, _bundled_target, _looks_like_path, bundled_gguf_path

    if not isinstance(spec, str) or not spec.strip():
        raise VacError(f"{flag} must name a model (hub id, directory, .gguf file or {BUNDLED!r}), got {spec!r}")
    if spec == BUNDLED:
        directory = _bundled_target()
        if not (directory / "config.json").is_file():
            bundled_gguf_path()  # raises if the package is missing; dequantized on first use
            return ModelInfo()
    elif spec.endswith(".gguf"):
        if not Path(spec).expanduser().is_file():
            raise VacError(f"{flag}: GGUF file {spec} does not exist")
        return ModelInfo()
    elif Path(spec).expanduser().is_dir():
        directory = Path(spec).expanduser()
        if not (directory / "config.json").is_file():
            raise VacError(f"{flag} {directory} has no config.json; point it at a Hugging Face model directory")
    elif _looks_like_path(spec):
        raise VacError(f"{flag} {spec!r}: no such file or directory")
    else:
        return ModelInfo()
    config = read_json_file(directory / "config.json", "the model's config")
    if not isinstance(config, dict):
        raise VacError(f"{directory / 'config.json'} must hold a JSON object")
    get_family(argparse.Namespace(model_type=config.get("model_type")))
    tensors: dict[str, tuple[str, list[int]]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(safetensors_header(path))
    return ModelInfo(directory, config, tensors)


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def export_bytes(info: ModelInfo, dtype: str, ratio: float = 1.0) -> int | None:
    """About the bytes an export of this model writes: the target linears at 1/ratio of their
    dense size (the budget is exact over them), everything else as is, all in ``dtype``."""
    from vac.families import FAMILIES

    if not info.tensors:
        return None
    family = FAMILIES.get((info.config or {}).get("model_type"))
    subs = family.attention + family.mlp if family else ()
    target = re.compile(rf"{re.escape(family.layers_path)}\.\d+\.({'|'.join(map(re.escape, subs))})\.weight"
                        ) if family else None
    linear = other = 0
    for name, (_, shape) in info.tensors.items():
        n = math.prod(shape)
        if target is not None and target.fullmatch(name):
            linear += n
        else:
            other += n
    return int((other + linear / ratio) * _DTYPE_BYTES.get(dtype, 4))


# --- data ---------------------------------------------------------------------------------------------


def check_sources(sources: Iterable[tuple[str, Any]]) -> None:
    from vac.data import check_source

    for flag, source in sources:
        if source is not None:
            check_source(source, flag)


# --- the output location ------------------------------------------------------------------------------

#: room kept free beyond the expected export (tokenizer, report, plots, file-system slack)
DISK_MARGIN = 64 << 20


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_writable_location(path: Path, flag: str, *, inside: bool = True) -> Path:
    """``path`` is, or can become, a folder this process can write in: its nearest existing
    ancestor is a folder, and a temporary folder can be created (and removed) there. ``inside``
    False probes beside ``path`` instead (an export is assembled in a sibling, then renamed)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise VacError(f"{flag} {path} exists and is not a directory")
    anchor = _existing_ancestor(path if inside else path.parent)
    if not anchor.is_dir():
        raise VacError(f"{flag} {path} is below {anchor}, which is a file, not a folder; choose another {flag}")
    try:  # permissions alone do not say it (root, read-only mounts, ACLs): try it
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name or 'vac'}.probe-{os.getpid()}-", dir=anchor))
    except OSError as e:
        raise VacError(f"{flag} {path}: cannot write in {anchor} ({e.strerror}); choose a folder you can "
                       "write to") from None
    return anchor


def check_out_location(out, flag: str = "--out", *, overwrite: bool = False, expected_bytes: int | None = None,
                       inputs: Iterable[tuple[str, Any]] = ()) -> Path:
    """An export can be written to ``out``: see :func:`check_writable_location`, plus
    ``out`` is not the current folder or one of its ancestors, holds none of the ``inputs``
    (flag, path), is empty or a previous VAC export that ``overwrite`` may replace, and the disk
    has ``expected_bytes`` free. Leftovers of an interrupted export to ``out`` are tidied first."""
    from vac.outdir import check_out_dir, clean_interrupted

    if not isinstance(out, (str, Path)) or not str(out).strip():
        raise VacError(f"{flag} must be a folder path, got {out!r}")
    out = Path(out).expanduser()
    where = out.resolve()
    cwd = Path.cwd().resolve()
    if where == cwd or where in cwd.parents or where == Path.home().resolve():
        raise VacError(f"{flag} {out} is {'the current folder' if where == cwd else 'a folder that holds the current one'}"
                       f"{' (your home folder)' if where == Path.home().resolve() else ''}; the export replaces "
                       f"{flag} as a whole, so give it a folder of its own, e.g. {flag} runs/NAME")
    for input_flag, value in inputs:
        if not value or not isinstance(value, str):
            continue
        p = Path(value).expanduser()
        if p.exists() and (p.resolve() == where or where in p.resolve().parents):
            raise VacError(f"{flag} {out} holds {input_flag} {value}; the export would replace its own input: "
                           f"choose another {flag}")
    anchor = check_writable_location(out, flag, inside=False)
    for line in clean_interrupted(out):
        logging.getLogger("vac").info(line)
    check_out_dir(out, overwrite)
    if expected_bytes:
        free = shutil.disk_usage(anchor).free
        if free < expected_bytes + DISK_MARGIN:
            raise VacError(f"{flag} {out}: the export needs about {_human(expected_bytes)} but only {_human(free)} "
                           f"are free on that disk; free some space or choose another {flag}")
    return out


# --- the three CLIs -----------------------------------------------------------------------------------


def validate_compress(cfg) -> None:
    """Everything about a compression run that can be checked before loading the model."""
    cfg.validate()  # options (make_config did it already; library callers may not have)
    check_device(cfg.device)
    info = inspect_model(cfg.model)
    check_layers(cfg, info.num_layers)
    check_sources([("--calib-data", cfg.calib_data), ("--eval-data", cfg.eval_data if cfg.evaluate else None)])
    recovering = cfg.recover_steps > 0 or cfg.recover_minutes > 0
    if cfg.recover_config and not recovering:
        raise VacError("--recover-config is used only with --recover-steps or --recover-minutes")
    if recovering:
        from vac.recover.config import from_compress_config

        try:  # the recovery options, validated now rather than after compression
            rcfg = from_compress_config(cfg)
        except VacError as e:
            raise VacError(f"--recover-config {cfg.recover_config}: {e}" if cfg.recover_config else str(e)) from None
        check_sources([("--recover-config pretrain_data", rcfg.pretrain_data),
                       ("--recover-config chat_data", rcfg.chat_data)])
    if cfg.eval_tasks:
        if not cfg.out:
            raise VacError("--eval-tasks evaluates the exported checkpoint: give --out")
        from vac.harness import check_tasks

        check_tasks(cfg.eval_tasks)  # the extra is installed and every name is known, before minutes of work
    if cfg.work_dir:
        check_writable_location(Path(cfg.work_dir).expanduser(), "--work-dir")
    if cfg.out:
        dtype = cfg.export_dtype
        if dtype == "auto":  # the base model's published dtype (see vac.models.published_dtype)
            declared = (info.config or {}).get("dtype") or (info.config or {}).get("torch_dtype")
            dtype = declared if declared in _DTYPE_BYTES else "bfloat16"
        expected = export_bytes(info, dtype, cfg.ratio)
        if expected and recovering:  # checkpoints beside --out: float32 weights and two Adam moments, twice
            expected += 2 * 3 * export_bytes(info, "float32", cfg.ratio)
        check_out_location(cfg.out, overwrite=cfg.overwrite, expected_bytes=expected,
                           inputs=[("--model", cfg.model), ("--calib-data", cfg.calib_data),
                                   ("--eval-data", cfg.eval_data), ("--recover-config", cfg.recover_config)])
        if recovering:
            from vac.recover.checkpoint import foreign_run_entries

            out = Path(cfg.out).expanduser()
            run_dir = out.with_name(out.name + ".recover")
            check_writable_location(run_dir, "--out (its .recover folder)")
            foreign = foreign_run_entries(run_dir) if run_dir.is_dir() else []
            if foreign and cfg.overwrite:  # --overwrite starts recovery afresh by deleting that folder
                raise VacError(f"{run_dir} holds {', '.join(foreign[:3])}, which a recovery run does not write; "
                               "--overwrite would delete that folder: move those files away")


def check_student(directory: Path, flag: str = "--student") -> ModelInfo:
    """An exported VAC checkpoint: config.json with a 'vac' entry, its modeling code, intact weights."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise VacError(f"{flag} {d} is not a directory; point it at a directory written by `python -m vac.compress`")
    if not (d / "config.json").is_file():
        raise VacError(f"{flag} {d}: no config.json; point it at a directory written by `python -m vac.compress`")
    config = read_json_file(d / "config.json", "the student's config")
    if not isinstance(config, dict) or "vac" not in config:
        raise VacError(f"{flag} {d} is not a VAC checkpoint (config.json has no 'vac' entry); compress it first "
                       "with `python -m vac.compress --out DIR`")
    from vac.outdir import MODELING_FILES

    missing = [n for n in MODELING_FILES if not (d / n).is_file()]
    if missing or not list(d.glob("*.safetensors")):
        raise VacError(f"{flag} {d} is an incomplete VAC checkpoint (missing {', '.join(missing) or '*.safetensors'}); "
                       "export it again")
    if (d / "report.json").is_file():  # the recovered export's report extends it
        read_json_file(d / "report.json", "the student's report")
    tensors: dict[str, tuple[str, list[int]]] = {}
    for path in sorted(d.glob("*.safetensors")):
        tensors.update(safetensors_header(path))
    return ModelInfo(d, config, tensors)


def validate_recover(args, rcfg, out: Path, run_dir: Path) -> None:
    """``python -m vac.recover``: inputs, data, the output and run folders, before loading anything."""
    from vac.recover.checkpoint import has_checkpoint

    student = check_student(args.student)
    inspect_model(args.teacher, "--teacher")
    check_sources([("--pretrain-data", rcfg.pretrain_data), ("--chat-data", rcfg.chat_data),
                   ("--eval-data", rcfg.eval_data if rcfg.eval_samples else None)])
    inputs = [("--student", args.student), ("--teacher", args.teacher), ("--pretrain-data", rcfg.pretrain_data),
              ("--chat-data", rcfg.chat_data), ("--eval-data", rcfg.eval_data), ("--config", args.config)]
    check_out_location(out, overwrite=args.overwrite, expected_bytes=export_bytes(student, args.dtype),
                       inputs=inputs + [("--run-dir", str(run_dir))])
    run = run_dir.resolve()
    if run == out.resolve() or out.resolve() in run.parents:
        raise VacError(f"--run-dir {run_dir} is inside --out {out}, which the export replaces; put it beside --out")
    for flag, value in inputs:
        p = Path(value).expanduser() if isinstance(value, str) else None
        if p is not None and p.exists() and (p.resolve() == run or run in p.resolve().parents):
            raise VacError(f"--run-dir {run_dir} holds {flag} {value}; choose another --run-dir")
    check_writable_location(run_dir, "--run-dir")
    if not args.resume and has_checkpoint(run_dir):
        raise VacError(f"{run_dir} already holds a recovery checkpoint; resume it (--resume) or choose another "
                       "--run-dir")


def validate_search(cfg, run_dir: Path, resume: bool = False) -> None:
    """``python -m vac.search``: the recipe's compression options, evaluation model and data, the run
    folder (and, to resume, a checkpoint in it that verifies)."""
    from vac.config import make_config
    from vac.search.state import has_state, load_state

    check_writable_location(run_dir, "--out")
    if has_state(run_dir):
        if not resume:
            raise VacError(f"{run_dir} already holds a search checkpoint; pass --resume to continue it, or choose "
                           "another --out")
        load_state(run_dir)  # raises when no checkpoint there verifies
    if cfg.workers is not None:
        check_number("--workers", cfg.workers, NON_NEGATIVE, integer=True)
    for name, keys in [("compress_base", cfg.compress_base)] + [(f"reference {k!r}", v)
                                                                for k, v in cfg.references.items()]:
        try:
            make_config({**cfg.compress_base, **keys, "evaluate": False, "out": None})
        except VacError as e:
            raise VacError(f"search config {name}: {e}") from None
    if cfg.evaluator == "compression":
        from vac.strategy import SPEC_DEFAULTS

        spec = {**SPEC_DEFAULTS, **cfg.evaluation}
        unknown = sorted(set(cfg.evaluation) - set(SPEC_DEFAULTS) - {"split"})
        if unknown:
            raise VacError(f"search config evaluation: unknown keys {unknown}; known: {sorted(SPEC_DEFAULTS)}")
        if spec["metric"] not in ("kl", "ppl"):
            raise VacError(f"search config evaluation metric must be kl or ppl, got {spec['metric']!r}")
        for key in ("calibration_blocks", "heldout_blocks", "block_size"):
            check_number(f"search config evaluation {key}", spec[key], AT_LEAST_ONE, integer=True)
        check_device(spec["device"], "search config evaluation device")
        info = inspect_model(spec["model"], "search config evaluation model")
        if info.num_layers is not None and info.num_layers != cfg.space.num_layers:
            raise VacError(f"search space num_layers is {cfg.space.num_layers} but {spec['model']} has "
                           f"{info.num_layers} decoder layers")
        check_sources([("search config evaluation data", spec["data"])])


__all__ = ["Bounds", "CliParser", "ModelInfo", "as_layers", "check_compress_options", "check_device", "check_fields",
           "check_multipliers", "check_number", "check_out_location", "check_recover_options",
           "check_search_settings", "check_student", "check_writable_location", "export_bytes", "inspect_model",
           "layers_type", "one_line", "parse_layers", "read_json_file", "safetensors_header", "validate_compress",
           "validate_recover", "validate_search", "yaml_error_text", "yaml_list_type", "yaml_mapping_type"]
