"""The results of a run: report.json (schema in DESIGN.md §4), report.md, plots, console table."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import torch

from vac import __version__
from vac.files import write_json, write_text


def build_report(*, cfg, loaded, family: str, result, dense_model_params: int, compressed_model_params: int,
                 evaluation: dict, timings: dict) -> dict:
    return {
        "vac_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": loaded.base_model,
        "model": cfg.model,
        "family": family,
        "method": {"name": cfg.method, "order": cfg.order, "granularity": cfg.granularity,
                   "objective": cfg.objective, "allocation": cfg.allocation,
                   "fisher_exponent": cfg.fisher_exponent, "kfac_out_exponent": cfg.kfac_out_exponent,
                   "kfac_in_exponent": cfg.kfac_in_exponent, "damp": cfg.damp},
        "config": cfg.to_dict(),
        "ratio": {
            "target": cfg.ratio,
            "achieved_linear": result.linear_ratio,
            "achieved_model": dense_model_params / compressed_model_params,
        },
        "params": {
            "dense_linear": result.dense_target_params,
            "compressed_linear": result.compressed_target_params,
            "dense_model": dense_model_params,
            "compressed_model": compressed_model_params,
        },
        "ranks": result.ranks,
        "allocation": result.allocation,
        "evaluation": evaluation,
        "timings_s": timings,
    }


def write_report(directory: Path, report: dict, result=None, plots: bool = True) -> None:
    """report.json and report.md (each replaced atomically), and with ``result`` the plots."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "report.json", report)
    write_text(directory / "report.md", report_markdown(report))
    if result is not None and plots:
        plot_ranks(directory / "ranks.png", result)
        if result.spectra:
            plot_spectra(directory / "spectra.png", result)


def quality_rows(report: dict) -> list[tuple[str, dict]]:
    ev = report.get("evaluation") or {}
    return [(k, ev[k]) for k in ("dense", "compressed", "recovered", "quantized") if ev.get(k)]


def domain_table(evaluation: dict) -> tuple[list[str], list[list[str]]] | None:
    """The per-domain evaluation as (header, rows), the mean over domains last; None without domains."""
    from vac.evaluate import evaluation_table

    domains = evaluation.get("domains") or {}
    if not domains:
        return None
    models = [k for k in ("compressed", "recovered", "quantized") if k in next(iter(domains.values()))]
    header, rows = evaluation_table(evaluation, models)
    return header, rows[:-1]  # (the overall row is the summary's main table)


def domain_markdown(evaluation: dict) -> list[str]:
    """The per-domain table in markdown (PPL / dense, KL and top-1 per domain and their mean)."""
    table = domain_table(evaluation)
    if table is None:
        return []
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"**{c}**" if r[0] == "mean" and c else c for c in r) + " |" for r in rows]
    return lines + [""]


def report_markdown(report: dict) -> str:
    r, p, t = report["ratio"], report["params"], report["timings_s"]
    lines = [
        f"# VAC compression report: {report['base_model']}",
        "",
        f"- method: `{report['method']['name']}`, order `{report['method']['order']}`, granularity "
        f"`{report['method']['granularity']}`, objective `{report['method']['objective']}`, allocation "
        f"`{report['method']['allocation']}`",
        f"- ratio over target linears: target {r['target']:.3f}, achieved {r['achieved_linear']:.3f}; "
        f"whole model {r['achieved_model']:.3f}",
        f"- parameters: linear {p['dense_linear']:,} -> {p['compressed_linear']:,}; "
        f"model {p['dense_model']:,} -> {p['compressed_model']:,}",
        "",
    ]
    rows = quality_rows(report)
    if rows:
        ev = report["evaluation"]
        lines += [f"Evaluation on `{ev.get('data')}` ({ev.get('tokens', '?')} tokens):", "",
                  "| model | PPL | KL(dense‖model) | top-1 agreement |", "|---|---|---|---|"]
        for name, m in rows:
            kl = f"{m['kl']:.4f}" if "kl" in m else "–"
            top1 = f"{m['top1']:.2%}" if "top1" in m else "–"
            lines.append(f"| {name} | {m['ppl']:.3f} | {kl} | {top1} |")
        lines.append("")
        if ev.get("domains"):
            lines += ["Per domain (every domain weighs the same in the mean):", ""] + domain_markdown(ev)
    mem = report.get("memory") or {}
    lines += ["| stage | seconds | peak host GiB | peak device GiB | disk GiB |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {_gib(mem.get(k, {}).get('host_bytes'))} | {_gib(mem.get(k, {}).get('device_bytes'))}"
              f" | {_gib(mem.get(k, {}).get('disk_bytes'))} |" for k, v in t.items()] + [""]
    return "\n".join(lines)


def plot_ranks(path: Path, result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds: dict[str, list[tuple[int, float]]] = {}
    for t in result.targets:
        r = result.ranks.get(t.name)
        keep = 1.0 if r is None else r * (t.out_features + t.in_features) / t.dense_params
        kinds.setdefault(t.kind, []).append((t.layer, keep))
    fig, ax = plt.subplots(figsize=(9, 4))
    for kind, pts in kinds.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", ms=3, label=kind)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("kept fraction of parameters")
    ax.set_title("parameters kept per matrix (1 = dense)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectra(path: Path, result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    layers = sorted({t.layer for t in result.targets})
    show = {layers[0], layers[len(layers) // 2], layers[-1]}
    for t in result.targets:
        s = result.spectra.get(t.name)
        if s is None or t.layer not in show:
            continue
        e = torch.cumsum(s.double() ** 2, 0)
        ax.plot((e / e[-1]).numpy(), label=f"L{t.layer} {t.kind}", lw=1)
    ax.set_xlabel("rank")
    ax.set_ylabel("captured weighted energy")
    ax.set_title("cumulative weighted spectra (first, middle, last layer)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=3, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    r, p = report["ratio"], report["params"]
    table = Table(title=f"VAC: {report['base_model']} ({report['method']['name']}, {report['method']['order']})")
    table.add_column("model")
    for c in ("params (model)", "linear ratio", "PPL", "KL", "top-1"):
        table.add_column(c, justify="right")
    rows = dict(quality_rows(report))
    table.add_row("dense", f"{p['dense_model']:,}", "1.000", _fmt(rows.get("dense"), "ppl", "{:.3f}"), "–", "–")
    for name in ("compressed", "recovered", "quantized"):
        if name != "compressed" and name not in rows:
            continue
        m = rows.get(name)
        table.add_row(name, f"{p['compressed_model']:,}", f"{r['achieved_linear']:.3f}", _fmt(m, "ppl", "{:.3f}"),
                      _fmt(m, "kl", "{:.4f}"), _fmt(m, "top1", "{:.2%}"))
    console.print(table)
    domains = domain_table(report.get("evaluation") or {})
    if domains is not None:
        header, rows = domains
        per_domain = Table(title="per domain")
        for c in header:
            per_domain.add_column(c, justify="left" if c == "domain" else "right")
        for row in rows:
            per_domain.add_row(*row, style="bold" if row[0] == "mean" else None)
        console.print(per_domain)
    memory = report.get("memory") or {}
    device = any("device_bytes" in m for m in memory.values())
    times = Table(title="time per stage and peak memory")
    for c in ("stage", "seconds", "host GiB") + (("device GiB",) if device else ()) + ("disk GiB",):
        times.add_column(c, justify="left" if c == "stage" else "right")
    for k, v in report["timings_s"].items():
        m = memory.get(k, {})
        cells = [k, f"{v:.1f}", _gib(m.get("host_bytes"))] + ([_gib(m.get("device_bytes"))] if device else [])
        times.add_row(*cells, _gib(m.get("disk_bytes")))
    console.print(times)


def _gib(n: int | None) -> str:
    return "–" if n is None else f"{n / (1 << 30):.2f}"


def _fmt(m: dict | None, key: str, spec: str) -> str:
    return spec.format(m[key]) if m and key in m else "–"
