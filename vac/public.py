"""What leaves the machine: reports, cards and config entries without the user's local paths.

An exported checkpoint is meant to be published, and ``report.json``, ``README.md`` and the
``vac`` entry of ``config.json`` record where the model and the data came from. A hub id or
``bundled`` says that usefully; ``/home/alice/models/x`` only says who ran it where. Absolute
paths become "a local checkpoint" (models) or ``local:NAME`` (data and other files).
"""

from __future__ import annotations

import re
from pathlib import Path

#: keys whose value names a model: a local path there becomes LOCAL_MODEL
MODEL_KEYS = frozenset({"model", "base_model", "student", "teacher"})
LOCAL_MODEL = "a local checkpoint"
_ABSOLUTE = re.compile(r"(/|~|[A-Za-z]:[\\/]|file:)")


def is_local_path(text: str) -> bool:
    return bool(_ABSOLUTE.match(text))


def public(obj, key: str | None = None):
    """A copy of ``obj`` (dicts, lists, strings) with absolute local paths replaced, recursively;
    the user's home folder is also hidden inside longer strings."""
    if isinstance(obj, dict):
        return {k: public(v, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [public(v, key) for v in obj]
    if isinstance(obj, str):
        if is_local_path(obj):
            return LOCAL_MODEL if key in MODEL_KEYS else f"local:{Path(obj).name}"
        home = str(Path.home())
        return obj.replace(home, "~") if len(home) > 1 else obj
    return obj
