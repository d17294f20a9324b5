"""Experiment tracking for the search: Weights & Biases when available, else nothing.

One wandb history row per evaluated genome (``eval/*``, stepped by ``eval/index``) and one
per generation (``gen/*`` plus the front as a table). wandb is optional: if it is missing or
``init`` fails, the search goes on with a warning. The mode follows ``WANDB_MODE``; without
it, ``offline`` unless an API key is configured (so nothing hangs on a login prompt).
"""

from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path
from typing import Any


class NullTracker:
    run_id: str | None = None

    def start(self, run_dir: Path, config: dict[str, Any], resume_id: str | None = None) -> None:
        pass

    def log_evaluation(self, index: int, generation: int, key: str, config: dict, result: dict) -> None:
        pass

    def log_generation(self, record: dict[str, Any], front: list[dict[str, Any]]) -> None:
        pass

    def finish(self) -> None:
        pass


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for k, v in config.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        elif isinstance(v, list):
            flat[k] = str(v)
        else:
            flat[k] = v
    return flat


class WandbTracker(NullTracker):
    def __init__(self, project: str = "vac-search", name: str | None = None, mode: str | None = None,
                 entity: str | None = None):
        self.project, self.name, self.entity = project, name, entity
        self.mode = mode or os.environ.get("WANDB_MODE") or ("online" if _has_api_key() else "offline")
        self.run = None

    def start(self, run_dir: Path, config: dict[str, Any], resume_id: str | None = None) -> None:
        if self.mode == "disabled":
            return
        try:
            import wandb
            self.run = wandb.init(project=self.project, entity=self.entity, name=self.name, mode=self.mode,
                                  dir=str(run_dir), config=config, id=resume_id,
                                  resume="allow" if resume_id else None, job_type="search")
            self.run.define_metric("eval/index")
            self.run.define_metric("eval/*", step_metric="eval/index")
            self.run.define_metric("gen/generation")
            self.run.define_metric("gen/*", step_metric="gen/generation")
            self.run_id = self.run.id
        except Exception as exc:  # noqa: BLE001 -- tracking must never stop a search
            warnings.warn(f"wandb disabled: init failed ({type(exc).__name__}: {exc})", stacklevel=2)
            self.run = None

    def log_evaluation(self, index, generation, key, config, result) -> None:
        if self.run is None:
            return
        row = {"eval/index": index, "eval/generation": generation, "eval/key": key}
        row.update({f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float, str))})
        row.update({f"eval/genome.{k}": v for k, v in _flatten(config).items()})
        self.run.log(row)

    def log_generation(self, record, front) -> None:
        if self.run is None:
            return
        import wandb
        columns = ["key", "quality", "ratio", "generation", "config"]
        table = wandb.Table(columns=columns, data=[[e["key"], e["quality"], e["ratio"], e.get("generation"),
                                                    str(e.get("config"))] for e in front])
        self.run.log({"gen/generation": record["gen"], **{f"gen/{k}": v for k, v in record.items()},
                      "gen/front": table})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
