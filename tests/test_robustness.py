"""The pieces behind the fault table: non-finite checks, one spelling for layer lists, exports that
never delete what VAC did not write, checkpoints that survive corruption, text that is text, one
vocabulary for the search, and what an export publishes."""

from __future__ import annotations

import copy
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_blocks, tiny_model, tiny_tokenizer, write_corpus

from vac.checks import NonFiniteError, check_finite, check_loss, scan_safetensors
from vac.config import config_from_args, make_config
from vac.errors import VacError
from vac.pipeline import compress_

# --- non-finite values -----------------------------------------------------------------------------------


def test_check_finite_names_the_first_bad_tensor_and_where():
    good = torch.ones(3, 4)
    bad = torch.ones(3, 4)
    bad[1, 2] = float("inf")
    bad[2, 0] = float("nan")
    check_finite([("a", good), ("ids", torch.tensor([1, 2]))], "weights")  # ints cannot be NaN
    with pytest.raises(NonFiniteError, match=r"statistics of layer 3: b has 2 non-finite values \(first: inf at "
                                             r"index \[1, 2\] of shape \[3, 4\]\); try float32"):
        check_finite([("a", good), ("b", bad), ("c", bad)], "statistics of layer 3", "try float32")
    with pytest.raises(NonFiniteError, match="nan at index"):
        check_finite([("h", torch.tensor([1.0, float("nan")], dtype=torch.bfloat16))], "x")


def test_check_finite_counts_across_chunks(monkeypatch):
    import vac.checks

    monkeypatch.setattr(vac.checks, "CHUNK", 5)  # a large tensor is checked piece by piece
    t = torch.zeros(4, 6)
    t[3, 5] = t[0, 4] = float("nan")
    with pytest.raises(NonFiniteError, match=r"2 non-finite values \(first: nan at index \[0, 4\]"):
        check_finite([("t", t)], "x")


def test_scan_safetensors_names_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, str(tmp_path / "1.safetensors"))
    save_file({"c": torch.tensor([0.0, float("-inf")])}, str(tmp_path / "2.safetensors"))
    with pytest.raises(NonFiniteError, match=r"2.safetensors:c has 1 non-finite value \(first: -inf"):
        scan_safetensors(tmp_path)
    (tmp_path / "2.safetensors").unlink()
    scan_safetensors(tmp_path)


def test_check_loss():
    check_loss(1.5, "loss", "")
    with pytest.raises(NonFiniteError, match="step 3: the loss is nan; lower --lr"):
        check_loss(float("nan"), "step 3: the loss", "lower --lr")


# --- data -------------------------------------------------------------------------------------------------


def test_a_few_latin1_bytes_are_replaced_with_a_warning(tmp_path, caplog):
    from vac.data import iter_documents

    p = tmp_path / "c.txt"
    p.write_bytes(b"w1 w2\n\nw3 caf\xe9 w4\n")
    with caplog.at_level(logging.WARNING):
        docs = list(iter_documents(str(p)))
    assert docs == ["w1 w2", "w3 caf\ufffd w4"]
    assert "1 byte(s) are not UTF-8 (the first on line 3)" in caplog.text


def test_text_that_is_not_text_is_refused_where_it_is(tmp_path):
    from vac.data import check_text, iter_documents

    check_text("plain\ttext\r\n\fwith layout", "x")
    check_text("caf\ufffd", "x")  # too short to tell: one accent that did not decode
    with pytest.raises(VacError, match=r"x does not look like text: 50% .* on line 2"):
        check_text("abc\n\x00\x01\x02\ufffd", "x")
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "w1 w2"}) + "\n" + json.dumps({"text": "\x00\x01\x02\x03 w1"}) + "\n")
    with pytest.raises(VacError, match="c.jsonl:2 does not look like text"):
        list(iter_documents(str(p)))


def test_recovery_data_goes_through_the_same_checks(tmp_path):
    from vac.mixing import distillation_mix

    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"text": "w1"}\n{"text": "\xff"}\n')
    with pytest.raises(VacError, match="c.jsonl:2: not valid UTF-8"):
        distillation_mix(tiny_tokenizer(), pretrain=str(p), chat=None, chat_fraction=0.0, seq_len=8, seed=0,
                         eval_source=None)
