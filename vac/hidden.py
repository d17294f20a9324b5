"""Hidden states at decoder-layer boundaries, held in host RAM up to a cap and spilled to disk past it.

Every sweep over the model (gradient profiling, allocation spectra, sequential factorization,
evaluation) moves the calibration tokens through the decoder one layer at a time, so what it
keeps between layers is a handful of boundaries: ``[batch tensors]`` of shape (batch, seq,
hidden) per key. Which boundaries are still needed is the caller's business (it knows the
plan); this store only bounds the RAM they take: past ``ram_bytes`` the least recently used
entries go to a safetensors file in ``spill_dir`` and come back on the next ``get``.

The store counts what it holds (``ram_bytes_held``, ``peak_ram_bytes``, ``disk_bytes``), so
tests can check that a sweep's memory does not grow with depth by counting bytes, not by
timing anything.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

import torch

#: default RAM for cached hidden states. Front-to-back sequential compression keeps four
#: boundaries alive at once (dense and compressed streams, this layer and the next): OLMo-3-7B's
#: recipe (128 x 2048 tokens, bf16) needs 2 GiB each. Spilling more costs disk reads, not errors.
DEFAULT_RAM_BYTES = 8 << 30


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class HiddenStore:
    """key -> list of per-batch tensors, in RAM up to ``ram_bytes``, the rest on disk."""

    def __init__(self, ram_bytes: int = DEFAULT_RAM_BYTES, spill_dir: str | Path | None = None,
                 device: str | torch.device = "cpu"):
        self.ram_bytes = int(ram_bytes)
        self.device = torch.device(device)  # where tensors held in RAM live (the host, normally)
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self._dir: Path | None = None
        self._ram: OrderedDict[Hashable, list[torch.Tensor]] = OrderedDict()  # LRU order
        self._disk: dict[Hashable, tuple[Path, int, int]] = {}  # key -> (file, batches, bytes)
        self.peak_ram_bytes = 0
        self.peak_disk_bytes = 0
        self.spills = 0

    # --- accounting -------------------------------------------------------------------------
    @property
    def ram_bytes_held(self) -> int:
        return sum(nbytes(v) for v in self._ram.values())

    @property
    def disk_bytes(self) -> int:
        return sum(b for _, _, b in self._disk.values())

    def __contains__(self, key: Hashable) -> bool:
        return key in self._ram or key in self._disk

    def keys(self) -> list[Hashable]:
        return [*self._ram, *self._disk]

    # --- access -----------------------------------------------------------------------------
    def put(self, key: Hashable, tensors: list[torch.Tensor]) -> None:
        self.drop(key)
        self._ram[key] = [t.detach().to(self.device) for t in tensors]
        self._enforce(keep=key)

    def get(self, key: Hashable) -> list[torch.Tensor]:
        if key in self._ram:
            self._ram.move_to_end(key)
            return self._ram[key]
        if key not in self._disk:
            raise KeyError(key)
        from safetensors.torch import load_file

        path, batches, _ = self._disk.pop(key)
        data = load_file(str(path), device=str(self.device))
        path.unlink()
        self._ram[key] = [data[f"b{i}"] for i in range(batches)]
        self._enforce(keep=key)
        return self._ram[key]

    def drop(self, key: Hashable) -> None:
        self._ram.pop(key, None)
        entry = self._disk.pop(key, None)
        if entry is not None:
            entry[0].unlink(missing_ok=True)

    def retain(self, keep) -> None:
        """Drop every key for which ``keep(key)`` is false."""
        for key in self.keys():
            if not keep(key):
                self.drop(key)

    def clear(self) -> None:
        for key in self.keys():
            self.drop(key)

    def close(self) -> None:
        self.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "HiddenStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- spilling ---------------------------------------------------------------------------
    def _enforce(self, keep: Hashable) -> None:
        held = self.ram_bytes_held
        for key in list(self._ram):
            if held <= self.ram_bytes:
                break
            if key == keep:  # the entry being handed out stays in RAM, even over the cap
                continue
            held -= nbytes(self._ram[key])
            self._spill(key)
        self.peak_ram_bytes = max(self.peak_ram_bytes, held)

    def _spill(self, key: Hashable) -> None:
        from safetensors.torch import save_file

        if self._dir is None:
            if self._spill_root is not None:
                self._spill_root.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="vac-hidden-", dir=self._spill_root))
        tensors = self._ram.pop(key)
        fd, name = tempfile.mkstemp(suffix=".safetensors", dir=self._dir)
        os.close(fd)
        save_file({f"b{i}": t.contiguous() for i, t in enumerate(tensors)}, name)
        self._disk[key] = (Path(name), len(tensors), nbytes(tensors))
        self.spills += 1
        self.peak_disk_bytes = max(self.peak_disk_bytes, self.disk_bytes)
