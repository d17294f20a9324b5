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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
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
