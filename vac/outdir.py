"""The folder an export goes to: what VAC may write there, what it may replace, and the hidden
siblings an export is assembled in.

Nothing of the user's is deleted: ``--overwrite`` replaces only a previous VAC export
(:func:`check_out_dir`); an export is built in a ``.NAME.tmp-PID-*`` sibling and renamed into
place (:func:`replace_dir`), and the leftovers of a killed run are tidied up, or the previous
export put back, by :func:`clean_interrupted`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from vac.errors import VacError
from vac.files import pid_alive

log = logging.getLogger(__name__)

MODELING_FILES = ("modeling_vac.py",)  # the self-contained modeling code every export ships


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an ``out`` that VAC may not write (checked before the run, and again when the export starts).

    An empty or missing folder is always fine. A non-empty one needs ``overwrite``, and even then
    only a previous VAC export is replaced: a folder holding anything VAC did not write is refused,
    so ``--out ~/models --overwrite`` cannot wipe a user's folder.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise VacError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise VacError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite "
                           "(which replaces only a previous VAC export)")
        foreign = foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            what = (f"holds {shown}, which VAC did not write" if is_vac_export(out) else
                    f"is not a previous VAC export (it holds {shown})")
            raise VacError(f"--out {out} {what}; --overwrite replaces only a previous VAC export (config.json "
                           "with a 'vac' entry, modeling_vac.py, weights, tokenizer, report). Move those files "
                           "away or choose another --out")
    return out


#: what an export writes besides *.safetensors: config and modeling code, tokenizer files (the
#: names transformers' tokenizers save), the report, the card and the plots
EXPORT_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json", *MODELING_FILES,
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
    "README.md", "report.json", "report.md", "ranks.png", "spectra.png", "recover_curves.png"})


def is_vac_export(directory: Path) -> bool:
    """A previous VAC export: config.json with a ``vac`` entry and the modeling code next to it."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "vac" in config and all((directory / n).is_file() for n in MODELING_FILES)


def foreign_entries(directory: Path) -> list[str]:
    """Entries of ``directory`` that an export does not write (everything, if it is no VAC export)."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    if not is_vac_export(directory):
        return names
    return [n for n in names if n not in EXPORT_FILES and not n.endswith(".safetensors")]  # folders end in /


def staging_name(out: Path, kind: str) -> str:
    """Prefix of the hidden siblings an export works in: ``.NAME.tmp-PID-`` (being built) and
    ``.NAME.old-PID-`` (the export being replaced). The pid tells a later run whether the
    process that made one is gone (a leftover, removed) or still running (left alone)."""
    return f".{out.name}.{kind}-{os.getpid()}-"


def _staging_pattern(out: Path) -> re.Pattern:
    # mkdtemp appends 8 characters of [a-z0-9_]; names of VAC before the pid was added had none
    # (probe: the folder validation creates and removes at once to see that it can write there)
    return re.compile(rf"\.{re.escape(out.name)}\.(tmp|old|probe)-(?:(\d+)-)?[a-z0-9_]{{8}}")


def clean_interrupted(out: str | Path) -> list[str]:
    """Tidy up after exports to ``out`` that were killed: returns what was done, one line each.

    Leftover ``.NAME.tmp-*`` folders (an export being assembled) are removed. A leftover
    ``.NAME.old-*`` folder holds the previous export, moved aside for the final rename; if the
    kill came between the two renames, ``out`` is missing and the previous export is put back
    (nothing is lost), otherwise it is removed. Only names of this scheme whose process is
    gone are touched.
    """
    out = Path(out).expanduser()
    if not out.parent.is_dir():
        return []
    pattern, done = _staging_pattern(out), []
    for p in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if not m or not p.is_dir() or (m.group(2) and pid_alive(int(m.group(2)))):
            continue
        if m.group(1) == "old" and (p / "old").is_dir() and not out.exists():
            os.replace(p / "old", out)
            done.append(f"restored the previous export of an interrupted run into {out}")
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p.name}, left by an interrupted run")
    return done


def staging_dir(out: Path) -> Path:
    """A fresh hidden sibling of ``out`` to assemble the export in; leftovers of killed runs go first."""
    for line in clean_interrupted(out):
        log.info(line)
    return Path(tempfile.mkdtemp(prefix=staging_name(out, "tmp"), dir=out.parent))  # (0700 until the rename)


def _ordinary_permissions(directory: Path) -> None:
    """Files as the umask would make them: safetensors writes its files 0600, mkdtemp its folder 0700."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for p in directory.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename the assembled ``tmp`` into place at ``out``; a previous export there is moved aside first
    (into a ``.NAME.old-PID-*`` sibling that :func:`clean_interrupted` restores after a kill) and removed."""
    _ordinary_permissions(tmp)
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=staging_name(out, "old"), dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
