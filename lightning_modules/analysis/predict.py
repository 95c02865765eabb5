"""Generation for `evaluate`: every example not yet in `samples.jsonl` is answered (greedy, batched,
left-padded, through `core.generation.greedy_generate`, the function validation uses), so an
interrupted evaluation resumes where it stopped. A suite shares one model across its tasks
(`SharedGenerator`).

On N processes (`trainer.devices=N`, `lightning_modules.run.ranks`) the pending examples are cut into
the batches one process would make and rank r answers batches r, r+N, ... (the same batches, so the
same greedy answers as on one process). Each rank appends its answers to its own
`samples.rank<r>.jsonl` batch by batch (a killed run keeps them); rank 0 gathers the answers, writes
them once, in the original order, into samples.jsonl and removes the rank files. A run that starts
folds the rank files a killed run left into samples.jsonl first: nothing answered is asked again."""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import lightning as L
from tqdm.auto import tqdm

from core.checkpoints import check_base, read_checkpoint, tensors_digest
from core.distributed import batch_shard, free_memory, run_job
from core.errors import UserError
from core.faults import fault_point
from core.generation import greedy_generate
from datamodules.collate import VLMCollator
from datamodules.examples import Example
from lightning_modules.analysis.devices import current_fabric
from metrics.classify import classify, sample_row
from metrics.samples import SAMPLES, append_samples, example_key, read_samples, record_key, write_samples
from models.backbone import build_backbone, is_built_from_config


def load_fit_checkpoint(model, path: str) -> None:
    """Weights of a Lightning checkpoint written by `fit` (keys `model.*`), loaded safely."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint not found: {path}")
    ckpt = read_checkpoint(Path(path), label="checkpoint")
    weights = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    identity = ckpt.get("run_identity") or {}
    if identity.get("trainable_only") and weights and not unexpected:  # the base it left out: the one built here?
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or "the model built from config"
        check_base(identity, {"name_or_path": base, "base_digest": tensors_digest(model.state_dict(), missing)},
                   path, label="checkpoint")
        missing = []
    if missing or unexpected or not weights:
        detail = [f"{len(missing)} missing (e.g. '{missing[0]}')"] if missing else []
        detail += [f"{len(unexpected)} unexpected (e.g. '{unexpected[0]}')"] if unexpected else []
        raise UserError(f"{path}: weights do not fit model.name_or_path and model.finetune: "
                        f"{'; '.join(detail) or 'no model.* weights'}")


@dataclass(frozen=True)
class ModelSpec:
    """What every rank builds the same generation model from: the config, a fit checkpoint and, for
    a model built from config, the texts its tokenizer is trained on (with the seed, its identity)."""

    cfg: object
    checkpoint: Optional[str]
    texts: Optional[tuple[str, ...]]
    key: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def of(cls, cfg, checkpoint: Optional[str], examples: list[Example]) -> "ModelSpec":
        texts = None
        if is_built_from_config(cfg.model.name_or_path):  # a tokenizer trained on every evaluated text
            texts = tuple([ex.instruction for ex in examples] + [ex.response or "" for ex in examples])
        return cls(cfg, checkpoint, texts)

    def build(self):
        if self.texts is not None:  # its random weights: the same model on every rank, whatever ran before
            L.seed_everything(self.cfg.seed, verbose=False)
        model, processor = build_backbone(self.cfg.model, list(self.texts) if self.texts is not None else None)
        if self.checkpoint:
            load_fit_checkpoint(model, self.checkpoint)
        return model.eval(), processor


_MODEL: dict[str, tuple] = {}  # this process's generation model (one at a time), by ModelSpec.key


def model_of(spec: ModelSpec) -> tuple:
    if spec.key not in _MODEL:
        release_model()
        model, processor = spec.build()
        _MODEL[spec.key] = (current_fabric(spec.cfg).to_device(model), processor)
    return _MODEL[spec.key]


def release_model() -> None:
    _MODEL.clear()
    free_memory()


class ReleaseJob:
    """Every rank frees its generation model (before a judge model loads)."""

    def run(self, rank: int, world: int) -> list:
        release_model()
        return []


@dataclass
class GenerateJob:
    """Answer `batches` (each rank its shard, `batch_shard`); a rank's part: [(batch index, rows)]."""

    spec: ModelSpec
    batches: list[list[Example]]
    run_dir: str
    max_length: int
    image_mode: str
    system_prompt: Optional[str]
    image_aspect_ratio: str
    refusal_preset: str

    def run(self, rank: int, world: int) -> list:
        model, processor = model_of(self.spec)
        fabric = current_fabric(self.spec.cfg)
        collate = VLMCollator(processor, self.max_length, train=False, image_mode=self.image_mode,
                              system_prompt=self.system_prompt, image_aspect_ratio=self.image_aspect_ratio)
        part = rank_part(Path(self.run_dir), rank, world)
        out = []
        mine = batch_shard(len(self.batches), rank, world)
        for b in tqdm(mine, desc=f"generating{f' (rank 0 of {world})' if world > 1 else ''}", unit="batch",
                      disable=rank != 0, dynamic_ncols=True, leave=False, file=sys.stdout):  # stderr: the error lines
            fault_point("answer", rank)  # a test's planted fault (SAFETY_MIRAGE_FAULT), else nothing
            batch = fabric.to_device(collate(self.batches[b]))
            with fabric.autocast():
                texts = greedy_generate(model, processor, batch, int(self.spec.cfg.eval.max_new_tokens))
            rows = [sample_row(ex.extra["set"], ex, r, classify(r, ex, self.refusal_preset, None))
                    for ex, r in zip(batch["examples"], texts)]
            append_samples(part, rows)  # on disk batch by batch: a killed rank loses at most one batch
            out.append((b, rows))
        return out


def rank_part(run_dir: Path, rank: int, world: int) -> Path:
    """Where a rank appends its answers: samples.jsonl itself on one process."""
    return run_dir / (SAMPLES if world == 1 else f"samples.rank{rank}.jsonl")


def fold_rank_parts(run_dir: Path) -> bool:
    """The answers in rank files that a killed multi-process run left, appended to samples.jsonl
    (each once), then the rank files removed; whether there were any."""
    parts = sorted(run_dir.glob("samples.rank*.jsonl"))
    if not parts:
        return False
    path = run_dir / SAMPLES
    done = {record_key(r) for r in read_samples(path)}
    for part in parts:
        rows = [r for r in read_samples(part) if record_key(r) not in done]
        append_samples(path, rows)
        done |= {record_key(r) for r in rows}
    for part in parts:
        part.unlink()
    return True


def put_in_order(path: Path, examples: list[Example]) -> None:
    """samples.jsonl in the examples' order (other lines after them, as they were): the same file
    whatever the number of ranks and interruptions."""
    rows = read_samples(path)
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault(record_key(r), r)
    keys = [example_key(ex) for ex in examples]
    wanted = set(keys)
    ordered = [by_key[k] for k in keys if k in by_key] + [r for k, r in by_key.items() if k not in wanted]
    if ordered != rows:
        write_samples(path, ordered)


class SharedGenerator:
    """One generation model for several `generate_missing` calls (a suite's tasks): built on first
    use -- never when every answer already exists -- and freed by `release()` before judging.
    `examples_of` gives the texts a model built from config trains its tokenizer on (called only then)."""

    def __init__(self, cfg, checkpoint: Optional[str], examples_of: Callable[[], list[Example]]):
        self.cfg, self.checkpoint, self.examples_of = cfg, checkpoint, examples_of
        self._spec: Optional[ModelSpec] = None

    def spec(self) -> ModelSpec:
        if self._spec is None:
            tiny = is_built_from_config(self.cfg.model.name_or_path)
            self._spec = ModelSpec.of(self.cfg, self.checkpoint, self.examples_of() if tiny else [])
        return self._spec

    def release(self) -> None:
        if self._spec is not None:
            run_job(ReleaseJob())
        self._spec = None


def generate_missing(cfg, examples: list[Example], run_dir: Path, checkpoint: Optional[str] = None,
                     system_prompt: Optional[str] = None, generator: Optional[SharedGenerator] = None) -> int:
    """Generate every example not yet in samples.jsonl, on every rank; returns how many were
    generated. The model is `generator`'s, else built here and freed at the end."""
    path = run_dir / SAMPLES
    folded = fold_rank_parts(run_dir)
    done = {record_key(r) for r in read_samples(path)}
    pending = [ex for ex in examples if example_key(ex) not in done]
    if not pending:
        if folded:
            put_in_order(path, examples)
        return 0
    print(f"generating {len(pending)} of {len(examples)} answers ({len(examples) - len(pending)} already in {path})")
    size = int(cfg.data.eval_batch_size)
    job = GenerateJob(generator.spec() if generator else ModelSpec.of(cfg, checkpoint, examples),
                      [pending[i:i + size] for i in range(0, len(pending), size)], str(run_dir), cfg.data.max_length,
                      cfg.data.image_mode, system_prompt or cfg.data.get("system_prompt"),
                      cfg.data.get("image_aspect_ratio", "original"), cfg.eval.refusal_preset)
    parts = run_job(job)
    if len(parts) > 1:  # written once, by rank 0, in the original order; then the rank files go
        append_samples(path, [row for _, rows in sorted((p for part in parts for p in part), key=lambda p: p[0]) for row in rows])
        for rank in range(len(parts)):
            rank_part(run_dir, rank, len(parts)).unlink(missing_ok=True)
    put_in_order(path, examples)
    if generator is None:
        run_job(ReleaseJob())
    return len(pending)
