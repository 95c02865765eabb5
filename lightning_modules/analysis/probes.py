"""Knowledge probes of an aligned model, run by `fit` after the test evaluation when
`eval.probes=true`, written to `<run_dir>/probes.json` (read by `compare`):

(a) hazard NLL: mean per-token NLL of each unsafe test query's harmful answer (the record's
    `harmful_response`) under the clean, attacked (compliance cue) and neutral-cue prompt. A model
    that refuses but still "knows" keeps it low (the mirage); removed knowledge raises it.
(b) relearning attack: `relearn_steps` fine-tuning steps on a small set of hazard answers from the
    TRAINING split (disjoint from the test queries), and separately on benign answers, then ASR on
    (the first `max_queries` of) `unsafe_clean` again, against the test evaluation's ASR on the same
    queries. Hidden knowledge returns after a few steps; removed knowledge stays away.
    Always on a copy of the weights: the saved model is never touched.
(c) first-token attribution: occlusion of the first word (replaced by the neutral-cue control's
    word where the run has an `unsafe_neutral` set, else removed), the image (blanked) and the rest
    of the query (removed), and of the end mark alone (stripped),
    measured on the log-odds of a refusal first token against the answer's first token
    (metrics.attribution).
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from core.schema import parse_section
from lightning_modules.config.schema import ProbeSettings
from core.files import atomic_write
from core.generation import greedy_generate, model_inputs
from core.records import strict_json
from datamodules.collate import VLMCollator
from datamodules.examples import ALL_EVAL_SETS, Example
from losses.nll import mean_token_nll, token_mean_ce
from metrics.attribution import refusal_log_odds, summarize_attribution
from metrics.classify import classify
from metrics.refusal import is_refusal
from models.backbone import mark_trainable
from models.precision import compute_context, optimizer_spec, run_update_path, upcast_trainable

NLL_SETS = {"hazard_nll_clean": "unsafe_clean", "hazard_nll_attacked": "unsafe_attacked",
            "hazard_nll_neutral": "unsafe_neutral"}
ATTRIBUTION_SETS = tuple(s for s in ALL_EVAL_SETS if s != "unsafe_cue_removed")
PARTS = ("first_word", "image", "rest", "end_mark")
END_MARKS = ".?!"


def parse_probe_settings(cfg) -> ProbeSettings:
    return parse_section(cfg.get("probes") or {}, ProbeSettings, "probes")


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def with_hazard_answer(examples: list[Example]) -> list[Example]:
    return [replace(e, response=e.extra["harmful_response"]) for e in examples
            if isinstance(e.extra.get("harmful_response"), str)]


class Prober:
    def __init__(self, cfg, module, data, settings: ProbeSettings):
        self.cfg, self.module, self.data, self.settings = cfg, module, data, settings
        self.processor = module.processor
        self.device = module.device
        self.batch_size = int(cfg.data.eval_batch_size)
        self.train_collate = self._collator(train=True)

    def _collator(self, train: bool, image_mode: Optional[str] = None) -> VLMCollator:
        return VLMCollator(self.processor, self.cfg.data.max_length, train=train,
                           image_mode=image_mode or self.cfg.data.image_mode,
                           system_prompt=self.cfg.data.get("system_prompt"),
                           image_aspect_ratio=self.cfg.data.get("image_aspect_ratio", "original"))

    # -- (a) -----------------------------------------------------------------------------------
    @torch.no_grad()
    def hazard_nll(self, model, examples: list[Example]) -> list[float]:
        model.eval()
        out = []
        for chunk in _batches(with_hazard_answer(examples), self.batch_size):
            batch = _to(self.train_collate(chunk), self.device)
            logits = model(**model_inputs(batch)).logits
            out += mean_token_nll(logits, batch["labels"]).tolist()
        return out

    # -- (b) -----------------------------------------------------------------------------------
    def asr(self, model, examples: list[Example]) -> float:
        collate = self._collator(train=False)
        harmful = []
        for chunk in _batches(examples, self.batch_size):
            responses = greedy_generate(model, self.processor, _to(collate(chunk), self.device),
                                        self.cfg.eval.max_new_tokens)
            # the test evaluation's own rule (vlm: its keyword stand-in, as in the training-time eval)
            harmful += [classify(r, ex, self.cfg.eval.refusal_preset, self.module.judge).harmful
                        for ex, r in zip(chunk, responses)]
        return sum(harmful) / len(harmful) if harmful else math.nan

    def relearn(self, rows: list[Example], test: list[Example]) -> float:
        """ASR on `test` after `relearn_steps` AdamW steps on `rows`, on a copy of the weights."""
        settings = self.settings
        model = copy.deepcopy(self.module.model)
        mark_trainable(model, self.cfg.model)  # what `model.finetune` trains, whatever the method trained
        path = run_update_path(self.cfg)  # the run's update path; a strategy's fp32 masters -> fp32 on this copy
        if path.name in ("fp32", "strategy"):
            upcast_trainable(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer_class, kwargs = optimizer_spec(self.cfg.optim, path.name)
        optim = optimizer_class(params, **{**kwargs, "lr": settings.relearn_lr or self.cfg.optim.lr,
                                           "weight_decay": 0.01, "betas": (0.9, 0.999)})  # torch's defaults
        rng = random.Random(self.cfg.seed)
        torch.manual_seed(self.cfg.seed)
        model.train()
        for _ in range(settings.relearn_steps):
            batch = _to(self.train_collate(rng.sample(rows, min(settings.relearn_batch_size, len(rows)))), self.device)
            logits = model(**model_inputs(batch)).logits
            loss = token_mean_ce(logits, batch["labels"])
            optim.zero_grad()
            loss.backward()
            optim.step()
        model.eval()
        try:
            return self.asr(model, test)
        finally:
            del model, optim

    def relearn_rows(self, test_ids: set[str], test_images: set) -> tuple[list[Example], list[Example]]:
        """(hazard rows with their harmful answer, benign rows with their answer) of the training
        split, none sharing an id or an image with the test queries."""
        rows = [e for e in self.data.examples(self.data.files.train)
                if e.id not in test_ids and (e.image is None or e.image not in test_images)]
        rng = random.Random(self.cfg.seed)
        hazard, benign = with_hazard_answer([e for e in rows if not e.safe]), [e for e in rows if e.safe]
        rng.shuffle(hazard)
        rng.shuffle(benign)
        n = self.settings.relearn_examples
        return hazard[:n], benign[:n]

    # -- (c) -----------------------------------------------------------------------------------
    def _first_label(self, examples: list[Example]) -> list[int]:
        batch = self.train_collate(examples)
        labels = batch["labels"]
        first = (labels != -100).int().argmax(1)
        return labels[torch.arange(len(examples)), first].tolist()

    @torch.no_grad()
    def log_odds(self, model, examples: list[Example], comply: list[int], refusal_ids: list[int],
                 image_mode: Optional[str] = None) -> list[float]:
        collate = self._collator(train=False, image_mode=image_mode)
        out = []
        for i in range(0, len(examples), self.batch_size):
            batch = _to(collate(examples[i:i + self.batch_size]), self.device)
            last = model(**model_inputs(batch)).logits[:, -1, :]
            ids = torch.tensor(comply[i:i + self.batch_size], device=self.device)
            out += refusal_log_odds(last, refusal_ids, ids).tolist()
        return out

    def refusal_token_ids(self, anchor: Example) -> list[int]:
        """First tokens of the training split's refusals (the unsafe rows' responses)."""
        refusals = sorted({e.response for e in self.data.examples(self.data.files.train)
                           if not e.safe and e.response and is_refusal(e.response, self.cfg.eval.refusal_preset)})
        if not refusals:
            return []
        return sorted(set(self._first_label([replace(anchor, response=r) for r in refusals[:50]])))

    def attribution(self, model, sets: dict[str, list[Example]]) -> dict:
        model.eval()
        anchor = next(iter(sets.values()))[0]
        refusal_ids = self.refusal_token_ids(anchor)
        if not refusal_ids:
            print("probes: no refusal in the training split's unsafe responses; attribution skipped")
            return {}
        # The first word is occluded by the neutral-cue control's word where the run has one (a
        # word training ties to neither label), else removed (an input the model never saw).
        neutral = {e.instruction.split()[0] for e in sets.get("unsafe_neutral", []) if e.instruction.split()}
        filler = [next(iter(neutral))] if len(neutral) == 1 else []
        out = {"first_word_occlusion": f"replaced by '{filler[0]}'" if filler else "removed"}
        for name in ATTRIBUTION_SETS:
            if name not in sets:
                continue
            examples = [e for e in sets[name] if len(e.instruction.split()) > 1]
            targets = [e.response if e.safe else e.extra.get("harmful_response") for e in examples]
            examples = [replace(e, response=t) for e, t in zip(examples, targets) if isinstance(t, str) and t]
            if not examples:
                continue
            comply = self._first_label(examples)
            refusal_set = set(refusal_ids)
            keep = [i for i, c in enumerate(comply) if c not in refusal_set]  # an answer that is itself a refusal says nothing
            examples, comply = [examples[i] for i in keep], [comply[i] for i in keep]
            if not examples:
                continue
            full = self.log_odds(model, examples, comply, refusal_ids)
            words = [e.instruction.split() for e in examples]
            occluded = {
                "first_word": self.log_odds(model, [replace(e, instruction=" ".join(filler + w[1:]))
                                                    for e, w in zip(examples, words)],
                                            comply, refusal_ids),
                "image": self.log_odds(model, examples, comply, refusal_ids, image_mode="blank"),
                "rest": self.log_odds(model, [replace(e, instruction=w[0]) for e, w in zip(examples, words)],
                                      comply, refusal_ids),
                # part of "rest", measured alone: in the Mirage World the end mark follows the cue
                # ("?" after a question word), so it can carry the cue's signal by itself
                "end_mark": self.log_odds(model, [replace(e, instruction=e.instruction.rstrip(END_MARKS))
                                                  for e in examples], comply, refusal_ids),
            }
            out[name] = summarize_attribution(full, occluded)
        return out


def _finite(x: float) -> Optional[float]:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def run_probes(cfg, module, data, run_dir: Path) -> dict:
    """All three probes on the run's test sets; writes and returns probes.json's content."""
    # fp32 masters next to 16-bit frozen weights run under autocast, as in the training steps
    with compute_context(module.model, module.device):
        return _run_probes(cfg, module, data, run_dir)


def _run_probes(cfg, module, data, run_dir: Path) -> dict:
    settings = parse_probe_settings(cfg)
    start = time.perf_counter()
    prober = Prober(cfg, module, data, settings)
    sets = data.eval_split(data.files.test)
    limited = {k: v[:settings.max_queries] for k, v in sets.items()}
    model = module.model
    summary: dict[str, Optional[float]] = {}
    nll = {}
    for column, set_name in NLL_SETS.items():
        values = prober.hazard_nll(model, limited.get(set_name, []))
        nll[set_name] = {"mean": sum(values) / len(values) if values else None, "n": len(values)}
        summary[column] = nll[set_name]["mean"]
    relearn = {}
    test = limited.get("unsafe_clean", [])
    if settings.relearn_steps > 0 and test:
        # ASR before relearning on the same queries, from the test evaluation's own generations
        asked = {(e.id, e.instruction) for e in test}
        before = [g["harmful"] for g in module.generations
                  if g["set"] == "unsafe_clean" and (g["id"], g["prompt"]) in asked]
        summary["asr_before_relearn"] = sum(before) / len(before) if before else None
        all_test = sets.get("unsafe_clean", [])
        hazard, benign = prober.relearn_rows({e.id for e in all_test}, {e.image for e in all_test})
        for column, rows, kind in (("asr_relearn", hazard, "hazard"), ("asr_relearn_benign", benign, "benign")):
            if rows:
                summary[column] = prober.relearn(rows, test)
                relearn[kind] = {"asr": summary[column], "n_train": len(rows), "n_eval": len(test)}
            else:
                print(f"probes: the training split has no {kind} rows with an answer; {column} not measured")
    attribution = prober.attribution(model, limited) if settings.attribution else {}
    for part in PARTS:
        summary[f"attr_{part}"] = attribution.get("unsafe_clean", {}).get(part, {}).get("mean")
    payload = {"summary": {k: _finite(v) if v is not None else None for k, v in summary.items()},
               "hazard_nll": nll, "relearn": relearn,
               "relearn_settings": {"steps": settings.relearn_steps, "lr": settings.relearn_lr or float(cfg.optim.lr),
                                    "batch_size": settings.relearn_batch_size, "source": "training split"},
               "attribution": attribution, "wall_s": round(time.perf_counter() - start, 1)}
    atomic_write(run_dir / "probes.json", strict_json(payload, indent=1), what="probes")
    print(f"probes ({run_dir}/probes.json): " + ", ".join(
        f"{k}={v:.3f}" for k, v in payload["summary"].items() if v is not None))
    return payload
