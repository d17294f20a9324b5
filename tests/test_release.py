"""Release path on tiny models: quantise -> export -> reload without vac, sizes, model card, publishing.

Tolerances: in float32 the exported modeling code runs the same dequantisation on the same packed
tensors as quantize_model_ did, so reloaded logits must match the in-memory quantised model to
1e-5 absolute (they are bitwise equal in practice). In bfloat16, one bf16 step of the logits.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys

import pytest
import torch
from conftest import random_blocks, tiny_model, tiny_tokenizer, write_corpus
from test_export import reload_without_vac

from vac.card import model_card
from vac.config import make_config
from vac.export import checkpoint_bytes, export, measure_sizes
from vac.pipeline import compress_
from vac.publish import main as publish_main
from vac.quantize import quantize_model_

ATOL_FP32 = 1e-5


def _factorized(ratio=1.5, family="llama"):
    model = tiny_model(family)
    calib = random_blocks(8, 32)
    result = compress_(model, make_config(dict(method="whiten", ratio=ratio, batch_size=4, allocation="uniform")), calib, progress=False)
    return model, calib, result


@pytest.mark.parametrize("method,compensate", [("int8", False), ("w4", True)])
def test_quantized_roundtrip_without_vac(method, compensate, tmp_path):
    model, calib, result = _factorized()
    assert any(r % 2 for r in result.ranks.values())  # odd ranks exercise the w4 padding column
    q = quantize_model_(model, method, group_size=32, calib_blocks=calib, compensate=compensate, progress=False)
    out = export(model, tiny_tokenizer(), tmp_path / "out", vac_meta={"ranks": result.ranks}, quantized=q,
                 verify_ids=calib[:1])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vac"]["quantization"]["method"] == method
    assert cfg["vac"]["quantization"]["compensate"] is compensate
    keys = _safetensors_header(next(out.glob("*.safetensors")))
    name = "model.layers.0.self_attn.q_proj"
    assert f"{name}.down.qweight" in keys and f"{name}.up.scales" in keys
    assert f"{name}.down.weight" not in keys and f"{name}.up.weight" not in keys
    assert ("model.layers.0.mlp.up_proj.up.zeros" in keys) == (method == "w4")
    assert keys["model.embed_tokens.weight"]["dtype"] == "F32"  # embeddings stay unquantised

    ids = random_blocks(2, 16, seed=1)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    got = reload_without_vac(out, ids, tmp_path)
    torch.testing.assert_close(got, expected, atol=ATOL_FP32, rtol=0)

    # in this process too: packed on-the-fly mode, and a bf16 load
    from transformers import AutoModelForCausalLM

    packed = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, vac_keep_packed=True).eval()
    assert type(packed.model.layers[0].self_attn.q_proj.down).__name__ == "PackedLinear"
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, expected, atol=ATOL_FP32, rtol=0)
        bf16 = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
        got16 = bf16(input_ids=ids).logits.float()
    step = 2 ** -7 * expected.abs().max().item()  # one bf16 step at the largest logit
    assert (got16 - expected).abs().max().item() <= 2 * step


def _safetensors_header(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _stored_bytes(entry: dict) -> int:
    begin, end = entry["data_offsets"]
    return end - begin


def test_w4_factor_bytes_under_30_percent_of_bf16(tmp_path):
    """Bytes the exported file stores for the factors (packed + scales + zeros) vs the same factors in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    calib = random_blocks(4, 32)
    result = compress_(model, make_config(dict(method="whiten", ratio=1.5, batch_size=4, allocation="uniform")), calib, progress=False)
    q = quantize_model_(model, "w4", group_size=64, progress=False)
    out = export(model, tiny_tokenizer(), tmp_path / "w4", vac_meta={"ranks": result.ranks}, quantized=q,
                 dtype=torch.bfloat16, verify_ids=calib[:1])
    header = _safetensors_header(next(out.glob("*.safetensors")))
    w4 = sum(_stored_bytes(e) for k, e in header.items() if ".down." in k or ".up." in k)
    bf16 = 2 * sum(r * (t.in_features + t.out_features) for t in result.targets
                   for r in [result.ranks[t.name]])
    assert w4 <= 0.30 * bf16, f"w4 factors take {w4 / bf16:.1%} of their bf16 bytes"
    # whole files, measured: the checkpoint is the w4 variant measure_sizes writes (+ file headers)
    sizes = measure_sizes(model, group_size=64)
    assert sizes["w4"] < sizes["int8"] < sizes["bf16"]
    assert abs(checkpoint_bytes(out) - sizes["w4"]) <= 0.02 * sizes["w4"]


@pytest.fixture(scope="module")
def run_report(tmp_path_factory):
    """A real run of the pipeline on the tiny model, then quantisation and export with the card."""
    from conftest import write_tiny_checkpoint

    from vac.compress import run

    d = tmp_path_factory.mktemp("run")
    write_tiny_checkpoint(d / "tiny")
    write_corpus(d / "corpus.txt", docs=60, words=40)
    cfg = make_config(dict(model=str(d / "tiny"), calib_data=str(d / "corpus.txt"), eval_data=str(d / "corpus.txt"),
                           method="whiten", ratio=1.5, seq_len=32, calib_samples=8, eval_samples=4, device="cpu",
                           batch_size=4))
    report = run(cfg, progress=False, console=_quiet_console())
    report["license"] = "apache-2.0"
    report["size_bytes"] = {"dense_bf16": 123_456, "factorized_bf16": 98_765, "factorized_int8": 54_321,
                            "factorized_w4": 32_109, "checkpoint": 33_333}
    report["quantization"] = {"method": "w4", "group_size": 32, "compensate": True}
    report["evaluation"]["quantized"] = {"ppl": 191.919, "kl": 0.4321, "top1": 0.4567, "tokens": 124}
    return report


def _quiet_console():
    import io

    from rich.console import Console

    return Console(file=io.StringIO())


def _report_numbers(report) -> set[str]:
    """Every way the card may print a number of the report."""
    out: set[str] = set()

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.update({str(v), f"{v:,}", f"{v:.3f}", f"{v:.4f}", f"{v:.1f}", f"{v * 100:.2f}",
                        f"{v / 1e3:,.1f}", f"{v / 1e6:,.1f}", f"{v / 1e9:,.2f}"})
    walk(report)
    return out


def _strings(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from _strings(x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _strings(x)
    elif isinstance(v, str):
        yield v


def test_model_card_has_the_runs_numbers_and_no_others(run_report):
    card = model_card(run_report)
    ev, r, p = run_report["evaluation"], run_report["ratio"], run_report["params"]
    for needle in (f"{ev['dense']['ppl']:.3f}", f"{ev['compressed']['ppl']:.3f}", f"{ev['compressed']['kl']:.4f}",
                   f"{ev['compressed']['top1']:.2%}", "191.919", "0.4321", "45.67%", f"{r['achieved_linear']:.3f}x",
                   f"{r['achieved_model']:.3f}x", f"{p['compressed_model']:,}", "123,456 B", "32,109 B", "33,333 B",
                   "trust_remote_code=True", "license: apache-2.0", ev["data"], "group of 32"):
        assert needle in card, needle
    # the front matter names a base model by its Hub id only (here it is a local directory)
    assert "base_model:" not in card.split("---")[1]
    assert "base_model: org/base\n" in model_card({**run_report, "base_model": "org/base"})
    # nothing else: strip the report's own strings (names, paths, dates), then every number left
    # in the card must be one of the report's numbers in some printed form
    text = card
    for s in sorted(set(_strings(run_report)), key=len, reverse=True):
        if len(s) > 2:
            text = text.replace(s, " ")
    allowed = _report_numbers(run_report)
    numbers = re.findall(r"(?<![\w.\-/])\d[\d,]*(?:\.\d+)?", text)
    assert numbers
    stray = [n for n in numbers if n not in allowed]
    assert not stray, f"numbers in the card that the report does not hold: {stray}"


def test_model_card_written_into_the_export(run_report, tmp_path):
    model, calib, result = _factorized()
    out = export(model, tiny_tokenizer(), tmp_path / "out", vac_meta={"ranks": result.ranks},
                 card=lambda staged: model_card({**run_report, "size_bytes": {"checkpoint": checkpoint_bytes(staged)}}))
    text = (out / "README.md").read_text()
    assert f"{checkpoint_bytes(out):,} B" in text and "## Usage" in text


# --- publishing ------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    model, calib, result = _factorized()
    return export(model, tiny_tokenizer(), tmp_path / "ckpt", vac_meta={"ranks": result.ranks}, card="# card\n")


def test_push_dry_run_lists_files(checkpoint, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", _forbidden)
    (checkpoint / ".DS_Store").write_text("x")  # hidden files are not uploaded
    assert publish_main([str(checkpoint), "--push-to-hub", "me/tiny-vac", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "would upload" in printed and "me/tiny-vac" in printed
    for name in ("config.json", "model.safetensors", "modeling_vac.py", "README.md", "tokenizer.json"):
        assert name in printed
    assert ".DS_Store" not in printed


def _forbidden(*args, **kwargs):
    raise AssertionError("nothing may be uploaded")


def test_push_offline_fails_cleanly_and_uploads_nothing(checkpoint, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", _forbidden)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    assert publish_main([str(checkpoint), "--push-to-hub", "me/tiny-vac"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nothing was uploaded" in err and len(err.splitlines()) == 1
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert publish_main([str(checkpoint), "--push-to-hub", "me/tiny-vac"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err


def test_push_cli_offline_subprocess(checkpoint, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fake", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "vac.export", str(checkpoint), "--push-to-hub", "me/x"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: could not upload") and "Traceback" not in proc.stderr


def test_push_refuses_a_non_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert publish_main([str(tmp_path), "--push-to-hub", "me/x", "--dry-run"]) == 2
    assert "not a VAC checkpoint" in capsys.readouterr().err


def test_base_license_from_local_sources(tmp_path):
    from vac.card import base_license

    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- x\n---\n# model\n")
    assert base_license(str(tmp_path)) == "mit"
    (tmp_path / "README.md").write_text("# no front matter\n")
    assert base_license(str(tmp_path)) is None
    assert base_license(str(tmp_path / "missing.gguf")) is None  # unreadable: unknown, not an error
