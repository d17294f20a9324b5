"""``python -m vac.compress``: the whole default pipeline, as a thin shell over library calls.

open (safetensors on disk, never loaded whole) -> data -> compress_home (one decoder layer at a
time) -> evaluate (dense and compressed streamed side by side) -> report -> export (shards
written layer by layer). Every stage is a plain function; this module only wires them, records
their time and memory, and prints the result. Recovery and quantization work on the whole
compressed model and load it into memory (compressed, it is ~1/ratio of the dense weights).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from vac.config import CompressConfig, config_from_args
from vac.errors import VacError
from vac.validate import one_line

log = logging.getLogger("vac")


def load_data(cfg: CompressConfig, tokenizer, model=None):
    """Calibration and evaluation blocks (see :func:`load_data_by_domain`) for a dense ``model`` in
    memory, which writes the ``--own-samples`` part of the calibration."""
    calib, evaluation, _ = load_data_by_domain(cfg, tokenizer)
    if cfg.own_samples:
        if model is None:
            raise ValueError("--own-samples: the calibration's own text is sampled from the dense model; pass it")
        from vac.selfgen import generated_blocks

        calib = with_own_text(calib, generated_blocks(model, tokenizer, cfg.own_samples, cfg.seq_len, seed=cfg.seed,
                                                      batch_size=max(cfg.batch_size, 16)))
    return calib, evaluation


def load_data_by_domain(cfg: CompressConfig, tokenizer):
    """Calibration blocks, evaluation blocks and the domain of each evaluation block (None unless the
    evaluation source is a bundled mixture: then ``--eval-samples`` blocks of every domain). The same
    source is split by document, never shared."""
    from vac.data import evaluation_blocks, token_blocks

    shared = cfg.calib_data == cfg.eval_data
    # --own-samples of the calibration blocks are the model's own text (see with_own_text)
    calib = token_blocks(cfg.calib_data, tokenizer, cfg.calib_samples - cfg.own_samples, cfg.seq_len, split="calib",
                         shared=shared, seed=cfg.seed) if cfg.calib_samples > cfg.own_samples else \
        torch.empty((0, cfg.seq_len), dtype=torch.long)
    evaluation = groups = None
    if cfg.evaluate:
        evaluation, groups = evaluation_blocks(cfg.eval_data, tokenizer, cfg.eval_samples, cfg.seq_len,
                                               shared=shared, seed=cfg.seed)
    return calib, evaluation, groups


def with_own_text(corpus: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """The calibration blocks: the corpus's and the model's own, interleaved (so that the first
    --fisher-samples blocks, which the gradient statistics read, hold both in proportion)."""
    from vac.data import interleave

    return interleave({"corpus": corpus, "own": own})[0]


def own_text(cfg: CompressConfig, home, tokenizer, work: Path, progress: bool) -> torch.Tensor:
    """``--own-samples`` blocks sampled from the dense model (see vac/selfgen.py), kept in the work
    directory so that a rerun (or a resumed run) calibrates on the same text without sampling again.

    Sampling needs the whole model. When it fits on the device it is loaded there; otherwise it is
    written once to an offload folder and run under accelerate's disk offload (weights read from
    disk module by module at every step: slow, but any size runs on any device)."""
    from safetensors.torch import load_file, save_file

    from vac.selfgen import generated_blocks, sampling_batch

    import json

    batch = sampling_batch(cfg.batch_size)
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(home.directory).glob("*.safetensors"))
    # the work directory may be shared by runs on other models (--work-dir, OUT.work): key the text by all it
    # depends on
    key = {"n": str(cfg.own_samples), "seq_len": str(cfg.seq_len), "seed": str(cfg.seed), "batch": str(batch),
           "model": str(Path(home.directory).resolve()), "weights": json.dumps(weights),
           "vocab": str(len(tokenizer))}
    path = work / "own-text.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            if fh.metadata() == key:
                return load_file(str(path))["ids"]
    offload = work / "own-text-offload"
    weights_bytes, cache_bytes = whole_model_bytes(home), sampling_cache_bytes(home.config, batch, cfg.seq_len, home.dtype)
    free = free_bytes(home.device)
    model = None
    try:
        if weights_bytes + cache_bytes <= free:
            model = home.to_model(home.device, dense=True)
        else:
            steps = (cfg.seq_len - 1) * -(-cfg.own_samples // batch)
            log.warning("--own-samples: the dense model needs ~%.1f GiB on %s (and %.1f GiB for sampling) and %.1f GiB "
                        "are free, so it samples under disk offload, reading its weights from disk at each of %d "
                        "steps (slow on large models; --own-samples 0 calibrates on --calib-data alone)",
                        weights_bytes / 2**30, home.device, cache_bytes / 2**30, free / 2**30, steps)
            model = offloaded_dense_model(home, offload)
        ids = generated_blocks(model, tokenizer, cfg.own_samples, cfg.seq_len, seed=cfg.seed, batch_size=batch,
                               progress=progress)
    finally:
        del model
        shutil.rmtree(offload, ignore_errors=True)
    tmp = path.with_suffix(".tmp")
    save_file({"ids": ids.contiguous()}, str(tmp), metadata=key)
    tmp.replace(path)
    return ids


def whole_model_bytes(home) -> int:
    """The dense model's weights in the compute dtype."""
    from vac.pipeline import param_count

    return param_count(home.model) * torch.finfo(home.dtype).bits // 8


def sampling_cache_bytes(config, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """What sampling needs beyond the weights (vac.selfgen.cache_bytes) for a model of ``config``."""
    from vac.dryrun import Shapes
    from vac.selfgen import cache_bytes

    return cache_bytes(Shapes.of(config), batch, seq_len, torch.finfo(dtype).bits // 8)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def offloaded_dense_model(home, folder: Path):
    """The dense model with its weights in ``folder`` (accelerate's offload format, written one layer at
    a time) and accelerate's disk-offload hooks bringing each module's weights to the device in turn."""
    from accelerate import disk_offload
    from accelerate.utils import offload_weight, save_offload_index

    from vac.families import decoder_layers
    from vac.weights import empty_model, tied_source_name

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model = empty_model(home.config)
    layers = decoder_layers(model)
    for l in range(home.num_layers):
        layers[l] = home.layer_skeleton(l, factorized=False)
    if getattr(home.config, "tie_word_embeddings", False):
        model.tie_weights()
    index: dict = {}
    states = [home.outer_state()] + [home.layer_state(l, dense=True) for l in range(home.num_layers)]
    for state in states:
        for name, value in state.items():
            value = value.to(home.dtype) if value.is_floating_point() else value
            index = offload_weight(value, name, str(folder), index)
    outer = states[0]
    for name, _ in model.named_parameters(remove_duplicate=False):
        source = tied_source_name(model, name)
        if name not in index and source in outer:  # a tied name: the hooks look weights up by module
            index = offload_weight(outer[source].to(home.dtype), name, str(folder), index)
    missing = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in index]
    if missing:
        raise VacError(f"internal: no stored weight for {missing[:3]} while offloading the dense model")
    save_offload_index(index, str(folder))
    return disk_offload(model, str(folder), execution_device=home.device).eval()


def resolve_dtypes(cfg: CompressConfig, checkpoint, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(arithmetic dtype, export dtype) for ``--dtype`` / ``--export-dtype`` (see their help)."""
    from vac.models import DTYPES

    export = checkpoint.published_dtype if cfg.export_dtype == "auto" else DTYPES[cfg.export_dtype]
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype], export
    # bf16/fp16 weights are exact in float32, and bf16 arithmetic on CPUs is slow
    return (export if device.type != "cpu" else torch.float32), export


def work_dir_for(cfg: CompressConfig) -> tuple[Path, bool]:
    """(directory, whether VAC made it up): --work-dir, OUT.work beside --out, or a new temporary one."""
    if cfg.work_dir:
        return Path(cfg.work_dir).expanduser(), False
    if cfg.out:
        out = Path(cfg.out).expanduser()
        return out.with_name(out.name + ".work"), True
    return Path(tempfile.mkdtemp(prefix="vac-work-")), True


def _fingerprint(cfg: CompressConfig, checkpoint, calib: torch.Tensor, dtype: torch.dtype) -> dict:
    """What the dense model's statistics depend on: a rerun with the same ones reuses them."""
    files = sorted(checkpoint.directory.glob("*.safetensors"))
    return {"model": str(checkpoint.directory.resolve()),
            "weights": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
            "calib_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest(),
            "fisher_samples": cfg.fisher_samples, "grad_rank": cfg.grad_rank, "dtype": str(dtype),
            "method": cfg.method}


def run(cfg: CompressConfig, progress: bool = True, console=None) -> dict:
    """Run the pipeline for a validated config; returns the report (also written to --out)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if cfg.dry_run:
        from vac.dryrun import dry_run

        return dry_run(cfg, console)
    from vac.models import open_checkpoint, resolve_device
    from vac.validate import validate_compress

    validate_compress(cfg)  # every input and the output location, before minutes of work, not after
    device = resolve_device(cfg.device)
    from vac.memory import Stages

    stages = Stages(device)
    with stages("load"):
        checkpoint = open_checkpoint(cfg.model)
    work, made_up = work_dir_for(cfg)
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = _run(cfg, checkpoint, device, work, stages, progress, console)
    except BaseException:
        # keep statistics a rerun can reuse (OUT.work, or the user's --work-dir); nothing else
        if made_up and (not cfg.out or not any(work.rglob("*.safetensors"))):
            shutil.rmtree(work, ignore_errors=True)
        elif work.is_dir():
            console.print(f"the statistics measured so far are kept in {work}: the same command reuses them")
        raise
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    if cfg.eval_tasks:
        from vac.evalcli import evaluate_export

        with stages("eval-tasks"):
            record = evaluate_export([Path(cfg.out).expanduser()], cfg.model, cfg.eval_tasks, cfg.eval_limit,
                                     cfg.device)
        report["eval_tasks"] = record["tasks"]
    return report


def _run(cfg: CompressConfig, checkpoint, device: torch.device, work: Path, stages, progress: bool, console) -> dict:
    from vac.card import base_license, model_card
    from vac.evaluate import compare_home, merge_model_evaluation
    from vac.export import checkpoint_bytes, export, export_home
    from vac.hidden import HiddenStore
    from vac.home import CheckpointHome
    from vac.pipeline import compress_home, param_count
    from vac.public import public
    from vac.quantize import quantize_model_
    from vac.report import build_report, print_summary, write_report
    from vac.statstore import StatsStore

    dtype, export_dtype = resolve_dtypes(cfg, checkpoint, device)
    with stages("load"):
        home = CheckpointHome(checkpoint.directory, device=device, dtype=dtype, work_dir=work / "model",
                              store_dtype=export_dtype, config=checkpoint.config)
    tok = checkpoint.tokenizer
    family = home.family.model_type
    with stages("data"):
        calib, eval_blocks, eval_groups = load_data_by_domain(cfg, tok)
    if cfg.own_samples:
        with stages("generate"):
            calib = with_own_text(calib, own_text(cfg, home, tok, work, progress))
    console.print(f"[bold]VAC[/bold] {checkpoint.base_model} ({family}, {home.num_layers} layers) -> ratio "
                  f"{cfg.ratio} with {cfg.method}; calibration {tuple(calib.shape)}, evaluation "
                  f"{None if eval_blocks is None else tuple(eval_blocks.shape)}; arithmetic {_name(dtype)}, "
                  f"export {_name(export_dtype)}, on {device}")
    console.print({k: v for k, v in cfg.to_dict().items()})
    dense_params = param_count(home.model)
    store = StatsStore(work / "stats", fingerprint=_fingerprint(cfg, checkpoint, calib, dtype))
    hidden = HiddenStore(ram_bytes=int(cfg.hidden_ram_gb * (1 << 30)), spill_dir=work / "hidden")
    try:
        with stages("compress"):
            result = compress_home(home, cfg, calib, progress=progress, store=store, hidden=hidden,
                                   stages=stages.nested("compress"))
    finally:
        hidden.close()
    if hidden.peak_disk_bytes:
        stages.record_disk("compress/factorize", hidden.peak_disk_bytes + store.nbytes())
    evaluation: dict = {}
    if cfg.evaluate:
        with stages("evaluate"):
            evaluation = {"data": cfg.eval_data, "split": "eval", "seq_len": cfg.seq_len,
                          **compare_home(home, eval_blocks, progress=progress, groups=eval_groups)}
            evaluation["tokens"] = evaluation["dense"]["tokens"]
    compressed_params = dense_params - result.dense_target_params + result.compressed_target_params
    model = None  # the whole compressed model, in memory: only recovery and quantization need it
    recovery = _recover(cfg, home, tok, (eval_blocks, eval_groups), evaluation, stages, progress) \
        if _recovering(cfg) else None
    if recovery is not None:
        model = recovery.pop("model")
    quantized = None
    if cfg.quantize != "none":
        if model is None:
            model = home.to_model(device)
        with stages("quantize"):
            quantized = quantize_model_(model, cfg.quantize, cfg.group_size, calib_blocks=calib,
                                        compensate=cfg.quantize_compensate, batch_size=cfg.batch_size,
                                        progress=progress)
        if cfg.evaluate:
            with stages("evaluate"):
                quantized_eval = compare_home(home, eval_blocks, models={"quantized": model}, progress=progress,
                                              groups=eval_groups)
                merge_model_evaluation(evaluation, quantized_eval, "quantized", "quantized")
    timings = {**{f"compress/{k}": v for k, v in result.timings.items()},
               **{k: v for k, v in stages.seconds.items() if not k.startswith("compress/")}}
    report = build_report(cfg=cfg, loaded=checkpoint, family=family, result=result, dense_model_params=dense_params,
                          compressed_model_params=compressed_params, evaluation=evaluation, timings=timings)
    report["dtypes"] = {"arithmetic": _name(dtype), "export": _name(export_dtype)}
    report["license"] = base_license(cfg.model)
    if recovery is not None:
        report["recovery"] = {k: recovery[k] for k in ("config", "steps", "tokens", "probes", "before", "after",
                                                      "history", "timings_s") if k in recovery}
    if quantized is not None:
        report["quantization"] = {k: v for k, v in quantized["config"].items() if k != "modules"} | quantized["stats"]
    report["memory"] = stages.memory
    if cfg.out:
        report["size_bytes"] = _sizes(home, cfg)
        vac_meta = {"version": report["vac_version"], "ranks": result.ranks, "base_model": checkpoint.base_model,
                    "method": cfg.method, "ratio": cfg.ratio}
        export_stage = stages("export")

        def extras(tmp: Path) -> None:
            report["size_bytes"]["checkpoint"] = checkpoint_bytes(tmp)
            if recovery is not None and recovery.get("plot") and Path(recovery["plot"]).is_file():
                shutil.copy2(recovery["plot"], tmp / "recover_curves.png")
            report["timings_s"]["export"] = stages.seconds.get("export", 0.0)
            write_report(tmp, public(report), result)  # public: no local paths in what gets published

        card = lambda tmp: model_card(public(report))  # noqa: E731
        with export_stage:
            if model is not None:
                out = export(model, tok, cfg.out, vac_meta=public(vac_meta), overwrite=cfg.overwrite,
                             write_extras=extras, quantized=quantized, card=card, verify_ids=calib[:1, :64],
                             dtype=export_dtype)
            else:
                out = export_home(home, tok, cfg.out, vac_meta=public(vac_meta), overwrite=cfg.overwrite,
                                  write_extras=extras, card=card, verify_ids=calib[:1, :64], progress=progress)
        report["timings_s"]["export"] = stages.seconds["export"]
        report["memory"] = stages.memory
        write_report(out, public(report), plots=False)  # the export's own time and memory, now known
        console.print(f"wrote {out}")
    print_summary(report, console)
    return report


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _recovering(cfg: CompressConfig) -> bool:
    return cfg.recover_steps > 0 or cfg.recover_minutes > 0


def _recover(cfg: CompressConfig, home, tok, eval_set, evaluation: dict, stages, progress: bool) -> dict:
    """Distil the compressed model from the dense one; both are loaded whole (training needs them)."""
    from vac.evaluate import merge_model_evaluation
    from vac.recover import recover_
    from vac.recover.config import from_compress_config

    rcfg = from_compress_config(cfg)
    # checkpoints live beside --out (not inside: the export is written atomically at the end);
    # an interrupted run resumes from them unless --overwrite asks for a fresh start
    run_dir = Path(cfg.out).with_name(Path(cfg.out).name + ".recover") if cfg.out else None
    if run_dir is not None and cfg.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    resume = run_dir is not None and run_dir.is_dir() and any(run_dir.iterdir())
    with stages("recover"):
        model = home.to_model(home.device)
        teacher = home.to_model(home.device, dense=True)
        recovery = recover_(model, teacher, tok, rcfg, eval_blocks=eval_set[0], eval_groups=eval_set[1],
                            run_dir=run_dir, progress=progress, resume=resume)
        del teacher
    if recovery.get("interrupted"):
        raise VacError(f"recovery was interrupted ({recovery.get('signal')}); nothing was exported. Run the "
                       "same command again to resume from the checkpoint in " + str(run_dir))
    if cfg.evaluate:
        merge_model_evaluation(evaluation, recovery["after"], "student", "recovered")
    recovery["model"] = model
    return recovery


def _sizes(home, cfg: CompressConfig) -> dict[str, int]:
    """Weight bytes of the dense model in bf16 and of the factorized one in bf16 / int8 / w4."""
    from vac.export import weight_bytes

    def shapes(model_params):
        return [(k, tuple(p.shape), p.dtype) for k, p in model_params]

    from vac.weights import tied_source_name

    stored = [(k, p) for k, p in home.model.named_parameters() if tied_source_name(home.model, k) is None]
    dense = weight_bytes(shapes(stored), set(), methods=())["bf16"]
    prefix = home.family.layers_path + "."
    params = [(k, p) for k, p in stored if not k.startswith(prefix)]
    factors = set()
    for l in range(home.num_layers):
        layer = home.layer_skeleton(l, factorized=True)
        for k, p in layer.named_parameters():
            params.append((home.layer_prefix(l) + k, p))
            if k.endswith((".down.weight", ".up.weight")):
                factors.add(home.layer_prefix(l) + k)
    f = weight_bytes(shapes(params), factors, group_size=cfg.group_size)
    return {"dense_bf16": dense, "factorized_bf16": f["bf16"], "factorized_int8": f["int8"],
            "factorized_w4": f["w4"]}


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
