"""The recovery data stream: pre-training text with a fraction of conversations mixed in.

Three layers, each with a small JSON-able state so that a checkpoint holds the exact position:

- a *cursor* walks the training records of one source, epoch after epoch. Local sources
  (``bundled``, files, folders) are read once and visited in a fresh seeded order each epoch;
  Hub datasets are streamed with ``datasets`` in stream order, and their position is the
  stream's own ``state_dict()`` taken just before the current record, so a resume re-reads
  exactly that record. When a source is also the evaluation source, its evaluation documents
  (``vac.data``'s rule: usable document ``i`` with ``i % EVAL_EVERY == EVAL_EVERY - 1``) are
  skipped: training never sees them.
- a *packer* cuts fixed-length rows from the cursor's rendered records: token ids plus a mask
  of the tokens that carry loss. Plain text (and, for distillation, conversations rendered
  through the chat template) carries loss everywhere; for supervised replay a conversation
  carries loss only on its assistant turns (``render_conversation``). Records are joined with
  EOS and rows cross record boundaries, as in pre-training, so there is no padding.
- a *mix* decides for each row which source fills it, by a seeded hash of the row number
  (no RNG state to save), and returns batches.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vac.data import (EVAL_EVERY, LOCAL_SUFFIXES, bundled_documents, bundled_domains, file_records, local_files,
                      record_text)
from vac.errors import VacError

#: The pre-training mix of OLMo 3 (Dolma 3), for real runs with network access; offline the
#: default is the bundled corpus.
DOLMA3 = "allenai/dolma3_mix-6T-1025-7B"
#: OLMo 3's post-training SFT conversations (``messages`` records), the chat part of the mix.
DOLCI_THINK_SFT = "allenai/Dolci-Think-SFT-7B"


# --- records of a source -------------------------------------------------------------------------


def is_local(source: str) -> bool:
    return bundled_domains(source) is not None or Path(source).expanduser().exists()


def local_records(source: str) -> Iterator[dict]:
    """Raw records (``{"text": ...}`` or ``{"messages": [...]}``) of a local source, in source order."""
    if bundled_domains(source) is not None:
        for doc in bundled_documents(source):
            yield {"text": doc}
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise VacError(f"data source {source!r}: no such file or directory")
    for f in local_files(path):
        for _, record in file_records(f):  # the same readers (and the same checks) as vac.data
            yield record


def open_stream(source: str):
    """A ``datasets`` streaming dataset for a Hub id (``id``, ``id:config`` or ``id:config@split``)."""
    import datasets

    name, _, split = source.partition("@")
    repo, _, config = name.partition(":")
    try:
        return datasets.load_dataset(repo, config or None, split=split or "train", streaming=True)
    except Exception as e:
        raise VacError(f"could not stream dataset {source!r} from the Hugging Face Hub ({type(e).__name__}: {e}); "
                       "check the id and network access (offline?), or use a local file, a folder, or "
                       "'bundled'") from None


def _usable(record, tokenizer, where: str) -> bool:
    if not isinstance(record, dict):
        raise VacError(f"{where}: records must be mappings with 'text' or 'messages', got {type(record).__name__}")
    return bool(record_text(record, tokenizer, where=where))


# --- cursors: training records, epoch after epoch ----------------------------------------------------


class LocalCursor:
    """Training records of a local source, in a seeded order that changes every epoch."""

    def __init__(self, source: str, tokenizer, *, holdout: bool, seed: int, records: list[dict] | None = None):
        if records is None:
            records = []
            for i, rec in enumerate(r for r in local_records(source) if _usable(r, tokenizer, source)):
                if not (holdout and i % EVAL_EVERY == EVAL_EVERY - 1):
                    records.append(rec)
        if not records:
            what = "training split of the source" if holdout else "source"
            raise VacError(f"data source {source!r} has no usable text (the {what} is empty); give a file or "
                           "folder with 'text' or 'messages' records")
        self.records, self.seed = records, seed
        self.epoch = self.index = 0
        self._order_epoch, self._order = -1, []

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            self._order = list(range(len(self.records)))
            random.Random(f"vac-mix:{self.seed}:{epoch}").shuffle(self._order)
            self._order_epoch = epoch
        return self._order

    def current(self) -> dict:
        return self.records[self._order_of(self.epoch)[self.index]]

    def advance(self) -> None:
        self.index += 1
        if self.index == len(self.records):
            self.epoch, self.index = self.epoch + 1, 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load(self, state: dict) -> None:
        if not 0 <= state["index"] < len(self.records):
            raise VacError(f"saved data position {state} is outside this source ({len(self.records)} records); "
                           "the data changed since the checkpoint was written")
        self.epoch, self.index = state["epoch"], state["index"]


class StreamCursor:
    """Training records of a streamed dataset, in stream order; it restarts at the end (next epoch).

    The position is the dataset's ``state_dict()`` taken just before the current record, plus the
    record's index in the source (for the evaluation hold-out rule).
    """

    def __init__(self, source: str, tokenizer, *, holdout: bool, seed: int,
                 opener: Callable[[str], object] = open_stream):
        self.source, self.tokenizer, self.holdout, self.opener = source, tokenizer, holdout, opener
        self.epoch = 0
        self._open()
        self._next()

    def _open(self) -> None:
        self.ds = self.opener(self.source)
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(self.epoch)
        self.it = iter(self.ds)
        self.doc_index = -1  # index among the usable records of the source, this epoch
        self._found = False  # a training record was met in this pass

    def _next(self) -> None:
        while True:
            before = copy.deepcopy(self.ds.state_dict())
            try:
                rec = next(self.it)
            except StopIteration:
                if not self._found:
                    raise VacError(f"data source {self.source!r} has no usable text (no training records "
                                   "with 'text' or 'messages')") from None
                self.epoch += 1
                self._open()
                continue
            if not _usable(rec, self.tokenizer, self.source):
                continue
            self.doc_index += 1
            if self.holdout and self.doc_index % EVAL_EVERY == EVAL_EVERY - 1:
                continue
            self.record, self.record_state, self._found = rec, before, True
            return

    def current(self) -> dict:
        return self.record

    def advance(self) -> None:
        self._next()

    def state(self) -> dict:
        return {"epoch": self.epoch, "doc_index": self.doc_index, "stream": self.record_state}

    def load(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self._open()
        self.ds.load_state_dict(state["stream"])
        self.it = iter(self.ds)
        # the stream resumes at the current record, which _next counts again
        self.doc_index, self._found = state["doc_index"] - 1, True
        self._next()


def make_cursor(source: str, tokenizer, *, holdout: bool, seed: int):
    domains = bundled_domains(source)
    if domains is not None and len(domains) > 1:
        raise VacError(f"{source!r} is a mixture of domains: give each domain its own mix part "
                       "(see pretrain_parts)")
    if domains is not None:  # one domain: its training documents, whatever the evaluation source
        return LocalCursor(source, tokenizer, holdout=True, seed=seed,
                           records=[{"text": t} for t in bundled_documents(source, "calib")])
    if is_local(source):
        return LocalCursor(source, tokenizer, holdout=holdout, seed=seed)
    if source.startswith((".", "/", "~")) or Path(source).suffix in LOCAL_SUFFIXES:
        raise VacError(f"data source {source!r}: no such file or directory")
    return StreamCursor(source, tokenizer, holdout=holdout, seed=seed)


# --- rendering: a record -> token ids + loss mask -------------------------------------------------------


def render_conversation(messages: list[dict], tokenizer, where: str = "") -> tuple[list[int], list[bool]]:
    """Token ids of a conversation through the chat template, and which of them are assistant tokens.

    An assistant turn spans from the end of the generation prompt before it to the end of the
    conversation rendered up to and including it, so its end-of-turn marker is learnt too.
    Templates that rewrite earlier turns (e.g. drop past reasoning) break that prefix property;
    for them the turn's content is located in the rendered text instead.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise VacError(f"{where}: conversation records need a tokenizer with a chat template")
    if not getattr(tokenizer, "is_fast", False):
        raise VacError("assistant-token masks need a fast tokenizer (character offsets)")

    def render(msgs, gen=False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) if msgs else ""

    text = render(messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before, upto = render(messages[:i], gen=True), render(messages[: i + 1])
        if upto.startswith(before) and text.startswith(upto) and len(upto) > len(before) >= cursor:
            start, end = len(before), len(upto)
        else:
            content = m.get("content") or ""
            start = text.find(content, cursor) if content else -1
            if start < 0:
                raise VacError(f"{where}: cannot locate assistant turn {i} in the rendered conversation")
            end = start + len(content)
        spans.append((start, end))
        cursor = end
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [b > a and any(s <= a < e for s, e in spans) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


Renderer = Callable[[dict, str], tuple[list[int], list[bool]]]


def text_renderer(tokenizer) -> Renderer:
    """Distillation: a record's text (conversations through the chat template), loss on every token."""

    def render(record: dict, where: str):
        ids = tokenizer(record_text(record, tokenizer, where=where) or "", add_special_tokens=False)["input_ids"]
        ids = list(ids) + [tokenizer.eos_token_id]
        return ids, [True] * len(ids)

    return render


def assistant_renderer(tokenizer) -> Renderer:
    """Supervised replay: a conversation with loss on its assistant tokens only."""

    def render(record: dict, where: str):
        if not isinstance(record.get("messages"), list):
            raise VacError(f"{where}: supervised replay needs conversation records ('messages' lists), "
                           f"got keys {sorted(record)}")
        ids, mask = render_conversation(record["messages"], tokenizer, where=where)
        return ids + [tokenizer.eos_token_id], mask + [False]

    return render


class Packer:
    """Rows of ``seq_len`` tokens cut from a cursor's rendered records, joined end to end."""

    def __init__(self, cursor, render: Renderer, seq_len: int, where: str):
        self.cursor, self.render, self.seq_len, self.where = cursor, render, seq_len, where
        self.offset = 0
        self._cache_key, self._cache = None, ([], [])

    def _tokens(self) -> tuple[list[int], list[bool]]:
        key = json.dumps(self.cursor.state(), sort_keys=True, default=str)
        if key != self._cache_key:
            self._cache_key, self._cache = key, self.render(self.cursor.current(), self.where)
        return self._cache

    def next_row(self) -> tuple[list[int], list[bool]]:
        ids: list[int] = []
        mask: list[bool] = []
        lossless = 0  # consecutive records without a loss-carrying token
        while len(ids) < self.seq_len:
            t, m = self._tokens()
            take = self.seq_len - len(ids)
            ids += t[self.offset: self.offset + take]
            mask += m[self.offset: self.offset + take]
            self.offset += take
            if self.offset >= len(t):
                lossless = 0 if any(m) else lossless + 1
                if lossless > 10_000:
                    raise VacError(f"data source {self.where!r} has no tokens that carry loss (no assistant turns?)")
                self.cursor.advance()
                self.offset = 0
        return ids, mask

    def state(self) -> dict:
        return {"cursor": self.cursor.state(), "offset": self.offset}

    def load(self, state: dict) -> None:
        self.cursor.load(state["cursor"])
        self.offset = state["offset"]
        self._cache_key = None


# --- the mix --------------------------------------------------------------------------------------------


@dataclass
class MixPart:
    name: str
    packer: Packer
    fraction: float


class Mix:
    """Batches whose rows come from the parts in the given fractions, chosen per row by a seeded hash."""

    def __init__(self, parts: list[MixPart], seed: int):
        total = sum(p.fraction for p in parts)
        if not parts or total <= 0 or any(p.fraction < 0 for p in parts):
            raise VacError(f"data mix fractions must be >= 0 and not all 0, got {[p.fraction for p in parts]}")
        self.parts, self.seed, self.rows = parts, seed, 0
        acc, self._bounds = 0.0, []
        for p in parts:
            acc += p.fraction / total
            self._bounds.append(acc)

    def part_of(self, row: int) -> MixPart:
        u = random.Random(f"vac-rows:{self.seed}:{row}").random()
        for part, bound in zip(self.parts, self._bounds):
            if u < bound:
                return part
        return self.parts[-1]

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` rows: token ids (n x seq_len, long) and loss mask (n x seq_len, bool)."""
        rows = []
        for _ in range(n):
            rows.append(self.part_of(self.rows).packer.next_row())
            self.rows += 1
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
        return ids, mask

    def state(self) -> dict:
        return {"rows": self.rows, "parts": {p.name: p.packer.state() for p in self.parts}}

    def load(self, state: dict) -> None:
        missing = sorted({p.name for p in self.parts} - set(state["parts"]))
        if missing:
            raise VacError(f"saved data position lacks sources {missing}; the data mix changed")
        self.rows = state["rows"]
        for p in self.parts:
            p.packer.load(state["parts"][p.name])


def pretrain_parts(source: str, tokenizer, render, seq_len: int, seed: int, fraction: float,
                   eval_source: str | None) -> list[MixPart]:
    """The pre-training part(s) of a mix: one for a source, or for a bundled mixture one per domain
    with its share of ``fraction``, so that rows (not documents, whose lengths differ 25x) follow
    the shares; each domain's evaluation documents are never trained on."""
    domains = bundled_domains(source)
    if domains is None or len(domains) == 1:
        cursor = make_cursor(source, tokenizer, holdout=source == eval_source, seed=seed)
        return [MixPart("pretrain", Packer(cursor, render, seq_len, source), fraction)]
    from vac.corpus import DOMAINS

    total = sum(DOMAINS[d].weight for d in domains)
    parts = []
    for i, d in enumerate(domains):
        cursor = make_cursor(f"bundled:{d}", tokenizer, holdout=True, seed=seed + 101 * i)
        parts.append(MixPart(f"pretrain:{d}", Packer(cursor, render, seq_len, f"bundled:{d}"),
                             fraction * DOMAINS[d].weight / total))
    return parts


def distillation_mix(tokenizer, *, pretrain: str, chat: str | None, chat_fraction: float, seq_len: int,
                     seed: int, eval_source: str | None) -> Mix:
    """Pre-training text plus ``chat_fraction`` of rows from rendered conversations (loss everywhere)."""
    render = text_renderer(tokenizer)
    parts = []
    if chat_fraction < 1:
        parts += pretrain_parts(pretrain, tokenizer, render, seq_len, seed, 1.0 - chat_fraction, eval_source)
    if chat and chat_fraction > 0:
        cursor = make_cursor(chat, tokenizer, holdout=chat == eval_source, seed=seed + 1)
        parts.append(MixPart("chat", Packer(cursor, render, seq_len, chat), chat_fraction))
    elif chat_fraction >= 1:
        raise VacError("chat_fraction is 1 but no chat data is given")
    return Mix(parts, seed)


def replay_mix(tokenizer, *, chat: str, seq_len: int, seed: int, eval_source: str | None) -> Mix:
    """Conversations only, loss on assistant tokens (the post-training replay stage)."""
    cursor = make_cursor(chat, tokenizer, holdout=chat == eval_source, seed=seed + 2)
    return Mix([MixPart("sft", Packer(cursor, assistant_renderer(tokenizer), seq_len, chat), 1.0)], seed)


__all__ = ["DOLMA3", "DOLCI_THINK_SFT", "Mix", "MixPart", "Packer", "LocalCursor", "StreamCursor",
           "make_cursor", "pretrain_parts",
           "render_conversation", "text_renderer", "assistant_renderer", "distillation_mix", "replay_mix",
           "local_records", "open_stream"]
