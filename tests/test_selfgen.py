"""Calibration text sampled from the model itself (vac/selfgen.py)."""

from __future__ import annotations

import torch

from conftest import tiny_model, tiny_tokenizer
from vac.selfgen import generated_blocks


def test_blocks_are_full_seeded_and_start_from_ordinary_tokens():
    model, tok = tiny_model(), tiny_tokenizer()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = generated_blocks(model, tok, 5, 12, seed=1, batch_size=2)
    after = torch.rand(3)
    assert torch.equal(before, after)  # the caller's random stream is untouched
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert torch.equal(a, generated_blocks(model, tok, 5, 12, seed=1, batch_size=2))
    assert not torch.equal(a, generated_blocks(model, tok, 5, 12, seed=2, batch_size=2))
    assert set(a[:, 0].tolist()).isdisjoint(tok.all_special_ids)
    assert int((a == tok.eos_token_id).sum()) == 0  # every block is full: end of text suppressed
    assert generated_blocks(model, tok, 0, 12).shape == (0, 12)


def test_samples_follow_the_model():
    # a model whose every next token is w5 (id 7): sampling at temperature 1 must follow it
    model, tok = tiny_model(), tiny_tokenizer()
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[7] = 50.0
    model.lm_head = head
    out = generated_blocks(model, tok, 3, 10, seed=0)
    assert (out[:, 1:] == 7).float().mean() > 0.9


def test_disk_offloaded_dense_model_samples_what_the_model_in_memory_samples(tmp_path):
    """The path for models that do not fit: weights written layer by layer to an offload folder, run
    under accelerate's disk-offload hooks; tied embeddings included."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from vac.compress import offloaded_dense_model
    from vac.home import CheckpointHome

    for tied in (False, True):
        cfg = tiny_config("llama")
        cfg.tie_word_embeddings = tied
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / f"m{tied}", safe_serialization=True)
        home = CheckpointHome(tmp_path / f"m{tied}")
        whole = home.to_model("cpu", dense=True)
        offloaded = offloaded_dense_model(home, tmp_path / f"offload{tied}")
        assert not any(p.device.type == "cpu" for p in offloaded.parameters())  # nothing held in memory
        ids = torch.randint(2, 100, (2, 12))
        with torch.no_grad():
            assert torch.allclose(whole(ids).logits, offloaded(ids).logits, atol=1e-5)
        tok = tiny_tokenizer()
        assert torch.equal(generated_blocks(whole, tok, 3, 10, seed=4), generated_blocks(offloaded, tok, 3, 10, seed=4))


def test_sampling_cache_estimate_counts_the_keys_and_values_a_grouped_query_model_keeps():
    # the memory check before sampling (and --dry-run's generate stage) must count key/value heads, not
    # query heads: a grouped-query model keeps a fraction of the cache
    from transformers import DynamicCache

    from vac.compress import sampling_cache_bytes

    model = tiny_model("mistral")  # head_dim 16, fewer key/value heads than query heads
    text = model.config
    assert text.num_key_value_heads < text.num_attention_heads
    batch, seq = 3, 10
    cache = DynamicCache(config=text)
    with torch.no_grad():
        model(torch.randint(2, 50, (batch, seq)), cache=cache, use_cache=True)
    kept = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    estimate = sampling_cache_bytes(text, batch, seq, torch.float32)
    rest = batch * text.vocab_size * 4 * 2 + batch * (4 * text.hidden_size + 3 * text.intermediate_size) * 4
    assert estimate - rest == kept
