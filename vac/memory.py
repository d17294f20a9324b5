"""Time and memory per stage of a run: ``report.json``'s ``timings_s`` and ``memory`` records.

``Stages`` is a context-manager factory: ``with stages("factorize"): ...`` adds the stage's
seconds and records its peak resident host memory (sampled by a background thread, since
``ru_maxrss`` can only grow) and, on CUDA, its peak allocated device memory (the allocator's
own counter, reset at each stage). Nested stages are recorded under ``outer/inner``.
"""

from __future__ import annotations

import threading
import time

import torch

SAMPLE_SECONDS = 0.02


def trim() -> None:
    """Hand memory the allocator has freed back to the OS (glibc keeps freed heap pages otherwise).

    The sweeps allocate and free large, differently sized temporaries layer after layer (covariances,
    square roots, factors); without a trim, glibc's heap keeps the pages of the largest ones, and
    the resident size creeps up over a deep model though nothing is held. A no-op elsewhere.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _Sampler:
    """Peak RSS while running, sampled every ``SAMPLE_SECONDS`` (and at start and stop)."""

    def __init__(self):
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak


class Stages:
    """Seconds and peak memory per named stage."""

    def __init__(self, device: torch.device | str | None = None, prefix: str = ""):
        self.seconds: dict[str, float] = {}
        self.memory: dict[str, dict[str, int]] = {}
        self.device = torch.device(device) if device is not None else None
        self.prefix = prefix
        self._active: list[_Stage] = []  # open stages, outermost first (shared with nested views)

    def nested(self, prefix: str) -> "Stages":
        """Stages recorded into this object under ``prefix/``."""
        child = Stages(self.device, prefix=f"{self.prefix}{prefix}/")
        child.seconds, child.memory, child._active = self.seconds, self.memory, self._active
        return child

    def __call__(self, name: str):
        return _Stage(self, self.prefix + name)

    def record_disk(self, name: str, nbytes: int) -> None:
        self.memory.setdefault(self.prefix + name, {})["disk_bytes"] = int(nbytes)

    @property
    def cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()

    def peaks(self) -> dict[str, int]:
        """The largest host / device peak over every stage."""
        out = {"host_bytes": 0, "device_bytes": 0, "disk_bytes": 0}
        for rec in self.memory.values():
            for k in out:
                out[k] = max(out[k], rec.get(k, 0))
        return out


class _Stage:
    def __init__(self, stages: Stages, name: str):
        self.stages, self.name = stages, name

    def __enter__(self):
        s = self.stages
        self.device_peak = 0
        if s.cuda:  # the counter is reset per stage: hand what it saw so far to the open stages
            torch.cuda.synchronize(s.device)
            seen = torch.cuda.max_memory_allocated(s.device)
            for outer in s._active:
                outer.device_peak = max(outer.device_peak, seen)
            torch.cuda.reset_peak_memory_stats(s.device)
        s._active.append(self)
        self.sampler = _Sampler()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        s = self.stages
        s.seconds[self.name] = s.seconds.get(self.name, 0.0) + time.perf_counter() - self.t0
        s._active.remove(self)
        rec = s.memory.setdefault(self.name, {})
        rec["host_bytes"] = max(rec.get("host_bytes", 0), self.sampler.stop())
        if s.cuda:
            self.device_peak = max(self.device_peak, torch.cuda.max_memory_allocated(s.device))
            for outer in s._active:
                outer.device_peak = max(outer.device_peak, self.device_peak)
            rec["device_bytes"] = max(rec.get("device_bytes", 0), self.device_peak)
        return False
