"""Modeling code for VAC-compressed checkpoints.

Self-contained on purpose: it is copied into every exported checkpoint and imports only torch
and transformers (no vac, no network, no dynamic code execution). The checkpoint's config is the
base family's own config (e.g. LlamaConfig) plus a ``vac`` entry holding the rank of every
factorized linear; ``VacForCausalLM`` builds the base family's ``*ForCausalLM`` and swaps those
linears for ``FactorizedLinear`` (``up(down(x))``) before the weights are loaded, so any family
transformers knows works.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


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
    for name, rank in vac.get("ranks", {}).items():
        if rank is None:
            continue
        old = model.get_submodule(name)
        new = FactorizedLinear(old.in_features, old.out_features, int(rank), bias=old.bias is not None,
                               device=old.weight.device, dtype=old.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)


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
    return _CLASSES[base]


class VacForCausalLM(PreTrainedModel):
    """Entry point named in ``auto_map``: dispatches to ``vac_class(config)``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if config is None:
            config = transformers.AutoConfig.from_pretrained(pretrained_model_name_or_path)
        kwargs.pop("trust_remote_code", None)
        return vac_class(config).from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        return vac_class(config)._from_config(config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return vac_class(config)._from_config(config, **kwargs)
