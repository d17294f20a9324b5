from __future__ import annotations

import json

import pytest
from conftest import tiny_tokenizer, write_corpus

from vac.data import EVAL_EVERY, iter_documents, split_documents, token_blocks
from vac.errors import VacError


def test_local_formats_and_folder(tmp_path):
    tok = tiny_tokenizer()
    (tmp_path / "a.txt").write_text("w1 w2\n\nw3 w4\n\n\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "w5 w6"}) + "\n" +
                                      json.dumps({"messages": [{"role": "user", "content": "w7"}]}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["w8 w9", "w10"]}), tmp_path / "c.parquet")
    docs = list(iter_documents(str(tmp_path), tok))
    assert docs[:3] == ["w1 w2", "w3 w4", "w5 w6"]
    assert "w7" in docs[3] and "<|user|>" in docs[3]
    assert docs[4:] == ["w8 w9", "w10"]


def test_calibration_and_evaluation_documents_are_disjoint(tmp_path):
    p = tmp_path / "c.txt"
    write_corpus(p, docs=40)
    calib = list(split_documents(str(p), "calib", shared=True))
    ev = list(split_documents(str(p), "eval", shared=True))
    assert len(ev) == 40 // EVAL_EVERY and len(calib) == 40 - len(ev)
    assert not set(calib) & set(ev)


def test_blocks_shape_and_determinism(tmp_path):
    p = tmp_path / "c.txt"
    write_corpus(p)
    tok = tiny_tokenizer()
    a = token_blocks(str(p), tok, 6, 16, split="calib", shared=True, seed=3)
    b = token_blocks(str(p), tok, 6, 16, split="calib", shared=True, seed=3)
    assert a.shape == (6, 16) and (a == b).all()
    assert not (a == token_blocks(str(p), tok, 6, 16, split="calib", shared=True, seed=4)).all()


def test_too_short_source_says_how_many_tokens(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("w1 w2 w3")
    with pytest.raises(VacError, match=r"has 4 tokens; .* need 64"):
        token_blocks(str(p), tiny_tokenizer(), 2, 32)


def test_bad_records(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"title": "x"}\n')
    with pytest.raises(VacError, match="neither a 'text'"):
        list(iter_documents(str(p)))
    p.write_text("{not json\n")
    with pytest.raises(VacError, match="not valid JSON"):
        list(iter_documents(str(p)))
