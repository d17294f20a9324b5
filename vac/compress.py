"""``python -m vac.compress``: the whole default pipeline, as a thin shell over library calls.

load -> data -> compress_ -> evaluate -> report -> export. Every stage is a plain function; this
module only wires them, times them and prints the result.
"""

from __future__ import annotations

import copy
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from vac.config import CompressConfig, config_from_args
from vac.errors import VacError
from vac.validate import one_line

log = logging.getLogger("vac")


class Timer:
    def __init__(self):
        self.stages: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.stages[name] = timer.stages.get(name, 0.0) + time.perf_counter() - self.t0

        return _Stage()


def load_data(cfg: CompressConfig, tokenizer):
    """Calibration and evaluation blocks; the same source is split by document, never shared."""
    from vac.data import token_blocks

    shared = cfg.calib_data == cfg.eval_data
    calib = token_blocks(cfg.calib_data, tokenizer, cfg.calib_samples, cfg.seq_len, split="calib",
                         shared=shared, seed=cfg.seed)
    evaluation = None
    if cfg.evaluate:
        evaluation = token_blocks(cfg.eval_data, tokenizer, cfg.eval_samples, cfg.seq_len, split="eval",
                                  shared=shared, seed=cfg.seed)
    return calib, evaluation


def run(cfg: CompressConfig, progress: bool = True, console=None) -> dict:
    """Run the pipeline for a validated config; returns the report (also written to --out)."""
    from rich.console import Console

    from vac.evaluate import compare
    from vac.card import base_license, model_card
    from vac.export import checkpoint_bytes, export, measure_sizes
    from vac.quantize import quantize_model_
    from vac.families import get_family
    from vac.models import load, resolve_device
    from vac.pipeline import compress_, param_count
    from vac.public import public
    from vac.report import build_report, print_summary, write_report
    from vac.validate import validate_compress

    console = console or Console(stderr=True)
    validate_compress(cfg)  # every input and the output location, before minutes of work, not after
    timer = Timer()
    device = resolve_device(cfg.device)
    with timer("load"):
        loaded = load(cfg.model, cfg.dtype, str(device))
    model, tok = loaded.model, loaded.tokenizer
    family = get_family(model).model_type
    with timer("data"):
        calib, eval_blocks = load_data(cfg, tok)
    console.print(f"[bold]VAC[/bold] {loaded.base_model} ({family}) -> ratio {cfg.ratio} with {cfg.method}; "
                  f"calibration {tuple(calib.shape)}, evaluation {None if eval_blocks is None else tuple(eval_blocks.shape)}")
    console.print({k: v for k, v in cfg.to_dict().items()})
    dense_params = param_count(model)
    recovering = cfg.recover_steps > 0 or cfg.recover_minutes > 0
    dense = copy.deepcopy(model) if cfg.evaluate or recovering else None

    with timer("compress"):
        result = compress_(model, cfg, calib, progress=progress)
    evaluation: dict = {}
    if cfg.evaluate:
        with timer("evaluate"):
            evaluation = {"data": cfg.eval_data, "split": "eval", "seq_len": cfg.seq_len,
                          **compare({"compressed": model}, eval_blocks, reference=dense, progress=progress)}
            evaluation["tokens"] = evaluation["dense"]["tokens"]
    recovery = None
    if recovering:
        from vac.recover import recover_
        from vac.recover.config import from_compress_config

        rcfg = from_compress_config(cfg)
        # checkpoints live beside --out (not inside: the export is written atomically at the end);
        # an interrupted run resumes from them unless --overwrite asks for a fresh start
        run_dir = Path(cfg.out).with_name(Path(cfg.out).name + ".recover") if cfg.out else None
        if run_dir is not None and cfg.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        resume = run_dir is not None and run_dir.is_dir() and any(run_dir.iterdir())
        with timer("recover"):
            recovery = recover_(model, dense, tok, rcfg, eval_blocks=eval_blocks, run_dir=run_dir,
                                progress=progress, resume=resume)
        if recovery.get("interrupted"):
            raise VacError(f"recovery was interrupted ({recovery.get('signal')}); nothing was exported. Run the "
                           "same command again to resume from the checkpoint in " + str(run_dir))
        if cfg.evaluate:
            evaluation["recovered"] = recovery["after"]["student"]
    compressed_params = param_count(model)
    sizes = {}
    if cfg.out:
        with timer("sizes"):  # bytes on disk, measured by writing the files (then deleted)
            sizes["dense_bf16"] = measure_sizes(dense if dense is not None else model, methods=())["bf16"]
            f = measure_sizes(model, group_size=cfg.group_size)
            sizes.update(factorized_bf16=f["bf16"], factorized_int8=f["int8"], factorized_w4=f["w4"])
    quantized = None
    if cfg.quantize != "none":
        with timer("quantize"):
            quantized = quantize_model_(model, cfg.quantize, cfg.group_size, calib_blocks=calib,
                                        compensate=cfg.quantize_compensate, batch_size=cfg.batch_size,
                                        progress=progress)
        if cfg.evaluate:
            with timer("evaluate"):
                evaluation["quantized"] = compare({"q": model}, eval_blocks, reference=dense, progress=progress)["q"]
    timings = {**{f"compress/{k}": v for k, v in result.timings.items()}, **timer.stages}
    report = build_report(cfg=cfg, loaded=loaded, family=family, result=result, dense_model_params=dense_params,
                          compressed_model_params=compressed_params, evaluation=evaluation, timings=timings)
    report["license"] = base_license(cfg.model)
    if recovery is not None:
        report["recovery"] = {k: recovery[k] for k in ("config", "steps", "tokens", "probes", "before", "after",
                                                      "history", "timings_s") if k in recovery}
    if quantized is not None:
        report["quantization"] = {k: v for k, v in quantized["config"].items() if k != "modules"} | quantized["stats"]
    if cfg.out:
        t0 = time.perf_counter()
        report["size_bytes"] = sizes
        vac_meta = {"version": report["vac_version"], "ranks": result.ranks, "base_model": loaded.base_model,
                    "method": cfg.method, "ratio": cfg.ratio}

        def extras(tmp: Path) -> None:
            report["size_bytes"]["checkpoint"] = checkpoint_bytes(tmp)
            if recovery is not None and recovery.get("plot") and Path(recovery["plot"]).is_file():
                shutil.copy2(recovery["plot"], tmp / "recover_curves.png")
            report["timings_s"]["export"] = time.perf_counter() - t0
            write_report(tmp, public(report), result)  # public: no local paths in what gets published

        out = export(model, tok, cfg.out, vac_meta=public(vac_meta), overwrite=cfg.overwrite, write_extras=extras,
                     quantized=quantized, card=lambda tmp: model_card(public(report)), verify_ids=calib[:1, :64])
        console.print(f"wrote {out}")
    print_summary(report, console)
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = config_from_args(argv)
        torch.manual_seed(cfg.seed)
        run(cfg)
    except VacError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
