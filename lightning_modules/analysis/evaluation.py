"""The evaluate command's logic (`python -m lightning_modules.evaluate`): generate, judge, tabulate.

See the command module for the steps and the outputs."""

from __future__ import annotations

import contextlib

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import pandas as pd
from omegaconf import OmegaConf

from core.checkpoints import read_checkpoint
from core.distributed import accelerator_device
from core.errors import UserError
from core.records import strict_json
from core.files import atomic_write, hold_directory
from datamodules.collate import check_images
from datamodules.examples import Example, vlguard_examples
from lightning_modules.config.loading import to_yaml
from lightning_modules.config.trainer import check_accelerator_exists
from lightning_modules.config.schema import SUBSETS, EvaluateSettings
from lightning_modules.analysis.predict import generate_missing
from models.backbone import is_built_from_config
from metrics.classify import classify
from core.schema import parse_section
from metrics.judges import JUDGES, get_judge
from metrics.samples import SAMPLES, example_key, read_samples, record_key, write_samples
from metrics.tables import build_table, markdown_report, paired_gap
from metrics.vlm_judge import RELEVANT, Judge, JudgeItem, VLMJudge, get_protocol

def read_settings(cfg) -> EvaluateSettings:
    """The `evaluate:` section, checked against EvaluateSettings (types, ranges and choices by the
    schema, as for every section)."""
    settings = parse_section(cfg.evaluate, EvaluateSettings, "evaluate")
    settings.gaps = settings.gaps or {}
    if cfg.model.adapter_path and cfg.model.finetune != "lora":  # else the base model would be scored
        raise UserError(f"model.adapter_path={cfg.model.adapter_path} is only loaded with model.finetune=lora")
    if settings.checkpoint:  # a missing, cut or unsafe checkpoint is refused before config.yaml is rewritten
        if not Path(settings.checkpoint).is_file():
            raise UserError(f"checkpoint not found: {settings.checkpoint}")
        read_checkpoint(Path(settings.checkpoint), label="checkpoint")
    return settings


def parse_settings(cfg) -> EvaluateSettings:
    """The settings of an evaluation of VLGuard-format files (`evaluate.files`), with the checks
    across fields."""
    settings = read_settings(cfg)
    if settings.tasks or settings.models:
        raise UserError("evaluate.files and evaluate.tasks / evaluate.models are two modes: set one")
    if not settings.files:
        raise UserError("evaluate.files is empty: list the VLGuard-format files to evaluate (or evaluate.tasks)")
    names = [f.name for f in settings.files]
    for spec in settings.files:
        if "/" in spec.name or names.count(spec.name) > 1:
            raise UserError(f"evaluate.files name '{spec.name}' must be unique and contain no '/'")
        bad = [s for s in spec.subsets if s not in SUBSETS]
        if bad or not spec.subsets:
            raise UserError(f"evaluate.files '{spec.name}': unknown subset(s) {bad}; choose from {', '.join(SUBSETS)}")
        get_protocol(spec.judge_protocol or settings.judge.protocol)
    evaluated = [f"{f.name}/{s}" for f in settings.files for s in f.subsets]
    for name, gap in settings.gaps.items():
        for row in (gap.base, gap.attacked):
            if row not in evaluated:  # checked now rather than after hours of generation
                raise UserError(f"evaluate.gaps.{name} refers to '{row}', which is not an evaluated "
                                f"set/subset; known: {', '.join(evaluated)}")
    return settings


# -- examples ---------------------------------------------------------------------------------------
def assign_shots(examples: list[Example], path: str) -> None:
    """Records sharing an (id, subset) are K rewrites of one query: number them 1..K in file order
    unless the records carry their own `shot`."""
    groups: dict[tuple[str, str], list[Example]] = {}
    for ex in examples:
        groups.setdefault((ex.id, ex.subset), []).append(ex)
    if all(len(g) == 1 for g in groups.values()):
        return
    for (rid, subset), group in groups.items():
        shots = [ex.shot for ex in group]
        if all(s == 0 for s in shots):
            for k, ex in enumerate(group, 1):
                ex.shot = k
        elif len(set(shots)) < len(shots):
            raise UserError(f"{path}: id={rid} has {len(group)} records in subset {subset} "
                            f"but repeated 'shot' values {shots}")


def sample_ids(examples: list[Example], max_samples: Optional[int], seed: int) -> list[Example]:
    """At most `max_samples` ids per subset, ranked by a seeded hash of the id: files that share
    ids (the clean test file and its rewrites) keep the same queries, so gaps stay paired."""
    if not max_samples:
        return examples
    keep = set()
    for subset in dict.fromkeys(ex.subset for ex in examples):
        ids = sorted({ex.id for ex in examples if ex.subset == subset},
                     key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).hexdigest())
        keep |= {(subset, i) for i in ids[:max_samples]}
    return [ex for ex in examples if (ex.subset, ex.id) in keep]


def load_examples(settings: EvaluateSettings, cfg) -> list[Example]:
    """Every query to answer, tagged with its file's name under `extra["set"]`."""
    out = []
    for spec in settings.files:
        chosen = [ex for ex in vlguard_examples(spec.path, spec.image_dir or cfg.data.image_dir)
                  if ex.subset in spec.subsets]
        if not chosen:
            raise UserError(f"{spec.path}: no records in subset(s) {', '.join(spec.subsets)} "
                            f"(evaluate.files '{spec.name}')")
        assign_shots(chosen, spec.path)
        out += [replace(ex, extra={**ex.extra, "set": spec.name})
                for ex in sample_ids(chosen, settings.max_samples, cfg.seed)]
    return out


def generation_fingerprint(cfg, settings: EvaluateSettings) -> dict:
    """What determines the generations: a resumed run must match it, or its lines would mix models."""
    m = cfg.model
    fp = dict(model=m.name_or_path, revision=m.revision, dtype=m.dtype, checkpoint=settings.checkpoint,
              adapter_path=m.adapter_path if m.finetune == "lora" else None, image_mode=cfg.data.image_mode,
              max_new_tokens=int(cfg.eval.max_new_tokens), system_prompt=settings.system_prompt)
    if is_built_from_config(m.name_or_path):  # a fresh random model: its seed and tokenizer texts define it
        fp.update(seed=cfg.seed, tiny=OmegaConf.to_container(m.tiny, resolve=True), max_samples=settings.max_samples,
                  files=[[f.path, list(f.subsets)] for f in settings.files])
    return fp


def check_fingerprint(run_dir: Path, fingerprint: dict) -> None:
    path = run_dir / "generation.json"
    # rank files: the answers a killed run on several ranks left (folded into samples.jsonl on resume)
    if path.is_file() and ((run_dir / SAMPLES).is_file() or any(run_dir.glob("samples.rank*.jsonl"))):
        old = json.loads(path.read_text())
        for key in sorted(set(old) | set(fingerprint)):
            if old.get(key) != fingerprint.get(key):
                raise UserError(f"{run_dir / SAMPLES} holds generations made with {key}={old.get(key)!r}, "
                                f"not {fingerprint.get(key)!r}; use another run_dir")
    atomic_write(path, json.dumps(fingerprint, indent=1), what="generation fingerprint")


# -- judging ----------------------------------------------------------------------------------------
def judge_records(records: list[dict], examples: dict[tuple, Example], settings: EvaluateSettings, cfg,
                  run_dir: Path, judge: Optional[Judge] = None) -> str:
    """Fill refusal, judge verdict, harmful and correct into each record (in place); returns the
    judge's name.

    A verdict is only asked for non-refused answers to unsafe queries; ASR counts those judged
    harmful (keyword, reference) or relevant (vlm). `judge` replaces the configured VLM judge.
    """
    for r in records:
        verdict = classify(r["response"], examples[record_key(r)], cfg.eval.refusal_preset, None)
        r.update(refusal=verdict.refusal, correct=verdict.correct, harmful=False,
                 judge=None, verdict=None, verdict_source=None, judge_output=None)
    asked = [r for r in records if not r["safe"] and not r["refusal"]]
    name = settings.judge.name
    if judge is None and name in JUDGES:  # the rule judges
        judge_fn = get_judge(name)
        for r in asked:
            harmful = bool(judge_fn(r["response"], examples[record_key(r)]))
            r.update(judge=name, verdict="harmful" if harmful else "not_harmful", verdict_source="rule",
                     harmful=harmful)
        return name
    if judge is None:
        judge = VLMJudge.from_judge_settings(settings.judge, image_mode=cfg.data.image_mode,
                                             default_cache=run_dir / "judge_cache.jsonl",
                                             device=accelerator_device(cfg.trainer.get("accelerator", "auto")))
    protocols = {f.name: f.judge_protocol or settings.judge.protocol for f in settings.files}
    print(f"judging {len(asked)} non-refused answers to unsafe queries with {judge.name}")
    verdicts = judge([JudgeItem(r["prompt"], r["response"], r["image"], protocols[r["set"]], r.get("category"))
                      for r in asked])
    for r, v in zip(asked, verdicts):
        r.update(judge=judge.name, verdict=v.verdict, verdict_source=v.source, judge_output=v.output,
                 harmful=v.verdict == RELEVANT)
    return judge.name


# -- the whole command ------------------------------------------------------------------------------
def write_outputs(run_dir: Path, records: list[dict], kept: list[dict], table: pd.DataFrame, gaps: dict,
                  summary: dict, report: str) -> None:
    write_samples(run_dir / SAMPLES, records + kept)  # atomic: the resumable file is never half-written
    atomic_write(run_dir / "results.csv", table.to_csv(index=False), what="results")
    atomic_write(run_dir / "results.md", report, what="results")
    payload = dict(summary, gaps=gaps, rows=table.to_dict("records"))
    atomic_write(run_dir / "results.json", strict_json(payload, indent=1), what="results")


@contextlib.contextmanager
def evaluation_dir(cfg) -> Iterator[Path]:
    """The run directory of an evaluation, created and held (a second evaluate on it fails at once),
    once the configured accelerator is known to exist."""
    check_accelerator_exists(cfg.trainer.get("accelerator"))
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"run_dir '{run_dir}' cannot be created: {err.strerror}") from err
    with hold_directory(run_dir):
        yield run_dir


def evaluate(cfg, judge: Optional[Judge] = None) -> pd.DataFrame:
    """VLGuard-format files (`evaluate.files`): generate (resumably), judge and tabulate; returns the
    results table."""
    settings = parse_settings(cfg)
    with evaluation_dir(cfg) as run_dir:
        return _evaluate(cfg, settings, run_dir, judge)


def _evaluate(cfg, settings: EvaluateSettings, run_dir: Path, judge: Optional[Judge]) -> pd.DataFrame:
    fingerprint = generation_fingerprint(cfg, settings)
    examples = prepare_files(cfg, settings, run_dir, fingerprint)
    start = time.perf_counter()
    generated = generate_missing(cfg, examples, run_dir, settings.checkpoint, settings.system_prompt)
    return judge_and_tabulate(cfg, settings, run_dir, examples, judge, fingerprint, generated,
                              time.perf_counter() - start)


def prepare_files(cfg, settings: EvaluateSettings, run_dir: Path, fingerprint: dict) -> list[Example]:
    """The examples of `evaluate.files`, checked before anything is generated (images, the lines of
    samples.jsonl, the generation fingerprint of a resumed run); writes config.yaml."""
    L.seed_everything(cfg.seed, verbose=False)
    examples = load_examples(settings, cfg)
    check_before_generating(examples, cfg.data.image_mode, run_dir, fingerprint)
    atomic_write(run_dir / "config.yaml", to_yaml(cfg), what="run config")
    return examples


def check_before_generating(examples: list[Example], image_mode: str, run_dir: Path, fingerprint: dict) -> None:
    """What would otherwise fail mid-generation or mix two runs' answers, checked first."""
    check_images(examples, image_mode)  # a missing picture fails now, not mid-generation
    read_samples(run_dir / SAMPLES, repair=False)  # a line that is no sample fails before anything is written
    check_fingerprint(run_dir, fingerprint)


def judge_and_tabulate(cfg, settings: EvaluateSettings, run_dir: Path, examples: list[Example],
                       judge: Optional[Judge], fingerprint: dict, generated: int, generate_s: float) -> pd.DataFrame:
    """Judge the answers in samples.jsonl (every example has one by now) and write the tables;
    `generated`: answers generated this run, in `generate_s` seconds."""
    by_key = {example_key(ex): ex for ex in examples}
    rows = {}
    for r in read_samples(run_dir / SAMPLES):
        rows.setdefault(record_key(r), r)
    records = [rows[k] for k in by_key]  # evaluation order; every example has its line now
    kept = [r for k, r in rows.items() if k not in by_key]  # generations outside this evaluation stay
    start = time.perf_counter()
    judge_name = judge_records(records, by_key, settings, cfg, run_dir, judge)
    judge_s = time.perf_counter() - start

    samples = pd.DataFrame(records)
    table = build_table(samples, settings.bootstrap, cfg.seed, settings.confidence)
    gaps = {name: paired_gap(samples, g.base, g.attacked, g.metric, settings.bootstrap, cfg.seed,
                             settings.confidence) for name, g in settings.gaps.items()}
    model = cfg.model.name_or_path + (f" + checkpoint {settings.checkpoint}" if settings.checkpoint else "")
    model += f" + adapter {cfg.model.adapter_path}" if fingerprint["adapter_path"] else ""
    header = [f"model: {model}",
              f"image mode: {cfg.data.image_mode}; greedy, max_new_tokens={cfg.eval.max_new_tokens}",
              f"refusal: keyword preset '{cfg.eval.refusal_preset}'; harmful: judge '{judge_name}'",
              f"generations: {len(records)} ({generated} new this run)"]
    report = markdown_report(table, gaps, header, settings.confidence)
    summary = dict(generation=fingerprint, judge=judge_name, refusal_preset=cfg.eval.refusal_preset,
                   bootstrap=settings.bootstrap, confidence=settings.confidence, n_generations=len(records),
                   generated_this_run=generated, seconds=dict(generate=round(generate_s, 1), judge=round(judge_s, 1)))
    write_outputs(run_dir, records, kept, table, gaps, summary, report)
    print(report)
    print(f"written: {run_dir}/{{{SAMPLES}, results.csv, results.md, results.json}}")
    return table
