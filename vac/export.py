"""Writing a compressed model as a self-contained Hugging Face checkpoint, atomically.

The directory is assembled in a hidden temporary sibling, verified by reloading it with
``trust_remote_code`` and comparing logits, and only then renamed into place: an interrupted
or failed export leaves nothing at ``out`` (what may be written or replaced there: :mod:`vac.outdir`).

Also: size accounting measured from files actually written (:func:`checkpoint_bytes`,
:func:`measure_sizes`), and the ``python -m vac.export DIR --push-to-hub REPO`` CLI
(:mod:`vac.publish`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vac.errors import VacError
from vac.files import write_json
from vac.outdir import MODELING_FILES, check_out_dir, replace_dir, staging_dir

MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"
AUTO_MAP = {"AutoModelForCausalLM": "modeling_vac.VacForCausalLM"}


def modeling_dir() -> Path:
    """The shipped modeling files (a sibling folder in a checkout, vac.modeling when installed)."""
    if (MODELING_DIR / MODELING_FILES[0]).is_file():
        return MODELING_DIR
    import vac.modeling

    return Path(vac.modeling.__file__).parent


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
    if quantized is not None:
        _check_quantized(model, quantized)
        vac_meta = {**vac_meta, "quantization": {k: v for k, v in quantized["config"].items()}}
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = _cast_parameters(model, dtype)

    def write_weights(tmp: Path) -> None:
        config = model.config
        saved = {k: getattr(config, k, None) for k in ("auto_map", "vac", "architectures")}
        try:
            config.auto_map = dict(AUTO_MAP)
            config.vac = vac_meta
            with _packed_factors(model, quantized):
                model.save_pretrained(tmp, safe_serialization=True)
        finally:
            for k, v in saved.items():
                if v is None:
                    if hasattr(config, k):
                        delattr(config, k)
                else:
                    setattr(config, k, v)

    verify = (lambda tmp: verify_reload(model, tmp, verify_ids)) if verify_ids is not None else None
    return _staged_export(out, overwrite, write_weights, tokenizer, write_extras, card, verify)


def export_home(home, tokenizer, out: str | Path, *, vac_meta: dict, overwrite: bool = False,
                write_extras: Callable[[Path], None] | None = None, verify_ids: torch.Tensor | None = None,
                card: str | Callable[[Path], str] | None = None, shard_bytes: int = 2 << 30,
                progress: bool = False) -> Path:
    """Export the compressed model behind a :class:`~vac.home.CheckpointHome` without loading it whole.

    Shards are written layer by layer (each holds at most ``shard_bytes`` before it is flushed),
    in the home's ``store_dtype``, with the index ``save_pretrained`` would write. With
    ``verify_ids``, the staged checkpoint is reloaded by ``from_pretrained`` (one model: the
    pipeline never holds its own copy) and must reproduce the logits the pipeline computes by
    streaming the same layers.
    """
    def write_weights(tmp: Path) -> None:
        import copy

        from tqdm.auto import tqdm

        config = copy.deepcopy(home.config)
        config.auto_map = dict(AUTO_MAP)
        config.vac = vac_meta
        config.architectures = [type(home.model).__name__]
        config.dtype = home.store_dtype
        config.save_pretrained(tmp)
        generation = home.directory / "generation_config.json"
        if generation.is_file():
            shutil.copy2(generation, tmp / generation.name)

        def tensors():
            yield from home.outer_state().items()
            for l in tqdm(range(home.num_layers), desc="export", disable=not progress, unit="layer"):
                yield from home.layer_state(l).items()

        write_sharded(tensors(), tmp, shard_bytes)

    verify = (lambda tmp: verify_home_reload(home, tmp, verify_ids)) if verify_ids is not None else None
    return _staged_export(out, overwrite, write_weights, tokenizer, write_extras, card, verify)


def _staged_export(out, overwrite: bool, write_weights: Callable[[Path], None], tokenizer,
                   write_extras, card, verify) -> Path:
    """Assemble the checkpoint in a hidden sibling of ``out``, verify it, then rename it into place."""
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    try:
        write_weights(tmp)
        tokenizer.save_pretrained(tmp)
        for name in MODELING_FILES:
            shutil.copy2(modeling_dir() / name, tmp / name)
        if write_extras is not None:
            write_extras(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card(tmp) if callable(card) else card)
        if verify is not None:
            verify(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_sharded(tensors, directory: Path, shard_bytes: int = 2 << 30) -> list[Path]:
    """Write (name, tensor) pairs as ``model.safetensors`` or ``model-0000i-of-0000n.safetensors``
    shards plus ``model.safetensors.index.json``, holding at most one shard in memory."""
    from safetensors.torch import save_file

    files: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        path = directory / f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        files.append((path, list(shard)))

    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        if shard and size + t.numel() * t.element_size() > shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
    if shard or not files:
        flush()
    if len(files) == 1:
        target = directory / "model.safetensors"
        os.replace(files[0][0], target)
        return [target]
    weight_map, paths = {}, []
    for i, (path, names) in enumerate(files, 1):
        final = directory / f"model-{i:05d}-of-{len(files):05d}.safetensors"
        os.replace(path, final)
        paths.append(final)
        weight_map.update({n: final.name for n in names})
    write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                             "weight_map": weight_map})
    return paths


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
    return _check_logits(a, b, dtype, atol)


@torch.no_grad()
def verify_home_reload(home, directory: Path, ids: torch.Tensor) -> float:
    """Reload ``directory`` with trust_remote_code and compare its logits with the home's streamed ones."""
    from transformers import AutoModelForCausalLM

    h, inputs = home.capture(ids, ids.shape[0])
    for l in range(home.num_layers):
        h = home.run_all(home.current_layer(l), h, inputs)
        home.release(l)
    expected = home.logits(h[0]).float().cpu()
    # reloaded in the pipeline's arithmetic dtype: the stored weights (bf16, say) are exact in it, so the
    # logits must agree to rounding, which checks the files hold exactly the weights the pipeline used
    reloaded = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=home.dtype,
                                                    device_map={"": home.device})
    reloaded.eval()
    got = reloaded(input_ids=ids.to(home.device), use_cache=False).logits.float().cpu()
    del reloaded
    return _check_logits(expected, got, home.dtype)


def _check_logits(expected: torch.Tensor, got: torch.Tensor, dtype: torch.dtype, atol: float | None = None) -> float:
    diff = (expected - got).abs().max().item()
    tol = atol if atol is not None else (1e-4 if dtype == torch.float32 else 5e-2) * max(1.0, expected.abs().max().item())
    if not diff <= tol:
        raise VacError(f"export check failed: the reloaded checkpoint's logits differ by {diff:.3g} (> {tol:.3g}); "
                       "nothing was written. Please report this as a bug")
    return diff


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


def weight_bytes(shapes, factors: set[str], methods: tuple[str, ...] = ("int8", "w4"), group_size: int = 128,
                 float_dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes of the weights (safetensors payload, headers excluded) of a model given as
    (name, shape, dtype) triples: ``{"bf16": n}`` with floating tensors in ``float_dtype``, and for
    each method in ``methods`` the same with every tensor named in ``factors`` stored packed -
    exactly the tensors an export with ``quantized=`` and ``dtype=float_dtype`` writes. No
    weight is read: a 32B model is accounted for as fast as a tiny one."""
    from vac.quantize import quantized_nbytes

    name = str(float_dtype).removeprefix("torch.").replace("bfloat16", "bf16")
    fsize = torch.empty((), dtype=float_dtype).element_size()
    sizes = {name: 0, **{m: 0 for m in methods}}
    for key, shape, dtype in shapes:
        numel = 1
        for d in shape:
            numel *= int(d)
        plain = numel * (fsize if dtype.is_floating_point else torch.empty((), dtype=dtype).element_size())
        sizes[name] += plain
        for m in methods:
            sizes[m] += quantized_nbytes(int(shape[0]), int(shape[1]), m, group_size) if key in factors else plain
    return sizes


def measure_sizes(model: nn.Module, methods: tuple[str, ...] = ("int8", "w4"), group_size: int = 128,
                  float_dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """:func:`weight_bytes` of an in-memory model (tied tensors once), factorized modules' factors as factors."""
    from vac.quantize import factorized_modules

    factors = {f"{m}.{f}.weight" for m in factorized_modules(model) for f in ("down", "up")}
    shapes = [(k, tuple(v.shape), v.dtype) for k, v in _unique_state(model).items()]
    return weight_bytes(shapes, factors, methods, group_size, float_dtype)


def main(argv: list[str] | None = None) -> int:
    """``python -m vac.export DIR --push-to-hub REPO [--dry-run] [--private]``."""
    from vac.publish import main as publish_main

    return publish_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
