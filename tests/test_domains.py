"""The bundled corpus as a mixture of domains: selections, shares, splits, the recovery stream, and
the per-domain evaluation in the report and the card. Synthetic domains stand in for the corpus."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_tokenizer

from vac import corpus
from vac.data import (bundled_documents, bundled_domains, domain_blocks, interleave, mixture_counts, split_documents,
                      token_blocks)
from vac.errors import VacError

NAMES = ("news", "encyclopedia", "literature", "conversation", "docs", "code")


@pytest.fixture
def fake_corpus(monkeypatch):
    """Six domains of 40 documents each; domain d's words are w{k*...} so a block's domain is visible."""
    docs = {name: [" ".join(f"w{(10 * k + i + j) % 60 + 2}" for j in range(30)) + f" doc{i}" for i in range(40)]
            for k, name in enumerate(NAMES)}
    monkeypatch.setattr(corpus, "documents", lambda name: list(docs[corpus._check_name(name).name]))
    return docs


def test_selections_name_domains_and_refuse_unknown_ones():
    assert bundled_domains("bundled") == list(corpus.DOMAINS)
    assert bundled_domains("bundled:news") == ["news"]
    assert bundled_domains("bundled:code+news") == ["news", "code"]  # the corpus's order
    assert bundled_domains("bundled:-code") == [d for d in corpus.DOMAINS if d != "code"]
    assert bundled_domains("notes.txt") is None and bundled_domains("allenai/dolma") is None
    for bad in ("bundled:nwes", "bundled:", "bundled:news+", "bundled:-news+code+docs+literature+conversation+"
                "encyclopedia"):
        if bad == "bundled:":
            assert bundled_domains(bad) == list(corpus.DOMAINS)
            continue
        with pytest.raises(VacError, match="domain"):
            bundled_domains(bad)


def test_mixture_counts_follow_the_weights_and_add_up():
    for n in (0, 1, 5, 6, 7, 64, 65):
        counts = mixture_counts(list(NAMES), n)
        assert sum(counts.values()) == n and max(counts.values()) - min(counts.values()) <= 1


def test_interleave_keeps_every_prefix_mixed():
    parts = {d: torch.full((k, 3), i) for i, (d, k) in enumerate(zip("abc", (4, 4, 2)))}
    rows, groups = interleave(parts)
    assert rows.shape == (10, 3) and groups.count("a") == 4 and groups.count("c") == 2
    assert set(groups[:3]) == {"a", "b", "c"}
    assert all(int(r[0]) == "abc".index(g) for r, g in zip(rows, groups))


def test_calibration_and_evaluation_never_share_a_document(fake_corpus):
    """Every fourth document of each domain is evaluation, whatever selection calibrates and evaluates."""
    for source in ("bundled", "bundled:news", "bundled:-code"):
        calib = set(bundled_documents(source, "calib"))
        evals = set(bundled_documents("bundled", "eval"))
        assert not calib & evals
        assert set(split_documents(source, "calib", shared=False)) == calib  # split even when not "shared"
    assert len(bundled_documents("bundled:docs", "eval")) == 10


def test_mixture_blocks_draw_each_domain_its_share(fake_corpus):
    tok = tiny_tokenizer()
    blocks = token_blocks("bundled", tok, 12, 16, split="calib")
    assert blocks.shape == (12, 16)
    rows, groups = domain_blocks("bundled", tok, 12, 16, split="calib", per_domain=False)
    assert torch.equal(rows, blocks) and sorted(set(groups)) == sorted(NAMES)
    assert all(groups.count(d) == 2 for d in NAMES)
    assert set(groups[:6]) == set(NAMES)  # the gradient samples (a prefix) see every domain
    rows, groups = domain_blocks("bundled:news+code", tok, 3, 16, split="eval")
    assert rows.shape == (6, 16) and groups.count("news") == 3 and groups.count("code") == 3


def test_recovery_stream_draws_domains_by_rows_and_resumes(fake_corpus):
    """Recovery's pre-training rows follow the domains' shares row by row (one mix part per domain),
    never hold an evaluation document, and a resumed mix continues with the same rows."""
    from vac.mixing import distillation_mix

    tok = tiny_tokenizer()
    def mix():
        return distillation_mix(tok, pretrain="bundled", chat=None, chat_fraction=0.0, seq_len=16, seed=3,
                                eval_source=None)

    m = mix()
    assert sorted(p.name for p in m.parts) == sorted(f"pretrain:{d}" for d in NAMES)
    rows = [m.part_of(r).name for r in range(600)]
    assert all(70 <= rows.count(f"pretrain:{d}") <= 130 for d in NAMES)
    evals = set(bundled_documents("bundled", "eval"))
    for part in m.parts:  # each part's records are its domain's training documents
        records = {r["text"] for r in part.packer.cursor.records}
        assert records and not records & evals and records <= set(fake_corpus[part.name.split(":")[1]])
    first, _ = m.next_batch(5)
    state = m.state()
    twin = mix()
    twin.load(state)
    torch.testing.assert_close(twin.next_batch(7)[0], m.next_batch(7)[0])
    assert first.shape == (5, 16)


def test_per_domain_evaluation_in_the_report_and_the_card(fake_corpus):
    from conftest import random_blocks, tiny_model

    from vac.card import model_card
    from vac.evaluate import compare
    from vac.report import domain_markdown, report_markdown

    dense, other = tiny_model(seed=0), tiny_model(seed=1)
    blocks = random_blocks(6, 16)
    groups = ["news", "code", "docs"] * 2
    result = compare({"compressed": other}, blocks, dense, groups=groups, progress=False)
    assert set(result["domains"]) == {"news", "code", "docs"}
    whole = compare({"compressed": other}, blocks, dense, progress=False)
    assert result["compressed"]["ppl"] == pytest.approx(whole["compressed"]["ppl"], rel=1e-5)
    news = compare({"compressed": other}, blocks[[0, 3]], dense, progress=False)
    assert result["domains"]["news"]["compressed"]["kl"] == pytest.approx(news["compressed"]["kl"], rel=1e-5)
    ratios = [d["compressed"]["ppl"] / d["dense"]["ppl"] for d in result["domains"].values()]
    assert result["mean"]["compressed"]["ppl_ratio"] == pytest.approx(sum(ratios) / 3)
    table = domain_markdown(result)
    assert len(table) == 2 + 3 + 1 + 1 and table[-2].startswith("| **mean**")
    report = _report({"data": "bundled", "split": "eval", "seq_len": 16, "tokens": 90, **result})
    assert "| news |" in report_markdown(report) and "| news |" in model_card(report)


def _report(evaluation: dict) -> dict:
    return {"base_model": "tiny", "model": "tiny",
            "ratio": {"target": 1.5, "achieved_linear": 1.5, "achieved_model": 1.2},
            "params": {"dense_linear": 10, "compressed_linear": 6, "dense_model": 20, "compressed_model": 16},
            "method": {"name": "kfac", "order": "front-to-back", "granularity": "matrix", "objective": "dense-target",
                       "allocation": "knapsack"},
            "evaluation": evaluation, "timings_s": {}, "config": {}, "ranks": {}, "vac_version": "0"}


def test_domains_are_described_with_a_licence():
    for d in corpus.DOMAINS.values():
        assert d.licence and d.package and "==" in d.package and d.weight > 0
    assert [f.name for f in dataclasses.fields(corpus.Domain)][:2] == ["name", "title"]


def test_recovery_on_the_mixture_is_evaluated_per_domain(fake_corpus):
    """recover_ on a bundled mixture: pre-training rows from every domain, evaluation blocks of every
    domain, and the before/after evaluations per domain, merged into a report as 'recovered'."""
    from conftest import tiny_model

    from vac.evaluate import merge_model_evaluation
    from vac.recover import recover_
    from vac.recover.config import make_recover_config

    teacher, student = tiny_model(seed=0), tiny_model(seed=1)
    rcfg = make_recover_config(dict(steps=3, lr=1e-3, seq_len=16, batch_size=2, warmup_steps=1, pretrain_data="bundled",
                                    eval_data="bundled", eval_samples=2, eval_every=0, checkpoint_every=0,
                                    run_probes=False, wandb_mode="disabled", device="cpu"))
    res = recover_(student, teacher, tiny_tokenizer(), rcfg, progress=False)
    assert set(res["before"]["domains"]) == set(NAMES) == set(res["after"]["domains"])
    assert res["after"]["dense"]["tokens"] == 6 * 2 * 15
    report = {"dense": res["before"]["dense"], "domains": {d: {"dense": v["dense"]} for d, v in
                                                             res["before"]["domains"].items()}, "mean": {}}
    merge_model_evaluation(report, res["after"], "student", "recovered")
    assert report["recovered"] == res["after"]["student"]
    assert all(report["domains"][d]["recovered"] == res["after"]["domains"][d]["student"] for d in NAMES)
    assert report["mean"]["recovered"] == res["after"]["mean"]["student"]
