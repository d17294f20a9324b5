"""Reading a Hugging Face checkpoint one tensor at a time, and building its model without weights.

:class:`SafetensorsSource` maps parameter names to tensors of a checkpoint directory (a single
``model.safetensors``, several files, or an index), read lazily with ``safe_open``;
:func:`empty_model` builds the ``*ForCausalLM`` skeleton on the meta device with accelerate's
``init_empty_weights``, so that a 32B model costs nothing until a layer is materialized.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vac.errors import VacError


class SafetensorsSource:
    """Tensors of a Hugging Face checkpoint directory, read one at a time with ``safe_open``."""

    def __init__(self, directory: str | Path, config=None):
        self.directory = Path(directory)
        self._handles: dict[Path, object] = {}
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise VacError(f"{index} is not a valid safetensors index ({e}); re-download the checkpoint") from e
            files = {name: self.directory / f for name, f in weight_map.items()}
        else:
            files = {}
            for f in sorted(self.directory.glob("*.safetensors")):
                files.update({k: f for k in self._handle(f).keys()})
        if not files:
            raise VacError(f"{self.directory} has no *.safetensors weights")
        self._files = files
        self._tied = bool(getattr(config, "tie_word_embeddings", False)) if config is not None else False

    def _resolve(self, name: str) -> str | None:
        if name in self._files:
            return name
        # base-model checkpoints (LlamaModel saved without the "model." prefix)
        if name.startswith("model.") and name[len("model."):] in self._files:
            return name[len("model."):]
        return None

    def _handle(self, path: Path):
        from safetensors import safe_open

        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises several types for truncated files
                raise VacError(f"could not read {path} ({type(e).__name__}: {e}); the file may be corrupt or "
                               "incomplete: re-download or re-export it") from e
        return self._handles[path]

    def has(self, name: str) -> bool:
        return self._resolve(name) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        key = self._resolve(name)
        return tuple(self._handle(self._files[key]).get_slice(key).get_shape())

    def get(self, name: str, tied_to: str | None = None) -> torch.Tensor:
        key = self._resolve(name)
        if key is None and tied_to is not None:
            key = self._resolve(tied_to)
        if key is None:
            raise VacError(f"{self.directory} has no tensor {name!r}; the checkpoint does not match its config.json")
        try:
            return self._handle(self._files[key]).get_tensor(key)
        except VacError:
            raise
        except Exception as e:
            raise VacError(f"could not read tensor {key!r} from {self._files[key]} ({type(e).__name__}: {e}); the "
                           "file may be corrupt or incomplete: re-download or re-export it") from e

    def dtype(self) -> torch.dtype:
        """The checkpoint's floating-point dtype (that of its first floating tensor)."""
        for name in self._files:
            h = self._handle(self._files[name])
            t = h.get_slice(name)
            dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(t.get_dtype())
            if dtype is not None:
                return dtype
        return torch.float32


def empty_model(config) -> nn.Module:
    """The *ForCausalLM of ``config`` with every parameter on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def tied_source_name(model: nn.Module, name: str) -> str | None:
    """The tensor a tied parameter is stored under (lm_head.weight -> model.embed_tokens.weight)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(tied, dict):
        return tied.get(name)
    return None


