"""An evaluation suite (`evaluate.tasks`): one model on safety, attacked and utility tasks, one
folder per task under `run_dir/tasks/<name>/`, and `results.csv` with a `task` column.

* safety task (kind `vlguard`, or a safety benchmark converted to VLGuard format in the task folder):
  the evaluate command itself on the clean file plus, with `attack:`, the one-word attack files
  (`attacks.benchmark_attack`: cues mined on the training set), with the mirage and over-prudence gaps;
* utility task (VQA, multiple choice, POPE, MME): answers generated as evaluate generates them, scored
  by `metrics.benchmark_scores` (`vqa_accuracy`, `accuracy`, ... in [0, 1]; MME's scores 0..200/2000).

One model per suite: every unfinished task is prepared (and checked) first, then answered by one
model built on first need (`SharedGenerator`), which is freed before judging and scoring. Resumable
per task: a task whose `task.json` (its spec and generation fingerprint) matches is read back, not
regenerated; an interrupted task resumes from its samples.jsonl; a finished suite loads no model.
Intervals: bootstrap (safety, as evaluate), Wilson (accuracy-type rates), Student t (VQA soft scores)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Optional

import pandas as pd
from omegaconf import OmegaConf

from attacks.benchmark_attack import attack_benchmark, evaluate_entries
from core.distributed import accelerator_device
from core.errors import UserError
from core.files import atomic_write
from datamodules.benchmarks import KIND_OPTIONS, read_task
from datamodules.examples import Example
from lightning_modules.analysis.evaluation import (check_before_generating, generation_fingerprint, judge_and_tabulate,
                                                   load_examples, parse_settings, prepare_files)
from lightning_modules.analysis.predict import SharedGenerator, generate_missing
from lightning_modules.analysis.suite_tables import FRONT, HEADLINE, family, suite_markdown
from lightning_modules.config.schema import EvaluateSettings, SuiteTask
from metrics.benchmark_scores import headline_units, pope_f1_interval, score_task
from metrics.samples import SAMPLES, example_key, read_samples, record_key
from metrics.tables import t_interval, wilson_interval
from metrics.judges import JUDGES as RULE_JUDGES
from metrics.vlm_judge import LazyJudge, VLMJudge, get_protocol, judge_name
from models.backbone import is_built_from_config

TASK_RESULTS = "task_results.csv"


def check_tasks(settings) -> None:
    names = [t.name for t in settings.tasks]
    for task in settings.tasks:
        if "/" in task.name or names.count(task.name) > 1:
            raise UserError(f"evaluate.tasks name '{task.name}' must be unique and contain no '/'")
        if task.attack and family(task.kind) != "safety":
            raise UserError(f"evaluate.tasks '{task.name}': attack is for safety tasks, not kind {task.kind}")
        if task.attack and not task.attack.train:
            raise UserError(f"evaluate.tasks '{task.name}': attack needs train (the training file the model was aligned on)")
        allowed = set(KIND_OPTIONS.get(task.kind, ()))
        if family(task.kind) == "safety":  # converted to VLGuard format: image_dir is the task's own key
            allowed &= {"variant"}
        unknown = sorted(set(task.options) - allowed)
        if unknown:
            raise UserError(f"evaluate.tasks '{task.name}': kind {task.kind} takes no option {unknown[0]!r}"
                            f"{'; options: ' + ', '.join(sorted(allowed)) if allowed else ''}")
        for protocol in (task.judge_protocol, task.attack.judge_protocol if task.attack else None):
            get_protocol(protocol or settings.judge.protocol)  # unknown: one line now, not after generating
    if settings.files or settings.gaps:
        raise UserError("evaluate.tasks (a suite) replaces evaluate.files and evaluate.gaps: leave them empty")
    names = [m.name for m in settings.models]
    for model in settings.models:
        if "/" in model.name or names.count(model.name) > 1:
            raise UserError(f"evaluate.models name '{model.name}' must be unique and contain no '/'")


def _spec(task) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(task), default=str))


def _finished(task_dir: Path, stamp: dict) -> Optional[pd.DataFrame]:
    """The task's rows if it already ran with this spec and generation setup."""
    try:
        if json.loads((task_dir / "task.json").read_text()) == stamp:
            return pd.read_csv(task_dir / TASK_RESULTS, keep_default_na=False, na_values=[""])
    except (OSError, ValueError):
        pass
    return None


# -- safety -----------------------------------------------------------------------------------------
def _safety_files(task, cfg, task_dir: Path) -> tuple[list[dict], dict]:
    """evaluate.files and gaps of a safety task: the clean file (converted into the task folder when
    the benchmark is not VLGuard-format) and, with attack:, the attack files next to it."""
    data_dir = task_dir / "data"
    image_dir = task.image_dir
    if task.kind == "vlguard":
        clean, subsets = Path(task.path), list(task.subsets)
        if not clean.is_file():
            raise UserError(f"evaluate.tasks '{task.name}': benchmark file not found: {clean}")
        # relative image paths: against the image folder, else the benchmark's folder (not data/'s)
        image_dir = image_dir or cfg.data.image_dir or str(clean.parent.resolve())
    else:
        from datamodules.benchmarks.__main__ import convert

        clean = data_dir / "clean.json"
        convert(task.kind, task.path, clean, task.image_dir, task.options.get("variant"))
        subsets = ["unsafes"]
    if not task.attack:
        return [dict(name="clean", path=str(clean), subsets=subsets, image_dir=image_dir,
                     judge_protocol=task.judge_protocol)], {}
    a = task.attack
    mode = "paraphrase" if a.paraphrase_model else "rule"
    done = attack_benchmark(a.train, clean, data_dir, mode, a.seed, a.shots, a.paraphrase_model)
    files, gaps = evaluate_entries(clean, done)
    files[0]["subsets"] = [s for s in subsets if s in files[0]["subsets"]]
    for spec in files:
        spec.update(image_dir=image_dir, judge_protocol=a.judge_protocol)
    files[0]["judge_protocol"] = task.judge_protocol
    print(f"task {task.name}: cues mined on {a.train}: compliance {done['compliance_cue']!r}, refusal "
          f"{done['refusal_cue']!r}; attack files in {data_dir}")
    return files, gaps


def safety_config(task, cfg, task_dir: Path):
    """The config and settings of evaluate on a safety task's files (clean, and attacked)."""
    files, gaps = _safety_files(task, cfg, task_dir)
    sub = OmegaConf.merge(cfg, {"run_dir": str(task_dir)})
    sub.evaluate.tasks, sub.evaluate.models = [], []
    sub.evaluate.files, sub.evaluate.gaps = files, gaps
    sub.evaluate.max_samples = task.max_samples or cfg.evaluate.get("max_samples")
    return sub, parse_settings(sub)


def score_safety(run: "TaskRun", fingerprint: dict, judge) -> pd.DataFrame:
    """Judged and tabulated as evaluate does its files, plus the task's roles and gap rows."""
    files = run.settings.files
    table = judge_and_tabulate(run.cfg, run.settings, run.dir, run.examples, judge, fingerprint, run.generated,
                               run.generate_s).assign(kind=run.task.kind)
    roles = {files[0].name: "clean"} | {f.name: ("attacked" if list(f.subsets) == ["unsafes"] else "overprudence")
                                        for f in files[1:]}
    table["role"] = table["set"].map(roles)
    table["headline"] = (table["category"] == "all") & ~table["shot"].astype(str).str.fullmatch(r"\d+")
    results = json.loads((run.dir / "results.json").read_text())
    gap_rows = [dict(set=name, subset="gap", shot="", category="all", n=g["n_paired"], role="gap", headline=True,
                     kind=run.task.kind, gap=g["value"], gap_lo=g["lo"], gap_hi=g["hi"],
                     gap_of=f"{g['metric']}: {g['attacked']} - {g['base']}")
                for name, g in results.get("gaps", {}).items()]
    return pd.concat([table, pd.DataFrame(gap_rows)], ignore_index=True)


# -- utility ----------------------------------------------------------------------------------------
def sample_groups(examples: list[Example], max_samples: Optional[int], seed: int) -> list[Example]:
    """At most `max_samples` groups, ranked by a seeded hash: a group is an id, an MME image (its
    two questions stay together, else accuracy+ loses its pairs) or an MMBench question with its
    CircularEval copies (`extra["group"]`)."""
    if not max_samples:
        return examples
    group = [str(ex.extra.get("group") or ex.extra.get("image_key") or ex.id) for ex in examples]
    keep = set(sorted(dict.fromkeys(group), key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())[:max_samples])
    return [ex for ex, g in zip(examples, group) if g in keep]


def _interval(fam: str, metric: str, values: list[float], rate: float, confidence: float) -> tuple[float, float]:
    if fam == "vqa":  # soft scores: Student t on the per-question scores
        return t_interval(values, confidence)[1:]
    return wilson_interval(rate, len(values), confidence)


def utility_examples(task, cfg, settings) -> list[Example]:
    options = {k: v for k, v in task.options.items() if v is not None}
    examples = read_task(task.kind, task.path, task.image_dir, **options)
    if not examples:
        raise UserError(f"evaluate.tasks '{task.name}': no questions in {task.path}")
    return [dataclasses.replace(ex, extra={**ex.extra, "set": task.name})
            for ex in sample_groups(examples, task.max_samples or settings.max_samples, cfg.seed)]


def score_utility(run: "TaskRun") -> pd.DataFrame:
    task, examples, settings = run.task, run.examples, run.settings
    answers = {record_key(r): r["response"] for r in read_samples(run.dir / SAMPLES)}
    responses = [answers[example_key(ex)] for ex in examples]
    fam, headline = family(task.kind), HEADLINE[family(task.kind)]
    scores = score_task(task.kind, examples, responses)
    units = headline_units(task.kind, examples, responses)  # MMBench: one per question with its copies
    rows = []
    for category, values in scores.items():
        members = [v for c, v in units if category == "all" or str(c) == category]
        n = len(members) if units else sum(category == "all" or str(ex.category) == category for ex in examples)
        row = dict(set=task.name, subset="utility", shot="single", category=category, n=n, kind=task.kind,
                   role="utility", headline=category == "all", **values)
        if headline in values and members:
            row[f"{headline}_lo"], row[f"{headline}_hi"] = _interval(fam, headline, members, values[headline],
                                                                     settings.confidence)
        elif headline in values and fam == "pope" and settings.bootstrap:  # the mean F1: bootstrap
            row[f"{headline}_lo"], row[f"{headline}_hi"] = pope_f1_interval(
                examples, responses, settings.bootstrap, int(run.cfg.get("seed", 0) or 0), settings.confidence)
        rows.append(row)
    return pd.DataFrame(rows)


# -- one model --------------------------------------------------------------------------------------
@dataclasses.dataclass
class TaskRun:
    """A task to answer and score: its folder, the config and settings it is evaluated under (a
    safety task: evaluate's on its files; a utility task: the suite's) and its examples."""

    task: SuiteTask
    dir: Path
    cfg: object
    settings: EvaluateSettings
    examples: list[Example]
    generated: int = 0
    generate_s: float = 0.0


def prepare_task(task, cfg, settings, task_dir: Path, fingerprint: Optional[dict]) -> TaskRun:
    """A task's examples (converted, attacked, sampled); with `fingerprint` (a task to run) checked as
    evaluate checks its files before generating: images, samples.jsonl, the generation fingerprint."""
    if family(task.kind) == "safety":
        sub, sub_settings = safety_config(task, cfg, task_dir)
        examples = (prepare_files(sub, sub_settings, task_dir, fingerprint) if fingerprint
                    else load_examples(sub_settings, sub))
        return TaskRun(task, task_dir, sub, sub_settings, examples)
    examples = utility_examples(task, cfg, settings)
    if fingerprint:
        check_before_generating(examples, cfg.data.image_mode, task_dir, fingerprint)
    return TaskRun(task, task_dir, cfg, settings, examples)


def suite_fingerprint(cfg, settings) -> dict:
    """What determines every task's generations: the model; a model built from config is also
    defined by the texts its tokenizer is trained on, every task's."""
    fingerprint = generation_fingerprint(cfg, settings)
    if is_built_from_config(cfg.model.name_or_path):
        fingerprint["tasks"] = [_spec(t) for t in settings.tasks]
    return fingerprint


def run_suite(cfg, settings, run_dir: Path, judge=None) -> pd.DataFrame:
    """Every task of the suite on cfg's model, built once; `run_dir/results.csv` (+ .md); returns the table."""
    fingerprint, tables, runs, stamps = suite_fingerprint(cfg, settings), {}, [], {}
    for i, task in enumerate(settings.tasks, 1):
        task_dir = run_dir / "tasks" / task.name
        task_dir.mkdir(parents=True, exist_ok=True)
        stamps[task.name] = dict(task=_spec(task), generation=fingerprint, seed=cfg.seed, judge=_spec(settings.judge),
                                 refusal_preset=cfg.eval.refusal_preset, bootstrap=settings.bootstrap,
                                 confidence=settings.confidence)
        tables[task.name] = _finished(task_dir, stamps[task.name])
        if tables[task.name] is not None:
            print(f"[task {i}/{len(settings.tasks)}] {task.name}: finished earlier, read from {task_dir / TASK_RESULTS}")
        else:
            runs.append(prepare_task(task, cfg, settings, task_dir, fingerprint))
            print(f"[task {i}/{len(settings.tasks)}] {task.name} ({task.kind}): {len(runs[-1].examples)} queries")

    def every_example() -> list[Example]:  # a model built from config: its tokenizer learns every task's texts
        ready = {run.task.name: run for run in runs}
        return [ex for t in settings.tasks for ex in
                (ready.get(t.name) or prepare_task(t, cfg, settings, run_dir / "tasks" / t.name, None)).examples]

    generator = SharedGenerator(cfg, settings.checkpoint, every_example)
    shared_judge = None
    if judge is None and settings.judge.name not in RULE_JUDGES:  # one judge model for every safety task
        shared_judge = judge = LazyJudge(judge_name(settings.judge.model), lambda: VLMJudge.from_judge_settings(
            settings.judge, image_mode=cfg.data.image_mode, default_cache=run_dir / "judge_cache.jsonl",
            device=accelerator_device(cfg.trainer.get("accelerator", "auto"))))
    for run in runs:
        start = time.perf_counter()
        run.generated = generate_missing(run.cfg, run.examples, run.dir, settings.checkpoint, settings.system_prompt,
                                         generator)
        run.generate_s = time.perf_counter() - start
    generator.release()  # before the judge model
    for run in runs:
        table = score_safety(run, fingerprint, judge) if family(run.task.kind) == "safety" else score_utility(run)
        table.insert(0, "task", run.task.name)
        atomic_write(run.dir / TASK_RESULTS, table.to_csv(index=False), what="task results")
        atomic_write(run.dir / "task.json", json.dumps(stamps[run.task.name], indent=1), what="task stamp")
        tables[run.task.name] = table
    if shared_judge is not None:
        shared_judge.release()  # the next model of a comparison generates without it
    table = pd.concat([tables[t.name] for t in settings.tasks], ignore_index=True)
    table = table[[*FRONT, *[c for c in table.columns if c not in FRONT]]]
    atomic_write(run_dir / "results.csv", table.to_csv(index=False), what="results")
    atomic_write(run_dir / "results.md", suite_markdown(table, [cfg.model.name_or_path]), what="results")
    print(suite_markdown(table, [cfg.model.name_or_path]))
    print(f"written: {run_dir}/results.csv, results.md")
    return table
