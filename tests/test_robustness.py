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


def _dead_pid() -> int:
    """The pid of a process that has exited (what a killed run leaves in its temporary names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


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


# --- options ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [("0,-1", [0, -1]), ("5", [5]), ("[0,-1]", [0, -1]), ("[0, -1]", [0, -1]),
                                           ("[]", []), (" 1 , 2 ", [1, 2])])
def test_layer_lists_have_one_spelling(text, expected):
    assert config_from_args(["--keep-dense", text]).keep_dense == expected
    assert config_from_args(["--order", text]).order == expected
    assert make_config({"keep_dense": text}).keep_dense == expected  # YAML strings too


def test_layer_lists_from_yaml_values():
    assert make_config({"keep_dense": 5}).keep_dense == [5]
    assert make_config({"keep_dense": [0, -1], "order": "middle-out"}).order == "middle-out"
    for bad in ([0, "x"], [True], 1.5, {"a": 1}):
        with pytest.raises(VacError, match="--keep-dense takes layer indices"):
            make_config({"keep_dense": bad})


def test_every_float_option_must_be_finite():
    from dataclasses import fields

    from vac.config import CompressConfig
    from vac.recover.config import RecoverConfig, make_recover_config

    for f in fields(CompressConfig):
        if isinstance(f.default, float):
            with pytest.raises(VacError, match=f"--{f.name.replace('_', '-')} must be a finite number"):
                make_config({f.name: float("nan")})
    for f in fields(RecoverConfig):
        if isinstance(f.default, float):
            with pytest.raises(VacError, match=f"--{f.name.replace('_', '-')} must be a finite number"):
                make_recover_config({f.name: float("inf")})


def test_option_types_are_checked():
    for values, needle in (({"model": 5}, "--model must be a non-empty string"), ({"evaluate": "yes"}, "true or false"),
                           ({"calib_samples": [8]}, "--calib-samples must be an integer"),
                           ({"multipliers": [1]}, "--multipliers must be a mapping")):
        with pytest.raises(VacError, match=needle):
            make_config(values)


def test_device_check():
    from vac.validate import check_device

    check_device("auto")
    check_device("cpu")
    for bad in ("meta", "gpu", "cuda:x"):
        with pytest.raises(VacError):
            check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(VacError, match="--device cuda"):
            check_device("cuda")


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vac.compress", "--multipliers", "{a:", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("error:") == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


# --- the families table and one vocabulary for the search -------------------------------------------------


def test_family_never_is_enforced():
    from vac.families import Family

    with pytest.raises(ValueError, match="never"):
        Family("x", attention=("self_attn.q_proj", "self_attn.q_norm"), mlp=(),
               stages=(("self_attn.q_proj", "self_attn.q_norm"),))


def test_a_registered_method_reaches_the_search():
    from vac.methods import METHODS, Method, register
    from vac.search import Genome, SearchSpace

    with pytest.raises(VacError, match="not among"):
        SearchSpace(num_layers=4, method=["kfac", "mine"])
    register(Method("mine", False, False, False, METHODS["svd"].fit, "a method registered by a user"))
    try:
        space = SearchSpace(num_layers=4, method=["kfac", "mine"])
        assert ("method", ("kfac", "mine")) in space.cat_genes
        assert Genome(order="front-to-back", ratio=1.5, method="mine").to_config()["method"] == "mine"
        assert make_config({"method": "mine"}).method == "mine"
    finally:
        del METHODS["mine"]


def test_search_vocabularies_are_the_registries():
    from vac import config
    from vac.families import kinds
    from vac.search import genome

    assert genome.NAMED_ORDERS == config.ORDERS and genome.GRANULARITIES == config.GRANULARITIES
    assert genome.ALLOCATIONS == config.ALLOCATIONS
    # a fused projection (Phi-3) is a kind of its own: a per-kind multiplier may name it
    assert set(kinds()) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                            "gate_up_proj"}


# --- exports: what --overwrite replaces, leftovers, permissions, no local paths ----------------------------


@pytest.fixture(scope="module")
def factorized():
    model = tiny_model()
    result = compress_(model, make_config(dict(method="svd", ratio=1.5, allocation="uniform")), random_blocks(4, 16),
                       progress=False)
    return model, result


def _export(factorized, out, **kw):
    from vac.export import export

    model, result = factorized
    return export(model, tiny_tokenizer(), out, vac_meta={"ranks": result.ranks}, **kw)


def test_overwrite_replaces_only_a_previous_export(factorized, tmp_path):
    out = tmp_path / "out"
    _export(factorized, out)
    (out / "README.md").write_text("old card")
    _export(factorized, out, overwrite=True, card="new card")
    assert (out / "README.md").read_text() == "new card"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(VacError, match="notes.txt, which VAC did not write"):
        _export(factorized, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_killed_exports_are_removed_and_nothing_else(factorized, tmp_path):
    out = tmp_path / "out"
    dead, alive = _dead_pid(), os.getpid()
    for name in (f".out.tmp-{dead}-abcd1234", ".out.tmp-k2j4h5g6", f".out.old-{dead}-zz_9zz9z", f".out.tmp-{alive}-live0000",
                 ".out.tmp-notes", ".other.tmp-12345678", "out.recover"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    _export(factorized, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".out.tmp-{alive}-live0000", ".out.tmp-notes", ".other.tmp-12345678", "out", "out.recover"])


def test_a_kill_between_the_two_renames_loses_nothing(factorized, tmp_path):
    from vac.outdir import clean_interrupted, is_vac_export

    out = tmp_path / "out"
    _export(factorized, out)
    trash = tmp_path / f".out.old-{_dead_pid()}-abcdefgh"
    trash.mkdir()
    os.replace(out, trash / "old")  # the previous export moved aside, then the process died
    assert not out.exists()
    done = clean_interrupted(out)
    assert is_vac_export(out) and not trash.exists() and "restored" in done[0]


def test_export_has_ordinary_permissions(factorized, tmp_path):
    out = _export(factorized, tmp_path / "out")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~mask}


def test_published_files_hold_no_local_paths(tmp_path):
    from conftest import write_tiny_checkpoint

    from vac.compress import main

    write_tiny_checkpoint(tmp_path / "model")
    write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "model"), "--calib-data", str(tmp_path / "corpus.txt"), "--eval-data",
                 str(tmp_path / "corpus.txt"), "--calib-samples", "8", "--eval-samples", "4", "--seq-len", "32",
                 "--batch-size", "4", "--fisher-samples", "2", "--ratio", "1.5", "--out", str(out)]) == 0
    for p in out.iterdir():
        if p.suffix in (".json", ".md", ".py", ".jinja", ".txt"):
            text = p.read_text()
            assert str(tmp_path) not in text and str(Path.home()) not in text, p.name
    report = json.loads((out / "report.json").read_text())
    assert report["base_model"] == report["model"] == "a local checkpoint"
    assert report["config"]["calib_data"] == "local:corpus.txt"
    assert json.loads((out / "config.json").read_text())["vac"]["base_model"] == "a local checkpoint"


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


# --- recovery checkpoints that survive corruption ---------------------------------------------------------


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _recover_setup(tmp_path):
    from vac.recover import make_recover_config

    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, docs=40, words=50)
    teacher = tiny_model()
    student = copy.deepcopy(teacher)
    compress_(student, make_config(dict(method="svd", ratio=2.0)), random_blocks(4, 32), progress=False)
    rcfg = make_recover_config(dict(steps=6, lr=2e-3, seq_len=32, batch_size=2, warmup_steps=1, eval_samples=0,
                                    pretrain_data=str(corpus), eval_data=str(corpus), checkpoint_every=2,
                                    run_probes=False, wandb_mode="disabled", device="cpu"))
    return student, teacher, rcfg


def _crash_at(step_to_crash):
    def hook(stage, step):
        if step == step_to_crash:
            raise RuntimeError("killed")
    return hook


@pytest.mark.parametrize("damage", ["truncate:state.json", "truncate:trainable.safetensors", "flip:optimizer.pt",
                                    "delete:rng.pt", "delete:manifest.json"])
def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, caplog, one_thread, damage):
    from vac.recover import recover_

    student, teacher, rcfg = _recover_setup(tmp_path)
    tok = tiny_tokenizer()
    full = copy.deepcopy(student)
    recover_(full, teacher, tok, rcfg, progress=False)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        recover_(copy.deepcopy(student), teacher, tok, rcfg, run_dir=run, progress=False, on_step=_crash_at(5))
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 4
    assert json.loads((run / "checkpoint-previous" / "state.json").read_text())["step"] == 2
    how, name = damage.split(":")
    p = run / "checkpoint" / name
    if how == "truncate":
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif how == "flip":
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    else:
        p.unlink()
    resumed = copy.deepcopy(student)
    with caplog.at_level(logging.WARNING, logger="vac.recover"):
        out = recover_(resumed, teacher, tok, rcfg, run_dir=run, resume=True, progress=False)
    assert "checkpoint (global step 4 (stage 0, step 4)) is unusable" in caplog.text or name == "manifest.json"
    assert "resuming from checkpoint-previous at global step 2" in caplog.text
    assert out["steps"] == {"kd": 6}
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=n)  # two steps trained again, same result


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path, one_thread):
    from vac.recover import recover_

    student, teacher, rcfg = _recover_setup(tmp_path)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        recover_(copy.deepcopy(student), teacher, tiny_tokenizer(), rcfg, run_dir=run, progress=False,
                 on_step=_crash_at(5))
    for name in ("checkpoint", "checkpoint-previous"):
        (run / name / "state.json").write_text("{")
    with pytest.raises(VacError, match=r"no usable recovery checkpoint.*global step 4.*truncated.*global step 2"):
        recover_(copy.deepcopy(student), teacher, tiny_tokenizer(), rcfg, run_dir=run, resume=True, progress=False)


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, one_thread):
    from vac.recover import recover_
    from vac.recover.checkpoint import verify_checkpoint

    student, teacher, rcfg = _recover_setup(tmp_path)
    run = tmp_path / "run"

    def poison(stage, step):  # after step 3 (no checkpoint there) a weight turns into NaN
        if step == 3:
            with torch.no_grad():
                next(p for p in student.parameters() if p.requires_grad).view(-1)[0] = float("nan")

    with pytest.raises(NonFiniteError, match=r"kd step 4: the training loss is nan.*kept in .*checkpoint "
                                             r"\(global step 2"):
        recover_(student, teacher, tiny_tokenizer(), rcfg, run_dir=run, progress=False, on_step=poison)
    assert verify_checkpoint(run / "checkpoint") is None
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2


# --- search checkpoints that survive corruption ---------------------------------------------------------------


def _search(run_dir, generations, resume=False):
    from test_search import run_search

    return run_search(run_dir, generations, resume=resume)


def test_search_resumes_from_the_previous_generation_when_the_newest_is_damaged(tmp_path, capsys):
    full = _search(tmp_path / "full", 4)
    run = tmp_path / "run"
    _search(run, 2)
    state = run / "state.json"
    assert json.loads((run / "state-previous.json").read_text())["generation"] == 1
    state.write_text(state.read_text()[:-200])  # truncated
    (run / f".state.json.tmp-{_dead_pid()}").write_text("{")  # and a leftover of a killed write
    resumed = _search(run, 4, resume=True)
    err = capsys.readouterr().err
    assert "state.json is unusable: not valid JSON" in err and "generation 2 is evaluated again" in err
    assert [e["key"] for e in resumed.front] == [e["key"] for e in full.front]
    assert resumed.logbook == full.logbook
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]


def test_search_checkpoint_checksum_catches_an_edit(tmp_path):
    from vac.search.state import load_state

    _search(tmp_path, 1)
    state = tmp_path / "state.json"
    text = state.read_text()
    state.write_text(text.replace('"generation": 1', '"generation": 7'))  # still valid JSON
    loaded, skipped = load_state(tmp_path)
    assert loaded["generation"] == 0 and "does not match its checksum" in skipped[0]
    (tmp_path / "state-previous.json").write_text("[]")
    with pytest.raises(VacError, match="no usable search checkpoint"):
        load_state(tmp_path)
