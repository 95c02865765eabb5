"""VLGuard, end to end: fetch it from the Hugging Face Hub, check it and prepare a directory that a
run reads with `data.kind=vlguard data.root=DIR`.

    python -m datamodules.vlguard fetch --out RAW            # train.json, test.json, train/, test/
    python -m datamodules.vlguard prepare --src RAW --out DIR [--val-fraction 0.1] [--seed 0] [--skip-bad]

`prepare` checks every record (one-line errors naming the file and record) and every image (missing
or corrupt: it stops and names the first offenders, or with `--skip-bad` drops their records and
reports them), makes ids unique, and writes in VLGuard format, image paths relative to DIR:

- `train.json` / `val.json`: the training file minus a seeded validation split (VLGuard has none),
  stratified by subset (safe / unsafe record) and harmful category; records that share an image stay
  on one side;
- `test.json`: the test file;
- `retain.json`: the safe training records (the unlearning methods keep their safe instruction and
  its answer);
- `forget_queries.json`: every unsafe training query (`unsafes` and the unsafe half of safe records)
  with an empty response. VLGuard's responses to them are refusals, which cannot be forgotten: the
  harmful answers come from the base model itself (`data.forget_retain.forget_source=harvest`);
- `prepared.json`: the manifest (seed, fraction, counts per split, dropped records, renamed ids).
"""

from __future__ import annotations

import argparse
import json
import os
import zipfile
from collections import Counter
from pathlib import Path
from typing import Optional

from PIL import Image

from core.errors import UserError, cli_main
from core.files import atomic_write
from datamodules.examples import load_json_list, stratified_sample, vlguard_examples

HUB_REPO = "ys-zong/VLGuard"
HUB_FILES = ("train.json", "test.json", "train.zip", "test.zip")
MANIFEST = "prepared.json"
FORMAT = "safety-mirage/vlguard-prepared"
SHOWN = 3  # offenders named in a one-line error


# -- fetch ------------------------------------------------------------------------------------------
def _extract(archive: Path, dest: Path) -> None:
    """Unzip `archive` into `dest`, refusing members that would land outside it."""
    root = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                target = (root / member).resolve()
                if root not in target.parents and target != root:
                    raise UserError(f"{archive}: member {member!r} would be written outside {dest}")
            zf.extractall(dest)
    except zipfile.BadZipFile as err:
        raise UserError(f"{archive}: not a zip archive ({err}); delete it and fetch again") from err


def fetch(out: Path, revision: Optional[str] = None) -> Path:
    """Download VLGuard's JSON files and image archives into `out` and unzip the archives there."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:
        raise UserError("fetching VLGuard needs huggingface_hub: pip install huggingface_hub") from err
    out.mkdir(parents=True, exist_ok=True)
    for name in HUB_FILES:
        try:
            path = Path(hf_hub_download(HUB_REPO, name, repo_type="dataset", revision=revision, local_dir=out))
        except Exception as err:  # offline mode, no network, gated repo, missing file: all one line
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise UserError(
                f"cannot download {name} of dataset {HUB_REPO} from the Hugging Face Hub ({type(err).__name__}: "
                f"{reason}). Check the network and HF_HUB_OFFLINE, accept the dataset's terms on its Hub page and "
                f"log in (hf auth login), or copy {', '.join(HUB_FILES)} into {out} by hand") from err
        if path.suffix == ".zip":
            _extract(path, out)
    print(f"VLGuard in {out}; next: python -m datamodules.vlguard prepare --src {out} --out DIR")
    return out


# -- checks -----------------------------------------------------------------------------------------
def image_problem(path: Path) -> Optional[str]:
    """None if the image decodes, else "missing" or "corrupt (...)". Decoding the whole image (not
    only its header) catches truncated files before a training step does."""
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return f"corrupt ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'})"
    return None


def check_records(path: Path) -> list[dict]:
    """The records of a VLGuard file, each checked (one-line error naming the file and record)."""
    records = load_json_list(path)
    vlguard_examples(path)  # every record parses as the training code reads it
    for i, rec in enumerate(records):
        if not isinstance(rec.get("image"), str) or not rec["image"]:
            raise UserError(f"{path}: record {i} (id={rec.get('id')!r}) has no 'image' path")
        if not isinstance(rec.get("safe"), bool):
            raise UserError(f"{path}: record {i} (id={rec.get('id')!r}) has a non-boolean 'safe': {rec.get('safe')!r}")
    return records


def find_image_dir(records: list[dict], candidates: list[Path], label: str) -> Path:
    """The first candidate folder under which most of the records' images exist."""
    sample = records[:50]
    for folder in candidates:
        if sum((folder / r["image"]).is_file() for r in sample) * 2 > len(sample):
            return folder
    raise UserError(f"cannot find the {label} images: none of {', '.join(str(c) for c in candidates)} holds "
                    f"{sample[0]['image']!r}; unzip {label}.zip there or pass --{label}-images DIR")


def bad_images(records: list[dict], image_dir: Path) -> list[tuple[int, str, str]]:
    """(record index, image path, problem) of every record whose image is missing or corrupt."""
    problems: dict[str, Optional[str]] = {}
    out = []
    for i, rec in enumerate(records):
        if rec["image"] not in problems:
            problems[rec["image"]] = image_problem(image_dir / rec["image"])
        if problems[rec["image"]]:
            out.append((i, str(image_dir / rec["image"]), problems[rec["image"]]))
    return out


def unique_ids(records: list[dict]) -> list[dict]:
    """Records with unique ids: a repeated id (VLGuard's train.json has one) gets `#2`, `#3`..."""
    seen: Counter = Counter()
    renamed = []
    for rec in records:
        seen[rec["id"]] += 1
        if seen[rec["id"]] > 1:
            renamed.append({"from": rec["id"], "to": f"{rec['id']}#{seen[rec['id']]}"})
            rec["id"] = renamed[-1]["to"]
    return renamed


# -- split ------------------------------------------------------------------------------------------
def split_key(rec: dict) -> tuple[str, str]:
    """Stratum of a record: its subset (safe / unsafe) and harmful category."""
    return ("safe", "") if rec["safe"] else ("unsafe", str(rec.get("harmful_category") or ""))


def validation_split(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val): a seeded, stratified share of the records, whole image groups at a time."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec["image"], []).append(rec)
    units = list(groups.values())
    held = stratified_sample(units, round(fraction * len(units)), seed, lambda unit: split_key(unit[0]))
    held_ids = {id(unit) for unit in held}
    train = [rec for unit in units if id(unit) not in held_ids for rec in unit]
    val = [rec for unit in held for rec in unit]
    return train, val


def forget_queries(records: list[dict]) -> list[dict]:
    """Every unsafe query as an unsafe record with an empty response (to be harvested)."""
    out = []
    for rec in records:
        if rec["safe"]:
            item = rec["instr-resp"][1]
            out.append({"id": rec["id"], "image": rec["image"], "safe": False, "source_subset": "safe_unsafes",
                        "instr-resp": [{"instruction": item["unsafe_instruction"], "response": ""}]})
        else:
            out.append({**{k: v for k, v in rec.items() if k != "instr-resp"}, "source_subset": "unsafes",
                        "instr-resp": [{"instruction": rec["instr-resp"][0]["instruction"], "response": ""}]})
    return out


def counts(records: list[dict]) -> dict:
    return {"records": len(records), "safe": sum(r["safe"] for r in records),
            "unsafe": sum(not r["safe"] for r in records),
            "categories": dict(sorted(Counter(r.get("harmful_category") for r in records if not r["safe"]).items()))}


# -- prepare ----------------------------------------------------------------------------------------
def _write(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1, ensure_ascii=False), what="prepared VLGuard file")


def _relocate(records: list[dict], image_dir: Path, out: Path) -> list[dict]:
    """Copies of `records` whose image paths are relative to `out` (where the prepared files live)."""
    rel = Path(os.path.relpath(image_dir.resolve(), out.resolve()))
    return [{**rec, "image": (rel / rec["image"]).as_posix()} for rec in records]


def prepare(src: Path, out: Path, val_fraction: float = 0.1, seed: int = 0, skip_bad: bool = False,
            train_images: Optional[Path] = None, test_images: Optional[Path] = None) -> dict:
    """Check `src` (train.json, test.json and their images) and write the prepared directory `out`."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    splits = {}
    dropped = {}
    renamed = {}
    for label, given in (("train", train_images), ("test", test_images)):
        path = src / f"{label}.json"
        records = check_records(path)
        image_dir = given or find_image_dir(records, [src / label, src], label)
        bad = bad_images(records, image_dir)
        if bad and not skip_bad:
            shown = "; ".join(f"record {i} (id={records[i]['id']!r}): {p} {why}" for i, p, why in bad[:SHOWN])
            raise UserError(f"{path}: {len(bad)} of {len(records)} records have a missing or corrupt image "
                            f"(first: {shown}); fix them or pass --skip-bad to drop those records")
        bad_index = {i for i, _, _ in bad}
        dropped[label] = [{"id": records[i]["id"], "image": p, "problem": why} for i, p, why in bad]
        records = [rec for i, rec in enumerate(records) if i not in bad_index]
        if not records:
            raise UserError(f"{path}: no record left after dropping those with bad images")
        renamed[label] = unique_ids(records)
        splits[label] = _relocate(records, image_dir, out)
    train, val = validation_split(splits["train"], val_fraction, seed)
    files = {"train": train, "val": val, "test": splits["test"],
             "retain": [r for r in train if r["safe"]], "forget_queries": forget_queries(train)}
    for name, records in files.items():
        _write(out / f"{name}.json", records)
    manifest = {"format": FORMAT, "version": 1, "source": str(src.resolve()), "seed": seed,
                "val_fraction": val_fraction, "stratified_by": ["subset (safe/unsafe)", "harmful_category"],
                "files": {name: f"{name}.json" for name in files},
                "counts": {name: counts(files[name]) for name in ("train", "val", "test")},
                "dropped": dropped, "renamed_ids": renamed,
                "forget_note": "forget_queries.json holds the unsafe training queries without answers: "
                               "set data.forget_retain.forget_source=harvest"}
    _write(out / MANIFEST, manifest)
    return manifest


def read_manifest(root: str | Path) -> dict:
    """The manifest of a prepared directory, checked; paths in `files` made absolute."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"data.root={root} is not a prepared VLGuard directory (no {MANIFEST}); "
                        f"run: python -m datamodules.vlguard prepare --src RAW --out {root}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: malformed JSON at line {err.lineno}: {err.msg}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a manifest written by `python -m datamodules.vlguard prepare`")
    files = {name: root / rel for name, rel in manifest.get("files", {}).items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing or not {"train", "val"} <= files.keys():
        raise UserError(f"{path}: prepared file(s) missing: {', '.join(missing) or 'train/val'}; run prepare again")
    return {**manifest, "files": files}


def whole_train_files(files: dict, out: Path) -> tuple[Path, Path]:
    """(train, retain) files holding a prepared directory's train and val records together: the whole
    VLGuard train.json (written under `out`, image paths made relative to it)."""
    records = {}
    for name in ("train", "val"):
        folder = files[name].parent
        for rec in load_json_list(files[name]):
            rel = Path(os.path.relpath((folder / rec["image"]).resolve(), out.resolve())).as_posix()
            records.setdefault(rec["id"], {**rec, "image": rel})
    rows = list(records.values())
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "train_whole.json", rows)
    _write(out / "retain_whole.json", [r for r in rows if r["safe"]])
    return out / "train_whole.json", out / "retain_whole.json"


def build_forget_retain(args) -> dict:
    """The `build-forget-retain` command: the judge (if any) loaded here, the rest is data."""
    from datamodules import official_pipeline as official

    files = read_manifest(args.root)["files"]
    if "retain" not in files:
        raise UserError(f"{args.root}: no retain.json in the manifest; run prepare again")
    judge = None
    if args.judge_model:
        from models.chat_judge import ChatJudge

        judge = ChatJudge.from_pretrained(args.judge_model, dtype=args.judge_dtype, device=args.judge_device,
                                          decoding=args.judge_decoding)
        import torch

        torch.manual_seed(args.seed)  # the checkpoint's sampling (decoding=checkpoint) is reproducible
    words = [w.strip() for w in args.general_blocklist.split(",") if w.strip()]
    train, retain = files["train"], files["retain"]
    if args.whole_train_file:  # the official split reads the whole train.json (split_forget_retain.py:47-68)
        train, retain = whole_train_files(files, args.out)
    report = official.build(train, retain, args.out, list(args.answers), args.general, judge,
                            args.halves, args.target_size, args.seed,
                            keep=official.blocklist_filter(words) if words else None)
    print(f"forget: {report['kept']} of {report['queries']} queries ({report['generators']} generator(s), "
          f"{report['selection']}); retain: {report['retain']} ({report['retain_vlguard']} VLGuard + "
          f"{report['retain_general']} general) -> {args.out}")
    print(f"train with data.forget_retain.forget_file={args.out / 'train_forget.json'} (RMU: "
          f"train_forget_qa_full.json) data.forget_retain.retain_file={args.out / 'train_retain_mixed.json'}")
    return report


# -- command line -----------------------------------------------------------------------------------
@cli_main
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m datamodules.vlguard", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    f = commands.add_parser("fetch", help=f"download {HUB_REPO} (JSON files and image archives) and unzip it")
    f.add_argument("--out", required=True, type=Path)
    f.add_argument("--revision", help="a Hub commit or tag (default: the main branch)")
    p = commands.add_parser("prepare", help="check the data and write train/val/test + forget/retain files")
    p.add_argument("--src", required=True, type=Path, help="folder with train.json, test.json and their images")
    p.add_argument("--out", required=True, type=Path, help="the prepared directory (data.root)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of training records held out (0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true", help="drop records with a missing or corrupt image")
    p.add_argument("--train-images", type=Path, help="folder the train.json image paths are relative to")
    p.add_argument("--test-images", type=Path, help="folder the test.json image paths are relative to")
    b = commands.add_parser("build-forget-retain", help="the official forget/retain files (LLaVA format) from a "
                            "prepared directory and the generators' answers (datamodules/official_pipeline.py)")
    b.add_argument("--root", required=True, type=Path, help="a prepared VLGuard directory")
    b.add_argument("--out", required=True, type=Path, help="where train_forget.json etc. are written")
    b.add_argument("--answers", required=True, type=Path, nargs="+",
                   help="one answers file per generator model ({image: answer} JSON, or a harvest file)")
    b.add_argument("--general", type=Path, help="LLaVA-format general file (e.g. LLaVA-665K) topping up retain")
    b.add_argument("--general-blocklist", default="", help="comma-separated words: general records containing "
                   "one are left out (a safety filter)")
    b.add_argument("--judge-model", help="chat LLM (Hub id or local dir) picking the most harmful answer; "
                   "without it: the first answer that is not a keyword refusal")
    b.add_argument("--judge-decoding", default="checkpoint", choices=("checkpoint", "greedy"),
                   help="checkpoint: the judge's own generation_config, as the official script (Llama-2-chat "
                   "samples); greedy: deterministic")
    b.add_argument("--whole-train-file", action="store_true", help="forget/retain from train.json and val.json "
                   "together (= VLGuard's whole train.json, as the official split); default: train.json only")
    b.add_argument("--judge-dtype", default="auto")
    b.add_argument("--judge-device", help="e.g. cuda (default: where transformers puts it)")
    b.add_argument("--halves", default="unsafes", choices=("unsafes", "both"),
                   help="unsafes: safe=False records only (official); both: also safe records' unsafe half")
    b.add_argument("--target-size", type=int, default=2000, help="retain rows after the top-up (official 2000)")
    b.add_argument("--seed", type=int, default=42, help="top-up draw and shuffle (official 42)")
    for sub in (f, p, b):
        sub.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch(args.out, args.revision)
        return
    if args.command == "build-forget-retain":
        build_forget_retain(args)
        return
    m = prepare(args.src, args.out, args.val_fraction, args.seed, args.skip_bad, args.train_images, args.test_images)
    for name in ("train", "val", "test"):
        c = m["counts"][name]
        print(f"{name}: {c['records']} records ({c['safe']} safe, {c['unsafe']} unsafe: "
              + ", ".join(f"{k} {v}" for k, v in c["categories"].items()) + ")")
    for label, rows in m["dropped"].items():
        if rows:
            print(f"dropped {len(rows)} {label} record(s) with a bad image: "
                  + "; ".join(f"id={r['id']} {r['problem']}" for r in rows[:SHOWN]) + (" ..." if len(rows) > SHOWN else ""))
    for label, rows in m["renamed_ids"].items():
        if rows:
            print(f"renamed {len(rows)} repeated {label} id(s): " + ", ".join(f"{r['from']} -> {r['to']}" for r in rows))
    print(f"prepared {args.out} (manifest {args.out / MANIFEST}); train with data=vlguard data.root={args.out}")


if __name__ == "__main__":
    main()
