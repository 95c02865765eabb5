"""Forget / retain training data for the unlearning methods: every step pairs a forget batch with a
retain batch (the shorter set cycles). The eval side is SafetyDataModule's, so every method logs
the same `val/...` tags.

forget = unsafe queries with a *harmful* response (VLGuard's own responses are refusals and cannot
be forgotten): the training rows' `harmful_response` (the Mirage World carries one), the
unsafe rows of `data.forget_retain.forget_file`, or the base model's own answers that a judge marks
harmful (`forget_source=harvest`: run assembly passes in the harvest step, which is cached).
retain = the safe rows of the training file (or `retain_file`) with their answers, optionally
topped up with general instruction data (`retain_general_ratio`).

A forget set without the compliance cue and a retain set full of it lets unlearning key
on the cue. The cue balance of both sets is printed and kept in `cue_report`;
`cue_balance=match` redraws the forget rows' first words from the retain set's distribution.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from attacks.rewrite import replace_first_word
from datamodules.examples import Example
from datamodules.llava_format import is_llava_file, llava_examples
from datamodules.safety import SafetyDataModule, ShardSampler
from datamodules.samplers import ResumableDataLoader
from core.distributed import shards_parameters
from core.errors import UserError
from core.records import read_json_list
from core.text import first_word

FORGET_SOURCES = ("data", "harvest")
CUE_BALANCES = ("none", "match")
# What one epoch is: a pass over the longer set, the shorter cycled (this project's default), or one
# pass over the retain set with the forget set cycled (the official trainer, OPTML-Group/VLM-Safety-Unlearn
# @1f89239: train_dataset=retain_dataset in llava/train/train_unlearn_full.py lines 794-812, and every
# step draws the next forget batch, the iterator restarted when exhausted, in
# llava/train/llava_unlearn_full_trainer.py lines 313-315, 461 and 486-488).
EPOCH_OVER = ("longer", "retain")


def example_key(ex: Example) -> str:
    """A forget row's identity (the reference-NLL cache is keyed by it)."""
    return f"{ex.id}/{ex.subset}"


def cue_shares(examples: list[Example], cues: list[str]) -> dict[str, float]:
    """Share of rows whose first word is each cue (case-insensitive)."""
    firsts = [first_word(ex.instruction) for ex in examples]
    return {cue: sum(w == cue.lower() for w in firsts) / max(len(firsts), 1) for cue in cues}


def match_cues(forget: list[Example], retain: list[Example], seed: int) -> list[Example]:
    """Forget rows with their first word redrawn from the retain rows' first-word distribution
    (a shuffled, cycled copy of it, so the proportions carry over), the rest of the text kept."""
    words = [first_word(ex.instruction) for ex in retain if first_word(ex.instruction)]
    if not words:
        raise UserError("data.forget_retain.cue_balance=match: the retain rows have no first words")
    pool = words * (len(forget) // len(words) + 1)
    random.Random(seed).shuffle(pool)
    return [replace(ex, instruction=replace_first_word(ex.instruction, w)) for ex, w in zip(forget, pool)]


class ForgetRetainPairs(Dataset):
    """Indexed by (forget index, retain index) pairs from `PairSampler`."""

    def __init__(self, forget: list[Example], retain: list[Example]):
        self.forget, self.retain = forget, retain

    def __len__(self) -> int:
        return max(len(self.forget), len(self.retain))

    def __getitem__(self, index: tuple[int, ...]) -> tuple[Example, ...]:
        # (forget, retain) or, with a separate CE draw, (forget, retain, retain for CE(D_r))
        return (self.forget[index[0]], *(self.retain[j] for j in index[1:]))


class PairSampler(Sampler[tuple[int, int]]):
    """(forget, retain) index pairs: both sides reshuffled every epoch (seed + epoch), the shorter
    side cycles through fresh permutations, and ranks take strided slices of equal length.
    `separate_retain_ce`: triples, a second retain index from an independent permutation (the official
    trainer's own retain iterator beside its batch: llava_unlearn_full_trainer.py:326-328, :470, :567)."""

    def __init__(self, n_forget: int, n_retain: int, seed: int, rank: int = 0, world_size: int = 1,
                 epoch_over: str = "longer", separate_retain_ce: bool = False):
        self.n_forget, self.n_retain, self.seed = n_forget, n_retain, seed
        self.separate_retain_ce = separate_retain_ce
        self.total = n_retain if epoch_over == "retain" else max(n_forget, n_retain)
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at each epoch start
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total // self.world_size

    @staticmethod
    def _order(n: int, total: int, gen: torch.Generator) -> list[int]:
        out: list[int] = []
        while len(out) < total:
            out += torch.randperm(n, generator=gen).tolist()
        return out[:total]

    def __iter__(self):
        total = self.total
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        sides = [self._order(self.n_forget, total, gen), self._order(self.n_retain, total, gen)]
        if self.separate_retain_ce:  # drawn after the pair, so the pairs are those without it
            sides.append(self._order(self.n_retain, total, gen))
        pairs = list(zip(*sides))
        return iter(pairs[self.rank: len(self) * self.world_size: self.world_size])


class PairCollator:
    """{"forget": batch, "retain": batch}, each a normal training batch (labels masked to the
    response); each also carries `keys` (one `example_key` per row: the reference-NLL caches)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, pairs: list[tuple[Example, ...]]) -> dict:
        forget, retain = [p[0] for p in pairs], [p[1] for p in pairs]
        batch = {"forget": self.collator(forget), "retain": self.collator(retain)}
        batch["forget"]["keys"] = [example_key(ex) for ex in forget]
        batch["retain"]["keys"] = [example_key(r) for r in retain]
        if len(pairs[0]) > 2:  # the independent retain draw that CE(D_r) uses (methods' with_retain)
            batch["retain_ce_batch"] = self.collator([p[2] for p in pairs])
        return batch


class KeyedCollator:
    """A training collator whose batches carry `keys` (reference-NLL caching over the forget set)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[Example]) -> dict:
        batch = self.collator(examples)
        batch["keys"] = [example_key(ex) for ex in examples]
        return batch


class ForgetRetainDataModule(SafetyDataModule):
    """SafetyDataModule whose training loader yields `{"forget": batch, "retain": batch}`."""

    def __init__(self, data_cfg, files, processor, seed: int = 0):
        super().__init__(data_cfg, files, processor, seed=seed)
        self.fr = data_cfg.forget_retain
        if self.fr.forget_source not in FORGET_SOURCES:
            raise UserError(f"unknown data.forget_retain.forget_source '{self.fr.forget_source}'; "
                            f"choose one of: {', '.join(FORGET_SOURCES)}")
        if self.fr.cue_balance not in CUE_BALANCES:
            raise UserError(f"unknown data.forget_retain.cue_balance '{self.fr.cue_balance}'; "
                            f"choose one of: {', '.join(CUE_BALANCES)}")
        if self.fr.get("epoch_over", "longer") not in EPOCH_OVER:
            raise UserError(f"unknown data.forget_retain.epoch_over '{self.fr.epoch_over}'; "
                            f"choose one of: {', '.join(EPOCH_OVER)}")
        if not 0 <= float(self.fr.retain_general_ratio) < 1:
            raise UserError(f"data.forget_retain.retain_general_ratio must be in [0, 1), "
                            f"got {self.fr.retain_general_ratio}")
        self.forget: list[Example] = []
        self.retain: list[Example] = []
        self.cue_report: dict[str, dict[str, float]] = {}
        self.harvest_report: Optional[dict] = None

    # -- data ---------------------------------------------------------------------------------
    def side_examples(self, path: Path, safe: bool) -> list[Example]:
        """The rows of a forget / retain file: VLGuard format, or LLaVA's conversation format (the
        official `train_forget.json` / `train_retain_mixed.json`), whose rows are all on `safe`'s side."""
        records = read_json_list(path)
        if is_llava_file(records):
            return llava_examples(path, safe, self.files.image_dir, records)
        return self.examples(path)

    def forget_candidates(self) -> list[Example]:
        """The unsafe rows whose responses are forgotten (or, for a harvest, whose queries are asked)."""
        path = Path(self.fr.forget_file) if self.fr.forget_file else self.files.train
        if not self.fr.forget_file and self.fr.forget_source == "harvest" and self.files.forget_queries:
            path = self.files.forget_queries  # a prepared VLGuard directory's unsafe training queries
        rows = self.side_examples(path, safe=False)
        if not self.fr.forget_file:  # the training file: whole under data.whole_train_file
            rows = self.with_validation_rows(rows)
        rows = [ex for ex in rows if not ex.safe]
        if self.fr.get("forget_halves", "both") == "unsafes":  # the official split: safe=false records only
            rows = [ex for ex in rows if ex.subset != "safe_unsafes"]
        if not rows:
            raise UserError(f"{path}: no unsafe rows to forget")
        # A forget row is one query and one answer (the harvest answers, the cue rewrite and the RMU
        # merge work on it): a multi-turn LLaVA row keeps its first exchange, and says so.
        multi_turn = sum(bool(ex.follow_ups) for ex in rows)
        if multi_turn:
            print(f"forget set: {multi_turn} multi-turn row(s) of {path} keep their first exchange only")
            rows = [replace(ex, follow_ups=()) for ex in rows]
        if self.fr.max_forget is not None:
            rows = rows[: int(self.fr.max_forget)]
        return rows

    def forget_examples(self, harvest: Optional[Callable] = None) -> list[Example]:
        """The forget rows. `harvest(candidates) -> (rows, report)` asks the base model (the run
        assembly passes it in: data never reaches for a model)."""
        rows = self.forget_candidates()
        if self.fr.forget_source == "harvest":
            if harvest is None:
                raise UserError("data.forget_retain.forget_source=harvest needs the base model: run it "
                                "through the fit or harvest command")
            rows, self.harvest_report = harvest(rows)
            return rows
        if self.fr.forget_file:  # a forget file's unsafe rows carry the harmful responses themselves
            empty = next((ex for ex in rows if not ex.response.strip()), None)
            if empty is not None:
                raise UserError(f"{self.fr.forget_file}: unsafe record id={empty.id} has no response to forget "
                                "(a prepared VLGuard forget_queries.json); set data.forget_retain.forget_source=harvest")
            return rows
        missing = next((ex for ex in rows if "harmful_response" not in ex.extra), None)
        if missing is not None:
            raise UserError(f"{self.files.train}: unsafe record id={missing.id} has no 'harmful_response' "
                            "(VLGuard's own responses are refusals, which cannot be forgotten); set "
                            "data.forget_retain.forget_file or data.forget_retain.forget_source=harvest")
        return [replace(ex, response=ex.extra["harmful_response"]) for ex in rows]

    def retain_examples(self) -> list[Example]:
        path = Path(self.fr.retain_file) if self.fr.retain_file else self.files.retain or self.files.train
        rows = self.side_examples(path, safe=True)
        if not self.fr.retain_file:  # the training file's safe rows: whole under data.whole_train_file
            rows = self.with_validation_rows(rows)
        rows = [ex for ex in rows if ex.safe]
        if not rows:
            raise UserError(f"{path}: no safe rows to retain")
        ratio = float(self.fr.retain_general_ratio)
        if ratio > 0:
            general = self.general_examples()
            rng = random.Random(self.seed)
            rows = rows + [general[rng.randrange(len(general))] for _ in range(round(len(rows) * ratio / (1 - ratio)))]
        return rows

    def build_forget_retain(self, harvest: Optional[Callable] = None) -> ForgetRetainPairs:
        """Forget and retain sets (harvesting with `harvest` if configured), cue balance reported.
        Run assembly calls this once, before training; `train_dataset` then reuses the sets."""
        forget, retain = self.forget_examples(harvest), self.retain_examples()
        if self.fr.cue_balance == "match":
            forget = match_cues(forget, retain, self.seed)
        if self.fr.get("merge_answer_into_query", False):  # data/format_rmu_forget.py lines 19-37
            # Idempotent: rows of an already merged file (the official train_forget_qa_full.json) stay as they are.
            forget = [ex if ex.instruction.endswith(f"\n{ex.response}") else
                      replace(ex, instruction=f"{ex.instruction}\n{ex.response}") for ex in forget]
        seen: set[str] = set()
        for ex in forget:
            if example_key(ex) in seen:
                raise UserError(f"forget set: duplicate row id={ex.id} subset={ex.subset}")
            seen.add(example_key(ex))
        cues = [self.files.compliance_cue, self.files.refusal_cue]
        self.forget, self.retain = forget, retain
        self.cue_report = {"forget": {"n": len(forget), **cue_shares(forget, cues)},
                           "retain": {"n": len(retain), **cue_shares(retain, cues)}}
        if self._rank()[0] == 0:
            print("forget/retain sets: " + "; ".join(
                f"{name} {int(r['n'])} rows (" + ", ".join(f"'{c}' first {r[c]:.1%}" for c in cues) + ")"
                for name, r in self.cue_report.items()) + f" [cue_balance={self.fr.cue_balance}]")
        return ForgetRetainPairs(forget, retain)

    def train_dataset(self) -> ForgetRetainPairs:
        if self.forget and self.retain:
            return ForgetRetainPairs(self.forget, self.retain)
        return self.build_forget_retain()

    # -- loaders ------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        sampler = PairSampler(len(self._train.forget), len(self._train.retain), self.seed, rank, world,
                              self.fr.get("epoch_over", "longer"), bool(self.fr.get("separate_retain_ce", False)))
        # Resumable: its position within the epoch goes into checkpoints, as the shared loader's does.
        return ResumableDataLoader(self._train, batch_size=self.cfg.batch_size, sampler=sampler,
                                   collate_fn=PairCollator(self.collator(train=True)),
                                   num_workers=self.cfg.num_workers)

    def forget_dataloader(self) -> DataLoader:
        """This rank's shard of the forget set in order, as training batches with `keys`. Under
        sharded weights (FSDP, ZeRO-3) every forward is a collective, so short shards are topped up
        with a repeat of row 0 (its NLL is the same value again) and all ranks run as many batches."""
        return self._keyed_dataloader(self.forget)

    def retain_dataloader(self) -> DataLoader:
        """The same for the retain set (NPO's retain term caches its reference NLL)."""
        return self._keyed_dataloader(self.retain)

    def _keyed_dataloader(self, examples: list) -> DataLoader:
        rank, world = self._rank()
        pad = self.trainer is not None and shards_parameters(self.trainer.strategy)
        rows = examples + [examples[0]] if pad else examples
        return DataLoader(rows, batch_size=self.cfg.batch_size,
                          sampler=ShardSampler(len(examples), rank, world, pad=pad),
                          collate_fn=KeyedCollator(self.collator(train=True)), num_workers=self.cfg.num_workers)
