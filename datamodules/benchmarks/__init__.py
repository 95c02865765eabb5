"""Benchmarks beyond VLGuard, one entry point: `read_task(kind, path, image_dir=None, **options)`
returns the Examples to answer; `TASK_KINDS[kind].family` says how they are scored
(`metrics.benchmark_scores.score_task` for utility families, evaluate's judge for `safety`).

Utility kinds read the Hugging Face parquet releases (a `.parquet` file or a folder of them) or
LLaVA's evaluation files (`datamodules.benchmarks.llava_files`); safety kinds read each
benchmark's published layout (`datamodules.benchmarks.safety`).

    python -m datamodules.benchmarks convert --kind mm_safetybench --path DIR --out FILE.json [--variant SD_TYPO]

writes a safety benchmark as a VLGuard-format file that `evaluate.files` and `attacks.rewrite` take.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from core.errors import UserError
from datamodules.benchmarks import safety
from datamodules.benchmarks.llava_files import LLAVA_READERS, read_llava_task, scienceqa_release
from datamodules.benchmarks.utility import PARQUET_READERS, read_parquet_task
from datamodules.examples import Example


@dataclass(frozen=True)
class TaskKind:
    name: str
    family: str  # vqa | multiple_choice | pope | mme | safety
    read: Callable[..., list[Example]]
    description: str


def _utility_reader(kind: str) -> Callable[..., list[Example]]:
    def read(path, image_dir=None, split=None, **options):
        path = Path(path)
        is_parquet = path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet")))
        if is_parquet:
            if image_dir is not None:
                raise UserError(f"{path}: a parquet release carries its images; image_dir is not used")
            _refuse(kind, "parquet release", options, _options(PARQUET_READERS[kind], "files"))
            return read_parquet_task(kind, path, split, **options)
        if split is not None:
            options["split"] = split
        reader = scienceqa_release if kind == "scienceqa_img" else LLAVA_READERS.get(kind)
        _refuse(kind, "LLaVA evaluation file", options, _options(reader, "path", "root", "image_dir") if reader else set())
        return read_llava_task(kind, path, image_dir, **options)
    read.__name__ = f"read_{kind}"
    return read


def _options(fn: Callable, *fixed: str) -> set[str]:
    return {p for p in inspect.signature(fn).parameters if p not in fixed}


def _refuse(kind: str, form: str, options: dict, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"{kind} read from a {form} takes no option {unknown[0]!r}"
                        + (f"; it takes {', '.join(sorted(allowed))}" if allowed else ""))


TASK_KINDS: dict[str, TaskKind] = {
    "vqav2": TaskKind("vqav2", "vqa", _utility_reader("vqav2"), "VQAv2 (val with annotations)"),
    "textvqa": TaskKind("textvqa", "vqa", _utility_reader("textvqa"), "TextVQA val"),
    "scienceqa_img": TaskKind("scienceqa_img", "multiple_choice", _utility_reader("scienceqa_img"),
                              "ScienceQA test, questions with an image"),
    "mmbench": TaskKind("mmbench", "multiple_choice", _utility_reader("mmbench"), "MMBench (dev: has answers)"),
    "pope": TaskKind("pope", "pope", _utility_reader("pope"), "POPE (adversarial, popular, random)"),
    "mme": TaskKind("mme", "mme", _utility_reader("mme"), "MME perception and cognition"),
    "mm_safetybench": TaskKind("mm_safetybench", "safety", safety.mm_safetybench,
                               "MM-SafetyBench, one image variant (SD, TYPO, SD_TYPO, text)"),
    "figstep": TaskKind("figstep", "safety", safety.figstep, "FigStep on SafeBench (figstep, text)"),
    "spa_vl_harm": TaskKind("spa_vl_harm", "safety", lambda path, **o: safety.spa_vl(path, "harm", **o),
                            "SPA-VL test, harm split"),
    "spa_vl_help": TaskKind("spa_vl_help", "safety", lambda path, **o: safety.spa_vl(path, "help", **o),
                            "SPA-VL test, help split (benign: over-prudence)"),
}
UTILITY_KINDS = tuple(k for k, t in TASK_KINDS.items() if t.family != "safety")
SAFETY_KINDS = tuple(k for k, t in TASK_KINDS.items() if t.family == "safety")
# The keyword options each kind takes (an unknown one is refused, naming these).
KIND_OPTIONS = {
    "vqav2": {"annotations", "split"}, "textvqa": {"annotations", "split", "ocr"}, "scienceqa_img": {"split"},
    "mmbench": {"split"}, "pope": {"annotations", "split"}, "mme": {"annotations", "split"},
    "mm_safetybench": _options(safety.mm_safetybench, "path"), "figstep": _options(safety.figstep, "path"),
    "spa_vl_harm": set(), "spa_vl_help": set(),
}


def read_task(kind: str, path: str | Path, image_dir: Optional[str | Path] = None, **options) -> list[Example]:
    """The Examples of one benchmark task (see the package docstring)."""
    if kind not in TASK_KINDS:
        raise UserError(f"unknown benchmark kind {kind!r}; choose from {', '.join(TASK_KINDS)}")
    options = {k: v for k, v in options.items() if v is not None}
    if image_dir is not None:
        options["image_dir"] = image_dir
    allowed = KIND_OPTIONS[kind] | ({"image_dir"} if kind not in ("spa_vl_harm", "spa_vl_help") else set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"benchmark kind {kind!r} takes no option {unknown[0]!r} (its images live in the parquet "
                        f"file)" if unknown[0] == "image_dir" else
                        f"benchmark kind {kind!r} takes no option {unknown[0]!r}; it takes {', '.join(sorted(allowed))}")
    if not Path(path).exists():
        raise UserError(f"{kind}: benchmark data not found: {path}")
    examples = TASK_KINDS[kind].read(path, **options)
    if not examples:
        raise UserError(f"{kind}: {path} holds no questions")
    return examples


__all__ = ["TASK_KINDS", "UTILITY_KINDS", "SAFETY_KINDS", "TaskKind", "read_task"]
