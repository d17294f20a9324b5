"""Inference speed: dense vs factorized vs quantised factors.

CPU (always): the bundled SmolLM2-135M, batch 1. Prefill = one forward pass over a 512-token
prompt (building the KV cache); decode = 64 greedy steps of one token from that cache. Each
repeat runs every variant once, in turn, so that load from other processes on a shared machine
hits all variants alike; the table gives medians and ratios to dense from the same run.
Variants: dense; factorized at --ratio (plain SVD with uniform ranks: speed depends only on the
shapes, not on how the factors were fitted); int8 and w4 (group 128) checkpoints exported and
reloaded through the shipped modeling_vac.py, once as loaded by default (factors dequantised at
load) and once with ``vac_keep_packed=True`` (packed buffers, dequantised on every forward).

GPU (--gpu, runs only when CUDA is available, skipped with a message otherwise): OLMo-3-7B shapes
in bf16. (a) single linears q/k/v/o, gate/up, down: dense vs factorized (1.8x) vs packed
int8/w4 (on-the-fly dequantisation), 2048 tokens (prefill) and 1 token (decode), eager and
torch.compile; (b) the full random-weight model, dense vs factorized vs w4-packed: prefill of
2048 tokens and batch-1 greedy decode of 64 tokens, eager with a dynamic cache, then an attempt
at static cache + torch.compile (CUDA graphs) through ``generate``. ``--gpu-smoke`` runs the GPU
code path on CPU with tiny shapes (to test it without a GPU).

    python experiments/bench_inference.py                  # CPU table (a few minutes on 2 cores)
    python experiments/bench_inference.py --threads 1 --repeats 3 --no-packed   # on a busy shared machine
    python experiments/bench_inference.py --gpu --skip-cpu # the GPU tables, on a CUDA machine
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vac.config import make_config  # noqa: E402
from vac.export import export, modeling_dir  # noqa: E402
from vac.factorize import uniform_rank  # noqa: E402
from vac.layers import FactorizedLinear  # noqa: E402
from vac.pipeline import compress_  # noqa: E402
from vac.quantize import quantize, quantize_model_  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------

def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def prefill_and_decode(model: nn.Module, prompt: torch.Tensor, steps: int) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds for ``steps`` greedy tokens, generated ids)."""
    device = prompt.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t1 = time.perf_counter()
    past, generated = out.past_key_values, [token]
    for _ in range(steps - 1):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        generated.append(token)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1, torch.cat(generated, dim=1)


def _markdown(title: str, results: dict[str, dict[str, list[float]]], tokens: dict[str, int]) -> str:
    """results[variant][metric] = list of seconds; ratios are to the first variant."""
    base = next(iter(results))
    metrics = list(next(iter(results.values())))
    lines = [f"\n{title}\n", "| variant | " + " | ".join(
        f"{m} (ms) | {m} tok/s | {m} speed-up" for m in metrics) + " |",
        "|---|" + "---|---|---|" * len(metrics)]
    for name, r in results.items():
        cells = []
        for m in metrics:
            med = statistics.median(r[m])
            ref = statistics.median(results[base][m])
            cells += [f"{1e3 * med:.1f}", f"{tokens[m] / med:.1f}", f"{ref / med:.2f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CPU: the bundled model
# ---------------------------------------------------------------------------------------------

def cpu_variants(model_spec: str, ratio: float, dtype: torch.dtype, group_size: int, workdir: str,
                 packed: bool = True):
    from transformers import AutoModelForCausalLM

    from vac.models import load

    loaded = load(model_spec, "float32", "cpu")
    dense, tok = loaded.model, loaded.tokenizer
    factorized = copy.deepcopy(dense)
    calib = torch.randint(0, dense.config.vocab_size, (1, 16))  # plain SVD: statistics are not used
    result = compress_(factorized, make_config(dict(method="svd", ratio=ratio)), calib, progress=False)
    out = {"dense": dense.to(dtype), "factorized": factorized.to(dtype)}
    for method in ("int8", "w4"):
        m = copy.deepcopy(factorized).float()
        q = quantize_model_(m, method, group_size, progress=False)
        path = export(m, tok, os.path.join(workdir, method), vac_meta={"ranks": result.ranks}, quantized=q,
                      dtype=dtype)
        del m
        out[f"{method} (dequantised at load)"] = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=True, dtype=dtype).eval()
        if packed:
            out[f"{method} (packed, on the fly)"] = AutoModelForCausalLM.from_pretrained(
                path, trust_remote_code=True, dtype=dtype, vac_keep_packed=True).eval()
    for m in out.values():
        m.eval()
        m.config.use_cache = True
    return out, result.linear_ratio, loaded.base_model


def bench_cpu(args) -> str:
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        models, achieved, base = cpu_variants(args.model, args.ratio, dtype, args.group_size, workdir,
                                              packed=not args.no_packed)
        vocab = next(iter(models.values())).config.vocab_size
        prompt = torch.randint(0, vocab, (1, args.prefill), generator=torch.Generator().manual_seed(0))
        for m in models.values():  # warm-up: first calls allocate and pick kernels
            prefill_and_decode(m, prompt[:, :32], 2)
        results = {name: {"prefill": [], "decode": []} for name in models}
        same = {}
        for rep in range(args.repeats):
            for name, m in models.items():
                t_pre, t_dec, ids = prefill_and_decode(m, prompt, args.decode)
                results[name]["prefill"].append(t_pre)
                results[name]["decode"].append(t_dec)
                same.setdefault(name, ids)
            print(f"  repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
    title = (f"CPU ({torch.get_num_threads()} threads, {args.dtype}), {base} factorized at {achieved:.3f}x; batch 1, "
             f"prefill {args.prefill} tokens, greedy decode {args.decode} tokens; median of {args.repeats} "
             "interleaved runs; speed-up = dense time / variant time")
    table = _markdown(title, results, {"prefill": args.prefill, "decode": args.decode - 1})
    agree = ", ".join(f"{n}: {(ids == same['factorized']).float().mean():.0%}" for n, ids in same.items()
                      if n not in ("dense", "factorized"))
    return table + (f"\n\nGreedy tokens identical to the unquantised factorized model's (share of the "
                    f"{args.decode}): {agree}\n")


# ---------------------------------------------------------------------------------------------
# GPU: OLMo-3-7B shapes
# ---------------------------------------------------------------------------------------------

OLMO3_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=100278, max_position_embeddings=8192)
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128, max_position_embeddings=256)


def _modeling():
    """The shipped modeling_vac.py (PackedLinear is what an exported checkpoint runs)."""
    spec = importlib.util.spec_from_file_location("modeling_vac_bench", modeling_dir() / "modeling_vac.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _packed_linear(weight: torch.Tensor, method: str, group_size: int):
    mv = _modeling()
    m, n = weight.shape
    layer = mv.PackedLinear(n, m, method, group_size if method == "w4" else None, device=weight.device)
    for k, v in quantize(weight, method, group_size).items():
        getattr(layer, k).copy_(v)
    return layer


def _random_factorized(m: int, n: int, ratio: float, device, dtype) -> FactorizedLinear:
    r = uniform_rank(m, n, ratio)
    up = torch.randn(m, r, device=device, dtype=dtype) / r ** 0.5
    down = torch.randn(r, n, device=device, dtype=dtype) / n ** 0.5
    return FactorizedLinear.from_factors(up, down, dtype=dtype)


def _time_module(fn, x, repeats: int, device) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_gpu_layers(cfg: dict, ratio: float, device, dtype, tokens: list[int], repeats: int, compile_: bool,
                     group_size: int) -> str:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = [("q/o", h, h), ("k/v", kv, h), ("gate/up", i, h), ("down", h, i)]
    lines = [f"\nSingle linears ({dtype}, {device}), median of {repeats}; factorized at {ratio}x, "
             "packed = on-the-fly dequantisation; speed-up vs dense eager\n",
             "| matrix (out x in) | tokens | dense (ms) | factorized | int8 packed | w4 packed |"
             + (" dense compiled | factorized compiled | w4 packed compiled |" if compile_ else ""),
             "|---|---|---|---|---|---|" + ("---|---|---|" if compile_ else "")]
    for name, m, n in shapes:
        dense = nn.Linear(n, m, bias=False, device=device, dtype=dtype)
        fact = _random_factorized(m, n, ratio, device, dtype)
        packed = {}
        for method in ("int8", "w4"):
            f = _random_factorized(m, n, ratio, device, torch.float32)
            layer = FactorizedLinear(n, m, f.rank)
            layer.down = _packed_linear(f.down.weight, method, group_size)
            layer.up = _packed_linear(f.up.weight, method, group_size)
            packed[method] = layer
        for t in tokens:
            x = torch.randn(1, t, n, device=device, dtype=dtype)
            base = _time_module(dense, x, repeats, device)
            cells = [f"{1e3 * base:.3f}"]
            for mod in (fact, packed["int8"], packed["w4"]):
                cells.append(f"{base / _time_module(mod, x, repeats, device):.2f}x")
            if compile_:
                for mod in (dense, fact, packed["w4"]):
                    try:
                        cells.append(f"{base / _time_module(torch.compile(mod), x, repeats, device):.2f}x")
                    except Exception as e:  # compile support varies with the install
                        cells.append(f"failed ({type(e).__name__})")
            lines.append(f"| {name} ({m}x{n}) | {t} | " + " | ".join(cells) + " |")
        del dense, fact, packed
    return "\n".join(lines)


def _factorize_random_(model: nn.Module, ratio: float, packed: str | None, group_size: int) -> None:
    from vac.families import find_targets
    from vac.home import replace_module as replace_linear

    dtype = next(model.parameters()).dtype
    for t in find_targets(model):
        old = model.get_submodule(t.name)
        device = old.weight.device
        new = _random_factorized(t.out_features, t.in_features, ratio, device, dtype)
        if packed:
            new.down = _packed_linear(new.down.weight.float(), packed, group_size)
            new.up = _packed_linear(new.up.weight.float(), packed, group_size)
        replace_linear(model, t.name, new)
        del old


def bench_gpu_model(cfg: dict, ratio: float, device, dtype, prefill: int, decode: int, repeats: int,
                    compile_: bool, group_size: int) -> str:
    import transformers

    config = transformers.Olmo3Config(**cfg, layer_types=["full_attention"] * cfg["num_hidden_layers"])
    results: dict[str, dict[str, list[float]]] = {}
    notes = []
    for variant in ("dense", "factorized", "w4 packed"):
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        if variant != "dense":
            _factorize_random_(model, ratio, "w4" if variant == "w4 packed" else None, group_size)
        prompt = torch.randint(0, config.vocab_size, (1, prefill), device=device)
        prefill_and_decode(model, prompt[:, :64], 2)  # warm-up
        r = results[variant] = {"prefill": [], "decode": []}
        for _ in range(repeats):
            t_pre, t_dec, _ = prefill_and_decode(model, prompt, decode)
            r["prefill"].append(t_pre)
            r["decode"].append(t_dec)
        if compile_:
            try:  # static cache + torch.compile ("reduce-overhead": CUDA graphs) through generate
                kw = dict(max_new_tokens=decode, min_new_tokens=decode, do_sample=False, cache_implementation="static")
                with torch.inference_mode():
                    model.generate(prompt, **kw)  # compiles
                    _sync(device)
                    t0 = time.perf_counter()
                    model.generate(prompt, **kw)
                    _sync(device)
                t_gen, t_pre = time.perf_counter() - t0, statistics.median(r["prefill"])
                results[f"{variant}, static cache + compile"] = {"prefill": [t_pre],
                                                                 "decode": [max(t_gen - t_pre, 1e-9)]}
            except Exception as e:
                notes.append(f"{variant}: static cache + torch.compile failed ({type(e).__name__}: {str(e)[:120]})")
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    title = (f"Full random-weight model ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {dtype}, "
             f"{device}), factorized at {ratio}x; batch 1, prefill {prefill}, greedy decode {decode}; median of "
             f"{repeats} (compiled rows: one timed generate after a compiling one; decode = generate - eager prefill)")
    table = _markdown(title, results, {"prefill": prefill, "decode": decode - 1})
    return table + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def bench_gpu(args, smoke: bool = False) -> str:
    if smoke:
        device, cfg, dtype = "cpu", TINY, torch.float32
        return (bench_gpu_layers(cfg, args.ratio, device, dtype, [16, 1], 2, False, 32)
                + "\n" + bench_gpu_model(cfg, args.ratio, device, dtype, 32, 4, 1, True, 32))
    if not torch.cuda.is_available():
        return "\nGPU benchmark skipped: CUDA is not available on this machine.\n"
    device, dtype = "cuda", torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    out = f"\nGPU: {name}\n"
    out += bench_gpu_layers(OLMO3_7B, args.ratio, device, dtype, [args.gpu_prefill, 1], 50, not args.no_compile,
                            args.group_size)
    out += "\n" + bench_gpu_model(OLMO3_7B, args.ratio, device, dtype, args.gpu_prefill, args.decode, args.repeats,
                                  not args.no_compile, args.group_size)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=1.8)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32", help="CPU dtype")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--no-packed", action="store_true",
                    help="CPU: leave out the vac_keep_packed=True variants (the slowest by far)")
    ap.add_argument("--gpu", action="store_true", help="also the GPU tables (skipped without CUDA)")
    ap.add_argument("--gpu-prefill", type=int, default=2048)
    ap.add_argument("--gpu-smoke", action="store_true", help="run the GPU code path on CPU with tiny shapes")
    ap.add_argument("--no-compile", action="store_true", help="GPU: skip the torch.compile attempts")
    args = ap.parse_args(argv)
    if not args.skip_cpu:
        print(bench_cpu(args), flush=True)
    if args.gpu or args.gpu_smoke:
        print(bench_gpu(args, smoke=args.gpu_smoke), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
