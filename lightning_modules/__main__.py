"""One command for all: `safety-mirage <command> --config FILE [key=value ...]` (or
`python -m lightning_modules <command> ...`), the same as `python -m lightning_modules.<command>`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "fit": "align a model and evaluate it (one run)",
    "evaluate": "evaluate one model on VLGuard-format files or a suite",
    "compare": "every method over a seed stack, with intervals",
    "harvest": "the forget set from the base model's own answers",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        asked = not argv or argv[0] in ("-h", "--help")
        width = max(map(len, COMMANDS))
        listing = "\n".join(f"  {name:<{width}}  {doc}" for name, doc in COMMANDS.items())
        print(f"usage: safety-mirage <command> --config FILE [key=value ...]\n\ncommands:\n{listing}",
              file=sys.stdout if asked else sys.stderr)
        raise SystemExit(0 if asked else 2)
    importlib.import_module(f"lightning_modules.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
