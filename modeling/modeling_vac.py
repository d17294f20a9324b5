"""Modeling code for VAC-compressed checkpoints.

Self-contained on purpose: it is copied into every exported checkpoint and imports only torch
and transformers (no vac, no network, no dynamic code execution). The checkpoint's config is the
base family's own config (e.g. LlamaConfig) plus a ``vac`` entry holding the rank of every
factorized linear; ``VacForCausalLM`` builds the base family's ``*ForCausalLM`` and swaps those
linears for ``FactorizedLinear`` (``up(down(x))``) before the weights are loaded, so any family
transformers knows works.

Quantised checkpoints (``vac.quantization`` in the config) store each factor as packed integers
plus scales (``<module>.down.qweight``, ``.scales``, w4: ``.zeros``; layout in vac/quantize.py).
By default the factors are dequantised once, right after loading, into ordinary ``nn.Linear``
weights of the load dtype: inference then runs at the speed of the unquantised factorization
(dequantising on every forward pass in plain torch is several times slower on CPU; see
experiments/bench_inference.py). ``from_pretrained(..., vac_keep_packed=True)`` keeps the packed
buffers instead and dequantises on the fly, for the smallest memory footprint.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


# --- dequantisation: a verbatim copy of vac/quantize.py (this file cannot import vac) -----------

def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 [rows, cols] * scales [rows] -> dtype [rows, cols]."""
    return (qweight.float() * scales.float()[:, None]).to(dtype)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., c] -> int8 [..., 2c] in [-8, 7]; the low nibble is the even column."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    q = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return (q ^ 8) - 8  # sign-extend a 4-bit two's-complement value


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                  dtype: torch.dtype = torch.float32, cols: int | None = None) -> torch.Tensor:
    """Packed uint8 [rows, ceil(cols/2)], scales [rows, G], packed zeros uint8 [rows, ceil(G/2)] -> dtype [rows, cols].

    w = (q - z) * scale per group of ``group_size`` columns; the last group may be shorter.
    ``cols`` crops the padding column of an odd width (default: 2 * qweight columns).
    """
    q = unpack_int4(qweight).float()
    if cols is not None:
        q = q[:, :cols]
    n_groups, cols = scales.shape[1], q.shape[1]
    z = unpack_int4(zeros)[:, :n_groups].float()
    z = z.repeat_interleave(group_size, dim=1)[:, :cols]
    s = scales.float().repeat_interleave(group_size, dim=1)[:, :cols]
    return ((q - z) * s).to(dtype)


# --- modules ----------------------------------------------------------------------------------

class PackedLinear(nn.Module):
    """A bias-free linear whose weight is stored quantised (buffers ``qweight``, ``scales``, ``zeros``).

    ``forward`` dequantises on every call (the ``vac_keep_packed=True`` mode); by default
    ``VacForCausalLM.from_pretrained`` replaces each PackedLinear by ``to_linear()`` once loaded.
    """

    def __init__(self, in_features: int, out_features: int, method: str, group_size: int | None,
                 scale_dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = method, group_size
        if method == "int8":
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=scale_dtype, device=device))
        elif method == "w4":
            n_groups = -(-in_features // group_size)
            self.register_buffer("qweight", torch.empty(out_features, (in_features + 1) // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales", torch.empty(out_features, n_groups, dtype=scale_dtype, device=device))
            self.register_buffer("zeros", torch.empty(out_features, (n_groups + 1) // 2, dtype=torch.uint8,
                                                      device=device))
        else:
            raise ValueError(f"unknown VAC quantization method {method!r} in config.json")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.method == "int8":
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_w4(self.qweight, self.scales, self.zeros, self.group_size, dtype, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantize(x.dtype))

    def to_linear(self, dtype: torch.dtype) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device=self.qweight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize(dtype))
        return linear

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "w4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}{group}"


class FactorizedLinear(nn.Module):
    """y = up(down(x)) + bias; parameter names match the training-side module."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.down(x))
        return y if self.bias is None else y + self.bias


def _factorize_modules(model: nn.Module, vac: dict) -> None:
    quant = vac.get("quantization") or {}
    packed = set(quant.get("modules", ()))
    for name, rank in vac.get("ranks", {}).items():
        if rank is None:
            continue
        old = model.get_submodule(name)
        new = FactorizedLinear(old.in_features, old.out_features, int(rank), bias=old.bias is not None,
                               device=old.weight.device, dtype=old.weight.dtype)
        if name in packed:
            scale_dtype = getattr(torch, quant.get("scale_dtype", "float16"))
            new.down = PackedLinear(old.in_features, int(rank), quant["method"], quant.get("group_size"),
                                    scale_dtype, device=old.weight.device)
            new.up = PackedLinear(int(rank), old.out_features, quant["method"], quant.get("group_size"),
                                  scale_dtype, device=old.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)


def dequantize_factors_(model: nn.Module) -> nn.Module:
    """Replace every PackedLinear by an nn.Linear holding its dequantised weight (model dtype).

    The config's ``vac.quantization`` entry is dropped, so ``save_pretrained`` afterwards writes
    a valid unquantised VAC checkpoint of the same (dequantised) weights.
    """
    dtype = model.get_input_embeddings().weight.dtype
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.to_linear(dtype))
    vac = getattr(model.config, "vac", None)
    if isinstance(vac, dict) and "quantization" in vac:
        model.config.vac = {k: v for k, v in vac.items() if k != "quantization"}
    return model


def _base_class(config) -> type:
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise ValueError(f"this transformers version has no causal LM for model_type {config.model_type!r}")
    return getattr(transformers, name)


_CLASSES: dict[type, type] = {}


def vac_class(config) -> type:
    """The base family's *ForCausalLM with factorized linears, created once per family."""
    base = _base_class(config)
    if base not in _CLASSES:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            _factorize_modules(self, getattr(config, "vac", None) or {})

        _CLASSES[base] = type(f"Vac{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})
        _inherit_conversions(base, _CLASSES[base].__name__)
    return _CLASSES[base]


def _inherit_conversions(base: type, name: str) -> None:
    """transformers (5.x) renames checkpoint keys on load and save by the class's name or model_type
    (e.g. Gemma 3's multimodal ``language_model.lm_head`` <-> ``lm_head``), but not for classes defined
    outside transformers, as this one is: register the base class's renamings under this class's name."""
    try:
        from transformers import conversion_mapping as cm
    except ImportError:  # transformers 4.x: no conversion mapping
        return
    get = getattr(cm, "get_checkpoint_conversion_mapping", None)
    register = getattr(cm, "register_checkpoint_conversion_mapping", None)
    if get is None or register is None:
        return
    mapping = get(base.__name__)
    if mapping is None:
        model_type = getattr(getattr(base, "config_class", None), "model_type", None)
        mapping = get(model_type) if model_type else None
    if mapping is not None:
        register(name, mapping, overwrite=True)


class VacForCausalLM(PreTrainedModel):
    """Entry point named in ``auto_map``: dispatches to ``vac_class(config)``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if config is None:
            config = transformers.AutoConfig.from_pretrained(pretrained_model_name_or_path)
        kwargs.pop("trust_remote_code", None)
        keep_packed = kwargs.pop("vac_keep_packed", False)
        loaded = vac_class(config).from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
        if not keep_packed:  # output_loading_info=True returns (model, info)
            dequantize_factors_(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    @classmethod
    def from_config(cls, config, **kwargs):
        return vac_class(config)._from_config(config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return vac_class(config)._from_config(config, **kwargs)
