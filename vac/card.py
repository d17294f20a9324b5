"""The exported checkpoint's README.md (Hugging Face model card), built from the run's report.

:func:`model_card` reads only the report dict (vac/report.py build_report, plus the optional
``size_bytes``, ``quantization``, ``recovery`` and ``license`` entries), so every number in the
card is one the run measured or was configured with; a section whose numbers are absent is
left out rather than filled in. :func:`base_license` finds the base model's licence for
``report["license"]`` (GGUF metadata, a local model card, or the Hub when reachable).
"""

from __future__ import annotations

import re
from pathlib import Path

QUALITY_ROWS = ("dense", "compressed", "recovered", "quantized")

#: report["size_bytes"] keys -> what they measure (bytes of safetensors files written by the run)
SIZE_ROWS = (
    ("dense_bf16", "dense model, bf16"),
    ("factorized_bf16", "factorized, bf16"),
    ("factorized_int8", "factorized, int8 factors (everything else bf16)"),
    ("factorized_w4", "factorized, w4 factors (everything else bf16)"),
)


def _mb(n: int) -> str:
    if n < 1e6:
        return f"{n / 1e3:,.1f} kB"
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith(".")


def _quant(report: dict) -> dict | None:
    q = report.get("quantization")
    if isinstance(q, dict) and q.get("method"):
        return q
    cfg = report.get("config") or {}
    if cfg.get("quantize") not in (None, "none"):
        return {"method": cfg["quantize"], "group_size": cfg.get("group_size") if cfg["quantize"] == "w4" else None}
    return None


def _quant_text(q: dict) -> str:
    if q["method"] == "int8":
        text = "INT8, symmetric, one scale per output channel of each factor"
    else:
        text = (f"four-bit (w4), asymmetric, one scale and zero point per group of {q.get('group_size')} "
                "input columns, two values per byte")
    if "compensate" in q:
        text += ("; after quantising `down`, `up` was refitted in closed form on the calibration input "
                 "covariance, then quantised" if q["compensate"] else "; no error compensation")
    return text + ". Embeddings, norms, `lm_head` and layers kept dense are not quantised"


def _front_matter(report: dict, q: dict | None) -> list[str]:
    tags = ["vac", "low-rank", "compressed"] + ([q["method"]] if q else [])
    lines = ["---"]
    if report.get("license"):
        lines.append(f"license: {report['license']}")
    if _is_hub_id(report["base_model"]):  # the Hub links it; a local checkpoint has no id to give
        lines.append(f"base_model: {report['base_model']}")
    lines += ["library_name: transformers", "pipeline_tag: text-generation",
              "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    return lines


def model_card(report: dict, repo_id: str | None = None) -> str:
    """README.md text for an exported checkpoint, from ``report`` only (see the module docstring)."""
    base, r, p = report["base_model"], report["ratio"], report["params"]
    m = report.get("method") or {}
    cfg = report.get("config") or {}
    q = _quant(report)
    sizes = report.get("size_bytes") or {}
    lines = _front_matter(report, q)
    link = f"[{base}](https://huggingface.co/{base})" if _is_hub_id(base) else f"`{base}`"
    lines += [
        f"# {base}, compressed with VAC",
        "",
        f"A low-rank compression of {link} made with VAC "
        f"{report.get('vac_version', '')}: each target linear layer W (m x n) is replaced by two factors, "
        "`up` (m x r) and `down` (r x n), with per-matrix ranks r; y = up(down(x)).",
        "",
        "## Method and options",
        "",
        f"- factorization: `{m.get('name')}`; order `{m.get('order')}`, granularity `{m.get('granularity')}`, "
        f"objective `{m.get('objective')}`, rank allocation `{m.get('allocation')}`, damping {m.get('damp')}",
    ]
    if m.get("name") == "kfac":
        refit = m.get("objective") == "dense-target" and m.get("granularity") == "matrix" and m.get("order") != "one-shot"
        inside = "C~ whitened exactly by the dense-target refit" if refit else m.get("kfac_in_exponent")
        lines.append(f"- K-FAC exponents: output side {m.get('kfac_out_exponent')}, input side {inside}")
    elif m.get("name") == "fisher":
        lines.append(f"- Fisher exponent: {m.get('fisher_exponent')}")
    if cfg:
        own = cfg.get("own_samples") or 0
        lines.append(f"- calibration: {cfg.get('calib_samples')} sequences of {cfg.get('seq_len')} tokens from "
                     f"`{cfg.get('calib_data')}`" + (f", of which {own} sampled from the dense model itself" if own else ""))
    lines.append(f"- recovery: {_recovery_text(report)}")
    lines.append(f"- quantization: {_quant_text(q) if q else 'none (factors stored in floating point)'}")
    lines += ["", "## Size", "",
              "| | dense | compressed |", "|---|---|---|",
              f"| parameters, target linear layers | {p['dense_linear']:,} | {p['compressed_linear']:,} |",
              f"| parameters, whole model | {p['dense_model']:,} | {p['compressed_model']:,} |",
              f"| compression ratio, target linear layers (target {r['target']}) | | "
              f"{r['achieved_linear']:.3f}x |",
              f"| compression ratio, whole model | | {r['achieved_model']:.3f}x |", ""]
    size_rows = [(label, sizes[k]) for k, label in SIZE_ROWS if isinstance(sizes.get(k), int)]
    if size_rows or isinstance(sizes.get("checkpoint"), int):
        lines += ["Bytes of the safetensors weight files written during the run (about the memory needed "
                  "to hold the weights in that form):", "", "| weights | bytes on disk |", "|---|---|"]
        lines += [f"| {label} | {_mb(n)} ({n:,} B) |" for label, n in size_rows]
        if isinstance(sizes.get("checkpoint"), int):
            lines.append(f"| **this checkpoint (download)** | **{_mb(sizes['checkpoint'])}** "
                         f"({sizes['checkpoint']:,} B) |")
        lines.append("")
        if q:
            lines += ["Quantised factors are dequantised once when the model is loaded, so in memory it "
                      "takes the size of the factorized model in the load dtype; pass "
                      "`vac_keep_packed=True` to `from_pretrained` to keep them packed (less memory, "
                      "slower: they are dequantised on every forward pass).", ""]
    lines += _quality(report)
    lines += _usage(repo_id or report.get("repo_id"))
    lines += [
        "## Limitations",
        "",
        "- Custom code is required: load with `trust_remote_code=True` (the bundled `modeling_vac.py` "
        "imports only torch and transformers). Inference engines that do not run custom code "
        "(llama.cpp, vLLM, TGI, ...) cannot load this checkpoint, and no GGUF file is provided.",
        "- Compression changes the model's outputs: the quality figures above come from the named "
        "evaluation data only; check the tasks you care about before relying on it.",
        "- Smaller is not necessarily faster: each factorized layer runs two thinner matrix products "
        "instead of one, and quantised factors are dequantised to floating point at load.",
        "",
        "## Licence",
        "",
        (f"The base model is released under `{report['license']}`; this derivative is subject to the same terms."
         if report.get("license") else
         f"The base model's licence could not be determined during the run: check the licence of {base} "
         "before using or redistributing this checkpoint."),
        "",
    ]
    t = report.get("timings_s") or {}
    if t:
        lines += ["## Run", "", f"Created {report.get('created', '')} by VAC {report.get('vac_version', '')}; "
                  "seconds per stage:", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in t.items()] + [""]
    return "\n".join(lines)


def _recovery_text(report: dict) -> str:
    rec = report.get("recovery")
    if isinstance(rec, dict) and rec:
        return "knowledge distillation from the dense model: " + ", ".join(
            f"{k} {v}" for k, v in rec.items() if not isinstance(v, (dict, list)))
    steps = (report.get("config") or {}).get("recover_steps")
    if steps:
        return f"knowledge distillation from the dense model, {steps} steps"
    return "none (the factors are used as fitted, without fine-tuning)"


def _data_note(source) -> str:
    """What a bundled source is, for readers of the card who do not have VAC."""
    from vac.data import bundled_domains

    try:
        domains = bundled_domains(source)
    except Exception:  # noqa: BLE001 -- a card is written whatever the source was
        return ""
    if not domains:
        return ""
    return (f", VAC's bundled corpus: {', '.join(domains)} (held-out documents of each; see VAC's README for the "
            "sources and licences)")


def _quality(report: dict) -> list[str]:
    ev = report.get("evaluation") or {}
    rows = [(k, ev[k]) for k in QUALITY_ROWS if isinstance(ev.get(k), dict) and "ppl" in ev[k]]
    if not rows:
        return []
    lines = ["## Quality", "",
             f"Evaluated on `{ev.get('data')}`{_data_note(ev.get('data'))} ({ev.get('split', 'eval')} split: {ev.get('tokens', '?'):,} "
             f"predicted tokens in blocks of {ev.get('seq_len', '?')}). KL is the mean per-token "
             "KL(dense ‖ model); top-1 is the share of positions where the model's most likely next token "
             "is the dense model's.", "",
             "| model | perplexity | KL to dense | top-1 agreement |", "|---|---|---|---|"]
    for name, v in rows:
        kl = f"{v['kl']:.4f}" if "kl" in v else "–"
        top1 = f"{v['top1']:.2%}" if "top1" in v else "–"
        lines.append(f"| {name} | {v['ppl']:.3f} | {kl} | {top1} |")
    lines.append("")
    if ev.get("domains"):
        from vac.report import domain_markdown

        lines += [f"Per domain of `{ev.get('data')}` ({len(ev['domains'])} domains; the mean weighs each the same):",
                  ""] + domain_markdown(ev)
    return lines


def _usage(repo_id: str | None) -> list[str]:
    where = repo_id or "path/to/this/checkpoint"
    return ["## Usage", "", "```python", "import torch",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
            f'model = AutoModelForCausalLM.from_pretrained("{where}", trust_remote_code=True, dtype=torch.bfloat16)',
            'inputs = tokenizer("The main idea of low-rank compression is", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs)[0], skip_special_tokens=True))", "```", ""]


# ---------------------------------------------------------------------------------------------
# The base model's licence (for report["license"])
# ---------------------------------------------------------------------------------------------

_LICENSE_LINE = re.compile(r"^license:\s*['\"]?([^'\"\n]+?)['\"]?\s*$", re.MULTILINE)


def base_license(model_spec: str) -> str | None:
    """The licence id of the model VAC was given (``cfg.model``), or None when it cannot be found.

    Bundled model and .gguf files: GGUF ``general.license``; a local directory: the ``license:``
    line of its README.md front matter; a Hub id: the Hub's model card (skipped when offline).
    """
    from vac.models import BUNDLED, bundled_gguf_path

    try:
        if model_spec == BUNDLED:
            return _gguf_license(bundled_gguf_path())
        path = Path(model_spec).expanduser()
        if model_spec.endswith(".gguf"):
            return _gguf_license(path)
        if path.is_dir():
            readme = path / "README.md"
            if readme.is_file():
                text = readme.read_text(errors="replace")
                if text.startswith("---"):
                    match = _LICENSE_LINE.search(text.split("---", 2)[1])
                    return match.group(1).strip() if match else None
            return None
        from huggingface_hub import model_info

        data = model_info(model_spec, timeout=10).card_data
        return getattr(data, "license", None) if data else None
    except Exception:  # no licence found is an answer, not a failure of the run
        return None


def _gguf_license(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.license")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else None
