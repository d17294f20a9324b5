"""compress -> export -> reload with trust_remote_code in a process where vac is NOT importable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import random_blocks, tiny_config, tiny_model, tiny_tokenizer

from vac.config import make_config
from vac.export import export
from vac.families import supported
from vac.pipeline import compress_

RELOAD = textwrap.dedent("""
    import sys

    class BlockVac:  # make `import vac` fail however it is installed (editable finder included)
        def find_spec(self, name, path=None, target=None):
            if name == "vac" or name.startswith("vac."):
                raise ImportError("vac is blocked in this process")

    sys.meta_path.insert(0, BlockVac())
    import torch
    from transformers import AutoModelForCausalLM

    directory, ids_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.load(ids_path, weights_only=True)
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, out_path)
    assert "vac" not in sys.modules
    print(type(model).__name__)
""")


def reload_without_vac(directory, ids, tmp_path) -> torch.Tensor:
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, str(script), str(directory), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], cwd=tmp_path, capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt", weights_only=True)


@pytest.mark.parametrize("family", supported())
def test_roundtrip_every_family(family, tmp_path):
    assert family in supported()
    model = tiny_model(family)
    calib = random_blocks(8, 32)
    cfg = make_config(dict(method="whiten", ratio=1.5, order="front-to-back", batch_size=4, allocation="uniform"))
    result = compress_(model, cfg, calib, progress=False)
    assert result.linear_ratio >= 1.5
    out = export(model, tiny_tokenizer(), tmp_path / "out", vac_meta={"ranks": result.ranks},
                 verify_ids=calib[:1])
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["auto_map"]["AutoModelForCausalLM"] == "modeling_vac.VacForCausalLM"
    assert (out / "modeling_vac.py").is_file() and list(out.glob("*.safetensors"))
    ids = random_blocks(2, 16, seed=1)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    got = reload_without_vac(out, ids, tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_export_is_atomic_on_failure(tmp_path):
    model = tiny_model()
    cfg = make_config(dict(method="svd", ratio=1.5, allocation="uniform"))
    result = compress_(model, cfg, random_blocks(4, 16), progress=False)

    def boom(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        export(model, tiny_tokenizer(), tmp_path / "out", vac_meta={"ranks": result.ranks}, write_extras=boom)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_streamed_export_writes_shards_that_reload_without_vac(tmp_path):
    """export_home writes the checkpoint layer by layer in several shards with an index; it reloads
    without vac and gives the logits of the streamed pipeline."""
    from vac.export import export_home
    from vac.home import CheckpointHome
    from vac.pipeline import compress_home

    dense = tiny_model("olmo3")
    dense.save_pretrained(tmp_path / "dense", safe_serialization=True)
    home = CheckpointHome(tmp_path / "dense", work_dir=tmp_path / "work")
    calib = random_blocks(4, 16)
    result = compress_home(home, make_config(dict(method="whiten", ratio=1.5, batch_size=4, allocation="uniform")),
                           calib, progress=False)
    out = export_home(home, tiny_tokenizer(), tmp_path / "out", vac_meta={"ranks": result.ranks},
                      verify_ids=calib[:1], shard_bytes=20_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    torch.testing.assert_close(reload_without_vac(out, calib[:2], tmp_path), home.to_model()(input_ids=calib[:2]).logits,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_export_stores_a_tied_head_once(tmp_path, tied):
    """A model whose head is tied to its embedding is exported with the embedding alone (as
    save_pretrained writes it): no second copy of the vocabulary matrix, and it reloads the same."""
    from transformers import AutoModelForCausalLM

    from vac.export import export_home
    from vac.home import CheckpointHome
    from vac.pipeline import compress_home

    cfg = tiny_config("olmo3")
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path / "dense", safe_serialization=True)
    home = CheckpointHome(tmp_path / "dense", work_dir=tmp_path / "work")
    calib = random_blocks(4, 16)
    result = compress_home(home, make_config(dict(method="whiten", ratio=1.5, batch_size=4, allocation="uniform")),
                           calib, progress=False)
    out = export_home(home, tiny_tokenizer(), tmp_path / "out", vac_meta={"ranks": result.ranks}, verify_ids=calib[:1])
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not tied)
    assert "model.embed_tokens.weight" in keys
    torch.testing.assert_close(reload_without_vac(out, calib[:2], tmp_path), home.to_model()(input_ids=calib[:2]).logits,
                               atol=1e-5, rtol=1e-4)
