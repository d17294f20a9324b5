"""Hostile inputs and faults, as a new user would try them, on all three CLIs.

Every row must end the same way: exit status 2, exactly one ``error:`` line that says what was
wrong, no traceback, and nothing written: the files under the test's folders are byte for byte
what they were (``--out`` absent or unchanged, no stray temporary folders), except for what a
row declares (the recovery run folder that keeps the last good checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_corpus, write_tiny_checkpoint

from vac.compress import main as compress_main
from vac.recover import main as recover_main
from vac.search.cli import main as search_main

MAINS = {"compress": compress_main, "recover": recover_main, "search": search_main}


def _set_weight(directory: Path, name: str, index: tuple, value: float) -> None:
    from safetensors.torch import load_file, save_file

    w = load_file(directory / "model.safetensors")
    w[name][index] = value
    save_file(w, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Inputs shared by the rows: a tiny model, text, a VAC export of it, and broken copies of each."""
    w = tmp_path_factory.mktemp("world")
    write_tiny_checkpoint(w / "tiny")
    write_corpus(w / "corpus.txt")
    args = ["--model", str(w / "tiny"), "--calib-data", str(w / "corpus.txt"), "--calib-samples", "8",
            "--seq-len", "32", "--batch-size", "4", "--no-evaluate", "--ratio", "1.5",
            "--method", "whiten", "--allocation", "uniform", "--out", str(w / "export")]
    assert compress_main(args) == 0
    for name, tensor, index, value in (("nan", "model.layers.0.self_attn.q_proj.weight", (0, 3), float("nan")),
                                       ("inf", "model.layers.1.input_layernorm.weight", (5,), float("inf"))):
        shutil.copytree(w / "tiny", w / name)
        _set_weight(w / name, tensor, index, value)
    shutil.copytree(w / "tiny", w / "badjson")
    (w / "badjson" / "config.json").write_text('{"model_type": "llama", "hidden_size": 6')
    shutil.copytree(w / "tiny", w / "truncated")
    weights = w / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    (w / "gpt2").mkdir()
    (w / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    shutil.copytree(w / "export", w / "export-badjson")
    (w / "export-badjson" / "config.json").write_text("{")
    (w / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (w / "utf16.txt").write_bytes(("w1 w2 w3 " * 50).encode("utf-16"))
    (w / "latin1.jsonl").write_bytes(b'{"text": "w1 w2"}\n{"text": "caf\xe9 w3"}\n')
    (w / "broken.jsonl").write_text('{"text": "w1 w2"}\n{"text": w3}\n')
    (w / "list.jsonl").write_text('["w1", "w2"]\n')
    (w / "corrupt.parquet").write_bytes(b"PAR1" + bytes(300))
    (w / "empty.txt").write_text("")
    (w / "table.csv").write_text("text\nw1 w2\n")
    (w / "nan-lr.yaml").write_text("lr: .nan\n")
    (w / "bad.yaml").write_text("ratio: [1.5\n")
    (w / "typo.yaml").write_text("ratio: 1.5\nratoi: 2\n")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    (w / "recover.yaml").write_text("lr: 1.0e-4\n")
    return w


def _search_config(w: Path, t: Path, **over) -> str:
    cfg = {"out": str(t / "search"), "evaluator": "toy", "workers": 0, "wandb": {"enabled": False},
           "search": {"population": 4, "generations": 1, "seed": 5},
           "space": {"num_layers": 4, "ratio": [1.5, 2.5], "exponent": [0.0, 0.75]}}
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    path = t / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def compress(w: Path, t: Path, *extra) -> list[str]:
    return ["--model", str(w / "tiny"), "--calib-data", str(w / "corpus.txt"), "--eval-data", str(w / "corpus.txt"),
            "--calib-samples", "8", "--seq-len", "32", "--batch-size", "4",
            "--fisher-samples", "2", "--no-evaluate", "--ratio", "1.5", "--out", str(t / "out"), *map(str, extra)]


def recover(w: Path, t: Path, *extra) -> list[str]:
    return ["--student", str(w / "export"), "--teacher", str(w / "tiny"), "--out", str(t / "recovered"),
            "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--pretrain-data", str(w / "corpus.txt"),
            "--eval-data", str(w / "corpus.txt"), "--eval-samples", "2", "--wandb-mode", "disabled",
            "--device", "cpu", "--no-run-probes", *map(str, extra)]


def search(w: Path, t: Path, *extra, **config) -> list[str]:
    return ["--config", _search_config(w, t, **config), "--no-progress", *map(str, extra)]


# --- set-ups for the rows that need more than arguments ---------------------------------------------


def out_holding_notes(w, t, mp):
    (t / "out" / "sub").mkdir(parents=True)
    (t / "out" / "notes.txt").write_text("precious")


def export_with_user_file(w, t, mp):
    shutil.copytree(w / "export", t / "out")
    (t / "out" / "notes.txt").write_text("mine")


def recovered_holding_notes(w, t, mp):
    (t / "recovered").mkdir()
    (t / "recovered" / "notes.txt").write_text("precious")


def out_is_a_file(w, t, mp):
    (t / "out").write_text("a file")


def recover_folder_with_user_file(w, t, mp):
    (t / "out.recover").mkdir()
    (t / "out.recover" / "notes.txt").write_text("mine")


def cwd_is_tmp(w, t, mp):
    mp.chdir(t)


def cannot_write(w, t, mp):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    mp.setattr("vac.validate.tempfile.mkdtemp", refuse)


def disk_full(w, t, mp):
    usage = shutil.disk_usage(t)
    mp.setattr("vac.validate.shutil.disk_usage", lambda p: usage._replace(free=1000))


def read_only_parent(w, t, mp):
    (t / "ro").mkdir()
    os.chmod(t / "ro", 0o555)


def run_dir_with_checkpoint(w, t, mp):
    (t / "recovered.run" / "checkpoint").mkdir(parents=True)


def run_dir_corrupt_checkpoint(w, t, mp):
    for name in ("checkpoint", "checkpoint-previous"):
        (t / "recovered.run" / name).mkdir(parents=True)
        (t / "recovered.run" / name / "state.json").write_text('{"step": ')


def search_corrupt_state(w, t, mp):
    (t / "search").mkdir()
    (t / "search" / "state.json").write_text('{"version": 1, "generation": ')


def search_state_without_resume(w, t, mp):
    (t / "search").mkdir()
    (t / "search" / "state.json").write_text("{}")


# (id, cli, arguments(w, t), what the error line must say, set-up, new paths allowed (relative to t))
ROWS = [
    # --- options: finite, typed, in range, one spelling --------------------------------------------------
    ("ratio-nan", "compress", lambda w, t: compress(w, t, "--ratio", "nan"), "--ratio must be a finite number > 1"),
    ("ratio-inf", "compress", lambda w, t: compress(w, t, "--ratio", "inf"), "--ratio"),
    ("ratio-one", "compress", lambda w, t: compress(w, t, "--ratio", "1"), "> 1"),
    ("ratio-text", "compress", lambda w, t: compress(w, t, "--ratio", "abc"), "invalid float value"),
    ("damp-nan", "compress", lambda w, t: compress(w, t, "--damp", "nan"), "--damp must be a finite number"),
    ("damp-negative", "compress", lambda w, t: compress(w, t, "--damp", "-1"), "--damp"),
    ("exponent-inf", "compress", lambda w, t: compress(w, t, "--kfac-out-exponent", "inf"), "--kfac-out-exponent"),
    ("exponent-negative", "compress", lambda w, t: compress(w, t, "--fisher-exponent", "-0.5"), "in [0, 1]"),
    ("recover-minutes-nan", "compress", lambda w, t: compress(w, t, "--recover-minutes", "nan"), "--recover-minutes"),
    ("calib-samples-zero", "compress", lambda w, t: compress(w, t, "--calib-samples", "0"), "--calib-samples"),
    ("seq-len-negative", "compress", lambda w, t: compress(w, t, "--seq-len", "-5"), "--seq-len"),
    ("group-size", "compress", lambda w, t: compress(w, t, "--group-size", "48"), "--group-size must be 32, 64"),
    ("keep-dense-out-of-range", "compress", lambda w, t: compress(w, t, "--keep-dense", "5"), "2 decoder layers"),
    ("keep-dense-garbage", "compress", lambda w, t: compress(w, t, "--keep-dense", "0,x"), "layer indices"),
    ("order-garbage", "compress", lambda w, t: compress(w, t, "--order", "1,x"), "layer indices"),
    ("order-not-permutation", "compress", lambda w, t: compress(w, t, "--order", "0,0"), "permutation"),
    ("multipliers-yaml", "compress", lambda w, t: compress(w, t, "--multipliers", "{a:"), "not valid YAML"),
    ("multipliers-list", "compress", lambda w, t: compress(w, t, "--multipliers", "[1, 2]"), "mapping"),
    ("multipliers-negative", "compress", lambda w, t: compress(w, t, "--multipliers", "{attention: -1}"), "> 0"),
    ("multipliers-unknown", "compress", lambda w, t: compress(w, t, "--multipliers", "{attn: 1}"), "unknown keys"),
    ("multipliers-mixed", "compress", lambda w, t: compress(w, t, "--multipliers", "{attention: 1, q_proj: 1}"),
     "mixes components and matrix kinds"),
    ("unknown-option", "compress", lambda w, t: compress(w, t, "--ratoi", "2"), "unrecognized arguments"),
    ("method-unknown", "compress", lambda w, t: compress(w, t, "--method", "magic"), "unknown --method"),
    ("dtype-unknown", "compress", lambda w, t: compress(w, t, "--dtype", "float8"), "--dtype"),
    ("device-cuda", "compress", lambda w, t: compress(w, t, "--device", "cuda:7"), "--device cuda:7"),
    ("device-garbage", "compress", lambda w, t: compress(w, t, "--device", "gpu"), "unknown --device"),
    # --- configuration files ---------------------------------------------------------------------------------
    ("config-missing", "compress", lambda w, t: compress(w, t, "--config", w / "nope.yaml"), "does not exist"),
    ("config-bad-yaml", "compress", lambda w, t: compress(w, t, "--config", w / "bad.yaml"), "not valid YAML"),
    ("config-unknown-key", "compress", lambda w, t: compress(w, t, "--config", w / "typo.yaml"), "ratoi"),
    ("config-not-mapping", "compress", lambda w, t: compress(w, t, "--config", w / "list.yaml"), "mapping"),
    ("config-not-text", "compress", lambda w, t: compress(w, t, "--config", w / "binary.yaml"), "not UTF-8"),
    ("recover-config-nan", "compress",
     lambda w, t: compress(w, t, "--recover-steps", "2", "--recover-config", w / "nan-lr.yaml"), "--lr must be"),
    ("recover-config-unused", "compress", lambda w, t: compress(w, t, "--recover-config", w / "recover.yaml"),
     "only with --recover-steps"),
    # --- models ----------------------------------------------------------------------------------------------
    ("model-missing", "compress", lambda w, t: compress(w, t, "--model", w / "missing"), "no such file"),
    ("model-config-not-json", "compress", lambda w, t: compress(w, t, "--model", w / "badjson"), "not valid JSON"),
    ("model-nan-weight", "compress", lambda w, t: compress(w, t, "--model", w / "nan"),
     "model.layers.0.self_attn.q_proj.weight has 1 non-finite value"),
    ("model-inf-norm", "compress", lambda w, t: compress(w, t, "--model", w / "inf"),
     "model.layers.1.input_layernorm.weight"),
    ("model-truncated", "compress", lambda w, t: compress(w, t, "--model", w / "truncated"), "truncated or corrupt"),
    ("model-family", "compress", lambda w, t: compress(w, t, "--model", w / "gpt2"), "not supported"),
    # --- data ------------------------------------------------------------------------------------------------
    ("data-binary", "compress", lambda w, t: compress(w, t, "--calib-data", w / "binary.txt"), "does not look like text"),
    ("data-bundled-domain", "compress", lambda w, t: compress(w, t, "--calib-data", "bundled:nwes"),
     "unknown bundled domain 'nwes'; the domains are news"),
    ("data-utf16", "compress", lambda w, t: compress(w, t, "--calib-data", w / "utf16.txt"), "expected UTF-8"),
    ("data-jsonl-not-utf8", "compress", lambda w, t: compress(w, t, "--calib-data", w / "latin1.jsonl"),
     "latin1.jsonl:2: not valid UTF-8"),
    ("data-jsonl-not-json", "compress", lambda w, t: compress(w, t, "--calib-data", w / "broken.jsonl"),
     "broken.jsonl:2 is not valid JSON"),
    ("data-jsonl-not-object", "compress", lambda w, t: compress(w, t, "--calib-data", w / "list.jsonl"),
     "list.jsonl:1: expected a JSON object"),
    ("data-parquet-corrupt", "compress", lambda w, t: compress(w, t, "--calib-data", w / "corrupt.parquet"),
     "not a readable Parquet file"),
    ("data-missing", "compress", lambda w, t: compress(w, t, "--calib-data", w / "missing.txt"), "no such file"),
    ("data-empty", "compress", lambda w, t: compress(w, t, "--calib-data", w / "empty.txt"), "no usable text"),
    ("data-csv", "compress", lambda w, t: compress(w, t, "--calib-data", w / "table.csv"), "unsupported data file"),
    # --- the output location -------------------------------------------------------------------------------
    ("out-below-a-file", "compress", lambda w, t: compress(w, t, "--out", w / "corpus.txt" / "out"), "which is a file"),
    ("out-is-a-file", "compress", lambda w, t: compress(w, t), "not a directory", out_is_a_file),
    ("out-current-folder", "compress", lambda w, t: compress(w, t, "--out", ".", "--overwrite"), "current folder",
     cwd_is_tmp),
    ("out-not-empty", "compress", lambda w, t: compress(w, t), "not empty", out_holding_notes),
    ("overwrite-user-folder", "compress", lambda w, t: compress(w, t, "--overwrite"), "not a previous VAC export",
     out_holding_notes),
    ("overwrite-export-with-user-file", "compress", lambda w, t: compress(w, t, "--overwrite"),
     "holds notes.txt, which VAC did not write", export_with_user_file),
    ("out-holds-the-model", "compress", lambda w, t: compress(w, t, "--out", w / "tiny", "--overwrite"),
     "holds --model"),
    ("overwrite-recover-folder-with-user-file", "compress",
     lambda w, t: compress(w, t, "--recover-steps", "2", "--overwrite"), "which a recovery run does not write",
     recover_folder_with_user_file),
    ("out-unwritable", "compress", lambda w, t: compress(w, t), "cannot write", cannot_write),
    ("out-disk-full", "compress", lambda w, t: compress(w, t), "are free on that disk", disk_full),
    pytest.param("out-read-only-parent", "compress", lambda w, t: compress(w, t, "--out", t / "ro" / "out"),
                 "cannot write", read_only_parent,
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")),
    # --- vac.recover -----------------------------------------------------------------------------------------
    ("recover-lr-nan", "recover", lambda w, t: recover(w, t, "--lr", "nan"), "--lr must be a finite number > 0"),
    ("recover-temperature-inf", "recover", lambda w, t: recover(w, t, "--temperature", "inf"), "--temperature"),
    ("recover-max-grad-norm-nan", "recover", lambda w, t: recover(w, t, "--max-grad-norm", "nan"), "--max-grad-norm"),
    ("recover-max-minutes-nan", "recover", lambda w, t: recover(w, t, "--max-minutes", "nan"), "--max-minutes"),
    ("recover-alpha", "recover", lambda w, t: recover(w, t, "--alpha", "2"), "--alpha"),
    ("recover-probes-yaml", "recover", lambda w, t: recover(w, t, "--probes", "[a"), "not valid YAML"),
    ("recover-student-not-vac", "recover", lambda w, t: recover(w, t, "--student", w / "tiny"), "not a VAC checkpoint"),
    ("recover-student-config-broken", "recover", lambda w, t: recover(w, t, "--student", w / "export-badjson"),
     "not valid JSON"),
    ("recover-teacher-missing", "recover", lambda w, t: recover(w, t, "--teacher", w / "missing"), "no such file"),
    ("recover-teacher-nan", "recover", lambda w, t: recover(w, t, "--teacher", w / "nan"), "non-finite"),
    ("recover-overwrite-user-folder", "recover", lambda w, t: recover(w, t, "--overwrite"), "not a previous VAC export",
     recovered_holding_notes),
    ("recover-run-dir-holds-checkpoint", "recover", lambda w, t: recover(w, t), "already holds a recovery checkpoint",
     run_dir_with_checkpoint),
    ("recover-resume-corrupt-checkpoints", "recover", lambda w, t: recover(w, t, "--resume"),
     "no usable recovery checkpoint", run_dir_corrupt_checkpoint),
    ("recover-loss-diverges", "recover", lambda w, t: recover(w, t, "--lr", "1e6", "--checkpoint-every", "0"),
     "the training loss is nan", None, {"recovered.run"}),
    # --- vac.search -----------------------------------------------------------------------------------------
    ("search-config-bad-yaml", "search", lambda w, t: ["--config", str(w / "bad.yaml")], "not valid YAML"),
    ("search-ratio-nan", "search", lambda w, t: search(w, t, space={"ratio": float("nan")}), "ratio"),
    ("search-exponent-range", "search", lambda w, t: search(w, t, space={"exponent": [0.0, 3.0]}), "exponent"),
    ("search-population-text", "search", lambda w, t: search(w, t, search={"population": "abc"}), "population"),
    ("search-cxpb", "search", lambda w, t: search(w, t, search={"cxpb": 2.0}), "cxpb"),
    ("search-method-unknown", "search", lambda w, t: search(w, t, space={"method": ["magic", "kfac"]}), "magic"),
    ("search-keep-dense-garbage", "search", lambda w, t: search(w, t, space={"keep_dense": [0, "x"]}), "keep_dense"),
    ("search-section-type", "search", lambda w, t: search(w, t, search=[1, 2]), "must be a mapping"),
    ("search-workers", "search", lambda w, t: search(w, t, "--workers", "-1"), "--workers"),
    ("search-out-below-a-file", "search", lambda w, t: search(w, t, out=str(w / "corpus.txt" / "run")),
     "which is a file"),
    ("search-compress-base-nan", "search", lambda w, t: search(w, t, compress_base={"damp": float("nan")}), "--damp"),
    ("search-evaluation-model", "search",
     lambda w, t: search(w, t, evaluator="compression", evaluation={"model": str(w / "missing")}), "no such file"),
    ("search-evaluation-depth", "search",
     lambda w, t: search(w, t, evaluator="compression", evaluation={"model": str(w / "tiny")}), "2 decoder layers"),
    ("search-corrupt-checkpoint", "search", lambda w, t: search(w, t, "--resume"), "no usable search checkpoint",
     search_corrupt_state),
    ("search-checkpoint-without-resume", "search", lambda w, t: search(w, t), "--resume", search_state_without_resume),
]


def _rows():
    for row in ROWS:
        values, marks = (row.values, row.marks) if hasattr(row, "marks") else (row, ())
        rid, cli, args, needle, *rest = values
        yield pytest.param(cli, args, needle, *(list(rest) + [None, set()])[:2], id=rid, marks=marks)


def _tree(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` with its content hash (folders: 'dir'), hidden ones included."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_the_table_is_large_enough():
    assert len(ROWS) >= 40


@pytest.mark.parametrize("cli,args,needle,setup,allowed", list(_rows()))
def test_hostile_input(cli, args, needle, setup, allowed, world, tmp_path, capsys, monkeypatch):
    t = tmp_path / "t"
    t.mkdir()
    if setup is not None:
        setup(world, t, monkeypatch)
    argv = args(world, t)
    before = _tree(world, t)
    capsys.readouterr()
    torch.manual_seed(0)
    rc = MAINS[cli](argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2, err[-2000:]
    assert len(errors) == 1, err[-2000:]
    assert "Traceback" not in err
    assert needle in errors[0], errors[0]
    after = _tree(world, t)
    new = {p for p in set(after) - set(before) if not any(p.startswith(str(t / a)) for a in allowed)}
    assert not new, f"stray files: {sorted(new)[:5]}"
    assert {p: h for p, h in after.items() if p in before} == before, "an existing file changed"
