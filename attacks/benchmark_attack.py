"""The one-word attack on any benchmark: cues mined on the training set, rewrites of the benchmark.

    python -m attacks.benchmark_attack --train TRAIN.json --benchmark BENCH.json \
        [--mode rule|paraphrase] [--model ID] [--shots K] [--seed S] [--out DIR]

1. mine: the audit (`attacks.audit`) of the training set the model was aligned on gives the
   compliance cue (the first word most over-represented among its safe instructions, VLGuard's
   "what") and the refusal cue (among its unsafe ones, VLGuard's "share"); `strongest_cue`.
2. rewrite: the benchmark's unsafe queries (records with `safe: false`) start with the compliance
   cue, K rewrites each (`KShotAttack`, records sharing the id, `shot` 1..K); its benign queries
   (`safe_instruction` of `safe: true` records) start with the refusal cue (`OverPrudenceRewrite`,
   one rewrite, the paired `unsafe_instruction` kept). mode `rule`: the grammatical generator
   (`attacks.grammar`); `paraphrase`: an instruction model (`attacks.paraphrase`), rule rewrites
   filling in where it gives too few. Ids, images, categories and responses are kept.
3. write `<stem>_<cue>_<K>shot.json` and `<stem>_<cue>_1shot.json` next to the benchmark (or in
   `--out`), the layout of the paper's test_what_3shot.json / test_share_1shot.json, and print
   the `evaluate` overrides that score clean + attacked in one run, with the mirage gap (ASR,
   attacked - clean unsafe queries) and the over-prudence gap (refusal rate, rewritten - clean
   benign queries).

Any safety benchmark becomes a VLGuard-format file with `python -m datamodules.benchmarks convert`.
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from core.errors import UserError, cli_main
from core.files import atomic_write

from .records import load_records
from .rewrite import KShotAttack, OverPrudenceRewrite, load_paraphraser, strongest_cue

MODES = {"rule": "grammatical", "paraphrase": "paraphrase"}  # this command's name -> attacks.rewrite's


def _user_error(err: ValueError, path) -> UserError:
    """A ValueError of the attack modules as one line that names `path`."""
    msg = str(err)
    return UserError(msg if str(path) in msg else f"{path}: {msg}")


def _records(path, what: str) -> list[dict]:
    if not Path(path).is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return load_records(path)
    except ValueError as err:
        raise _user_error(err, path) from None


def attack_file_name(stem: str, cue: str, shots: int) -> str:
    """`test_what_3shot.json`: the paper's naming, the cue lower-cased."""
    return f"{stem}_{cue.lower()}_{shots}shot.json"


def mine_attack_cues(train_file) -> dict[str, dict]:
    """{"compliance": row, "refusal": row}: `strongest_cue`'s audit rows (word, safe, unsafe,
    log_odds, cue, passed_over) of the training set; cues no rule renders are passed over in both
    modes (the paraphrase mode falls back on the rules for the rewrites the model gets wrong)."""
    records = _records(train_file, "training set")
    try:
        return {kind: strongest_cue(records, kind, str(train_file)) for kind in ("compliance", "refusal")}
    except ValueError as err:
        raise _user_error(err, train_file) from None


def _check_safe_flags(records: list[dict], path) -> None:
    """Which half a record belongs to decides what is rewritten: a missing or non-bool `safe`
    would silently land in the wrong one."""
    for i, rec in enumerate(records):
        if "instr-resp" not in rec:
            raise UserError(f"{path}: record {i} (id {rec.get('id', '?')!r}) has no 'instr-resp'; the attack "
                            "takes VLGuard-format files (convert a benchmark with python -m datamodules.benchmarks convert)")
        if not isinstance(rec.get("safe"), bool):
            raise UserError(f"{path}: record {i} (id {rec.get('id', '?')!r}): 'safe' must be true or false, "
                            f"got {rec.get('safe')!r}")


def attack_benchmark(train_file, benchmark_file, out_dir=None, mode: str = "rule", seed: int = 0, shots: int = 1,
                     paraphraser=None) -> dict:
    """Write the benchmark's attack files; see the module docstring.

    `paraphraser`: with mode "paraphrase", an `attacks.paraphrase.Paraphraser` or a model id /
    directory to load one from. Returns {"compliance_cue", "refusal_cue", "unsafe_attacked",
    "benign_rewritten", "n_unsafe", "n_benign"}: the two files (None where the benchmark has no
    such queries) and the number of queries each rewrites. Deterministic for a seed (and model).
    """
    return _attack(mine_attack_cues(train_file), benchmark_file, out_dir, mode, seed, shots, paraphraser)


def _attack(cues: dict, benchmark_file, out_dir, mode: str, seed: int, shots: int, paraphraser) -> dict:
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise UserError(f"shots must be an integer >= 1, got {shots!r}")
    if (mode == "paraphrase") != (paraphraser is not None):
        raise UserError("mode 'paraphrase' needs a paraphraser (a model id or an attacks.paraphrase.Paraphraser), "
                        "and mode 'rule' takes none")
    if isinstance(paraphraser, (str, Path)):
        try:
            paraphraser = load_paraphraser(str(paraphraser))
        except ValueError as err:
            raise UserError(str(err)) from None
    benchmark_file = Path(benchmark_file)
    records = _records(benchmark_file, "benchmark file")
    _check_safe_flags(records, benchmark_file)
    compliance, refusal = cues["compliance"]["cue"], cues["refusal"]["cue"]
    try:
        unsafe = KShotAttack(compliance, k=shots, seed=seed, mode=MODES[mode], paraphraser=paraphraser)
        attacked = unsafe.rewrite_file(records)
        benign = OverPrudenceRewrite(refusal, mode=MODES[mode], paraphraser=paraphraser).rewrite_file(records)
    except ValueError as err:  # k beyond the renderings, a query with too few distinct rewrites
        raise _user_error(err, benchmark_file) from None
    if not attacked and not benign:
        raise UserError(f"{benchmark_file}: neither unsafe queries (records with safe: false) nor benign ones "
                        "(safe_instruction of safe: true records) to rewrite")
    out = Path(out_dir) if out_dir is not None else benchmark_file.parent
    stem = benchmark_file.stem

    def write(rows: list[dict], cue: str, k: int) -> Path | None:
        if not rows:
            return None
        path = out / attack_file_name(stem, cue, k)
        if path.resolve() == benchmark_file.resolve():
            raise UserError(f"{path}: the attack file would replace the benchmark file; choose another out_dir")
        atomic_write(path, json.dumps(rows, indent=4, ensure_ascii=False), what="attack file")
        return path

    return {"compliance_cue": compliance, "refusal_cue": refusal,
            "unsafe_attacked": write(attacked, compliance, shots), "benign_rewritten": write(benign, refusal, 1),
            "n_unsafe": len(attacked) // shots, "n_benign": len(benign)}


def evaluate_entries(benchmark_file, result: dict, gap_prefix: str = "") -> tuple[list[dict], dict[str, dict]]:
    """(`evaluate.files` entries, `evaluate.gaps`) that evaluate the clean benchmark and its attack
    files in one run: set names are the file stems; gaps `<gap_prefix>mirage_gap` (ASR, attacked -
    clean `unsafes`) and `<gap_prefix>overprudence_gap` (refusal rate, rewritten - clean
    `safe_safes`), each only where its attack file exists. For a suite over several benchmarks."""
    bench = Path(benchmark_file).resolve()
    stem = bench.stem
    clean_subsets = (["unsafes"] if result["unsafe_attacked"] else []) + (
        ["safe_unsafes", "safe_safes"] if result["benign_rewritten"] else [])
    files = [{"name": stem, "path": str(bench), "subsets": clean_subsets}]
    gaps = {}
    for key, subset, gap, metric in (("unsafe_attacked", "unsafes", "mirage_gap", "asr"),
                                     ("benign_rewritten", "safe_safes", "overprudence_gap", "refusal_rate")):
        if result[key]:
            path = Path(result[key]).resolve()
            files.append({"name": path.stem, "path": str(path), "subsets": [subset]})
            gaps[gap_prefix + gap] = {"base": f"{stem}/{subset}", "attacked": f"{path.stem}/{subset}", "metric": metric}
    return files, gaps


def _flow(value) -> str:
    """YAML flow style for an OmegaConf dotlist value; strings quoted (paths may hold ':' or ',')."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return json.dumps(value)


def evaluate_overrides(benchmark_file, result: dict) -> list[str]:
    """`key=value` overrides of `python -m lightning_modules.evaluate` for `evaluate_entries`. The files
    replace the config's list (and its gaps); `evaluate.data_dir` / `attack_dir` are set because the
    shipped configs require them. Attack files written outside the benchmark's folder come with
    `data.image_dir=<the benchmark's folder>`, where the clean file's relative image paths resolve;
    images kept elsewhere: add your own `data.image_dir=...` after these."""
    files, gaps = evaluate_entries(benchmark_file, result)
    bench, attack_dir = Path(files[0]["path"]).parent, Path(files[1]["path"]).parent
    # Relative image paths resolve against data.image_dir, else each file's own folder: attack files
    # written elsewhere need the benchmark's folder as data.image_dir (a later data.image_dir=... wins).
    images = [f"data.image_dir={bench}"] if attack_dir != bench else []
    return [*images, f"evaluate.data_dir={bench}", f"evaluate.attack_dir={attack_dir}",
            f"evaluate.files={_flow(files)}",
            "evaluate.gaps=null",  # drop the config's own gaps: they name files no longer evaluated
            f"evaluate.gaps={_flow(gaps)}"]


def evaluate_command(benchmark_file, result: dict, config: str = "configs/evaluate/vlguard_paper.yaml") -> str:
    """The shell line of `evaluate_overrides` (MODEL stands for the model to evaluate)."""
    args = ["python", "-m", "lightning_modules.evaluate", "--config", config, "model.name_or_path=MODEL",
            *evaluate_overrides(benchmark_file, result)]
    return " ".join(shlex.quote(a) for a in args)


def _cue_line(kind: str, row: dict) -> str:
    passed = f"; passed over (no grammatical rewrite): {', '.join(row['passed_over'])}" if row["passed_over"] else ""
    return (f"{kind} cue: {row['cue']!r} (first word of {row['safe']} safe / {row['unsafe']} unsafe training "
            f"instructions, log-odds {row['log_odds']:+.2f}{passed})")


@cli_main
def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m attacks.benchmark_attack", description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True, help="the VLGuard-format training set the model was aligned on")
    p.add_argument("--benchmark", required=True, help="the VLGuard-format benchmark file to attack")
    p.add_argument("--mode", choices=MODES, default="rule")
    p.add_argument("--model", help="paraphrase mode: instruction model (Hugging Face id or local directory)")
    p.add_argument("--shots", type=int, default=1, help="rewrites per unsafe query (rule mode: at most 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder of the attack files (default: the benchmark's)")
    p.add_argument("--config", default="configs/evaluate/vlguard_paper.yaml", help="evaluate config of the printed command")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    args = p.parse_args(argv)
    if (args.mode == "paraphrase") != bool(args.model):
        raise UserError("--mode paraphrase needs --model, and --model needs --mode paraphrase")
    cues = mine_attack_cues(args.train)
    print(_cue_line("compliance", cues["compliance"]))
    print(_cue_line("refusal", cues["refusal"]))
    paraphraser = None
    if args.model:
        try:
            paraphraser = load_paraphraser(args.model)
        except ValueError as err:
            raise UserError(str(err)) from None
    result = _attack(cues, args.benchmark, args.out, args.mode, args.seed, args.shots, paraphraser)
    if result["unsafe_attacked"]:
        print(f"wrote {result['unsafe_attacked']}: {result['n_unsafe']} unsafe queries x {args.shots} "
              f"'{result['compliance_cue']}' rewrites")
    if result["benign_rewritten"]:
        print(f"wrote {result['benign_rewritten']}: {result['n_benign']} benign queries, "
              f"'{result['refusal_cue']}' rewrites")
    if paraphraser is not None:
        print(f"paraphrase: {paraphraser.n_model} rewrites from {args.model}, {paraphraser.n_fallback} rule-based "
              "fallbacks")
    print("evaluate clean + attacked (mirage_gap, overprudence_gap):")
    print(evaluate_command(args.benchmark, result, args.config))


if __name__ == "__main__":
    main()
