"""lm-evaluation-harness through python -m vac.evaluate, offline, on tiny exported checkpoints."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import write_corpus, write_tiny_checkpoint

from vac import harness
from vac.compress import main as compress_main
from vac.evaluate import CARD_BEGIN, main

lm_eval = pytest.importorskip("lm_eval")


def tiny_documents(n_docs: int = 12, words: int = 90) -> dict[str, list[str]]:
    """Six 'domains' of documents in the tiny tokenizer's vocabulary (w0 .. w125)."""
    from vac.corpus import DOMAINS

    g = torch.Generator().manual_seed(1)
    return {name: [" ".join(f"w{int(i)}" for i in torch.randint(0, 126, (words,), generator=g)) for _ in range(n_docs)]
            for name in DOMAINS}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    write_tiny_checkpoint(root / "tiny-llama")
    write_corpus(root / "corpus.txt")
    assert compress_main(["--model", str(root / "tiny-llama"), "--calib-data", str(root / "corpus.txt"),
                          "--calib-samples", "8", "--seq-len", "32", "--batch-size", "4", "--fisher-samples", "2",
                          "--no-evaluate", "--ratio", "1.5", "--out", str(root / "c15")]) == 0
    return root


@pytest.fixture
def offline_corpus(monkeypatch, tmp_path):
    """The bundled corpus replaced by tiny documents, VAC's cache by a temporary folder."""
    from vac import corpus

    docs = tiny_documents()
    monkeypatch.setenv("VAC_CACHE", str(tmp_path / "cache"))
    # every fourth document is evaluation: each tiny document once in that split
    monkeypatch.setattr(corpus, "documents", lambda name: [d for d in docs[name] for _ in range(4)])
    return docs


def test_offline_items_are_honest():
    docs = tiny_documents()
    items = harness.offline_items(docs, per_domain=5)
    assert set(items) == set(harness.OFFLINE_TASKS)
    for task, rows in items.items():
        assert len(rows) == 5 * len(docs)
        assert [r["domain"] for r in rows[:6]] == list(docs)  # domains interleaved: --limit sees them all
        for r in rows:
            assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["gold"] < 4
            text = r["context"] + r["choices"][r["gold"]]
            assert any(text in d for d in docs[r["domain"]])  # the gold choice really follows the passage
            wrong = [c for i, c in enumerate(r["choices"]) if i != r["gold"]]
            assert not any(r["context"] + c in d for c in wrong for d in docs[r["domain"]])
            if task == "vac_wordorder":  # the same words, in another order
                assert all(sorted(c.split()) == sorted(r["choices"][r["gold"]].split()) for c in wrong)


def test_suites_expand_and_unknown_tasks_are_refused():
    assert harness.expand_tasks(["vac-offline,piqa", "piqa"]) == ["vac_continuation", "vac_wordorder", "piqa"]
    assert "winogrande" in harness.expand_tasks("olmo3-base")
    with pytest.raises(Exception, match="two commands"):
        harness.suite_settings(["olmo3-base", "olmo3-think"])
    with pytest.raises(Exception, match="no_such_task"):
        harness.check_tasks(["no_such_task"])
    with pytest.raises(Exception, match="is an lm-evaluation-harness tag"):
        harness.check_tasks(["ai2_arc"])  # runs arc_easy and arc_challenge, but gives no result of its own
    assert harness.check_tasks(["olmo3-base"])[0] == "mmlu"  # a group is fine


def test_tasks_against_the_reference(exported, offline_corpus, capsys):
    root = exported
    args = [str(root / "c15"), "--reference", str(root / "tiny-llama"), "--tasks", "vac-offline", "--limit", "6",
            "--no-perplexity", "--no-probes", "--batch-size", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "vac_continuation" in out and "vac_wordorder" in out
    record = json.loads((root / "c15" / "eval.json").read_text())
    for task in harness.OFFLINE_TASKS:
        entry = record["tasks"][task]
        assert set(entry["models"]) == {"dense", "c15"} and entry["chance"] == 0.25
        assert entry["models"]["c15"]["samples"] == 6 and 0 <= entry["models"]["c15"]["score"] <= 1
        dense, c15 = entry["models"]["dense"]["score"], entry["models"]["c15"]["score"]
        assert entry["retained"]["c15"] == (pytest.approx(c15 / dense) if dense else None)
    assert record["harness"]["limit"] == 6
    card = (root / "c15" / "README.md").read_text()
    assert card.count(CARD_BEGIN) == 1 and "vac_continuation (proxy)" in card and "c15 / dense" in card
    # a later run with perplexity and probes keeps the task table (one record, one card section)
    assert main([str(root / "c15"), "--reference", str(root / "tiny-llama"), "--data", str(root / "corpus.txt"),
                 "--eval-samples", "2", "--seq-len", "32"]) == 0
    record = json.loads((root / "c15" / "eval.json").read_text())
    assert {"tasks", "perplexity", "probes"} <= set(record)
    probes = record["probes"]["models"]
    assert probes["dense"]["total"] == probes["c15"]["total"] >= 24  # dozens of prompts, not one
    card = (root / "c15" / "README.md").read_text()
    assert card.count(CARD_BEGIN) == 1 and "Behaviour probes" in card and "vac_wordorder (proxy)" in card


def test_checkpoint_loads_through_the_harness_hf_class(exported):
    from lm_eval.models.huggingface import HFLM

    from vac.recover.cli import load_student

    lm = harness.harness_model(path=exported / "c15", batch_size=2)
    assert isinstance(lm, HFLM)
    assert "FactorizedLinear" in {type(m).__name__ for m in lm.model.modules()}  # VAC's own modeling code
    ref, _ = load_student(exported / "c15")
    ids = torch.randint(2, 120, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits.float(), ref(ids).logits.float(), rtol=1e-4, atol=1e-4)


def test_missing_extra_and_misused_options(exported, monkeypatch, capsys):
    c15 = str(exported / "c15")
    assert main([c15, "--limit", "5"]) == 2
    assert "--limit applies to --tasks" in capsys.readouterr().err
    assert main([c15, "--no-perplexity", "--no-probes"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    assert main([c15, "--tasks", "vac-offline"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'vac[eval]'" in err and err.count("\n") == 1


def test_compress_and_recover_end_with_the_task_table(tmp_path, offline_corpus):
    from vac.recover.cli import main as recover_main

    write_tiny_checkpoint(tmp_path / "tiny-llama")
    write_corpus(tmp_path / "corpus.txt")
    common = ["--model", str(tmp_path / "tiny-llama"), "--calib-data", str(tmp_path / "corpus.txt"), "--calib-samples",
              "8", "--seq-len", "32", "--batch-size", "4", "--fisher-samples", "2", "--no-evaluate", "--ratio", "1.5"]
    assert compress_main(common + ["--eval-limit", "4"]) == 2  # --eval-limit without --eval-tasks: refused
    assert compress_main(common + ["--eval-tasks", "vac-offline"]) == 2  # nothing exported to evaluate: refused
    assert compress_main(common + ["--eval-tasks", "vac_continuation", "--eval-limit", "4", "--out",
                                   str(tmp_path / "c")]) == 0
    record = json.loads((tmp_path / "c" / "eval.json").read_text())
    assert set(record["tasks"]) == {"vac_continuation"}
    assert set(record["tasks"]["vac_continuation"]["models"]) == {"dense", "c"}
    assert "vac_continuation (proxy)" in (tmp_path / "c" / "README.md").read_text()
    rc = recover_main(["--student", str(tmp_path / "c"), "--teacher", str(tmp_path / "tiny-llama"), "--out",
                       str(tmp_path / "r"), "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--pretrain-data",
                       str(tmp_path / "corpus.txt"), "--eval-data", str(tmp_path / "corpus.txt"), "--eval-samples", "2",
                       "--no-run-probes", "--wandb-mode", "disabled", "--device", "cpu", "--eval-tasks",
                       "vac_wordorder", "--eval-limit", "4"])
    assert rc == 0
    record = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert list(record["tasks"]["vac_wordorder"]["models"]) == ["dense", "c", "r"]  # dense, compressed, recovered
    assert set(record["tasks"]["vac_wordorder"]["retained"]) == {"c", "r"}
