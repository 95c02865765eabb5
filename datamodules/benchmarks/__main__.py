"""`python -m datamodules.benchmarks convert --kind KIND --path DATA --out FILE.json [--image-dir DIR] [--variant V]`:
a safety benchmark as a VLGuard-format file (what `evaluate.files` and `attacks.rewrite` read).

Unsafe queries become `{id, image, safe: false, harmful_category, instr-resp: [{instruction, response: ""}]}`
with absolute image paths (or parquet image references); the benchmark's variant is kept under
`variant`. `python -m datamodules.benchmarks list` prints the kinds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import UserError, cli_main
from core.files import atomic_write
from datamodules.benchmarks import SAFETY_KINDS, TASK_KINDS, read_task
from datamodules.examples import Example


def vlguard_record(ex: Example) -> dict:
    if ex.safe:
        raise UserError(f"record id={ex.id} is a benign query; a VLGuard-format file pairs each benign query with "
                        "an unsafe one, so only unsafe benchmarks convert (read benign ones with read_task)")
    rec = {"id": ex.id, "image": ex.image, "safe": False, "harmful_category": ex.category or "",
           "instr-resp": [{"instruction": ex.instruction, "response": ""}]}
    return rec | ({"variant": ex.extra["variant"]} if "variant" in ex.extra else {})


def convert(kind: str, path: str, out: Path, image_dir=None, variant=None) -> int:
    if kind not in SAFETY_KINDS:
        raise UserError(f"convert takes a safety benchmark ({', '.join(SAFETY_KINDS)}), not {kind!r}")
    records = [vlguard_record(ex) for ex in read_task(kind, path, image_dir, variant=variant)]
    # never a half-written file under the final name; a full disk is one line
    atomic_write(out, json.dumps(records, indent=1, ensure_ascii=False), what="converted benchmark file")
    return len(records)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m datamodules.benchmarks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the benchmark kinds")
    conv = sub.add_parser("convert", help="a safety benchmark -> a VLGuard-format JSON file")
    conv.add_argument("--kind", required=True, choices=SAFETY_KINDS)
    conv.add_argument("--path", required=True, help="the benchmark's files as published")
    conv.add_argument("--out", required=True, type=Path)
    conv.add_argument("--image-dir", default=None)
    conv.add_argument("--variant", default=None, help="MM-SafetyBench: SD | TYPO | SD_TYPO | text; FigStep: figstep | text")
    args = parser.parse_args([a for a in argv if a != "--debug"])  # --debug: cli_main's full tracebacks
    if args.command == "list":
        for name, kind in TASK_KINDS.items():
            print(f"{name:16} {kind.family:16} {kind.description}")
        return
    n = convert(args.kind, args.path, args.out, args.image_dir, args.variant)
    print(f"{n} records -> {args.out}")


if __name__ == "__main__":
    cli_main(main)()
