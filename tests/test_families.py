"""Every family in the table on a tiny config: targets, layer-by-layer passes, learning-rate groups."""

from __future__ import annotations

import pytest
import torch
from conftest import random_blocks, tiny_model

from vac.families import FAMILIES, find_targets, get_family, supported


@pytest.mark.parametrize("family", supported())
def test_targets_found(family):
    model = tiny_model(family)
    f = get_family(model)
    targets = find_targets(model)
    per_layer = len(f.attention) + len(f.mlp)
    assert len(targets) == model.config.get_text_config().num_hidden_layers * per_layer
    assert all(t.name.startswith(f.layers_path + ".") for t in targets)
    for path, parts in f.fused:  # a fused projection holds the rows of its parts
        t = next(t for t in targets if t.name.endswith(path))
        assert len(parts) >= 2 and t.out_features > t.in_features // 2


@pytest.mark.parametrize("family", supported())
def test_layer_by_layer_pass_is_the_model(family):
    """The home's capture + one decoder layer at a time + head gives the model's own logits, also where
    sliding-window and full-attention layers get other masks and rotary embeddings (Gemma 3)."""
    from vac.home import InMemoryHome

    model = tiny_model(family)
    ids = random_blocks(2, 32, seed=3)
    home = InMemoryHome(model)
    hidden, inputs = home.capture(ids, batch_size=2)
    for l in range(home.num_layers):
        hidden = home.run_all(home.current_layer(l), hidden, inputs)
    with torch.no_grad():
        got = home.logits(hidden[0])
        want = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kinds_are_captured_separately():
    from vac.home import InMemoryHome

    home = InMemoryHome(tiny_model("gemma3_text"))
    _, inputs = home.capture(random_blocks(2, 32), batch_size=2)
    assert home.kinds == ["sliding_attention", "full_attention"]
    assert set(inputs.kwargs) == {"sliding_attention", "full_attention"}
    a, b = (inputs.kwargs[k][0] for k in ("sliding_attention", "full_attention"))
    assert not torch.equal(a["position_embeddings"][0], b["position_embeddings"][0])  # other rope bases


@pytest.mark.parametrize("family", supported())
def test_learning_rate_groups_cover_every_parameter_once(family):
    from vac.config import make_config
    from vac.pipeline import compress_
    from vac.recover.config import RecoverConfig
    from vac.recover.training import check_param_groups, param_groups

    model = tiny_model(family)
    compress_(model, make_config(dict(method="svd", ratio=1.5, allocation="uniform")), random_blocks(4, 16),
              progress=False)
    groups = param_groups(model, RecoverConfig(train_norms=True, train_embeddings=True))
    check_param_groups(model, groups)
    named = dict(model.named_parameters())
    grouped = [n for g in groups for n in g["names"]]
    assert len(grouped) == len(set(grouped))
    text = FAMILIES[family].layers_path.rsplit(".", 1)[0] + "."
    # every parameter of the language model is trained; only a vision tower (gemma3) stays frozen
    assert {n for n in named if n.startswith(text)} <= set(grouped)
    assert all(n.startswith(text) or "embed" in n or "lm_head" in n for n in grouped)
    by_group = {g["name"]: g for g in groups}
    assert any(n.endswith("down.weight") for n in by_group["attention"]["names"])
    assert any(n.endswith("down.weight") for n in by_group["mlp"]["names"])


@pytest.mark.parametrize("family", ["gemma3_text", "gemma3", "phi3"])
def test_streamed_compress_export_reload(family, tmp_path):
    """The CLI path (the checkpoint read one layer at a time, published key layouts included: Gemma 3's
    multimodal checkpoints store language_model.model.*) exports a checkpoint that reloads without vac
    and computes what the export verified."""
    from conftest import write_corpus, write_tiny_checkpoint
    from test_export import reload_without_vac
    from transformers import AutoModelForCausalLM

    from vac.compress import main

    write_tiny_checkpoint(tmp_path / "dense", family)
    write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "dense"), "--calib-data", str(tmp_path / "corpus.txt"), "--calib-samples",
                 "8", "--seq-len", "32", "--batch-size", "4", "--fisher-samples", "2", "--eval-samples", "2",
                 "--ratio", "1.5", "--out", str(out)]) == 0
    ids = random_blocks(1, 16, seed=2)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(reload_without_vac(out, ids, tmp_path), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gemma3_text", "phi3"])
def test_recover_runs_on_the_family(family, tmp_path):
    """Distillation of an exported checkpoint of the family from its dense teacher, and the re-export."""
    from conftest import write_corpus, write_tiny_checkpoint

    from vac.compress import main as compress_main
    from vac.recover.cli import main as recover_main

    write_tiny_checkpoint(tmp_path / "dense", family)
    write_corpus(tmp_path / "corpus.txt")
    corpus = str(tmp_path / "corpus.txt")
    assert compress_main(["--model", str(tmp_path / "dense"), "--calib-data", corpus, "--calib-samples", "8",
                          "--seq-len", "32", "--batch-size", "4", "--fisher-samples", "2", "--no-evaluate",
                          "--ratio", "1.5", "--out", str(tmp_path / "c")]) == 0
    assert recover_main(["--student", str(tmp_path / "c"), "--teacher", str(tmp_path / "dense"), "--out",
                         str(tmp_path / "r"), "--steps", "2", "--seq-len", "32", "--batch-size", "2",
                         "--pretrain-data", corpus, "--eval-data", corpus, "--eval-samples", "2", "--no-run-probes",
                         "--wandb-mode", "disabled", "--device", "cpu"]) == 0
    import json

    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["recovery"]["steps"] == {"kd": 2}
    assert report["evaluation"]["recovered"]["ppl"] > 1


def test_stand_ins_answer_for_the_layer():
    """During capture a decoder layer is replaced by a recorder; a model loop that reads the layer's own
    attributes (transformers 4.x: decoder_layer.attention_type) still finds them."""
    from vac.home import _Recorder

    layer = tiny_model("qwen2").model.layers[0]
    layer.attention_type = "full_attention"
    r = _Recorder(0, {}, stop=False, original=layer)
    assert r.attention_type == "full_attention"
    assert not list(r.children()) and not list(r.parameters())  # the original is not registered in it
