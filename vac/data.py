"""Text sources -> token blocks.

A source is ``bundled`` (VAC's offline multi-domain corpus, see :mod:`vac.corpus`), an HF dataset
id (streamed with ``datasets``; ``id``, ``id:config`` or ``id:config@split``), a local ``.txt`` /
``.jsonl`` / ``.parquet`` file, or a folder of those. Documents are numbered in source order; when
the calibration and evaluation sources are the same, every fourth document (index % 4 == 3) is
evaluation and the rest calibration, so the two splits never share a document.

``bundled`` is a mixture of domains (news, encyclopaedia, literature, conversation, technical
documentation, source code) in the shares :data:`vac.corpus.DOMAINS` states: ``bundled:news`` is
one domain, ``bundled:news+code`` several, ``bundled:-code`` all but one. The bundled corpus is
always split by document within each domain (every fourth document of a domain is evaluation), so
calibrating on one bundled selection and evaluating on another never shares a document. Blocks of a
mixture are drawn per domain in proportion to the shares and interleaved, so that any prefix of
them (the gradient samples are the first calibration blocks) is itself a mixture.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from vac.errors import VacError

log = logging.getLogger(__name__)

BUNDLED = "bundled"
EVAL_EVERY = 4  # document i is evaluation iff i % EVAL_EVERY == EVAL_EVERY - 1
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def fetch_bundled_corpus(force: bool = False) -> Path:
    """Fetch every domain of the bundled corpus (see :mod:`vac.corpus`); returns the corpus folder."""
    from vac import corpus

    dirs = corpus.fetch(force=force)
    return next(iter(dirs.values())).parent


def bundled_domains(source) -> list[str] | None:
    """The domains a ``bundled`` source selects (``bundled``, ``bundled:a+b``, ``bundled:-a``), or None
    for any other source. Unknown domain names are refused with the list of known ones."""
    if not isinstance(source, str) or not (source == BUNDLED or source.startswith(BUNDLED + ":")):
        return None
    from vac.corpus import DOMAINS

    spec = source[len(BUNDLED) + 1:].strip()
    if not spec:
        return list(DOMAINS)
    exclude = spec.startswith("-")
    names = [n.strip() for n in spec.lstrip("-").split("+")]
    unknown = [n for n in names if n not in DOMAINS]
    if unknown or not all(names):
        raise VacError(f"data source {source!r}: unknown bundled domain {', '.join(map(repr, unknown)) or '(empty)'}; "
                       f"the domains are {', '.join(DOMAINS)} (e.g. 'bundled:news', 'bundled:news+code', "
                       "'bundled:-code' for all but code)")
    chosen = [n for n in DOMAINS if (n in names) != exclude]
    if not chosen:
        raise VacError(f"data source {source!r} selects no domain")
    return chosen


def bundled_documents(source: str = BUNDLED, split: str = "all") -> list[str]:
    """Documents of a bundled selection, domain after domain; ``split`` "calib" / "eval" keeps that
    split of each domain (every fourth document of a domain is evaluation)."""
    from vac import corpus

    docs: list[str] = []
    for name in bundled_domains(source):
        docs += [d for i, d in enumerate(corpus.documents(name))
                 if split == "all" or (split == "eval") == (i % EVAL_EVERY == EVAL_EVERY - 1)]
    return docs


def mixture_counts(domains: list[str], n: int) -> dict[str, int]:
    """``n`` blocks shared among ``domains`` in proportion to their weights (largest remainder)."""
    from vac.corpus import DOMAINS

    total = sum(DOMAINS[d].weight for d in domains)
    exact = {d: n * DOMAINS[d].weight / total for d in domains}
    counts = {d: int(x) for d, x in exact.items()}
    for d in sorted(domains, key=lambda d: counts[d] - exact[d])[: n - sum(counts.values())]:
        counts[d] += 1
    return counts


def interleave(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
    """Rows of several tensors in one, spread evenly (row j of a part with k rows goes at (j + 1/2) / k),
    so every prefix holds each part in proportion; returns the rows and the part of each."""
    keyed = sorted((((j + 0.5) / len(t), i, j), name) for i, (name, t) in enumerate(parts.items())
                   for j in range(len(t)))
    if not keyed:
        width = next((t.shape[1:] for t in parts.values()), (0,))
        return torch.empty((0, *width), dtype=torch.long), []
    return torch.stack([parts[name][j] for (_, _, j), name in keyed]), [name for _, name in keyed]


# --- documents from a source -----------------------------------------------------------------


def local_files(path: Path) -> list[Path]:
    """The data files of a local folder (sorted) or the file itself."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
    if not files:
        raise VacError(f"data folder {path} has no {'/'.join(LOCAL_SUFFIXES)} files")
    return files


def iter_documents(source: str, tokenizer=None) -> Iterator[str]:
    """Yield the documents of a source as plain text (chat ``messages`` through the chat template)."""
    if bundled_domains(source) is not None:
        yield from bundled_documents(source)
        return
    path = Path(source).expanduser()
    if path.exists():
        for f in local_files(path):
            yield from _file_documents(f, tokenizer)
    elif path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raise VacError(f"data source {source!r}: no such file or directory")
    else:
        yield from _hub_documents(source, tokenizer)


def _file_documents(path: Path, tokenizer) -> Iterator[str]:
    for where, row in file_records(path):
        doc = record_text(row, tokenizer, where=where)
        if doc:
            yield doc


# --- reading local files, and telling text from what is not ---------------------------------------

#: characters that do not occur in text: C0/C1 controls other than tab, newlines and form feed,
#: and U+FFFD, which is what an undecodable byte becomes
_JUNK = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ufffd]")
#: above this share of such characters a "text" is binary data or in another encoding (UTF-16...);
#: a short document with an accent or two that did not decode is still text
MAX_JUNK = 0.05
MIN_JUNK = 3
#: how much of each local file the up-front check reads
HEAD_BYTES = 1 << 20


def check_text(text: str, where: str) -> None:
    """Refuse a string that is not text (a high share of control characters or undecodable bytes)."""
    junk = sum(1 for _ in _JUNK.finditer(text)) if text else 0
    if junk >= MIN_JUNK and junk > MAX_JUNK * len(text):
        first = _JUNK.search(text).start()
        raise VacError(f"{where} does not look like text: {junk / len(text):.0%} of its characters are control "
                       f"characters or undecodable bytes (the first on line {text.count(chr(10), 0, first) + 1}); "
                       "expected UTF-8 text")


def read_text_file(path: Path, limit: int | None = None) -> str:
    """A .txt file (or its first ``limit`` bytes) as text; a few bytes that are not UTF-8 (a
    Latin-1 accent) are replaced with a warning naming the line, a file that is not text is refused."""
    with path.open("rb") as fh:
        data = fh.read() if limit is None else fh.read(limit)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        text = data.decode("utf-8", errors="replace")
        check_text(text, str(path))
        if limit is None or e.start < len(data) - 4:  # (the head may end inside a character)
            log.warning("%s: %d byte(s) are not UTF-8 (the first on line %d); they were replaced", path,
                        text.count("\ufffd"), data.count(b"\n", 0, e.start) + 1)
    check_text(text, str(path))
    return text


def _jsonl_rows(lines: Iterable[bytes], path: Path) -> Iterator[tuple[str, dict]]:
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise VacError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                           "a .jsonl file holds one JSON record per line, in UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise VacError(f"{path}:{lineno} is not valid JSON ({e.msg} at column {e.colno}); a .jsonl file holds "
                           "one record per line, such as {\"text\": \"...\"}") from None
        if not isinstance(row, dict):
            raise VacError(f"{path}:{lineno}: expected a JSON object with 'text' or 'messages', got "
                           f"{type(row).__name__}")
        yield f"{path}:{lineno}", row


def _parquet_table(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a truncated or foreign file
        raise VacError(f"{path} is not a readable Parquet file ({type(e).__name__}: {str(e)[:200]}); expected a "
                       "Parquet table with a 'text' or 'messages' column") from None


def file_records(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` of a local data file: .txt documents (separated by blank lines) as
    ``{"text": ...}``, .jsonl lines, .parquet rows; ``where`` names the file and line or row."""
    if path.suffix == ".txt":
        for i, doc in enumerate(d.strip() for d in read_text_file(path).split("\n\n")):
            if doc:
                yield f"{path} (document {i + 1})", {"text": doc}
    elif path.suffix == ".jsonl":
        with path.open("rb") as fh:
            yield from _jsonl_rows(fh, path)
    elif path.suffix == ".parquet":
        for i, row in enumerate(_parquet_table(path).to_pylist()):
            yield f"{path} (row {i + 1})", row
    else:
        raise VacError(f"unsupported data file {path}; use .txt, .jsonl or .parquet")


def check_source(source, flag: str) -> None:
    """Up-front checks of a data source, before any model is loaded: it exists, and the head of
    each local file is what its suffix says (text, JSON lines, a Parquet table with a text column).
    Hub datasets are checked when streamed."""
    if not isinstance(source, str) or not source.strip():
        raise VacError(f"{flag} must name a data source ('bundled', a file, a folder or an HF dataset id), "
                       f"got {source!r}")
    if bundled_domains(source) is not None:
        return
    path = Path(source).expanduser()
    if not path.exists():
        if path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
            raise VacError(f"{flag} {source!r}: no such file or directory")
        return
    for f in local_files(path):
        if f.suffix == ".txt":
            read_text_file(f, HEAD_BYTES)
        elif f.suffix == ".jsonl":
            with f.open("rb") as fh:
                head = fh.read(HEAD_BYTES)
                lines = head.split(b"\n")
                if fh.read(1):
                    lines = lines[:-1]  # the head ends inside a line
            for _ in _jsonl_rows(lines, f):
                pass
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                names = pq.ParquetFile(f).schema_arrow.names
            except Exception as e:
                raise VacError(f"{f} is not a readable Parquet file ({type(e).__name__}: {str(e)[:200]}); expected "
                               "a Parquet table with a 'text' or 'messages' column") from None
            if "text" not in names and "messages" not in names:
                raise VacError(f"{f} has neither a 'text' nor a 'messages' column (columns: {names[:10]})")
        else:
            raise VacError(f"unsupported data file {f} ({flag}); use .txt, .jsonl or .parquet")


def record_text(row: dict, tokenizer, where: str = "") -> str | None:
    """A record's text: its ``text`` field, or its ``messages`` rendered with the chat template."""
    if not isinstance(row, dict):
        raise VacError(f"{where}: records must be mappings with 'text' or 'messages', got {type(row).__name__}")
    if isinstance(row.get("text"), str):
        text = row["text"].strip()
        check_text(text, where)
        return text or None
    if isinstance(row.get("messages"), list):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise VacError(f"{where}: conversation records need a tokenizer with a chat template")
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        check_text(text, where)
        return text
    raise VacError(f"{where}: record has neither a 'text' string nor a 'messages' list "
                   f"(keys: {sorted(row)})")


def _hub_documents(source: str, tokenizer) -> Iterator[str]:
    import datasets

    name, _, split = source.partition("@")
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split or "train", streaming=True)
        it = iter(ds)
        first = next(it)
    except StopIteration:
        raise VacError(f"dataset {source!r} is empty") from None
    except Exception as e:
        raise VacError(f"could not stream dataset {source!r} from the Hugging Face Hub "
                       f"({type(e).__name__}); check the id and network access (offline?), or use a local "
                       "file, a folder, or 'bundled'") from None
    for row in itertools.chain([first], it):
        doc = record_text(row, tokenizer, where=source)
        if doc:
            yield doc


# --- token blocks ------------------------------------------------------------------------------


def split_documents(source: str, split: str, shared: bool, tokenizer=None) -> Iterator[str]:
    """Documents of one split. ``shared``: calibration and evaluation read the same source. The
    bundled corpus is always split, per domain."""
    if bundled_domains(source) is not None:
        yield from bundled_documents(source, split)
        return
    for i, doc in enumerate(iter_documents(source, tokenizer)):
        is_eval = i % EVAL_EVERY == EVAL_EVERY - 1
        if not shared or split == "all" or (split == "eval") == is_eval:
            yield doc


def token_blocks(source: str, tokenizer, n_blocks: int, seq_len: int, *, split: str = "all",
                 shared: bool = False, seed: int = 0, skip_blocks: int = 0) -> torch.Tensor:
    """``n_blocks`` x ``seq_len`` token ids from a source split.

    Documents are shuffled with ``seed``, joined with EOS and cut into blocks, so blocks cross
    document boundaries the way pre-training data does. ``skip_blocks`` drops the first blocks
    (e.g. to keep a search's held-out slice apart from the calibration blocks). A bundled mixture
    draws each domain's share of the blocks from that domain alone and interleaves them.
    """
    domains = bundled_domains(source)
    if domains is not None and len(domains) > 1:
        return domain_blocks(source, tokenizer, n_blocks, seq_len, split=split, seed=seed,
                             skip_blocks=skip_blocks, per_domain=False)[0]
    need = (n_blocks + skip_blocks) * seq_len
    docs = list(split_documents(source, split, shared, tokenizer)) if domains is not None or \
        Path(source).expanduser().exists() else _take_streamed(source, split, shared, tokenizer, need)
    if not docs:
        raise VacError(f"data source {source!r} ({split} split) has no usable text")
    random.Random(seed).shuffle(docs)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
        ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise VacError(f"data source {source!r} ({split} split) has {len(ids)} tokens; "
                       f"{n_blocks + skip_blocks} blocks of {seq_len} need {need}. Use fewer samples "
                       "(--calib-samples/--eval-samples), a shorter --seq-len, or more text")
    t = torch.tensor(ids[:need], dtype=torch.long).view(n_blocks + skip_blocks, seq_len)
    return t[skip_blocks:]


def evaluation_blocks(source: str, tokenizer, n_blocks: int, seq_len: int, *, shared: bool,
                      seed: int = 0) -> tuple[torch.Tensor, list[str] | None]:
    """Evaluation blocks and the domain of each: for a bundled mixture ``n_blocks`` of every domain
    (an evaluation per domain), otherwise ``n_blocks`` of the source's evaluation split and None."""
    if len(bundled_domains(source) or ()) > 1:
        return domain_blocks(source, tokenizer, n_blocks, seq_len, split="eval", seed=seed)
    return token_blocks(source, tokenizer, n_blocks, seq_len, split="eval", shared=shared, seed=seed), None


def domain_blocks(source: str, tokenizer, n_blocks: int, seq_len: int, *, split: str = "all", seed: int = 0,
                  skip_blocks: int = 0, per_domain: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Blocks of a bundled selection and the domain of each. ``per_domain``: ``n_blocks`` from every
    domain (an evaluation per domain); otherwise ``n_blocks`` in all, shared by the domains' weights.
    Each domain's blocks come from its own documents; the rows are interleaved."""
    domains = bundled_domains(source)
    if domains is None:
        raise VacError(f"{source!r} is not a bundled source; per-domain blocks need 'bundled' or 'bundled:...'")
    counts = {d: n_blocks for d in domains} if per_domain else mixture_counts(domains, n_blocks)
    skips = {d: skip_blocks for d in domains} if per_domain else mixture_counts(domains, skip_blocks)
    parts = {d: token_blocks(f"{BUNDLED}:{d}", tokenizer, counts[d], seq_len, split=split, seed=seed,
                             skip_blocks=skips[d]) for d in domains if counts[d]}
    return interleave(parts)


def _take_streamed(source, split, shared, tokenizer, need_tokens) -> list[str]:
    # A streamed source is read only until it has (roughly) enough tokens: ~4 characters per token.
    docs, chars = [], 0
    for doc in split_documents(source, split, shared, tokenizer):
        docs.append(doc)
        chars += len(doc)
        if chars > 6 * need_tokens:
            break
    return docs


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vac.data", description="Manage VAC's bundled data.")
    p.add_argument("command", choices=["fetch"], help="fetch: download and extract the bundled corpus (every domain)")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    args = p.parse_args(argv)
    from vac import corpus

    return corpus.main(["fetch"] + (["--force"] if args.force else []))


if __name__ == "__main__":
    raise SystemExit(main())
