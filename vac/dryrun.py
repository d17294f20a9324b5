"""``--dry-run``: the memory a run will need, from the model's config alone (no weight is read).

The figures follow the shape of the streamed pipeline (vac/profile.py, vac/executor.py,
vac/evaluate.py, vac/export.py): what each stage holds at its peak is one or two decoder layers,
the embedding and head, one layer's statistics and the fit's intermediates for its widest
matrix, one batch of activations, and on the host the hidden-state boundaries that the sweep
keeps (capped by --hidden-ram-gb, the rest spilled to disk). experiments/bench_scale.py checks
the plan against measured peaks.

A hub id is resolved to its config.json through the Hub; offline, configs shipped in
configs/models/ (named ``org--name.json``) stand in for the models the recipes name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vac.errors import VacError

GiB = 1 << 30
SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"


@dataclass
class Shapes:
    """What the memory plan needs of a model: its family's targets and sizes."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    q_out: int
    kv_out: int
    tied: bool
    published_dtype: torch.dtype

    @classmethod
    def of(cls, config) -> "Shapes":
        from vac.models import published_dtype

        outer, config = config, (config.get_text_config() if hasattr(config, "get_text_config") else config)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        return cls(outer.model_type, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                   config.vocab_size, heads * head_dim, kv * head_dim, bool(getattr(config, "tie_word_embeddings", False)),
                   published_dtype(outer))

    def targets(self) -> list[tuple[str, int, int]]:
        """(kind, out, in) of one decoder layer's target linears (the Llama-shaped families)."""
        h, i = self.hidden, self.intermediate
        return [("q_proj", self.q_out, h), ("k_proj", self.kv_out, h), ("v_proj", self.kv_out, h),
                ("o_proj", h, self.q_out), ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]

    def layer_params(self) -> int:
        return sum(m * n for _, m, n in self.targets()) + 4 * self.hidden  # + norms

    def outer_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def resolve_config(spec: str):
    """The transformers config of ``spec`` without loading weights (see the module docstring)."""
    from transformers import AutoConfig

    from vac.models import BUNDLED, _looks_like_path, bundled_gguf_path

    if spec == BUNDLED:
        gguf = bundled_gguf_path()
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name), "the bundled GGUF's metadata"
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise VacError(f"GGUF file {path} does not exist")
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name), str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise VacError(f"{path} has no config.json")
        return AutoConfig.from_pretrained(path), str(path / "config.json")
    if _looks_like_path(spec):
        raise VacError(f"--model {spec!r}: no such file or directory")
    try:
        return AutoConfig.from_pretrained(spec), f"the Hub's {spec}/config.json"
    except Exception as e:
        shipped = SHIPPED_CONFIGS / (spec.replace("/", "--") + ".json")
        if shipped.is_file():
            from transformers import AutoConfig as _AC

            data = json.loads(shipped.read_text())
            config = _AC.for_model(data.pop("model_type"), **{k: v for k, v in data.items() if not k.startswith("_")})
            return config, f"{shipped} (the Hub was unreachable: {type(e).__name__})"
        raise VacError(f"could not fetch the config of {spec!r} from the Hub ({type(e).__name__}) and no shipped "
                       f"config {shipped.name} exists in {SHIPPED_CONFIGS}; pass a local directory") from None


def plan(cfg, shapes: Shapes, device_type: str) -> dict:
    """Planned peaks (bytes) per stage on the device, on the host, and on disk, and passes per stage."""
    gpu = device_type != "cpu"
    export_dtype = shapes.published_dtype if cfg.export_dtype == "auto" else getattr(torch, cfg.export_dtype)
    compute = (export_dtype if gpu else torch.float32) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    cb = _bytes(compute)
    solve = 4 if gpu else 8  # fp32 solves on GPU, fp64 on CPU
    L, h, V = shapes.layers, shapes.hidden, shapes.vocab
    targets = shapes.targets()
    widest_in = max(n for _, _, n in targets)
    widest_out = max(m for _, m, _ in targets)
    layer = shapes.layer_params() * cb
    outer = shapes.outer_params() * cb
    seq, batch = cfg.seq_len, cfg.batch_size
    t_calib, t_grad = cfg.calib_samples * seq, cfg.fisher_samples * seq
    from vac.data import bundled_domains

    domains = len(bundled_domains(cfg.eval_data) or [None])  # a bundled mixture is evaluated per domain
    t_eval = cfg.eval_samples * seq * domains if cfg.evaluate else 0
    boundary = t_calib * h * cb
    activations = batch * seq * (6 * h + 3 * shapes.intermediate) * cb  # one layer's forward, one batch
    head_seq = seq * V * 4 * 4  # one sequence's fp32 logits, log-softmax, probabilities, gradient

    # profiling: one layer forward + backward for one sequence, G accumulators of its targets, eigh
    grad_rows = {kind: t_grad < m for kind, m, _ in targets}
    g_accum = sum((t_grad * m if grad_rows[kind] else m * m) * 4 for kind, m, _ in targets)
    eig = max((t_grad * t_grad if grad_rows[k] else m * m) * solve * 3 for k, m, _ in targets)
    profile_dev = outer + layer + 3 * seq * (6 * h + 3 * shapes.intermediate) * cb + g_accum + eig + head_seq
    # allocation: the input covariances of one layer, then per target G^1/2, C^1/2 and the weighted matrix
    covs = (3 * h * h + shapes.intermediate ** 2) * 4
    alloc_dev = outer + layer + activations + covs + (widest_out ** 2 + widest_in ** 2 + 2 * widest_out * widest_in) * solve
    # factorization: dense and current layer, C~ and C_cross of a stage, and the dense-target fit of the
    # widest matrix: the damped C~ (and its symmetrising temporary), C_cross, the Cholesky factor,
    # G^a and G^-a, the weighted matrix and the SVD's factors
    fit = (4 * widest_in ** 2 + 3 * widest_out ** 2 + 3 * widest_out * widest_in) * solve
    fact_dev = outer + 2 * layer + activations + 2 * widest_in ** 2 * 4 + fit
    eval_dev = outer + 2 * layer + activations + head_seq
    compressed = (shapes.outer_params() + shapes.layer_params() * L / cfg.ratio) * _bytes(export_dtype)
    export_dev = compressed + activations  # the reload check holds the exported model once
    cap = cfg.hidden_ram_gb * GiB
    profile_hidden = (L + 2) * t_grad * h * cb
    host_base = 2 * GiB  # Python, torch, transformers, tokenizer, data
    stats_disk = sum(m * (min(t_grad, m) if cfg.grad_rank is None else min(t_grad, m, cfg.grad_rank)) * solve
                     for _, m, _ in targets) * L if _needs_g(cfg) else 0
    factors_disk = compressed
    stages = {}
    if cfg.own_samples:  # --own-samples: the whole dense model and its sampling cache (keys and values)
        from vac.selfgen import cache_bytes, sampling_batch

        gen_batch = sampling_batch(batch)
        stages["generate"] = dict(device=outer + L * layer + cache_bytes(shapes, gen_batch, seq, cb), host=host_base,
                                  disk=0,
                                  passes=f"{seq - 1} sampling steps x {-(-cfg.own_samples // gen_batch)} batch(es) of "
                                         "the whole dense model (under disk offload if it does not fit: then the "
                                         "model is written to the work directory and read at every step)")
    stages |= {
        "gradient_stats": dict(device=profile_dev, host=host_base + min(profile_hidden, cap),
                               disk=stats_disk + max(0, profile_hidden - cap),
                               passes=f"{L} layer forwards + {L} layer backwards over {t_grad:,} tokens"),
        "allocation": dict(device=alloc_dev, host=host_base + 2 * boundary, disk=stats_disk,
                           passes=f"{L} layer forwards over {t_calib:,} tokens"),
        "factorize": dict(device=fact_dev, host=host_base + min(4 * boundary, max(cap, boundary)),
                          disk=stats_disk + factors_disk + max(0, _spilled(cfg, L, boundary) - cap),
                          passes=_factorize_passes(cfg, L, t_calib)),
        "evaluate": dict(device=eval_dev, host=host_base + 2 * t_eval * h * cb, disk=factors_disk,
                         passes=f"{2 * L} layer forwards over {t_eval:,} tokens" if t_eval else "none"),
        "export": dict(device=export_dev, host=host_base + min(2 * GiB, compressed) + (0 if gpu else compressed),
                       disk=factors_disk + compressed, passes="1 shard writer, 1 reload check"),
    }
    if not gpu:  # the device is the host: everything on it is host memory
        for s in stages.values():
            s["host"] += s["device"] if s is not stages["export"] else 0
            s["device"] = 0
    return {"compute_dtype": compute, "export_dtype": export_dtype, "stages": stages,
            "peak": {k: max(s[k] for s in stages.values()) for k in ("device", "host", "disk")},
            "layer_bytes": layer, "outer_bytes": outer, "boundary_bytes": boundary}


def _needs_g(cfg) -> bool:
    from vac.methods import METHODS

    return METHODS[cfg.method].needs_output_grads or cfg.allocation == "knapsack"


def _spilled(cfg, L: int, boundary: int) -> int:
    """Hidden states the factorization keeps: 4 boundaries front to back and one-shot, all for others."""
    return (4 if cfg.order in ("front-to-back", "one-shot") else L + 2) * boundary


def _factorize_passes(cfg, L: int, tokens: int) -> str:
    stages = 4 if cfg.granularity == "matrix" and cfg.order != "one-shot" else 1
    return f"{L} layers x {stages} stage(s), each one pass of the current (and dense) layer, over {tokens:,} tokens"


def dry_run(cfg, console) -> dict:
    """Print the plan of ``cfg`` and return it (the CLI's ``--dry-run``)."""
    from rich.table import Table

    from vac.families import get_family
    from vac.models import resolve_device

    config, where = resolve_config(cfg.model)
    get_family(config)
    device = resolve_device(cfg.device) if cfg.device != "auto" else torch.device("cuda")
    shapes = Shapes.of(config)
    p = plan(cfg, shapes, device.type)
    table = Table(title=f"planned memory: {cfg.model} ({shapes.model_type}, {shapes.layers} layers, hidden "
                        f"{shapes.hidden}, intermediate {shapes.intermediate}) on {device.type}, arithmetic "
                        f"{str(p['compute_dtype']).removeprefix('torch.')}")
    for c in ("stage", "device GiB", "host GiB", "disk GiB", "passes"):
        table.add_column(c, justify="left" if c in ("stage", "passes") else "right")
    for name, s in p["stages"].items():
        table.add_row(name, f"{s['device'] / GiB:.1f}", f"{s['host'] / GiB:.1f}", f"{s['disk'] / GiB:.1f}",
                      s["passes"])
    pk = p["peak"]
    table.add_row("peak", f"{pk['device'] / GiB:.1f}", f"{pk['host'] / GiB:.1f}", f"{pk['disk'] / GiB:.1f}", "")
    console.print(f"config from {where}; no weights were loaded")
    console.print(table)
    return {"dry_run": True, "model": cfg.model, "config_source": where, "device": device.type,
            "peak_bytes": pk, "stages": {k: {kk: vv for kk, vv in v.items()} for k, v in p["stages"].items()}}
