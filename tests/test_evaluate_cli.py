"""python -m vac.evaluate on exported tiny checkpoints: per-domain table, eval.json, the card section."""

from __future__ import annotations

import json

import pytest
from conftest import write_corpus, write_tiny_checkpoint

from vac.compress import main as compress_main
from vac.evaluate import CARD_BEGIN, main


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    write_tiny_checkpoint(root / "tiny-llama")
    write_corpus(root / "corpus.txt")
    common = ["--model", str(root / "tiny-llama"), "--calib-data", str(root / "corpus.txt"), "--calib-samples", "8",
              "--seq-len", "32", "--batch-size", "4", "--fisher-samples", "2", "--no-evaluate"]
    assert compress_main(common + ["--ratio", "1.5", "--out", str(root / "c15")]) == 0
    assert compress_main(common + ["--ratio", "2.5", "--out", str(root / "c25")]) == 0
    return root


def test_checkpoints_against_their_reference(exported, capsys):
    root = exported
    args = [str(root / "c15"), str(root / "c25"), "--reference", str(root / "tiny-llama"), "--data",
            str(root / "corpus.txt"), "--eval-samples", "4", "--seq-len", "32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "c15" in out and "c25" in out and "mean" not in out  # (one source: no per-domain rows)
    record = json.loads((root / "c15" / "eval.json").read_text())
    res = record["perplexity"]
    assert res["dense"]["tokens"] == 4 * 31 and set(record["checkpoints"]) == {"c15", "c25"}
    assert res["c25"]["kl"] > res["c15"]["kl"] > 0  # more compression, further from the reference
    assert str(root) not in json.dumps(record)  # no local paths in a file meant for publishing
    card = (root / "c15" / "README.md").read_text()
    assert card.count(CARD_BEGIN) == 1 and "| all tokens |" in card
    assert main(args) == 0  # a second run replaces the section, it does not add one
    assert (root / "c15" / "README.md").read_text().count(CARD_BEGIN) == 1


def test_per_domain_without_a_reference(exported, capsys, monkeypatch):
    from vac import corpus

    docs = {name: [" ".join(f"w{(7 * k + i + j) % 60 + 2}" for j in range(60)) for i in range(24)]
            for k, name in enumerate(corpus.DOMAINS)}
    monkeypatch.setattr(corpus, "documents", lambda name: list(docs[name]))
    assert main([str(exported / "c15"), "--data", "bundled", "--eval-samples", "2", "--seq-len", "32",
                 "--no-card"]) == 0
    res = json.loads((exported / "c15" / "eval.json").read_text())["perplexity"]
    assert set(res["domains"]) == set(corpus.DOMAINS) and "dense" not in res
    assert res["c15"]["tokens"] == 6 * 2 * 31


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and err.count("\n") == 1
