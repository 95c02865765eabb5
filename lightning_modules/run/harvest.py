"""Harvest the forget set as the official pipeline does (OPTML-Group/VLM-Safety-Unlearn@1f89239,
`data/data.md` step 2): ask one or several generator models the unsafe training queries (greedy,
batched, the run's prompt format) and keep one harmful answer per query, cached as a VLGuard-format
file. Run by assembly (`data.forget_retain.forget_source=harvest`) or alone
(`python -m lightning_modules.harvest`). On several ranks (`python -m lightning_modules.harvest
trainer.devices=N`, or torch.distributed already started) each rank answers its shard of batches and
the shards are gathered; each rank's answers are on disk batch by batch (`.partial-*.rank<r>.jsonl`),
so a killed harvest resumes. Inside `fit` under Lightning's launcher rank 0 harvests before the other
ranks exist (they read its cache); under torchrun or Slurm every process starts at once and the
ranks take the cache's file lock in turn: one harvests, the others read its files.

- generators: `data.forget_retain.generators` (hub ids or local dirs, each one's answers cached in
  `answers-<hash>.json`, a file `datamodules.vlguard build-forget-retain --answers` reads); none: the
  run's own model.
- choice: with `data.forget_retain.judge_model` a chat LLM picks the most harmful answer with the
  official prompt (`select_harmful_responses.py`); a reply naming none falls back to the rule for that
  query (counted). The rule: the first answer that the run's judge (eval.judge; with eval.judge=vlm the
  VLM judge) marks as harmful compliance; a query with none is left out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import OmegaConf

from core.distributed import accelerator_device, batch_shard, free_memory, gather_objects, rank_and_world
from core.errors import UserError
from core.faults import fault_point
from core.files import append_lines, atomic_write, file_lock, read_lines
from core.generation import greedy_generate
from datamodules.examples import Example
from datamodules.official_pipeline import image_label, judge_choice


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _prompt_key(datamodule) -> dict:
    """What shapes the prompts and the generation (set-only keys: older caches stay valid)."""
    key = {"max_new_tokens": datamodule.fr.harvest_max_new_tokens, "max_length": datamodule.cfg.max_length,
           "image_mode": datamodule.cfg.image_mode}
    for prompt_setting in ("system_prompt", "image_aspect_ratio"):
        if datamodule.cfg.get(prompt_setting) not in (None, "original"):
            key[prompt_setting] = datamodule.cfg.get(prompt_setting)
    return key


def _queries(candidates: list[Example]) -> list:
    return [(ex.id, ex.instruction, ex.image) for ex in candidates]


def _cache_path(module, candidates: list[Example], datamodule) -> Path:
    """One file per (models, queries, generation settings, judges): the cache is never stale."""
    hp = module.hparams
    key = {"model": module.model_identity, "queries": _queries(candidates), **_prompt_key(datamodule),
           "judge": hp["eval"]["judge"], "refusal_preset": hp["eval"]["refusal_preset"], "version": 1}
    keep = datamodule.fr.get("harvest_keep", "harmful")
    if keep != "harmful":  # older cache keys stay valid
        key["keep"] = keep
    if hp["eval"]["judge"] == "vlm":  # which VLM judges, and how
        key["vlm_judge"] = hp["eval"]["vlm_judge"]
    if _generators(datamodule) != [None] or datamodule.fr.get("judge_model"):
        key.update(generators=_generators(datamodule), judge_model=datamodule.fr.get("judge_model"))
        if datamodule.fr.get("judge_model") and datamodule.fr.get("judge_decoding", "checkpoint") != "checkpoint":
            key["judge_decoding"] = datamodule.fr.get("judge_decoding")
    return Path(datamodule.fr.harvest_dir) / f"forget-{_digest(key)}.json"


def _generators(datamodule) -> list[Optional[str]]:
    """The generator models; None is the run's own model."""
    return [str(g) for g in datamodule.fr.get("generators") or []] or [None]


@torch.no_grad()
def _generate(model, processor, candidates: list[Example], datamodule, partial: Path) -> list[str]:
    """Greedy answers to every candidate. Cut into the batches one process makes; on N ranks rank r
    answers batches r, r+N, ... (the same batches: the same answers). Each rank appends its answers
    to `<partial>.rank<r>.jsonl` batch by batch, so a killed harvest resumes without asking again;
    the shards are gathered in the original order and the partial files go once the answers are whole."""
    rank, world = rank_and_world()
    done = _partial_answers(partial)
    if world > 1:  # every rank shards the same pending list (rank 0's reading of the files)
        box = [done]
        torch.distributed.broadcast_object_list(box, src=0)
        done = box[0]
    pending = [i for i in range(len(candidates)) if i not in done]
    size = datamodule.cfg.eval_batch_size
    batches = [pending[i:i + size] for i in range(0, len(pending), size)]
    collate = datamodule.collator(train=False, processor=processor)
    device = next(model.parameters()).device
    rows = []
    for b in batch_shard(len(batches), rank, world):
        fault_point("harvest", rank)  # a test's planted fault (SAFETY_MIRAGE_FAULT), else nothing
        batch = move_data_to_device(collate([candidates[i] for i in batches[b]]), device)
        texts = greedy_generate(model, processor, batch, datamodule.fr.harvest_max_new_tokens)
        mine = [{"index": i, "response": t} for i, t in zip(batches[b], texts)]
        append_lines(partial.with_name(f"{partial.name}.rank{rank}.jsonl"), [json.dumps(r) for r in mine],
                     what="harvest answers")
        rows += mine
    answers = dict(done)
    answers.update({r["index"]: r["response"] for r in gather_objects(rows)})
    return [answers[i] for i in range(len(candidates))]


def _partial_answers(partial: Path) -> dict[int, str]:
    """{candidate index: answer} from the rank files of an interrupted harvest (a cut line is redone)."""
    answers = {}
    for path in sorted(partial.parent.glob(f"{partial.name}.rank*.jsonl")):
        for _, line in read_lines(path, what="harvest answers"):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                row = json.loads(line)
                answers[int(row["index"])] = str(row["response"])
    return answers


def _drop_partial(partial: Path) -> None:
    """The rank files, once their answers are in a whole cache file (rank 0, after every rank read them)."""
    if rank_and_world()[0] == 0:
        for path in partial.parent.glob(f"{partial.name}.rank*.jsonl"):
            path.unlink(missing_ok=True)


def _partial_path(module, name: Optional[str], candidates: list[Example], datamodule) -> Path:
    """The stem of one generator's rank files while it answers (None: the run's own model)."""
    key = {"generator": name or module.model_identity, "queries": _queries(candidates), **_prompt_key(datamodule)}
    return Path(datamodule.fr.harvest_dir) / f".partial-{_digest(key)}"


def _generator_answers(module, name: Optional[str], candidates: list[Example], datamodule) -> list[str]:
    """One generator's answers to every candidate: the run's model (name None), or a model loaded
    with the run's model settings, its answers cached on their own (a VLGuard-format file)."""
    partial = _partial_path(module, name, candidates, datamodule)
    if name is None:  # the run's model: its answers are kept in the forget file only
        return _generate(module.model, module.processor, candidates, datamodule, partial)
    key = {"generator": name, "queries": _queries(candidates), **_prompt_key(datamodule), "version": 1}
    path = Path(datamodule.fr.harvest_dir) / f"answers-{_digest(key)}.json"
    if path.is_file():
        return [rec["instr-resp"][0]["response"] for rec in json.loads(path.read_text(encoding="utf-8"))]
    from models.backbone import load_pretrained, set_end_of_turn

    model_cfg = OmegaConf.merge(OmegaConf.create(module.hparams["model"]), {"name_or_path": name, "revision": None})
    try:
        model, processor = load_pretrained(model_cfg)
    except UserError as err:
        raise UserError(f"data.forget_retain.generators: {err}") from err
    set_end_of_turn(model, processor, model_cfg.get("end_token"))
    model.to(harvest_device(module)).eval()
    responses = _generate(model, processor, candidates, datamodule, partial)
    del model
    free_memory()
    if rank_and_world()[0] == 0:
        atomic_write(path, json.dumps([_record(ex, r) for ex, r in zip(candidates, responses)], indent=1),
                     what="harvest cache")
        print(f"harvest: {name} answered {len(responses)} queries -> {path}")
    _drop_partial(partial)
    return responses


def _judge(module, datamodule):
    name = datamodule.fr.get("judge_model")
    if not name:
        return None
    from models.chat_judge import ChatJudge

    model_cfg = module.hparams["model"]
    return ChatJudge.from_pretrained(str(name), dtype=model_cfg["dtype"], device=str(harvest_device(module)),
                                     trust_remote_code=bool(model_cfg.get("trust_remote_code")),
                                     decoding=datamodule.fr.get("judge_decoding", "checkpoint"))


def choose_answers(module, candidates: list[Example], answers: list[list[str]], judge=None,
                   keep_all: bool = False) -> tuple[list[Optional[str]], dict]:
    """One answer per query (None: left out) from `answers[generator][query]`, and a report. The
    judge's pick, else the first answer the run's judge marks harmful (`keep_all`: else the first)."""
    picks = [judge_choice(judge, image_label(ex), [gen[q] for gen in answers]) if judge is not None else None
             for q, ex in enumerate(candidates)]
    # The run's judge (a VLM with eval.judge=vlm) only where the selection judge did not choose.
    ruled = [q for q, g in enumerate(picks) if g is None]
    verdicts = [dict(zip(ruled, module.judge_batch([candidates[q] for q in ruled], [gen[q] for q in ruled])[0]))
                for gen in answers] if ruled else []
    chosen, picked = [], [0] * len(answers)
    report = {"candidates": len(candidates), "harmful": 0, "refused": 0, "other": 0,
              "judge_unparsed": len(ruled) if judge is not None else 0}
    for q, g in enumerate(picks):
        if g is None:
            g = next((i for i, v in enumerate(verdicts) if v[q].harmful), 0 if keep_all else None)
        chosen.append(None if g is None else answers[g][q])
        if g is not None:
            picked[g] += 1
        # kept / every generator refused / left out for another reason (off-topic, harmless)
        report["harmful" if g is not None else "refused" if all(v[q].refusal for v in verdicts) else "other"] += 1
    report["picked"] = picked
    return chosen, report


def _record(ex: Example, response: str) -> dict:
    item = {"instruction": ex.instruction, "response": response, "harmful_keywords": ex.harmful_keywords}
    rec = {"id": ex.id, "image": ex.image, "safe": False, "harmful_category": ex.category, "instr-resp": [item]}
    if "world" in ex.extra:
        rec["world"] = ex.extra["world"]
    return rec


def harvest_forget_set(module, candidates: list[Example], datamodule) -> tuple[list[Example], dict]:
    """(forget rows = candidates with the chosen harmful answers as responses, report)."""
    if len(_generators(datamodule)) > 1 and datamodule.fr.get("harvest_keep", "harmful") == "all":
        raise UserError("data.forget_retain.harvest_keep=all writes one generator's answers; with several "
                        "generators each one's answers are already cached (answers-*.json in harvest_dir)")
    path = _cache_path(module, candidates, datamodule)
    report_path = path.with_suffix(".report.json")
    # One process: a concurrent run harvesting the same key waits and reuses this one's files. Under
    # DDP the ranks generate together (a lock on one rank would stall the others' collectives); the
    # files are written atomically with identical contents either way.
    single = rank_and_world()[1] == 1
    with file_lock(path.with_name(f".{path.name}.lock")) if single else contextlib.nullcontext():
        return _harvest(module, candidates, datamodule, path, report_path)


def harvest_device(module) -> torch.device:
    """Where the harvest generates: it runs in run assembly, before Lightning has moved the model,
    so a GPU run would otherwise answer thousands of queries with a 7B model on the CPU."""
    return accelerator_device((module.hparams.get("trainer") or {}).get("accelerator", "auto"))


def _harvest(module, candidates, datamodule, path: Path, report_path: Path) -> tuple[list[Example], dict]:
    generators = _generators(datamodule)
    if not (path.is_file() and report_path.is_file()):
        module.to(harvest_device(module))  # Lightning moves it again (to the same device) at fit
        answers = [_generator_answers(module, name, candidates, datamodule) for name in generators]
        judge = _judge(module, datamodule)
        chosen, report = choose_answers(module, candidates, answers, judge,
                                        keep_all=datamodule.fr.get("harvest_keep", "harmful") == "all")
        del judge
        free_memory()
        kept = [_record(ex, text) for ex, text in zip(candidates, chosen) if text is not None]
        report.update(file=str(path), generators=[g or "the run's model" for g in generators],
                      selection=datamodule.fr.get("judge_model") or "the run's judge")
        if rank_and_world()[0] == 0:
            for target, obj in ((path, kept), (report_path, report)):  # the report last: it marks the pair whole
                atomic_write(target, json.dumps(obj, indent=1), what="harvest cache")
        if None in generators:  # the run's model's answers are in the forget file now
            _drop_partial(_partial_path(module, None, candidates, datamodule))
    else:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        kept = json.loads(path.read_text(encoding="utf-8"))
    if rank_and_world()[0] == 0:
        by = "the base model" if generators == [None] else f"{len(generators)} generator(s)"
        print(f"harvest: {report['harmful']} of {report['candidates']} unsafe queries answered harmfully by {by} "
              f"({report['refused']} refused, {report['other']} other) -> {path}")
        if report.get("generators", [None]) != ["the run's model"] or report.get("judge_unparsed"):
            print(f"harvest: chosen by {report.get('selection')}: " + ", ".join(
                f"{g} {n}" for g, n in zip(report.get("generators", []), report.get("picked", [])))
                + (f"; the judge named no answer for {report['judge_unparsed']} queries (the rule chose)"
                   if report.get("judge_unparsed") else ""))
    if not kept:
        raise UserError(f"harvest: the generators answered none of the {report['candidates']} unsafe queries "
                        "harmfully, so there is nothing to forget (check the judge, eval.judge)")
    by_key = {(ex.id, ex.instruction): ex for ex in candidates}
    rows = []
    for rec in kept:  # keep each candidate's own fields (subset, answer, extra) with the new response
        ex = by_key[(str(rec["id"]), rec["instr-resp"][0]["instruction"])]
        rows.append(replace(ex, response=rec["instr-resp"][0]["response"]))
    return rows, report
