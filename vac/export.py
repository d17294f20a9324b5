"""Writing a compressed model as a self-contained Hugging Face checkpoint, atomically.

The directory is assembled in a hidden temporary sibling, verified by reloading it with
``trust_remote_code`` and comparing logits, and only then renamed into place: an interrupted
or failed export leaves nothing at ``out``.

Also: size accounting measured from files actually written (:func:`checkpoint_bytes`,
:func:`measure_sizes`), and the ``python -m vac.export DIR --push-to-hub REPO`` CLI
(:mod:`vac.publish`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vac.errors import VacError
from vac.files import pid_alive

log = logging.getLogger(__name__)

MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"
MODELING_FILES = ("modeling_vac.py",)
AUTO_MAP = {"AutoModelForCausalLM": "modeling_vac.VacForCausalLM"}


def modeling_dir() -> Path:
    """The shipped modeling files (a sibling folder in a checkout, vac.modeling when installed)."""
    if (MODELING_DIR / MODELING_FILES[0]).is_file():
        return MODELING_DIR
    import vac.modeling

    return Path(vac.modeling.__file__).parent


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an ``out`` that VAC may not write (checked before the run, and again when the export starts).

    An empty or missing folder is always fine. A non-empty one needs ``overwrite``, and even then
    only a previous VAC export is replaced: a folder holding anything VAC did not write is refused,
    so ``--out ~/models --overwrite`` cannot wipe a user's folder.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise VacError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise VacError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite "
                           "(which replaces only a previous VAC export)")
        foreign = foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            what = (f"holds {shown}, which VAC did not write" if is_vac_export(out) else
                    f"is not a previous VAC export (it holds {shown})")
            raise VacError(f"--out {out} {what}; --overwrite replaces only a previous VAC export (config.json "
                           "with a 'vac' entry, modeling_vac.py, weights, tokenizer, report). Move those files "
                           "away or choose another --out")
    return out


#: what an export writes besides *.safetensors: config and modeling code, tokenizer files (the
#: names transformers' tokenizers save), the report, the card and the plots
EXPORT_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json", *MODELING_FILES,
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
    "README.md", "report.json", "report.md", "ranks.png", "spectra.png", "recover_curves.png"})


def is_vac_export(directory: Path) -> bool:
    """A previous VAC export: config.json with a ``vac`` entry and the modeling code next to it."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "vac" in config and all((directory / n).is_file() for n in MODELING_FILES)


def foreign_entries(directory: Path) -> list[str]:
    """Entries of ``directory`` that an export does not write (everything, if it is no VAC export)."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    if not is_vac_export(directory):
        return names
    return [n for n in names if n not in EXPORT_FILES and not n.endswith(".safetensors")]  # folders end in /


def staging_name(out: Path, kind: str) -> str:
    """Prefix of the hidden siblings an export works in: ``.NAME.tmp-PID-`` (being built) and
    ``.NAME.old-PID-`` (the export being replaced). The pid tells a later run whether the
    process that made one is gone (a leftover, removed) or still running (left alone)."""
    return f".{out.name}.{kind}-{os.getpid()}-"


def _staging_pattern(out: Path) -> re.Pattern:
    # mkdtemp appends 8 characters of [a-z0-9_]; names of VAC before the pid was added had none
    # (probe: the folder validation creates and removes at once to see that it can write there)
    return re.compile(rf"\.{re.escape(out.name)}\.(tmp|old|probe)-(?:(\d+)-)?[a-z0-9_]{{8}}")


def clean_interrupted(out: str | Path) -> list[str]:
    """Tidy up after exports to ``out`` that were killed: returns what was done, one line each.

    Leftover ``.NAME.tmp-*`` folders (an export being assembled) are removed. A leftover
    ``.NAME.old-*`` folder holds the previous export, moved aside for the final rename; if the
    kill came between the two renames, ``out`` is missing and the previous export is put back
    (nothing is lost), otherwise it is removed. Only names of this scheme whose process is
    gone are touched.
    """
    out = Path(out).expanduser()
    if not out.parent.is_dir():
        return []
    pattern, done = _staging_pattern(out), []
    for p in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if not m or not p.is_dir() or (m.group(2) and pid_alive(int(m.group(2)))):
            continue
        if m.group(1) == "old" and (p / "old").is_dir() and not out.exists():
            os.replace(p / "old", out)
            done.append(f"restored the previous export of an interrupted run into {out}")
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p.name}, left by an interrupted run")
    return done


def staging_dir(out: Path) -> Path:
    """A fresh hidden sibling of ``out`` to assemble the export in; leftovers of killed runs go first."""
    for line in clean_interrupted(out):
        log.info(line)
    return Path(tempfile.mkdtemp(prefix=staging_name(out, "tmp"), dir=out.parent))  # (0700 until the rename)


def _ordinary_permissions(directory: Path) -> None:
    """Files as the umask would make them: safetensors writes its files 0600, mkdtemp its folder 0700."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for p in directory.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export(model: nn.Module, tokenizer, out: str | Path, *, vac_meta: dict, overwrite: bool = False,
           write_extras: Callable[[Path], None] | None = None, verify_ids: torch.Tensor | None = None,
           quantized: dict | None = None, card: str | Callable[[Path], str] | None = None,
           dtype: torch.dtype | None = None) -> Path:
    """Save ``model`` (with FactorizedLinear modules) + tokenizer + modeling code into ``out``.

    ``vac_meta`` goes into config.json under ``vac`` (it must hold ``ranks``: module name ->
    rank or None). ``quantized`` is what ``vac.quantize.quantize_model_`` returned for this
    model: the factors are then stored as its packed tensors instead of float weights, and
    ``vac.quantization`` describes them. ``dtype`` (e.g. torch.bfloat16) stores every other
    floating-point tensor in that dtype (default: the model's own); the model is not changed,
    a cast copy is saved and verified. ``write_extras(tmp_dir)`` adds report files and plots
    after the weights are written (so it can measure them) and before the rename; then
    ``card`` (a string, or a function of the staged directory called after ``write_extras``)
    is written as README.md. With ``verify_ids``, the staged checkpoint is reloaded and must
    reproduce the logits of the (cast) model.
    """
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    if quantized is not None:
        _check_quantized(model, quantized)
        vac_meta = {**vac_meta, "quantization": {k: v for k, v in quantized["config"].items()}}
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = _cast_parameters(model, dtype)
    tmp = staging_dir(out)
    config = model.config
    saved = {k: getattr(config, k, None) for k in ("auto_map", "vac", "architectures")}
    try:
        config.auto_map = dict(AUTO_MAP)
        config.vac = vac_meta
        with _packed_factors(model, quantized):
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name in MODELING_FILES:
            shutil.copy2(modeling_dir() / name, tmp / name)
        if write_extras is not None:
            write_extras(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card(tmp) if callable(card) else card)
        if verify_ids is not None:
            verify_reload(model, tmp, verify_ids)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                if hasattr(config, k):
                    delattr(config, k)
            else:
                setattr(config, k, v)
    return out


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy with floating-point *parameters* in ``dtype``; buffers keep theirs.

    Not ``model.to(dtype)``: that also casts buffers such as rotary ``inv_freq``, which
    ``from_pretrained(dtype=...)`` keeps in float32, so the copy would no longer be the model
    the checkpoint reloads as (in bf16 the positions drift visibly on long sequences).
    """
    import copy

    model = copy.deepcopy(model)
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


class _PackedHolder(nn.Module):
    """Stands in for a factor during save_pretrained: its buffers are the packed tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(k, v)


def _check_quantized(model: nn.Module, quantized: dict) -> None:
    if not isinstance(quantized, dict) or not {"config", "tensors"} <= set(quantized):
        raise VacError("export(quantized=...) expects the dict returned by vac.quantize.quantize_model_")
    names = dict(model.named_modules())
    missing = [n for n in quantized["config"]["modules"] if n not in names]
    if missing:
        raise VacError(f"quantized modules {missing[:3]} are not in the model; quantize the model being exported")


@contextlib.contextmanager
def _packed_factors(model: nn.Module, quantized: dict | None):
    """Temporarily swap each quantised module's ``down``/``up`` for holders of the packed tensors."""
    if quantized is None:
        yield
        return
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name in quantized["config"]["modules"]:
            module = model.get_submodule(name)
            for factor in ("down", "up"):
                prefix = f"{name}.{factor}."
                tensors = {k[len(prefix):]: v for k, v in quantized["tensors"].items() if k.startswith(prefix)}
                if "qweight" not in tensors:
                    raise VacError(f"no packed tensors for {name}.{factor} in the quantized dict")
                swapped.append((module, factor, getattr(module, factor)))
                setattr(module, factor, _PackedHolder(tensors))
        yield
    finally:
        for module, factor, original in reversed(swapped):
            setattr(module, factor, original)


def _replace_dir(tmp: Path, out: Path) -> None:
    _ordinary_permissions(tmp)
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=staging_name(out, "old"), dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


@torch.no_grad()
def verify_reload(model: nn.Module, directory: Path, ids: torch.Tensor, atol: float | None = None) -> float:
    """Reload ``directory`` with trust_remote_code and compare logits with ``model``; returns max |diff|."""
    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    reloaded = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=dtype)
    reloaded.eval()
    device = next(model.parameters()).device
    a = model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()
    b = reloaded.to(device)(input_ids=ids.to(device), use_cache=False).logits.float().cpu()
    diff = (a - b).abs().max().item()
    tol = atol if atol is not None else (1e-4 if dtype == torch.float32 else 5e-2) * max(1.0, a.abs().max().item())
    if not diff <= tol:
        raise VacError(f"export check failed: the reloaded checkpoint's logits differ by {diff:.3g} (> {tol:.3g}); "
                       "nothing was written. Please report this as a bug")
    return diff


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------
# Size accounting: bytes of files actually written
# ---------------------------------------------------------------------------------------------

def checkpoint_bytes(directory: str | Path) -> int:
    """Sum of the sizes of the *.safetensors files in ``directory`` (the weights on disk)."""
    files = list(Path(directory).glob("*.safetensors"))
    if not files:
        raise VacError(f"{directory} holds no *.safetensors files")
    return sum(f.stat().st_size for f in files)


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors once (as save_pretrained writes them)."""
    seen, state = set(), {}
    for k, v in model.state_dict().items():
        key = (v.device, v.data_ptr(), tuple(v.shape), tuple(v.stride())) if v.numel() else (k,)
        if key in seen:
            continue
        seen.add(key)
        state[k] = v
    return state


def _write_shards(tensors, directory: Path, shard_bytes: int = 2 << 30) -> None:
    """Write (name, tensor) pairs into safetensors shards of about ``shard_bytes``, bounding memory."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    size, index = 0, 0
    for name, t in tensors:
        shard[name] = t.detach().to("cpu").contiguous()
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            save_file(shard, str(directory / f"shard-{index:05d}.safetensors"), metadata={"format": "pt"})
            shard, size, index = {}, 0, index + 1
    if shard or index == 0:
        save_file(shard, str(directory / f"shard-{index:05d}.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def measure_sizes(model: nn.Module, methods: tuple[str, ...] = ("int8", "w4"), group_size: int = 128,
                  float_dtype: torch.dtype = torch.bfloat16, scratch: str | Path | None = None) -> dict[str, int]:
    """Bytes on disk of ``model`` written as safetensors, measured, in a scratch directory deleted after.

    Returns ``{"bf16": n}`` (float tensors in ``float_dtype``) and, for each quantisation method
    in ``methods``, the bytes with every factorized module's factors stored packed (plain
    rounding, no calibration: compensation does not change sizes) and everything else in
    ``float_dtype`` - exactly what an export with ``quantized=`` and ``dtype=float_dtype``
    writes, less config and tokenizer files. The model is not modified.
    """
    from vac.quantize import factorized_modules, quantize

    name = str(float_dtype).removeprefix("torch.").replace("bfloat16", "bf16")
    state = _unique_state(model)
    factors = {f"{m}.{f}.weight" for m in factorized_modules(model) for f in ("down", "up")}
    sizes: dict[str, int] = {}
    for method in (None, *methods):
        with tempfile.TemporaryDirectory(dir=scratch) as d:
            def tensors():
                for k, v in state.items():
                    if method is not None and k in factors:
                        base = k.removesuffix(".weight")
                        for sub, packed in quantize(v, method, group_size).items():
                            yield f"{base}.{sub}", packed
                    else:
                        yield k, v.to(float_dtype) if v.is_floating_point() else v
            _write_shards(tensors(), Path(d))
            sizes[method or name] = checkpoint_bytes(d)
    return sizes


def main(argv: list[str] | None = None) -> int:
    """``python -m vac.export DIR --push-to-hub REPO [--dry-run] [--private]``."""
    from vac.publish import main as publish_main

    return publish_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
