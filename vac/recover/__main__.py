"""``python -m vac.recover``: see vac/recover/cli.py."""

from vac.recover.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
