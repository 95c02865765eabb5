"""The shared base of every alignment method: optimisation, divergence guard, and the safety
evaluation (greedy generation on the named eval sets -> refusal / ASR / IR / accuracy) that runs
in the validation and test hooks, so the mirage gap is a curve rather than an afterthought.

A method is a subclass that sets `name`, `Params` (its hyperparameters) and `loss_terms`; it may
swap `datamodule_class`. Nothing here knows which method is running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import OmegaConf
from torch import nn
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from datamodules.examples import EVAL_SETS
from datamodules.safety import SafetyDataModule, is_padding
from core.errors import UserError
from core.schema import parse_section, setting
from core.distributed import gather_objects, root_gathered, shards_parameters
from core.generation import greedy_generate, model_inputs
from lightning_modules.methods.param_groups import group_lr, param_groups
from lightning_modules.methods.sample_log import log_samples
from metrics.classify import Verdict, classify, sample_row
from metrics.judges import get_judge, separates_irrelevant
from metrics.gaps import safety_gaps
from metrics.outcomes import COUNTS, QueryOutcomes
from models.precision import compute_context, offloads_optimizer, optimizer_spec

SCHEDULERS = {"cosine": get_cosine_schedule_with_warmup, "constant": get_constant_schedule_with_warmup}


def row_query(ex) -> int:
    """A stable query index for a row that carries none (each row its own query)."""
    return int(hashlib.sha1(f"{ex.id}|{ex.subset}|{ex.instruction}".encode()).hexdigest()[:15], 16)


class TrainingDiverged(UserError):
    """A non-finite loss: training stops, the last good checkpoint is left as it is."""


@dataclasses.dataclass
class MethodParams:
    """Hyperparameters every method has. Subclasses add their own fields."""

    retain_weight: float = setting(1.0, "λ: weight of CE on retain data (the LLaVA loss), where a method has it", ge=0)


class AlignmentModule(L.LightningModule):
    name: ClassVar[str] = ""
    Params: ClassVar[type] = MethodParams
    datamodule_class: ClassVar[type] = SafetyDataModule

    def __init__(self, model: nn.Module, processor: Any, cfg, eval_set_names=EVAL_SETS):
        super().__init__()
        self.model = model
        self.processor = processor
        self.params = self.parse_params(cfg.method)
        self.optim_cfg = cfg.optim
        self.eval_cfg = cfg.eval
        # eval.judge=vlm asks eval.vlm_judge in `judge_batch` (loaded at first use: the eval steps and
        # the forget-set harvest); `self.judge` is the rule judge of the other settings.
        self.judge = get_judge("keyword" if cfg.eval.judge == "vlm" else cfg.eval.judge)
        if cfg.eval.judge == "vlm":
            from metrics.vlm_judge import get_protocol

            get_protocol(cfg.eval.vlm_judge.protocol)  # an unknown protocol fails now, not at the first validation
        self._vlm_judge = None
        self.image_mode = cfg.data.image_mode
        # The datamodule's eval sets (run assembly passes `datamodule.eval_set_names`).
        self.eval_set_names = tuple(eval_set_names)
        # One metric object per stage (lightning-hydra-template): val and test never share state.
        # Per query: K-shot sets count a query once, exactly under DDP.
        self.val_metrics = nn.ModuleDict({n: QueryOutcomes() for n in self.eval_set_names})
        self.test_metrics = nn.ModuleDict({n: QueryOutcomes() for n in self.eval_set_names})
        self.test_results: dict[str, dict[str, float]] = {}
        self.generations: list[dict] = []
        self._samples: dict[str, list[dict]] = {}
        self._warned_ir_missing = False
        # The run config as hparams (its `model` section included: an `ignore=["model"]` here would drop
        # that key, and a resume could not compare model settings); the nn.Modules are not init-arg hparams.
        self.save_hyperparameters(OmegaConf.to_container(cfg, resolve=True))

    @classmethod
    def parse_params(cls, method_cfg):
        """`method.*` (less `name`) as a checked `Params`: unknown keys, types, ranges, choices."""
        values = {k: v for k, v in OmegaConf.to_container(method_cfg, resolve=True).items() if k != "name"}
        return parse_section(values, cls.Params, "method")

    @classmethod
    def narrow_for_plan(cls, model, cfg) -> None:
        """Apply the method's own choice of trainable parameters to a model built for the run plan
        (RMU narrows them; the others train what `model.finetune` trains)."""

    # -- training ---------------------------------------------------------------------------------
    def forward_model(self, batch: dict, **kwargs):
        # Autocast where Lightning's step hooks do not provide it (the reference pass in on_fit_start)
        # and the model mixes fp32 masters with 16-bit frozen weights.
        with self.compute_context():
            return self.model(**model_inputs(batch), **kwargs)

    def compute_context(self):
        """Autocast for fp32 masters beside 16-bit frozen weights where Lightning gives none
        (models.precision.compute_context); never under a sharded strategy, whose own policy casts."""
        if self._trainer is not None and shards_parameters(self._trainer.strategy):
            return contextlib.nullcontext()
        return compute_context(self.model, self.device)

    def loss_terms(self, batch: dict) -> dict[str, torch.Tensor]:
        """Return {"loss": the objective, <term>: its parts...}; parts are logged as train/<term>."""
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with self.compute_context():  # fp32 masters + bf16 weights, no autocast from Lightning
            terms = self.loss_terms(batch)
        bad = [k for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
        if bad:
            raise TrainingDiverged(f"non-finite loss at step {self.global_step} in term(s) {', '.join(bad)} "
                                   f"({', '.join(f'{k}={float(terms[k].detach()):.4g}' for k in bad)}); "
                                   "training stopped")  # fit's line goes on with which checkpoint is kept, if any
        for key, value in terms.items():
            self.log(f"train/{key}", value.detach().float(), prog_bar=key == "loss", on_step=True, on_epoch=False)
        return terms["loss"]

    def configure_model(self) -> None:
        """A sharding strategy shards the model here, once (FSDP2: `lightning_modules.run.fsdp`);
        Lightning calls this hook at every stage, on every strategy."""
        shard = getattr(self._trainer.strategy, "shard_module", None) if self._trainer is not None else None
        if shard is not None:
            shard(self)

    def configure_optimizers(self):
        params = param_groups(self.model, self.optim_cfg)  # optim.projector_lr: the projector's own group
        optimizer_class, kwargs = self.optimizer_spec([p for group in params for p in group["params"]])
        opt = optimizer_class(params, **kwargs)
        if self.optim_cfg.scheduler not in SCHEDULERS:
            raise UserError(f"unknown optim.scheduler '{self.optim_cfg.scheduler}'; "
                            f"choose one of: {', '.join(SCHEDULERS)}")
        total = int(self.trainer.estimated_stepping_batches)
        warmup = math.ceil(self.optim_cfg.warmup_ratio * total)
        kwargs = {"num_training_steps": total} if self.optim_cfg.scheduler == "cosine" else {}
        scheduler = SCHEDULERS[self.optim_cfg.scheduler](opt, num_warmup_steps=warmup, **kwargs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_spec(self, params) -> tuple[type, dict]:
        """The optimizer of the run's update path (models/precision.py): DeepSpeed's CPU Adam when
        DeepSpeed offloads the optimizer, torch-optimi's Kahan AdamW for optim.master_weights=kahan,
        torch's AdamW otherwise (fused when every tensor is on a GPU, outside DeepSpeed)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        ds_config = getattr(strategy, "config", None) if isinstance(strategy, DeepSpeedStrategy) else None
        fused = ds_config is None and all(p.is_cuda for p in params)
        return optimizer_spec(self.optim_cfg, self.optim_cfg.get("master_weights", "fp32"),
                              ds_offload=offloads_optimizer(ds_config), fused=fused)

    # -- evaluation -------------------------------------------------------------------------------
    def generate(self, batch: dict) -> list[str]:
        # Sharded weights (FSDP, ZeRO-3): every forward is a collective, ranks generate in lockstep
        # (transformers cannot see the sharding when Lightning wraps the module around the model).
        synced = self._trainer is not None and shards_parameters(self._trainer.strategy)
        with root_gathered(self.model), self.compute_context():
            return greedy_generate(self.model, self.processor, batch, self.eval_cfg.max_new_tokens, synced)

    def vlm_judge(self):
        """The configured VLM judge, loaded once on this module's device (never a submodule: it is
        neither trained nor saved)."""
        if self._vlm_judge is None:
            from metrics.vlm_judge import VLMJudge

            # The run dir as run assembly chose it (a `_N` sibling of a finished run), from the config.
            self._vlm_judge = VLMJudge.from_judge_settings(
                self.eval_cfg.vlm_judge, image_mode=self.image_mode, device=self.device,
                default_cache=f"{self.hparams['run_dir']}/judge_cache.jsonl")
        return self._vlm_judge

    def judge_batch(self, examples: list, responses: list[str]) -> tuple[list[Verdict], list[bool]]:
        """(verdict, undetermined) per answer. Harm is judged only for non-refused answers to unsafe
        queries, by the rule judge or, with eval.judge=vlm, by the VLM judge in batches.
        `undetermined`: the judge cannot tell harmful from irrelevant there (IR is then missing)."""
        preset = self.eval_cfg.refusal_preset
        if self.eval_cfg.judge != "vlm":
            verdicts = [classify(r, ex, preset, self.judge) for r, ex in zip(responses, examples)]
            return verdicts, [not ex.safe and not v.refusal and not separates_irrelevant(self.eval_cfg.judge, ex)
                              for ex, v in zip(examples, verdicts)]
        from metrics.vlm_judge import RELEVANT, JudgeItem

        verdicts = [classify(r, ex, preset, None) for r, ex in zip(responses, examples)]
        asked = [i for i, (ex, v) in enumerate(zip(examples, verdicts)) if not ex.safe and not v.refusal]
        protocol = self.eval_cfg.vlm_judge.protocol
        judged = self.vlm_judge()([JudgeItem(examples[i].instruction, responses[i], examples[i].image, protocol)
                                   for i in asked]) if asked else []
        for i, j in zip(asked, judged):
            verdicts[i] = dataclasses.replace(verdicts[i], harmful=j.verdict == RELEVANT)
        return verdicts, [False] * len(examples)

    def _eval_step(self, batch: dict, dataloader_idx: int, metrics: nn.ModuleDict, keep: bool) -> None:
        name = self.eval_set_names[dataloader_idx]
        responses = self.generate(batch)
        examples = batch["examples"]
        real = [i for i, ex in enumerate(examples) if not is_padding(ex)]  # padding keeps sharded ranks in step
        responses, examples = [responses[i] for i in real], [examples[i] for i in real]
        verdicts, undetermined = self.judge_batch(examples, responses)
        dev = self.device
        # A query's index within its set (its K rewrites share it); data without one: its own row.
        query = [ex.extra["query"] if "query" in ex.extra else row_query(ex) for ex in examples]
        metrics[name].update(torch.tensor(query, dtype=torch.long, device=dev),
                             torch.tensor([ex.safe for ex in examples], device=dev),
                             *(torch.tensor([getattr(v, f) for v in verdicts], device=dev)
                               for f in ("refusal", "harmful", "correct")),
                             torch.tensor(undetermined, device=dev),
                             torch.tensor([v.relevant for v in verdicts], device=dev))
        shown = self._samples.setdefault(name, [])
        for ex, r in zip(examples, responses):
            if len(shown) < self.eval_cfg.log_samples:
                shown.append({"prompt": ex.instruction, "response": r, "image": ex.image})
        if keep:
            self.generations += [sample_row(name, ex, r, v) for ex, r, v in zip(examples, responses, verdicts)]

    def _eval_epoch_end(self, stage: str, metrics: nn.ModuleDict) -> dict[str, dict[str, float]]:
        results = {}
        for name in self.eval_set_names:
            values = metrics[name].compute()  # synced across ranks (rows gathered, grouped per query)
            metrics[name].reset()
            results[name] = {k: int(v) if k in COUNTS else float(v) for k, v in values.items()}
            for key, value in values.items():
                if key not in COUNTS and not torch.isnan(value):  # a missing rate is not logged (never as 0)
                    self.log(f"{stage}/{name}/{key}", value.float(), sync_dist=False, rank_zero_only=True)
        missing = [n for n, r in results.items() if math.isnan(r.get("ir", 0.0))]
        if missing and not self._warned_ir_missing:
            self._warned_ir_missing = True
            rank_zero_warn(f"IR is missing (NaN) on {', '.join(missing)}: eval.judge={self.eval_cfg.judge} cannot tell "
                           "a harmful answer from an irrelevant one on records without harmful_keywords (real "
                           "VLGuard), so ASR counts every non-refused answer; set eval.judge=vlm to measure IR")
        gaps = safety_gaps(results)
        for key, value in gaps.items():
            if not math.isnan(value):  # e.g. the relevance gaps where no relevance judge ran
                self.log(f"{stage}/{key}", value, sync_dist=False, rank_zero_only=True)
        self._log_samples(stage)
        return results

    def _log_samples(self, stage: str) -> None:
        if self.global_rank == 0 and self._trainer is not None:
            log_samples(self.loggers, stage, self._samples, self.global_step)
        self._samples = {}

    def on_train_start(self) -> None:
        for metric in self.val_metrics.values():  # nothing from a sanity check leaks into step 0
            metric.reset()
        self._apply_configured_optim()

    def _apply_configured_optim(self) -> None:
        """A resumed run restores the optimizer and scheduler of its checkpoint, learning rate
        included: the configured optim.lr / weight_decay / betas win (resuming after a divergence
        with a smaller optim.lr must use it), at the scheduler's restored position."""
        wd, betas = self.optim_cfg.weight_decay, tuple(self.optim_cfg.betas)
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.base_lrs = [group_lr(group, self.optim_cfg) for group in scheduler.optimizer.param_groups]
            for group, factor in zip(scheduler.optimizer.param_groups, getattr(scheduler, "lr_lambdas", [])):
                peak = group_lr(group, self.optim_cfg)
                group.update(initial_lr=peak, lr=peak * factor(scheduler.last_epoch))
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group.update(weight_decay=wd, betas=betas)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, self.val_metrics, keep=False)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_metrics)

    def on_test_epoch_start(self) -> None:
        self.generations = []

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, self.test_metrics, keep=True)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._eval_epoch_end("test", self.test_metrics)
        self.generations = gather_objects(self.generations)
