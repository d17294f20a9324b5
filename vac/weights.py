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


def _stored_as(config) -> tuple[tuple[str, str], ...]:
    from vac.families import FAMILIES

    family = FAMILIES.get(getattr(config, "model_type", None)) if config is not None else None
    return family.stored_as if family is not None else ()


class SafetensorsSource:
    """Tensors of a Hugging Face checkpoint directory, read a few at a time with ``safe_open``.

    A file is opened for each read and closed after: safetensors memory-maps it, and the pages
    of a mapping that stays open count as resident memory, so cached handles would make the
    process grow by every layer it has read. Names, shapes and dtypes come from the headers,
    read once.
    """

    def __init__(self, directory: str | Path, config=None):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise VacError(f"{index} is not a valid safetensors index ({e}); re-download the checkpoint") from e
            paths = sorted({self.directory / f for f in weight_map.values()})
        else:
            paths = sorted(self.directory.glob("*.safetensors"))
        self._renames = _stored_as(config)
        self._files: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, safetensors dtype)
        for path in paths:
            with self._open(path) as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    self._files[k] = path
                    self._meta[k] = (tuple(sl.get_shape()), sl.get_dtype())
        if not self._files:
            raise VacError(f"{self.directory} has no *.safetensors weights")

    @staticmethod
    def _open(path: Path):
        from safetensors import safe_open

        if not path.is_file():
            raise VacError(f"{path} is missing; the checkpoint is incomplete: re-download or re-export it")
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises several types for truncated files
            raise VacError(f"could not read {path} ({type(e).__name__}: {e}); the file may be corrupt or "
                           "incomplete: re-download or re-export it") from e

    def _resolve(self, name: str, tied_to: str | None = None) -> str | None:
        for candidate in (name, tied_to):
            if candidate is None:
                continue
            if candidate in self._files:
                return candidate
            # base-model checkpoints (LlamaModel saved without the "model." prefix)
            if candidate.startswith("model.") and candidate[len("model."):] in self._files:
                return candidate[len("model."):]
            for new, old in self._renames:  # the family's published layout (vac.families: stored_as)
                if candidate.startswith(new) and old + candidate[len(new):] in self._files:
                    return old + candidate[len(new):]
        return None

    def has(self, name: str) -> bool:
        return self._resolve(name) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self._resolve(name)][0]

    def get(self, name: str, tied_to: str | None = None) -> torch.Tensor:
        return self.get_many({name: tied_to})[name]

    def get_many(self, names: dict[str, str | None]) -> dict[str, torch.Tensor]:
        """{name: tensor} for ``names`` (name -> the tensor it is tied to, or None), one open per file."""
        keys = {}
        for name, tied_to in names.items():
            key = self._resolve(name, tied_to)
            if key is None:
                raise VacError(f"{self.directory} has no tensor {name!r}; the checkpoint does not match its "
                               "config.json")
            keys[name] = key
        out = {}
        for path in sorted({self._files[k] for k in keys.values()}):
            with self._open(path) as h:
                for name, key in keys.items():
                    if self._files[key] != path:
                        continue
                    try:
                        out[name] = h.get_tensor(key)
                    except Exception as e:
                        raise VacError(f"could not read tensor {key!r} from {path} ({type(e).__name__}: {e}); the "
                                       "file may be corrupt or incomplete: re-download or re-export it") from e
        return out

    def dtype(self) -> torch.dtype:
        """The checkpoint's floating-point dtype (that of its first floating tensor)."""
        for _, dtype in self._meta.values():
            found = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtype)
            if found is not None:
                return found
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


