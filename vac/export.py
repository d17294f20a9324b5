"""Writing a compressed model as a self-contained Hugging Face checkpoint, atomically.

The directory is assembled in a hidden temporary sibling, verified by reloading it with
``trust_remote_code`` and comparing logits, and only then renamed into place: an interrupted
or failed export leaves nothing at ``out``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vac.errors import VacError

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
    """Refuse a non-empty output directory unless overwriting was asked for (checked up front)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise VacError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise VacError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")
    return out


def export(model: nn.Module, tokenizer, out: str | Path, *, vac_meta: dict, overwrite: bool = False,
           write_extras: Callable[[Path], None] | None = None, verify_ids: torch.Tensor | None = None) -> Path:
    """Save ``model`` (with FactorizedLinear modules) + tokenizer + modeling code into ``out``.

    ``vac_meta`` goes into config.json under ``vac`` (it must hold ``ranks``: module name ->
    rank or None). ``write_extras(tmp_dir)`` adds report files and plots before the rename.
    With ``verify_ids``, the staged checkpoint is reloaded and must reproduce the logits.
    """
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    config = model.config
    saved = {k: getattr(config, k, None) for k in ("auto_map", "vac", "architectures")}
    try:
        config.auto_map = dict(AUTO_MAP)
        config.vac = vac_meta
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name in MODELING_FILES:
            shutil.copy2(modeling_dir() / name, tmp / name)
        if write_extras is not None:
            write_extras(tmp)
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


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
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
