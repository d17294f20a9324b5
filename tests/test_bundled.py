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
