"""The CLI end to end on a tiny checkpoint, and every bad input it must refuse cleanly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import write_corpus, write_tiny_checkpoint

from vac.compress import main


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    write_corpus(p)
    return p


def base_args(model_dir, corpus, out=None, evaluate=False):
    args = ["--model", str(model_dir), "--calib-data", str(corpus), "--eval-data", str(corpus),
            "--calib-samples", "8", "--seq-len", "32", "--batch-size", "4"]
    args += ["--eval-samples", "4"] if evaluate else ["--no-evaluate"]
    return args + (["--out", str(out)] if out else [])


def test_compress_end_to_end(tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = base_args(tiny_dir, corpus, out, evaluate=True)
    assert main(args + ["--ratio", "1.5", "--method", "kfac", "--order", "front-to-back", "--fisher-samples", "2"]) == 0
    for name in ("config.json", "model.safetensors", "modeling_vac.py", "tokenizer.json", "report.json",
                 "report.md", "ranks.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["ratio"]["achieved_linear"] >= 1.5
    assert report["params"]["compressed_linear"] < report["params"]["dense_linear"]
    for key in ("dense", "compressed"):
        assert report["evaluation"][key]["ppl"] > 0
    assert 0 <= report["evaluation"]["compressed"]["top1"] <= 1
    assert all(k.startswith("model.layers.") for k in report["ranks"])
    assert "time per stage" in capsys.readouterr().err


def test_help_lists_every_option():
    proc = subprocess.run([sys.executable, "-m", "vac.compress", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--model", "--ratio", "--method", "--calib-data", "--eval-data", "--calib-samples", "--seq-len",
                 "--out", "--config", "--order", "--allocation", "--overwrite"):
        assert flag in proc.stdout


def _fails(args, capsys, *needles, out=None):
    assert main(args) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    if out is not None:
        assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("ratio,needle", [("1.0", "> 1"), ("0.5", "> 1"), ("nan", "> 1"), ("inf", "> 1"),
                                          ("500", "too high")])
def test_bad_ratio(tiny_dir, corpus, tmp_path, capsys, ratio, needle):
    out = tmp_path / "out"
    _fails(base_args(tiny_dir, corpus, out) + ["--ratio", ratio], capsys, needle, out=out)


def test_unknown_family(tmp_path, corpus, capsys):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    (d / "model.safetensors").write_bytes(b"")
    _fails(base_args(d, corpus), capsys, "not supported", "llama", "olmo3", "python -m vac.families")


def test_families_command_lists_every_family_with_its_targets(capsys):
    from vac.families import FAMILIES, main

    assert main([]) == 0
    out = capsys.readouterr().out
    for name, family in FAMILIES.items():
        assert f"\n{name}  (decoder layers at {family.layers_path})" in out
    assert "down_proj" in out and "lm_head" in out
    assert main(["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["model_type"] for r in rows} == set(FAMILIES)
    assert all(sorted(sum(r["stages"], [])) == sorted(r["attention"] + r["mlp"]) for r in rows)


def test_missing_weights(tiny_dir, corpus, capsys):
    (tiny_dir / "model.safetensors").unlink()
    _fails(base_args(tiny_dir, corpus), capsys, "no *.safetensors")


def test_corrupt_weights(tiny_dir, corpus, capsys):
    w = tiny_dir / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    _fails(base_args(tiny_dir, corpus), capsys, "corrupt")


def test_missing_tokenizer(tiny_dir, corpus, capsys):
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    _fails(base_args(tiny_dir, corpus), capsys, "no tokenizer")


def test_empty_data(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails(base_args(tiny_dir, empty), capsys, "no usable text")


def test_too_little_data(tiny_dir, tmp_path, capsys):
    small = tmp_path / "small.txt"
    write_corpus(small, docs=8, words=10)
    _fails(base_args(tiny_dir, small), capsys, "tokens", "need")


def test_unreachable_hub_dataset(tiny_dir, corpus, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = base_args(tiny_dir, corpus)
    args[args.index("--calib-data") + 1] = "nobody/no-such-dataset"
    _fails(args, capsys, "no-such-dataset", "offline")


def test_unreachable_hub_model(corpus, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails(base_args("nobody/no-such-model", corpus), capsys, "no-such-model", "Hub")


def test_out_not_empty(tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _fails(base_args(tiny_dir, corpus, out), capsys, "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"


def test_yaml_config_and_unknown_keys(tiny_dir, corpus, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratio: 1.5\nratoi: 2\n")
    _fails(base_args(tiny_dir, corpus) + ["--config", str(bad)], capsys, "unknown keys", "ratoi")
    good = tmp_path / "good.yaml"
    good.write_text("ratio: 1.5\nmethod: svd\norder: [1, 0]\ndamp: 1e-3\n")  # YAML reads 1e-3 as a string
    from vac.config import config_from_args

    cfg = config_from_args(["--config", str(good), "--method", "whiten"])
    assert (cfg.ratio, cfg.method, cfg.order) == (1.5, "whiten", [1, 0])  # the command line wins
    assert cfg.damp == 1e-3


def test_shipped_configs_parse():
    from pathlib import Path

    from vac.config import load_yaml, make_config

    shipped = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))
    assert shipped
    for path in shipped:
        if path.name.startswith(("recover", "accelerate")):
            continue  # other stages' configs are parsed by their own tests
        make_config(load_yaml(path))


def test_compress_with_quantized_factors_and_card(tiny_dir, corpus, tmp_path):
    out = tmp_path / "out"
    args = base_args(tiny_dir, corpus, out, evaluate=True)
    assert main(args + ["--ratio", "1.5", "--method", "whiten", "--allocation", "uniform", "--quantize", "w4",
                        "--group-size", "32", "--quantize-compensate"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"]["method"] == "w4"
    assert "quantized" in report["evaluation"]
    sizes = report["size_bytes"]
    assert sizes["checkpoint"] < sizes["dense_bf16"]
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card
    assert f"{report['evaluation']['compressed']['ppl']:.2f}"[:4] in card


def test_compress_then_recover(tiny_dir, corpus, tmp_path):
    out = tmp_path / "out"
    args = base_args(tiny_dir, corpus, out, evaluate=True)
    assert main(args + ["--ratio", "1.5", "--method", "whiten", "--allocation", "uniform", "--recover-steps", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["steps"]
    assert report["evaluation"]["recovered"]["ppl"] > 0


def _safetensors_dtypes(directory) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            dtypes |= {str(h.get_slice(k).get_dtype()) for k in h.keys()}
    return dtypes


def test_bf16_export_reproduces_the_pipelines_logits_and_records_memory(tiny_dir, corpus, tmp_path):
    """Weights rounded to the export dtype before use: the bf16 checkpoint, reloaded in float32, gives
    exactly the logits the pipeline evaluated (the export check), and the report has time and memory."""
    out = tmp_path / "out"
    args = base_args(tiny_dir, corpus, out, evaluate=True) + ["--ratio", "1.5", "--export-dtype", "bfloat16",
                                                              "--fisher-samples", "2"]
    assert main(args) == 0
    assert _safetensors_dtypes(out) == {"BF16"}
    report = json.loads((out / "report.json").read_text())
    assert report["dtypes"] == {"arithmetic": "float32", "export": "bfloat16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for stage in ("load", "compress", "compress/gradient_stats", "compress/factorize", "evaluate", "export"):
        assert report["memory"][stage]["host_bytes"] > 0, stage
    assert report["memory"]["compress/gradient_stats"]["disk_bytes"] > 0  # the statistics store
    assert not (tmp_path / "out.work").exists()  # the work directory goes after a successful run


def test_work_dir_is_kept_on_request_and_a_rerun_reuses_the_statistics(tiny_dir, corpus, tmp_path, monkeypatch):
    import vac.profile as pr

    work = tmp_path / "work"
    args = base_args(tiny_dir, corpus) + ["--ratio", "1.5", "--fisher-samples", "2", "--work-dir", str(work),
                                          "--keep-work"]
    assert main(args) == 0
    assert sorted(p.name for p in (work / "stats").glob("layer_*.safetensors")) == ["layer_00000.safetensors",
                                                                                    "layer_00001.safetensors"]
    measured = []
    real = pr.GradientStats.__init__
    monkeypatch.setattr(pr.GradientStats, "__init__", lambda self, *a, **k: (measured.append(1), real(self, *a, **k))[1])
    assert main(args) == 0
    assert measured == []  # same model, data and settings: G comes from the store
    assert main(args + ["--fisher-samples", "3"]) == 0
    assert measured  # other gradient samples: measured afresh


def test_dry_run_reads_no_weights(tiny_dir, corpus, capsys, monkeypatch):
    import safetensors

    def no_weights(*a, **k):
        raise AssertionError("a dry run opened a weights file")

    monkeypatch.setattr(safetensors, "safe_open", no_weights)
    monkeypatch.setattr("vac.home.SafetensorsSource.__init__", no_weights)
    assert main(base_args(tiny_dir, corpus) + ["--dry-run", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "planned memory" in err and "no weights were loaded" in err


@pytest.mark.parametrize("recipe", ["olmo3-7b-think-1.8x.yaml", "olmo3-32b-think-1.8x.yaml"])
def test_dry_run_of_the_olmo3_recipes_offline(recipe, capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = Path(__file__).resolve().parent.parent / "configs" / recipe
    assert main(["--config", str(path), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "configs/models" in err and "peak" in err


@pytest.mark.parametrize("extra,needle", [
    (["--kfac-in-exponent", "0.3"], "whitens by C~ exactly"),
    (["--method", "svd", "--order", "back-to-front"], "reads weights only"),
    (["--allocation", "uniform", "--multipliers", "{attention: 1.2}"], "knapsack only"),
    (["--group-size", "64"], "--quantize w4 only"),
    (["--order", "one-shot", "--objective", "compressed-input"], "no closed loop"),
    (["--method", "svd", "--allocation", "uniform", "--own-samples", "2"], "reads no calibration text"),
    (["--own-samples", "8"], "every calibration sequence is the model's own"),  # with an explicit --calib-data
])
def test_options_that_would_do_nothing_are_rejected(tiny_dir, corpus, capsys, extra, needle):
    _fails(base_args(tiny_dir, corpus) + extra, capsys, "has no effect", needle)


def test_own_samples_mix_the_models_text_into_the_calibration(tiny_dir, corpus, tmp_path, monkeypatch, capsys):
    import vac.selfgen as sg

    out, work = tmp_path / "out", tmp_path / "work"
    args = base_args(tiny_dir, corpus, out) + ["--ratio", "1.5", "--fisher-samples", "2", "--own-samples", "3",
                                               "--work-dir", str(work), "--keep-work"]
    calls = []
    real = sg.generated_blocks
    monkeypatch.setattr(sg, "generated_blocks", lambda *a, **k: (calls.append(a[2:4]), real(*a, **k))[1])
    assert main(args) == 0
    assert calls == [(3, 32)]
    assert (work / "own-text.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["own_samples"] == 3
    assert "8 sequences of 32 tokens from" in (card := (out / "README.md").read_text())
    assert ", of which 3 sampled from the dense model itself" in card
    # a rerun calibrates on the same text, without sampling again
    assert main(args + ["--overwrite"]) == 0
    assert calls == [(3, 32)]
    # another model in the same work directory samples its own
    other = tmp_path / "other"
    write_tiny_checkpoint(other, seed=1)
    assert main(args[:1] + [str(other)] + args[2:] + ["--overwrite"]) == 0
    assert calls == [(3, 32), (3, 32)]
    capsys.readouterr()
    assert main(base_args(tiny_dir, corpus) + ["--own-samples", "9"]) == 2
    assert "--own-samples 9 is more than --calib-samples 8" in capsys.readouterr().err


def test_own_samples_default_to_a_quarter_and_to_none_where_no_calibration_is_read():
    from vac.config import make_config

    assert make_config({"calib_samples": 64}).own_samples == 16
    assert make_config({"calib_samples": 6}).own_samples == 1
    assert make_config({"method": "svd", "allocation": "uniform"}).own_samples == 0
    assert make_config({"method": "svd"}).own_samples == 16  # knapsack ranks read the calibration


def test_with_own_text_interleaves():
    import torch

    from vac.compress import with_own_text

    corpus, own = torch.arange(6)[:, None].repeat(1, 4), torch.full((2, 4), -1)
    mixed = with_own_text(corpus, own)
    assert mixed.shape == (8, 4)
    assert sorted(mixed[:, 0].tolist()) == [-1, -1, 0, 1, 2, 3, 4, 5]
    assert mixed[0, 0] != -1 and mixed[-1, 0] != -1  # spread, not appended


def test_own_samples_from_a_model_that_does_not_fit_run_under_disk_offload(tiny_dir, corpus, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import vac.compress as vc

    texts = []
    for free in (None, 0):
        if free is not None:
            monkeypatch.setattr(vc, "free_bytes", lambda device: free)
        work = tmp_path / f"work{free}"
        args = base_args(tiny_dir, corpus) + ["--ratio", "1.5", "--fisher-samples", "2", "--own-samples", "2",
                                              "--work-dir", str(work), "--keep-work"]
        assert main(args) == 0
        texts.append(load_file(str(work / "own-text.safetensors"))["ids"])
        assert not (work / "own-text-offload").exists()  # the offloaded weights are removed after sampling
    assert texts[0].equal(texts[1])
