"""The shared datamodule: a training set plus the four named eval sets, for the world or VLGuard."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from attacks.rewrite import KShotAttack, replace_first_word
from core.text import first_word
from datamodules.collate import VLMCollator, check_images
from datamodules.examples import Example, eval_set_names, eval_sets, safe_record_conversations, vlguard_examples
from datamodules.samplers import ResumableDataLoader
from core.errors import UserError
from core.distributed import shards_parameters


@dataclass
class DataFiles:
    """Where a run's data lives, whatever built it."""

    train: Path
    val: Path
    test: Optional[Path]
    image_dir: Optional[Path]
    compliance_cue: str
    refusal_cue: str
    general: Optional[Path] = None  # general instruction data for the SFT mixture
    world_dir: Optional[Path] = None
    neutral_cue: Optional[str] = None  # the control cue; None: no control eval sets
    retain: Optional[Path] = None  # the retain set's file, where the data provides one (prepared VLGuard)
    forget_queries: Optional[Path] = None  # unsafe queries to harvest forget answers for (prepared VLGuard)


# Eval sets are sampled and attacked with a fixed seed, not the run's: runs with different seeds
# are compared on the same queries.
EVAL_SEED = 0


def resolve_data_files(data_cfg) -> DataFiles:
    """Build (or reuse) the Mirage World, or point at user-given VLGuard-format files."""
    if data_cfg.kind == "mirage_world":
        from datamodules.mirage_world import WorldConfig, build_world

        try:
            world_cfg = WorldConfig(**data_cfg.world)
        except TypeError as err:
            raise UserError(f"unknown key in data.world: {err}") from err
        except ValueError as err:
            raise UserError(f"data.world: {err}") from err
        world = build_world(world_cfg, data_cfg.world_root)
        # The world's base corpus doubles as its general instruction data (safe rows only).
        return DataFiles(train=world / "safety_train.json", val=world / "val.json", test=world / "test.json",
                         image_dir=world, compliance_cue=world_cfg.compliance_cue,
                         refusal_cue=world_cfg.refusal_cue, general=world / "base.json", world_dir=world,
                         neutral_cue=world_cfg.neutral_cue)
    if data_cfg.kind == "vlguard":
        prepared = {}
        if data_cfg.get("root"):
            from datamodules.vlguard import read_manifest

            prepared = read_manifest(data_cfg.root)["files"]

        def path(key: str, prepared_name: Optional[str] = None) -> Optional[Path]:
            """data.<key> if set, else the prepared directory's file of that name."""
            return Path(data_cfg[key]) if data_cfg.get(key) else prepared.get(prepared_name)

        files = DataFiles(train=path("train_file", "train"), val=path("val_file", "val"),
                          test=path("test_file", "test"), image_dir=path("image_dir"),
                          compliance_cue=data_cfg.compliance_cue, refusal_cue=data_cfg.refusal_cue,
                          general=path("general_file"), retain=prepared.get("retain"),
                          forget_queries=prepared.get("forget_queries"), neutral_cue=data_cfg.get("neutral_cue") or None)
        for key in ("train", "val"):
            if getattr(files, key) is None:
                raise UserError(f"data.{key}_file must be set when data.kind=vlguard (or data.root=DIR, a directory "
                                "written by `python -m datamodules.vlguard prepare`)")
        return files
    raise UserError(f"unknown data.kind '{data_cfg.kind}'; choose one of: mirage_world, vlguard")


def _flat_examples(data) -> list[Example]:
    """Every Example in a dataset, whatever its nesting (eval sets by name, (forget, retain) pairs)."""
    if isinstance(data, Example):
        return [data]
    if isinstance(data, dict):
        data = list(data.values())
    elif hasattr(data, "__dict__"):  # a Dataset object: the examples it holds (ForgetRetainPairs.forget/.retain)
        data = list(vars(data).values())
    if isinstance(data, (list, tuple)):
        return [ex for item in data for ex in _flat_examples(item)]
    return []


def padding_row(ex: Example) -> Example:
    """A copy of `ex` that is generated for but never counted (see ShardSampler's `pad`)."""
    return replace(ex, extra={**ex.extra, "padding": True})


def is_padding(ex: Example) -> bool:
    return bool(ex.extra.get("padding"))


class ShardSampler(Sampler[int]):
    """Rank-strided indices with no padding: every eval sample is counted exactly once under DDP
    (Lightning's DistributedSampler repeats samples to even out ranks, which skews rates).

    `pad=True` is for sharded weights (FSDP, ZeRO-3), where every forward is a collective and all
    ranks must run the same number of batches: short shards are topped up with index `n`, a
    `padding_row` the dataset holds past its end, which the eval step drops before counting."""

    def __init__(self, n: int, rank: int, world_size: int, pad: bool = False):
        self.indices = list(range(rank, n, world_size))
        if pad:
            self.indices += [n] * (-(-n // world_size) - len(self.indices))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SafetyDataModule(L.LightningDataModule):
    """Training rows of the safety set (optionally mixed with general data) + named eval sets.

    Methods that need other training data (forget/retain pairs) subclass this and override
    `train_dataset`; the eval side is shared so every method logs the same `val/...` tags.
    """

    def __init__(self, data_cfg, files: DataFiles, processor, seed: int = 0):
        super().__init__()
        self.cfg = data_cfg
        self.files = files
        self.processor = processor
        self.seed = seed
        # The module builds one metric per name (AlignmentModule(eval_set_names=...)).
        self.eval_set_names = eval_set_names(files.neutral_cue)
        self._val: dict[str, list[Example]] = {}
        self._test: dict[str, list[Example]] = {}
        self._train: Optional[list] = None

    # -- data ---------------------------------------------------------------------------------
    def examples(self, path: Path) -> list[Example]:
        return vlguard_examples(path, self.files.image_dir)

    def general_examples(self) -> list[Example]:
        if self.files.general is None:
            raise UserError("data.general_ratio > 0 needs data.general_file")
        from core.records import read_json_list
        from datamodules.llava_format import is_llava_file, llava_examples

        records = read_json_list(self.files.general)
        if is_llava_file(records):  # LLaVA-665K and the like: every row is general (safe) data
            return llava_examples(self.files.general, True, self.files.image_dir, records)
        return [e for e in self.examples(self.files.general) if e.safe]

    def training_file_examples(self, path: Optional[Path] = None) -> list[Example]:
        """The rows of the training file (or `path`); with `data.whole_train_file` also the validation file's
        rows not already there (a prepared directory's train.json + val.json = VLGuard's whole train.json,
        what the official code trains on: VLM-Safety-Unlearn data/split_forget_retain.py:47-68)."""
        return self.with_validation_rows(self.examples(path or self.files.train))

    def with_validation_rows(self, rows: list[Example]) -> list[Example]:
        """`rows` plus, under `data.whole_train_file`, the validation file's rows not already among them."""
        if not self.cfg.get("whole_train_file") or self.files.val is None:
            return rows
        seen = {(ex.id, ex.subset) for ex in rows}
        return rows + [ex for ex in self.examples(self.files.val) if (ex.id, ex.subset) not in seen]

    def train_dataset(self) -> list:
        rows = self.training_file_examples()
        if self.cfg.get("safe_records", "rows") == "conversation":
            rows = safe_record_conversations(rows)
        ratio = float(self.cfg.general_ratio)
        count = self.cfg.get("general_samples")
        if count:
            # A fixed-size share of the general file, each row at most once (VLGuard's post-hoc mixture).
            general = self.general_examples()
            if int(count) > len(general):
                raise UserError(f"data.general_samples={count} but {self.files.general} has only "
                                f"{len(general)} safe rows")
            return rows + random.Random(self.seed).sample(general, int(count))
        if ratio > 0:
            if not 0 < ratio < 1:
                raise UserError(f"data.general_ratio must be in [0, 1), got {ratio}")
            general = self.general_examples()
            n = round(len(rows) * ratio / (1 - ratio))
            rng = random.Random(self.seed)
            rows = rows + [general[rng.randrange(len(general))] for _ in range(n)]
        return rows

    def attack_rewrites(self):
        """`(text, id) -> K rewrites` for a K-shot attack (data.attack_shots > 1), else None (one-word swap)."""
        k = int(self.cfg.get("attack_shots", 1))
        if k < 1:
            raise UserError(f"data.attack_shots must be >= 1, got {k}")
        if k == 1:
            return None
        try:
            attack = KShotAttack(self.files.compliance_cue, k=k, seed=EVAL_SEED)
        except ValueError as err:
            raise UserError(f"data.attack_shots={k}: {err}") from err

        def rewrites(text: str, rid: str) -> list[str]:
            try:
                return attack.rewrites(text, rid)
            except ValueError as err:
                raise UserError(f"data.attack_shots={k}: {err}") from err

        return rewrites

    def eval_split(self, path: Optional[Path]) -> dict[str, list[Example]]:
        if path is None:
            return {}
        # The attack generator's one-word swap (punctuation follows the cue, as in the paper's files);
        # K-shot: K distinct rewrites per unsafe query from the attack generator (its default mode).
        return eval_sets(self.examples(path), self.files.compliance_cue, self.files.refusal_cue,
                         replace_first_word, self.cfg.max_eval_samples, neutral_cue=self.files.neutral_cue,
                         first_word=first_word, kshot=self.attack_rewrites(), seed=EVAL_SEED)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._train is None:
            self._train = self.train_dataset()
            check_images(_flat_examples(self._train), self.cfg.image_mode)
        if stage in ("fit", "validate") and not self._val:
            self._val = self.eval_split(self.files.val)
            check_images(_flat_examples(self._val), self.cfg.image_mode)
            self.check_val_apart_from_test()
        if stage == "test" and not self._test:
            self._test = self.eval_split(self.files.test)
            if not self._test:
                raise UserError("no test split: set data.test_file")
            check_images(_flat_examples(self._test), self.cfg.image_mode)

    def check_val_apart_from_test(self) -> None:
        """Validation never sees a test query: a validation file sharing an (image, instruction) pair
        with the test file is refused (eval.test_split=val points both at one file on purpose)."""
        val, test = self.files.val, self.files.test
        if val is None or test is None or Path(val).resolve() == Path(test).resolve() or not Path(test).is_file():
            return
        def query(ex: Example) -> tuple:
            return (str(Path(ex.image).resolve()) if ex.image else None, ex.instruction)

        test_queries = {query(ex) for ex in self.examples(test)}
        shared = [ex for ex in self.examples(val) if query(ex) in test_queries]
        if shared:
            raise UserError(f"validation file {val} shares {len(shared)} queries with the test file {test} (first: "
                            f"record id={shared[0].id}): validation would leak test data; use a split of the training data")

    # -- loaders ------------------------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def collator(self, train: bool, processor=None) -> VLMCollator:
        """The run's batches; `processor`: the same prompt format through another model's processor
        (a harvest generator)."""
        return VLMCollator(processor or self.processor, self.cfg.max_length, train=train, image_mode=self.cfg.image_mode,
                           cache=self.cfg.cache_encodings, system_prompt=self.cfg.get("system_prompt"),
                           image_aspect_ratio=self.cfg.get("image_aspect_ratio", "original"),
                           overlong=self.cfg.get("overlong", "refuse") if train else "refuse")

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        # DistributedSampler also for one process: a seeded, per-epoch shuffle that a resumed
        # run reproduces (Lightning calls set_epoch).
        sampler = DistributedSampler(self._train, num_replicas=world, rank=rank, shuffle=True,
                                     seed=self.seed, drop_last=world > 1)
        # Resumable: its position within the epoch goes into checkpoints (resume=last continues mid-epoch).
        return ResumableDataLoader(self._train, batch_size=self.cfg.batch_size, sampler=sampler,
                                   collate_fn=self.collator(train=True), num_workers=self.cfg.num_workers,
                                   drop_last=False)

    def _eval_loaders(self, sets: dict[str, list[Example]]) -> list[DataLoader]:
        rank, world = self._rank()
        pad = self.trainer is not None and shards_parameters(self.trainer.strategy)
        return [DataLoader(sets[name] + [padding_row(sets[name][0])] if pad else sets[name],
                           batch_size=self.cfg.eval_batch_size,
                           sampler=ShardSampler(len(sets[name]), rank, world, pad=pad),
                           collate_fn=self.collator(train=False), num_workers=self.cfg.num_workers)
                for name in self.eval_set_names]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self._val)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self._test)
