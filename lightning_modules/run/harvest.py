"""Harvest the forget set from the base model itself, as the official pipeline does: ask the base
model the unsafe training queries, keep the answers that the run's judge marks as harmful
compliance (not refused, and harmful), and cache them as a VLGuard-format file. Run by assembly
(`data.forget_retain.forget_source=harvest`) or alone (`python -m lightning_modules.harvest`).
Under DDP each rank answers its shard and the shards are gathered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from datamodules.examples import Example
from datamodules.safety import ShardSampler
from core.distributed import accelerator_device, gather_objects, rank_and_world
from core.files import atomic_write, file_lock
from core.errors import UserError
from core.generation import greedy_generate


def _cache_path(module, candidates: list[Example], datamodule) -> Path:
    """One file per (base model, queries, generation settings, judge): the cache is never stale."""
    hp = module.hparams
    key = {"model": module.model_identity,
           "queries": [(ex.id, ex.instruction, ex.image) for ex in candidates],
           "max_new_tokens": datamodule.fr.harvest_max_new_tokens, "max_length": datamodule.cfg.max_length,
           "image_mode": datamodule.cfg.image_mode, "judge": hp["eval"]["judge"],
           "refusal_preset": hp["eval"]["refusal_preset"], "version": 1}
    keep = getattr(datamodule.fr, "harvest_keep", "harmful")
    if keep != "harmful":  # older cache keys stay valid
        key["keep"] = keep
    if hp["eval"]["judge"] == "vlm":  # which VLM judges, and how
        key["vlm_judge"] = hp["eval"]["vlm_judge"]
    for prompt_setting in ("system_prompt", "image_aspect_ratio"):  # in the key only when set: older caches stay valid
        if datamodule.cfg.get(prompt_setting) not in (None, "original"):
            key[prompt_setting] = datamodule.cfg.get(prompt_setting)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(datamodule.fr.harvest_dir) / f"forget-{digest}.json"


@torch.no_grad()
def _answer(module, candidates: list[Example], datamodule) -> list[dict]:
    """Greedy answers of the model to this rank's shard of the candidates."""
    collate = datamodule.collator(train=False)
    shard = list(ShardSampler(len(candidates), *rank_and_world()))
    rows = []
    for start in range(0, len(shard), datamodule.cfg.eval_batch_size):
        indices = shard[start: start + datamodule.cfg.eval_batch_size]
        examples = [candidates[i] for i in indices]
        texts = greedy_generate(module.model, module.processor, move_data_to_device(collate(examples), module.device),
                                datamodule.fr.harvest_max_new_tokens)
        # The run's own judge, as in its eval steps: with eval.judge=vlm the VLM judge decides (not
        # "every non-refusal", which would forget off-topic answers as if they were harmful).
        verdicts, _ = module.judge_batch(examples, texts)
        for i, text, verdict in zip(indices, texts, verdicts):
            rows.append({"index": i, "response": text, "refused": verdict.refusal, "harmful": verdict.harmful})
    return sorted(gather_objects(rows), key=lambda r: r["index"])


def _record(ex: Example, response: str) -> dict:
    item = {"instruction": ex.instruction, "response": response, "harmful_keywords": ex.harmful_keywords}
    rec = {"id": ex.id, "image": ex.image, "safe": False, "harmful_category": ex.category, "instr-resp": [item]}
    if "world" in ex.extra:
        rec["world"] = ex.extra["world"]
    return rec


def harvest_forget_set(module, candidates: list[Example], datamodule) -> tuple[list[Example], dict]:
    """(forget rows = candidates with the base model's harmful answers as responses, report)."""
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
    if not (path.is_file() and report_path.is_file()):
        module.to(harvest_device(module))  # Lightning moves it again (to the same device) at fit
        rows = _answer(module, candidates, datamodule)
        # keep=all: every answer (one generator's answers file for `datamodules.vlguard
        # build-forget-retain`, where a judge picks among several generators later).
        keep_all = getattr(datamodule.fr, "harvest_keep", "harmful") == "all"
        kept = [_record(candidates[r["index"]], r["response"]) for r in rows if r["harmful"] or keep_all]
        report = {"candidates": len(rows), "refused": sum(r["refused"] for r in rows),
                  "harmful": len(kept), "file": str(path)}
        report["other"] = report["candidates"] - report["refused"] - report["harmful"]
        if rank_and_world()[0] == 0:
            for target, obj in ((path, kept), (report_path, report)):  # the report last: it marks the pair whole
                atomic_write(target, json.dumps(obj, indent=1), what="harvest cache")
    else:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        kept = json.loads(path.read_text(encoding="utf-8"))
    if rank_and_world()[0] == 0:
        print(f"harvest: {report['harmful']} of {report['candidates']} unsafe queries answered harmfully by the "
              f"base model ({report['refused']} refused, {report['other']} other) -> {path}")
    if not kept:
        raise UserError(f"harvest: the base model answered none of the {report['candidates']} unsafe queries "
                        "harmfully, so there is nothing to forget (check the judge, eval.judge)")
    by_key = {(ex.id, ex.instruction): ex for ex in candidates}
    rows = []
    for rec in kept:  # keep each candidate's own fields (subset, answer, extra) with the new response
        ex = by_key[(str(rec["id"]), rec["instr-resp"][0]["instruction"])]
        rows.append(replace(ex, response=rec["instr-resp"][0]["response"]))
    return rows, report
