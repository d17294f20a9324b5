"""Quality and size cost of quantising the factors (int8, w4; with and without compensation).

The bundled SmolLM2-135M is factorized once (default: whitening, one-shot, 1.8x over the target
linears, calibration and held-out evaluation from the bundled corpus), then every variant is
quantised from that same factorization, evaluated against the dense model on the same held-out
blocks, and exported (bf16 for everything that is not a packed factor) to measure the bytes of
the files written. Compensation = refit ``up`` on the calibration covariance after quantising
``down`` (vac.quantize.quantize_model_).

    python experiments/bench_quantize.py                 # 64 calibration / 32 evaluation blocks of 256
    python experiments/bench_quantize.py --quick         # 32 / 8 blocks: a few minutes on 2 CPU cores
    python experiments/bench_quantize.py --group-sizes 32 64 128 --json out.json

Prints a markdown table: PPL, KL(dense || model), top-1 agreement, the mean relative output error
of the factorized layers on the calibration data, and safetensors bytes on disk.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vac.compress import load_data  # noqa: E402
from vac.config import make_config  # noqa: E402
from vac.evaluate import compare  # noqa: E402
from vac.export import checkpoint_bytes, export, measure_sizes  # noqa: E402
from vac.models import load  # noqa: E402
from vac.pipeline import compress_  # noqa: E402
from vac.quantize import quantize_model_  # noqa: E402


def factor_bytes(directory) -> int:
    """Bytes the safetensors files store for the factors (``<module>.down.*`` / ``.up.*``), from their headers."""
    total = 0
    for path in Path(directory).glob("*.safetensors"):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        total += sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items()
                     if ".down." in k or ".up." in k)
    return total


def factorize(model, cfg, calib, cache: str | None):
    """compress_ in place, or restore the factors saved by an earlier run with the same options."""
    from vac.layers import FactorizedLinear
    from vac.home import replace_module as replace_linear

    key = {k: v for k, v in cfg.to_dict().items() if k not in ("eval_samples", "out", "overwrite", "evaluate")}
    if cache and os.path.isfile(cache):
        saved = torch.load(cache, weights_only=False)
        if saved["key"] == key:
            for name, r in saved["result"].ranks.items():
                if r is not None:
                    old = model.get_submodule(name)
                    replace_linear(model, name, FactorizedLinear(old.in_features, old.out_features, r,
                                                                 bias=old.bias is not None))
            model.load_state_dict(saved["state"])
            print(f"factors restored from {cache}", file=sys.stderr)
            return saved["result"]
    result = compress_(model, cfg, calib, progress=False)
    if cache:
        torch.save({"key": key, "result": result, "state": model.state_dict()}, cache)
    return result


def variants(group_sizes: list[int]) -> list[tuple[str, str | None, int | None, bool]]:
    out: list[tuple[str, str | None, int | None, bool]] = [("factorized (no quantization)", None, None, False),
                                                           ("int8", "int8", None, False),
                                                           ("int8 + compensation", "int8", None, True)]
    for g in group_sizes:
        out += [(f"w4 g{g}", "w4", g, False), (f"w4 g{g} + compensation", "w4", g, True)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=1.8)
    ap.add_argument("--method", default="whiten")
    ap.add_argument("--order", default="one-shot")
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[128])
    ap.add_argument("--quick", action="store_true", help="32 calibration and 8 evaluation blocks")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--cache", help="file to save the factorized model to / restore it from (same options)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = make_config(dict(model=args.model, ratio=args.ratio, method=args.method, order=args.order, device="cpu",
                           calib_samples=32 if args.quick else 64, eval_samples=8 if args.quick else 32))
    t0 = time.perf_counter()
    loaded = load(cfg.model, cfg.dtype, "cpu")
    model, tok = loaded.model, loaded.tokenizer
    calib, eval_blocks = load_data(cfg, tok, model)
    dense = copy.deepcopy(model)
    result = factorize(model, cfg, calib, args.cache)
    print(f"{loaded.base_model}: {args.method} {args.order} at {result.linear_ratio:.3f}x over the target linears "
          f"({time.perf_counter() - t0:.0f} s); calibration {tuple(calib.shape)}, evaluation "
          f"{tuple(eval_blocks.shape)}", file=sys.stderr)

    models, rows = {}, {}
    for name, method, group, compensate in variants(args.group_sizes):
        m = copy.deepcopy(model)
        q, t1 = None, time.perf_counter()
        if method is not None:
            q = quantize_model_(m, method, group or 128, calib_blocks=calib, compensate=compensate,
                                batch_size=cfg.batch_size, progress=False)
        seconds = time.perf_counter() - t1
        with tempfile.TemporaryDirectory() as d:
            out = export(m, tok, os.path.join(d, "ckpt"), vac_meta={"ranks": result.ranks}, quantized=q,
                         dtype=torch.bfloat16, verify_ids=calib[:1, :32])
            size, fbytes = checkpoint_bytes(out), factor_bytes(out)
        err = q["stats"]["relative_error_by_kind"] if q else {}
        rows[name] = {"method": method, "group_size": group, "compensate": compensate, "bytes": size,
                      "factor_bytes": fbytes,
                      "quantize_s": seconds, "rel_output_error": sum(err.values()) / len(err) if err else 0.0,
                      "rel_output_error_by_kind": err}
        models[name] = m
        print(f"  {name}: quantized in {seconds:.1f} s, {size:,} B", file=sys.stderr)
    t2 = time.perf_counter()
    metrics = compare(models, eval_blocks, reference=dense, progress=False)
    print(f"evaluation of {len(models)} models: {time.perf_counter() - t2:.0f} s", file=sys.stderr)
    dense_bytes = measure_sizes(dense, methods=())["bf16"]

    print(f"\nQuantised factors, {loaded.base_model} at {result.linear_ratio:.3f}x ({args.method}, {args.order}); "
          f"evaluation: {metrics['dense']['tokens']:,} held-out tokens of the bundled corpus; sizes are bytes of "
          "the safetensors files written (non-factor tensors in bf16)\n")
    bf16_factors = next(r["factor_bytes"] for r in rows.values() if r["method"] is None)
    print("| model | PPL | KL(dense‖model) | top-1 | rel. output error (calib) | weights on disk | vs dense bf16 "
          "| factor bytes | vs bf16 factors |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| dense | {metrics['dense']['ppl']:.3f} | – | – | – | {dense_bytes / 1e6:.1f} MB | 1.000 "
          "| – | – |")
    for name, row in rows.items():
        m = metrics[name]
        row.update(ppl=m["ppl"], kl=m["kl"], top1=m["top1"])
        err = f"{row['rel_output_error']:.4f}" if row["method"] else "–"
        print(f"| {name} | {m['ppl']:.3f} | {m['kl']:.4f} | {m['top1']:.2%} | {err} | {row['bytes'] / 1e6:.1f} MB "
              f"| {row['bytes'] / dense_bytes:.3f} | {row['factor_bytes'] / 1e6:.1f} MB "
              f"| {row['factor_bytes'] / bf16_factors:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense": {**metrics["dense"], "bytes": dense_bytes}, "variants": rows,
                       "ratio": result.linear_ratio, "config": cfg.to_dict()}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
