"""Calibration text written by the model itself (LLM-QAT's data-free calibration, Liu et al. 2023).

A model's own samples follow the distribution it was trained on: for an open model pre-trained on a
broad mixture, prose, code, maths and dialogue in roughly the proportions it learnt them, and no
narrower than that. Calibration text drawn from a corpus covers only the corpus's domains; mixed
with the model's own text, it also keeps the directions that the model uses on text of kinds the
corpus does not contain.

Each sequence starts from one token drawn uniformly from the vocabulary (special tokens excepted),
then samples the model's full distribution (temperature 1, no top-k or top-p truncation, which
would narrow the text to the model's most typical phrases). End-of-text is suppressed so that every
block is full (another end token the model may know, such as a document separator, is sampled like
any other token: corpus blocks cross document boundaries too). Sampling uses its own generation
settings, never those a checkpoint ships (a repetition penalty would change the distribution). The
samples depend on the model, the seed, the sizes and the batch size.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig


BATCH = 16  # sequences sampled side by side (at least --batch-size)


def sampling_batch(batch_size: int) -> int:
    return max(batch_size, BATCH)


def cache_bytes(shapes, batch: int, seq_len: int, width: int) -> int:
    """Memory that sampling needs beyond the weights, for a model of ``shapes`` (vac.dryrun.Shapes)
    with ``width``-byte activations: keys and values of ``batch`` sequences of ``seq_len`` tokens, one
    step's logits (fp32, and their softmax) and a decoder layer's activations over the prompt."""
    kv = 2 * shapes.layers * batch * seq_len * shapes.kv_out * width
    return kv + batch * shapes.vocab * 4 * 2 + batch * (4 * shapes.hidden + 3 * shapes.intermediate) * width


def generated_blocks(model, tokenizer, n_blocks: int, seq_len: int, *, seed: int = 0, batch_size: int = BATCH,
                     progress: bool = False) -> torch.Tensor:
    """``n_blocks`` x ``seq_len`` token ids sampled from ``model`` (on its device), on CPU."""
    if n_blocks <= 0:
        return torch.empty((0, seq_len), dtype=torch.long)
    # a model under accelerate's offload hooks has its weights on "meta" and takes inputs anywhere
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    # the embedding may be padded past the tokenizer: only ids the tokenizer can produce start a sequence
    vocab = min(int(getattr(model.config.get_text_config(), "vocab_size", None) or len(tokenizer)), len(tokenizer))
    allowed = torch.ones(vocab, dtype=torch.bool)
    special = [i for i in tokenizer.all_special_ids if i is not None and 0 <= i < vocab]
    allowed[special] = False
    starts_from = allowed.nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    first = starts_from[torch.randint(len(starts_from), (n_blocks,), generator=gen)]
    eos = tokenizer.eos_token_id
    settings = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seq_len - 1,
                                min_new_tokens=seq_len - 1, pad_token_id=eos, eos_token_id=eos, use_cache=True)
    out = []
    chunks = range(0, n_blocks, batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="self-generated calibration", unit="batch")
    was_training = model.training
    model.eval()
    try:
        # sampling draws from the global generator: fork it, so a run's other randomness is unchanged
        # (every CUDA device: under offload the model computes on one while its weights show "meta")
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            torch.manual_seed(seed)
            for i in chunks:
                ids = first[i:i + batch_size, None].to(device)
                sampled = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=settings)
                out.append(sampled[:, :seq_len].cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
