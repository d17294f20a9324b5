"""Publishing an exported VAC checkpoint to the Hugging Face Hub.

    python -m vac.export DIR --push-to-hub USER/REPO [--dry-run] [--private]

The directory is checked first (a VAC checkpoint: config.json with ``auto_map`` and ``vac``,
safetensors weights, modeling_vac.py); ``--dry-run`` lists what would be uploaded and touches
no network. A real push reads the token from ``HF_TOKEN`` (or ``HUGGING_FACE_HUB_TOKEN``),
creates the repository if needed and uploads every listed file in one commit
(``HfApi.upload_folder``): a failure (offline, bad token, no permission) is a one-line
``VacError`` and leaves no partial commit.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from vac.errors import VacError

TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
REQUIRED = ("config.json", "modeling_vac.py")


@dataclass
class Upload:
    repo_id: str
    files: list[tuple[str, int]]  # (path relative to the folder, bytes)
    url: str | None = None  # the commit URL after a real push

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def checkpoint_files(directory: str | Path) -> list[tuple[str, int]]:
    """The files of a VAC checkpoint that a push uploads, after checking it is one.

    Hidden files and folders (editor files, export staging directories) are left out.
    """
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise VacError(f"{d} is not a directory; pass the --out directory of `python -m vac.compress`")
    missing = [name for name in REQUIRED if not (d / name).is_file()]
    if not list(d.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise VacError(f"{d} is not a VAC checkpoint: missing {', '.join(missing)}")
    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VacError(f"{d / 'config.json'} is not valid JSON: {e}") from None
    if "vac" not in config or "AutoModelForCausalLM" not in (config.get("auto_map") or {}):
        raise VacError(f"{d / 'config.json'} lacks the 'vac' and 'auto_map' entries of a VAC checkpoint; "
                       "export it with `python -m vac.compress ... --out DIR`")
    files = []
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append((rel.as_posix(), p.stat().st_size))
    return files


def hub_token() -> str | None:
    for var in TOKEN_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def push_to_hub(directory: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False,
                token: str | None = None, commit_message: str | None = None) -> Upload:
    """Upload ``directory`` to the model repository ``repo_id``; with ``dry_run`` only list it."""
    if not repo_id or repo_id.count("/") > 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise VacError(f"--push-to-hub expects a repository id like 'user/name', got {repo_id!r}")
    files = checkpoint_files(directory)
    upload = Upload(repo_id, files)
    if dry_run:
        return upload
    token = token or hub_token()
    if not token:
        raise VacError(f"no Hugging Face token: set {TOKEN_VARS[0]} (a token with write access) and retry; "
                       "nothing was uploaded")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(Path(directory).expanduser()),
                                 allow_patterns=[glob.escape(name) for name, _ in files],
                                 commit_message=commit_message or "Upload VAC-compressed checkpoint")
    except Exception as e:  # offline mode, network, authentication, permissions: all end the same way
        raise VacError(f"could not upload to the Hub repository {repo_id!r} ({_reason(e)}); "
                       "nothing was uploaded. Check the network, HF_HUB_OFFLINE and the token's write access"
                       ) from None
    upload.url = getattr(info, "commit_url", None) or str(info)
    return upload


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vac.export",
        description="Publish an exported VAC checkpoint directory to the Hugging Face Hub "
                    f"(token from ${TOKEN_VARS[0]}).")
    parser.add_argument("directory", help="the checkpoint directory written by `python -m vac.compress --out DIR`")
    parser.add_argument("--push-to-hub", metavar="REPO", required=True, help="target model repository, user/name")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded, upload nothing")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        upload = push_to_hub(args.directory, args.push_to_hub, private=args.private, dry_run=args.dry_run)
    except VacError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(name) for name, _ in upload.files)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(upload.files)} files ({_human(upload.total_bytes)}) to {upload.repo_id}:")
    for name, size in upload.files:
        print(f"  {name:<{width}}  {_human(size):>9}")
    if upload.url:
        print(upload.url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
