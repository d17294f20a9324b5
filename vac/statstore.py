"""The statistics of the dense model that later stages read back: one safetensors file per layer.

Profiling runs backward from the top layer and produces, per target linear, the damped
eigendecomposition of its output-gradient covariance G (and, for the ``fisher`` method, its
diagonal Fisher). The allocator and the factorization need them much later, one layer at a
time, so they go to disk as they are made (``layer_NNNNN.safetensors``) and are read back per
target with ``safe_open``: nothing whole-model stays in memory. The allocator's spectra (small:
min(m, n) numbers per target) are kept as well, so a second run on the same dense model and
calibration set (the evolutionary search scores many strategies) skips both sweeps.

``fingerprint`` names what the statistics depend on (model, data, sample counts, damping, ...);
opening a store whose fingerprint differs starts it afresh. Without a path the store is a
dict in memory (tests, small models).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from vac.factorize import SymEig

_G = "G."
_F = "F."


class StatsStore:
    def __init__(self, path: str | Path | None = None, fingerprint: dict | None = None):
        self.path = Path(path) if path is not None else None
        self.fingerprint = json.loads(json.dumps(fingerprint or {}))  # as read back from meta.json
        self._mem: dict[int, dict[str, torch.Tensor]] = {}
        self._spectra: dict[str, torch.Tensor] = {}
        self._spectra_key: str | None = None
        if self.path is not None:
            self._open()

    # --- lifecycle ---------------------------------------------------------------------------
    def _open(self) -> None:
        meta = self.path / "meta.json"
        if meta.is_file():
            try:
                old = json.loads(meta.read_text())
            except ValueError:
                old = None
            if old != self.fingerprint:  # statistics of another model, data or setting: only its own files go
                for f in [*self.path.glob("layer_*.safetensors"), *self.path.glob("*.tmp"),
                          self.path / "spectra.safetensors"]:
                    f.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(meta, json.dumps(self.fingerprint, indent=1, sort_keys=True))
        spectra = self.path / "spectra.safetensors"
        if spectra.is_file():
            from safetensors import safe_open

            with safe_open(str(spectra), framework="pt") as f:
                self._spectra = {k: f.get_tensor(k) for k in f.keys()}
                self._spectra_key = (f.metadata() or {}).get("key")

    def _layer_file(self, l: int) -> Path:
        return self.path / f"layer_{l:05d}.safetensors"

    # --- per-layer statistics ----------------------------------------------------------------
    def has_layer(self, l: int, names: list[str], G: bool = True, F: bool = False) -> bool:
        """Whether layer l's G (and/or diagonal Fisher) of every one of ``names`` is stored."""
        keys = self._keys(l)
        return all((not G or f"{_G}{n}.evecs" in keys) and (not F or _F + n in keys) for n in names)

    def _keys(self, l: int) -> set[str]:
        if self.path is None:
            return set(self._mem.get(l, {}))
        f = self._layer_file(l)
        if not f.is_file():
            return set()
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            return set(h.keys())

    def put_layer(self, l: int, G: dict[str, SymEig], F: dict[str, torch.Tensor]) -> None:
        tensors = {}
        for name, eig in G.items():
            tensors.update({f"{_G}{name}.{k}": v.detach().cpu().contiguous() for k, v in eig.tensors().items()})
        for name, f in F.items():
            tensors[_F + name] = f.detach().cpu().contiguous()
        tensors = {**self._read(l, ""), **tensors}  # what the layer already holds stays (G beside a new F)
        if self.path is None:
            self._mem[l] = tensors
            return
        from safetensors.torch import save_file

        target = self._layer_file(l)
        fd, tmp = tempfile.mkstemp(dir=self.path, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, target)  # a killed run never leaves half a layer behind
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _read(self, l: int, prefix: str) -> dict[str, torch.Tensor]:
        if self.path is None:
            return {k[len(prefix):]: v for k, v in self._mem.get(l, {}).items() if k.startswith(prefix)}
        from safetensors import safe_open

        path = self._layer_file(l)
        if not path.is_file():
            return {}
        with safe_open(str(path), framework="pt") as h:
            return {k[len(prefix):]: h.get_tensor(k) for k in h.keys() if k.startswith(prefix)}

    def G(self, l: int, name: str) -> SymEig | None:
        tensors = self._read(l, f"{_G}{name}.")
        return SymEig.from_tensors(tensors) if tensors else None

    def F(self, l: int, name: str) -> torch.Tensor | None:
        tensors = self._read(l, _F)
        return tensors.get(name)

    # --- allocation spectra ------------------------------------------------------------------
    def spectra(self, key: str) -> dict[str, torch.Tensor]:
        """Spectra stored under ``key`` (the settings they depend on beyond the fingerprint)."""
        return dict(self._spectra) if self._spectra_key == key else {}

    def put_spectra(self, key: str, spectra: dict[str, torch.Tensor]) -> None:
        if self._spectra_key != key:
            self._spectra, self._spectra_key = {}, key
        self._spectra.update({k: v.detach().float().cpu().contiguous() for k, v in spectra.items()})
        if self.path is None:
            return
        from safetensors.torch import save_file

        fd, tmp = tempfile.mkstemp(dir=self.path, suffix=".tmp")
        os.close(fd)
        save_file(self._spectra, tmp, metadata={"key": key})
        os.replace(tmp, self.path / "spectra.safetensors")

    # --- accounting --------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes the store holds (on disk, or in memory without a path)."""
        if self.path is None:
            return sum(t.numel() * t.element_size() for d in self._mem.values() for t in d.values())
        return sum(f.stat().st_size for f in self.path.glob("*.safetensors"))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
