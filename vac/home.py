"""Where a model's weights live, and one decoder layer at a time on the compute device.

Every stage of VAC touches one decoder layer at a time, so a model is reached through a
*home* that hands out materialized layers and takes factorized ones back:

* ``dense_layer(l)``: layer l as in the original model;
* ``current_layer(l)``: layer l as compressed so far (the dense one until something is committed);
* ``commit(l, sub, module)``: replace a target linear of layer l's current version;
* ``finish(l)``: layer l is done: persist its current version, free what the home holds of it;
* ``capture(ids)``: the inputs of layer 0 (hidden states and the per-layer keyword arguments:
  rotary embeddings, masks, one set per attention kind) from a real forward pass stopped there;
* ``logits(h)``: the head on the last boundary, ``head(norm(h))``.

Two homes:

* :class:`InMemoryHome` wraps an ``nn.Module`` (the Python API ``compress_(model, ...)``,
  tests, small models): layers are the model's own modules and commits replace them in place.
* :class:`CheckpointHome` never loads the whole model. The model is an empty skeleton built
  under accelerate's ``init_empty_weights``; a layer's tensors are read from the checkpoint's
  safetensors (``safe_open``, one tensor at a time) and placed on the device with
  ``set_module_tensor_to_device``; committed factors are written to a work directory, one
  safetensors file per finished layer, from which exports and later passes read them.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from vac.errors import VacError
from vac.families import decoder_layers, get_family
from vac.layers import FactorizedLinear
from vac.memory import trim
from vac.weights import SafetensorsSource, empty_model, tied_source_name


class _Stop(Exception):
    pass


def as_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


#: attribute a home sets on each decoder layer (and so on every copy of it): the layer's attention
#: kind, config.layer_types[l] (sliding-window or full attention), or None where all are alike
KIND_ATTR = "vac_attention_kind"


def attention_kinds(config, num_layers: int) -> list[str | None]:
    """The attention kind of each decoder layer: ``config.layer_types`` where the family has it (Gemma 3,
    OLMo 3, Qwen: sliding-window and full attention get other masks, and Gemma 3 other rotary
    embeddings), else None for every layer."""
    types = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "layer_types", None)
    if not types or len(set(types)) < 2:
        return [None] * num_layers
    return list(types)[:num_layers]


class LayerInputs:
    """Per-batch positional and keyword arguments of a decoder layer, captured once per attention kind.

    Batches of the same shape get the same rotary embeddings and masks: identical captures are
    kept once, so what this holds does not grow with the number of batches.
    """

    def __init__(self):
        self.args: dict[str | None, list[tuple]] = {}
        self.kwargs: dict[str | None, list[dict]] = {}

    def add(self, args: tuple, kwargs: dict, kind: str | None = None) -> None:
        for k in self.kwargs:
            for i in range(len(self.kwargs[k]) - 1, -1, -1):
                if _same(self.args[k][i], args) and _same(self.kwargs[k][i], kwargs):
                    args, kwargs = self.args[k][i], self.kwargs[k][i]
                    break
        self.args.setdefault(kind, []).append(args)
        self.kwargs.setdefault(kind, []).append(kwargs)

    def of(self, layer: nn.Module, b: int) -> tuple[tuple, dict]:
        """(args, kwargs) of batch ``b`` for ``layer``'s attention kind."""
        kind = getattr(layer, KIND_ATTR, None)
        if kind not in self.kwargs:
            if len(self.kwargs) != 1:
                raise VacError(f"no captured inputs for a decoder layer of attention kind {kind!r} (captured: "
                               f"{sorted(map(str, self.kwargs))})")
            kind = next(iter(self.kwargs))
        return self.args[kind][b], self.kwargs[kind][b]

    def __len__(self) -> int:
        return len(next(iter(self.kwargs.values()), []))


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records its inputs, passes the hidden states on.
    Other attributes are the original layer's (older transformers read ``decoder_layer.attention_type``)."""

    def __init__(self, index: int, box: dict, stop: bool, original: nn.Module):
        super().__init__()
        self.index, self.box, self.stop = index, box, stop
        object.__setattr__(self, "_original", original)  # not a submodule: nothing of it is registered

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, *args, **kwargs):
        self.box[self.index] = (args, kwargs)
        if self.stop:
            raise _Stop
        return args[0] if args else kwargs["hidden_states"]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, str, bool, type(None))) and a == b)


class ModelHome:
    """Common part of both homes: family, capture, head and the layer bookkeeping."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.family = get_family(model)
        self.config = model.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_layers = len(decoder_layers(model))
        self.kinds = attention_kinds(self.config, self.num_layers)
        for layer, kind in zip(decoder_layers(model), self.kinds):
            setattr(layer, KIND_ATTR, kind)  # copies of the layer (dense, current, skeletons) carry it
        self.ranks: dict[str, int] = {}  # committed factorizations, by full target name

    def layer_prefix(self, l: int) -> str:
        return f"{self.family.layers_path}.{l}."

    # --- implemented by each home ----------------------------------------------------------
    def dense_layer(self, l: int) -> nn.Module:
        raise NotImplementedError

    def current_layer(self, l: int) -> nn.Module:
        raise NotImplementedError

    def commit(self, l: int, sub: str, module: FactorizedLinear) -> None:
        raise NotImplementedError

    def finish(self, l: int) -> None:
        """Layer l will not be committed to again: persist it and free its device copies."""

    def release(self, l: int) -> None:
        """A hint that layer l is not needed on the device for a while."""

    def _outer_ready(self) -> None:
        """Make the embedding, rotary embeddings, final norm and head usable."""

    # --- shared ----------------------------------------------------------------------------
    def changed(self, l: int) -> bool:
        prefix = self.layer_prefix(l)
        return any(name.startswith(prefix) for name in self.ranks)

    @torch.no_grad()
    def capture(self, blocks: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], LayerInputs]:
        """Inputs of decoder layer 0 for ``blocks`` (host tensors, one per batch) and the layer kwargs
        of every attention kind: a real forward pass in which the decoder layers up to the first one
        of the last kind met are stand-ins that record what they are given (no layer is computed)."""
        self._outer_ready()
        layers = decoder_layers(self.model)
        first = {}  # attention kind -> its first layer
        for l, kind in enumerate(self.kinds):
            first.setdefault(kind, l)
        last = max(first.values())
        originals = [layers[l] for l in range(last + 1)]
        hidden, inputs = [], LayerInputs()
        for ids in blocks.split(batch_size):
            box: dict[int, tuple] = {}
            for l in range(last + 1):
                layers[l] = _Recorder(l, box, stop=l == last, original=originals[l])
            try:
                self.model(input_ids=ids.to(self.device), use_cache=False)
            except _Stop:
                pass
            finally:
                for l, module in enumerate(originals):
                    layers[l] = module
            for kind, l in first.items():
                args, kwargs = box[l]
                if not args:  # hidden states given by keyword
                    kwargs = dict(kwargs)
                    args = (kwargs.pop("hidden_states"),)
                kwargs = dict(kwargs)
                for key in ("past_key_value", "past_key_values", "cache"):
                    if key in kwargs:
                        kwargs[key] = None
                kwargs["use_cache"] = False
                inputs.add(tuple(args[1:]), kwargs, kind)
            hidden.append(box[0][0][0].to("cpu") if box[0][0] else box[0][1]["hidden_states"].to("cpu"))
        return hidden, inputs

    def head_modules(self) -> tuple[nn.Module, nn.Module]:
        self._outer_ready()
        return self.model.get_submodule(self.family.norm_path), self.model.get_submodule(self.family.head_path)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        norm, head = self.head_modules()
        return head(norm(h.to(self.device)))

    def run(self, layer: nn.Module, h: torch.Tensor, inputs: LayerInputs, b: int) -> torch.Tensor:
        """One batch through one decoder layer on the device; the output stays on the device."""
        args, kwargs = inputs.of(layer, b)
        return as_tensor(layer(h.to(self.device), *args, **kwargs))

    @torch.no_grad()
    def run_all(self, layer: nn.Module, hidden: list[torch.Tensor], inputs: LayerInputs) -> list[torch.Tensor]:
        return [self.run(layer, h, inputs, b).to("cpu") for b, h in enumerate(hidden)]

    def stage_targets(self, l: int) -> dict[str, str]:
        """sub-module path -> full name, for every target of layer l (factorized ones included)."""
        prefix = self.layer_prefix(l)
        return {sub: prefix + sub for sub in self.family.components()}


class InMemoryHome(ModelHome):
    """A model already in memory; layers are its own modules, commits replace them in place.

    The dense version of a layer that is being changed is kept (one layer, copied at its first
    commit) until ``finish``: per-matrix steps pair each stage's inputs in the current layer
    with those in the dense one.
    """

    def __init__(self, model: nn.Module):
        p = next(model.parameters())
        super().__init__(model, p.device, p.dtype)
        self.layers = decoder_layers(model)
        self._dense_copy: dict[int, nn.Module] = {}

    def dense_layer(self, l: int) -> nn.Module:
        return self._dense_copy.get(l, self.layers[l])

    def current_layer(self, l: int) -> nn.Module:
        return self.layers[l]

    def commit(self, l: int, sub: str, module: FactorizedLinear) -> None:
        if l not in self._dense_copy:
            self._dense_copy[l] = copy.deepcopy(self.layers[l])
        replace_module(self.layers[l], sub, module)
        self.ranks[self.layer_prefix(l) + sub] = module.rank

    def finish(self, l: int) -> None:
        self._dense_copy.pop(l, None)


class CheckpointHome(ModelHome):
    """A checkpoint directory of safetensors, never loaded whole.

    ``work_dir`` receives one ``layers/NNNNN.safetensors`` per finished layer (the factors of
    its committed targets, in ``store_dtype``) and ``ranks.json``. Every weight is rounded to
    ``store_dtype`` (the dtype the model will be exported in) before use, the checkpoint's and
    the committed factors alike, and computed with in ``dtype``: the dense reference and every
    statistic downstream are measured on the weights that will be published.
    """

    def __init__(self, directory: str | Path, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, work_dir: str | Path | None = None,
                 store_dtype: torch.dtype | None = None, config=None):
        from transformers import AutoConfig

        directory = Path(directory)
        config = config or AutoConfig.from_pretrained(directory)
        get_family(config)  # a clear error for unsupported families, before anything else
        skeleton = empty_model(config)
        self.source = SafetensorsSource(directory, config)
        dtype = dtype or self.source.dtype()
        super().__init__(skeleton, torch.device(device), dtype)
        self.directory = directory
        self.store_dtype = store_dtype or dtype
        self._check_tensors()
        self._own_work = work_dir is None
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="vac-work-"))
        (self.work_dir / "layers").mkdir(parents=True, exist_ok=True)
        self._dense: dict[int, nn.Module] = {}
        self._current: dict[int, nn.Module] = {}
        self._finished: set[int] = set()
        self._outer = False
        self._layers = decoder_layers(skeleton)

    # --- checks ----------------------------------------------------------------------------
    def _check_tensors(self) -> None:
        """Every parameter of the skeleton is in the checkpoint with its shape (read from headers only)."""
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if not self.source.has(name):
                tied = tied_source_name(self.model, name)
                if tied is not None and self.source.has(tied):
                    continue
                raise VacError(f"{self.directory} has no tensor {name!r}; the weights do not match config.json "
                               "(a different model, or an incomplete download)")
            shape = self.source.shape(name)
            if shape != tuple(p.shape):
                raise VacError(f"{self.directory}: tensor {name!r} has shape {shape}, config.json implies "
                               f"{tuple(p.shape)}; the weights do not match the config")

    # --- materialization -------------------------------------------------------------------
    def _set(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        from accelerate.utils import set_module_tensor_to_device

        dtype = None
        if value.is_floating_point():
            # the model as it will be published: weights in the export dtype, arithmetic in ``dtype``
            value, dtype = value.to(self.store_dtype), self.dtype
        set_module_tensor_to_device(module, name, self.device, value=value, dtype=dtype, clear_cache=False)
        module.get_parameter(name).requires_grad_(False)  # statistics only; recovery builds its own model

    def _outer_ready(self) -> None:
        if self._outer:
            return
        layers = self.family.layers_path + "."
        names = {name: tied_source_name(self.model, name)
                 for name, _ in self.model.named_parameters(remove_duplicate=False) if not name.startswith(layers)}
        for name, value in self.source.get_many(names).items():
            self._set(self.model, name, value)
        for name, buf in self.model.named_buffers():
            if not name.startswith(layers) and buf.device != self.device:
                module, _, leaf = name.rpartition(".")
                owner = self.model.get_submodule(module)
                persistent = leaf not in owner._non_persistent_buffers_set
                owner.register_buffer(leaf, buf.to(self.device), persistent=persistent)
        self._outer = True

    def layer_skeleton(self, l: int, factorized: bool) -> nn.Module:
        """Layer l's module tree with meta parameters; with ``factorized``, committed targets are
        FactorizedLinear of their ranks."""
        layer = copy.deepcopy(self._layers[l])  # meta parameters: nothing is copied
        prefix = self.layer_prefix(l)
        for sub in self.family.components() if factorized else ():
            if prefix + sub in self.ranks:
                old = layer.get_submodule(sub)
                replace_module(layer, sub, FactorizedLinear(old.in_features, old.out_features, self.ranks[prefix + sub],
                                                            bias=old.bias is not None, device="meta"))
        return layer

    def _build(self, l: int, factorized: bool = False) -> nn.Module:
        """Layer l on the device: the checkpoint's tensors, and with ``factorized`` the stored factors."""
        prefix = self.layer_prefix(l)
        layer = self.layer_skeleton(l, factorized)
        factors = self._stored_factors(l) if factorized else {}
        dense = self.source.get_many({prefix + name: None for name, _ in layer.named_parameters() if name not in factors})
        for name, _ in layer.named_parameters():
            self._set(layer, name, factors[name] if name in factors else dense[prefix + name])
        layer.to(self.device)  # buffers
        return layer.eval()

    def _stored_factors(self, l: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self._layer_file(l)
        return load_file(str(path)) if path.is_file() else {}

    def _layer_file(self, l: int) -> Path:
        return self.work_dir / "layers" / f"{l:05d}.safetensors"

    # --- the home interface ----------------------------------------------------------------
    def dense_layer(self, l: int) -> nn.Module:
        if l not in self._dense:
            self._dense[l] = self._build(l)
        return self._dense[l]

    def current_layer(self, l: int) -> nn.Module:
        if l in self._current:
            return self._current[l]
        if not self.changed(l):
            return self.dense_layer(l)
        self._current[l] = self._build(l, factorized=True)
        return self._current[l]

    def commit(self, l: int, sub: str, module: FactorizedLinear) -> None:
        if l in self._finished:
            raise RuntimeError(f"layer {l} was finished; it cannot be changed again")
        if l not in self._current:
            base = self.dense_layer(l)
            self._current[l] = copy.deepcopy(base)
        module = module.to(device=self.device)
        if self.store_dtype != self.dtype:  # later passes see the weights as they will be stored
            with torch.no_grad():
                for p in module.parameters():
                    p.copy_(p.to(self.store_dtype).to(p.dtype))
        replace_module(self._current[l], sub, module)
        self.ranks[self.layer_prefix(l) + sub] = module.rank

    def finish(self, l: int) -> None:
        from safetensors.torch import save_file

        if l in self._current:
            layer = self._current[l]
            prefix = self.layer_prefix(l)
            tensors = {}
            for sub in self.family.components():
                if prefix + sub in self.ranks:
                    for name, t in layer.get_submodule(sub).state_dict().items():
                        tensors[f"{sub}.{name}"] = t.detach().to("cpu", self.store_dtype).contiguous()
            path = self._layer_file(l)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            save_file(tensors, tmp)
            os.replace(tmp, path)
            (self.work_dir / "ranks.json").write_text(json.dumps(self.ranks, indent=1))
        self._finished.add(l)
        self.release(l)

    def release(self, l: int) -> None:
        self._dense.pop(l, None)
        if l in self._finished or not self.changed(l):
            self._current.pop(l, None)
        trim()

    def layer_state(self, l: int, dense: bool = False) -> dict[str, torch.Tensor]:
        """Layer l's tensors as exported (current version, or ``dense``), in ``store_dtype``, full names."""
        prefix = self.layer_prefix(l)
        factors = {} if dense else self._stored_factors(l)
        names = [name for name, _ in self.layer_skeleton(l, factorized=not dense).named_parameters()]
        stored = self.source.get_many({prefix + name: None for name in names if name not in factors})
        out = {}
        for name in names:
            t = factors[name] if name in factors else stored[prefix + name]
            out[prefix + name] = t.to(self.store_dtype) if t.is_floating_point() else t
        return out

    def outer_state(self) -> dict[str, torch.Tensor]:
        """The tensors outside the decoder layers (embedding, final norm, head unless tied): a tied
        parameter once, under the name its tie points to, as ``save_pretrained`` writes it."""
        layers = self.family.layers_path + "."
        names = {name: None for name, _ in self.model.named_parameters()
                 if not name.startswith(layers) and tied_source_name(self.model, name) is None}
        return {name: t.to(self.store_dtype) if t.is_floating_point() else t
                for name, t in self.source.get_many(names).items()}

    def to_model(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 dense: bool = False) -> nn.Module:
        """The whole compressed (or ``dense``) model in memory, for recovery and quantization, which
        train or calibrate it as one module; weights as stored, cast to ``dtype`` (default: compute)."""
        from accelerate.utils import set_module_tensor_to_device

        model = empty_model(self.config)
        layers = decoder_layers(model)
        for l in range(self.num_layers):
            layers[l] = self.layer_skeleton(l, factorized=not dense)
        state = self.outer_state()
        for l in range(self.num_layers):
            state.update(self.layer_state(l, dense=dense))
        dtype = dtype or self.dtype
        for name, value in state.items():
            set_module_tensor_to_device(model, name, device, value=value,
                                        dtype=dtype if value.is_floating_point() else None, clear_cache=False)
        if getattr(self.config, "tie_word_embeddings", False):
            model.tie_weights()
        model.to(device)  # buffers
        return model.eval()

    def close(self) -> None:
        """Remove the work directory if this home made it."""
        if self._own_work:
            import shutil

            shutil.rmtree(self.work_dir, ignore_errors=True)
