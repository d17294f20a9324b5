"""Tiny models and tokenizers built in code: no test downloads anything."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128

TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False)


def tiny_config(family: str):
    import transformers

    classes = {"llama": "LlamaConfig", "olmo3": "Olmo3Config", "olmo2": "Olmo2Config", "olmo": "OlmoConfig",
               "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig",
               "gemma3_text": "Gemma3TextConfig", "phi3": "Phi3Config"}
    extra = {"head_dim": 16} if family in ("qwen3", "mistral") else {}
    if family == "olmo3":
        extra["layer_types"] = ["full_attention"] * TINY["num_hidden_layers"]
    if family in ("gemma3_text", "gemma3"):
        # a window shorter than the test sequences: sliding and full attention really differ
        extra.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"])
    if family == "phi3":
        extra.update(pad_token_id=0, bos_token_id=1, eos_token_id=1)
    if family == "gemma3":  # the multimodal wrapper: the same text decoder under model.language_model
        text = transformers.Gemma3TextConfig(**TINY, **extra)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        return transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                                         image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3,
                                         eoi_token_index=VOCAB - 2, tie_word_embeddings=False)
    return getattr(transformers, classes[family])(**TINY, **extra)


def tiny_model(family: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()
    model.config.use_cache = False
    return model


def tiny_tokenizer():
    """A word-level tokenizer with VOCAB entries (real fast tokenizer, saved and reloaded like any other)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return fast


def random_blocks(n: int = 8, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n, seq_len), generator=g)


def write_tiny_checkpoint(directory, family: str = "llama", seed: int = 0):
    model = tiny_model(family, seed)
    model.save_pretrained(directory, safe_serialization=True)
    tiny_tokenizer().save_pretrained(directory)
    return model


def write_corpus(path, docs: int = 200, words: int = 60, seed: int = 0) -> None:
    """A .txt corpus of ``docs`` blank-line-separated documents in the tiny tokenizer's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    paras = [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (words,), generator=g)) for _ in range(docs)]
    path.write_text("\n\n".join(paras))


@pytest.fixture
def tiny_dir(tmp_path):
    d = tmp_path / "tiny-llama"
    write_tiny_checkpoint(d)
    return d
