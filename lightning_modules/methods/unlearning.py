"""The shared base of the unlearning methods (GA, GradDiff, NPO, SimNPO, RMU): forget / retain
batches, the retain cross-entropy λ·CE(D_r) that every method carries, and the
reference model without a second copy:

- `adapter`: under LoRA the reference is the same model with the adapter disabled;
- `snapshot`: frozen copies of the few modules that own *trainable* tensors, taken before any
  update or sharding and swapped into the model for the reference forward (the "frozen copy"
  option; cheap when few tensors train, as in RMU). A module swap, not a parameter swap: it works
  the same on one process, under DDP and under FSDP2 / ZeRO-3, whose hooks gather the weights of
  the modules they own, not of the copies swapped in;
- `cache` (NPO): each forget (and, for NPO's retain term, retain) sample's reference NLL, computed
  once before the first update and saved in the checkpoint, so a resume never recomputes it against a moved policy.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager, nullcontext

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from datamodules.forget_retain import ForgetRetainDataModule
from core.distributed import gather_objects
from lightning_modules.methods.alignment import AlignmentModule, MethodParams
from core.errors import UserError
from core.schema import setting
from losses import retain_weighted, sequence_nll, token_mean_ce

REFERENCES = ("auto", "adapter", "snapshot", "cache")


@dataclasses.dataclass
class UnlearningParams(MethodParams):
    retain_weight: float = setting(1.0, "λ of λ·CE(D_r); the paper reports collapse without it", ge=0)


def check(ok: bool, key: str, value, why: str) -> None:
    """One-line config error naming the method key."""
    if not ok:
        raise UserError(f"method.{key}={value!r}: {why}")


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def frozen_owners(model: nn.Module) -> dict[str, nn.Module]:
    """Frozen copies of the modules that own a trainable tensor (tied names included: a tied head
    gets its own copy of the shared initial values), outermost owners only."""
    owners = sorted({name.rpartition(".")[0] for name, p in model.named_parameters(remove_duplicate=False)
                     if p.requires_grad})
    if "" in owners:
        raise UserError("method.reference=snapshot: the model's root owns a trainable tensor itself; "
                        "allowed references here: cache, adapter")
    outermost = [n for n in owners if not any(n.startswith(f"{o}.") for o in owners)]
    return {n: copy.deepcopy(model.get_submodule(n)).requires_grad_(False).eval() for n in outermost}


@contextmanager
def modules_swapped(model: nn.Module, replacements: dict[str, nn.Module]):
    """`model` with the named submodules replaced for the block, then put back."""
    originals = []
    for name, module in replacements.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        originals.append((parent, attr, getattr(parent, attr)))
        setattr(parent, attr, module)
    try:
        yield
    finally:
        for parent, attr, module in reversed(originals):
            setattr(parent, attr, module)


class UnlearningModule(AlignmentModule):
    """Subclasses implement `loss_terms(batch)` on `batch["forget"]` / `batch["retain"]` with the
    helpers below and return `with_retain(...)`, so λ·CE(D_r) is added the same way everywhere."""

    Params = UnlearningParams
    datamodule_class = ForgetRetainDataModule

    def __init__(self, model, processor, cfg, **kwargs):
        super().__init__(model, processor, cfg, **kwargs)
        # What the base model is (the harvest cache key; hparams leave `model` out).
        self.model_identity = {k: cfg.model.get(k) for k in ("name_or_path", "revision", "adapter_path", "finetune")}
        self.reference_mode: str | None = None
        self._frozen: dict[str, nn.Module] = {}  # `snapshot`: not submodules (never trained, saved or sharded)
        self.reference_nll: dict[str, float] = {}  # example key -> summed reference NLL (`cache` mode)
        self.forget_loader = None  # set by run assembly: () -> this rank's forget batches with `keys`
        # The same for the retain set, for methods whose loss also compares retain NLLs to the
        # reference (NPO's retain term); they set `needs_retain_reference`.
        self.needs_retain_reference = False
        self.retain_reference_nll: dict[str, float] = {}
        self.retain_loader = None

    # -- losses -------------------------------------------------------------------------------
    def sequence_nll(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence summed response NLL [B] and response token counts [B] under the policy."""
        return sequence_nll(self.forward_model(batch).logits, batch["labels"])

    def ce(self, batch: dict) -> torch.Tensor:
        return token_mean_ce(self.forward_model(batch).logits, batch["labels"])

    def with_retain(self, objective: torch.Tensor, terms: dict, batch: dict,
                    retain_ce: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"loss": objective + λ·CE(D_r), **terms, "retain_ce"}; CE(D_r) is computed here unless the
        method already has it (GradDiff, RMU), and skipped when λ = 0 and nobody needs it. A batch with
        `retain_ce_batch` (data.forget_retain.separate_retain_ce) takes CE(D_r) on that independent draw."""
        lam = self.params.retain_weight
        if "retain_ce_batch" in batch:
            retain_ce = self.ce(batch["retain_ce_batch"]) if lam else None
        if lam and retain_ce is None:
            retain_ce = self.ce(batch["retain"])
        out = {"loss": retain_weighted(objective, retain_ce, lam) if lam else objective, **terms}
        if retain_ce is not None:
            out["retain_ce"] = retain_ce
        return out

    # -- reference model ----------------------------------------------------------------------
    def setup_reference(self, mode: str, full_default: str, lora_default: str = "adapter",
                        allowed: tuple[str, ...] = REFERENCES) -> None:
        """Resolve `auto` (`lora_default` under LoRA, `full_default` otherwise) and prepare the
        reference. Call at the end of the subclass's __init__, after its trainable parameters are final."""
        check(mode in allowed, "reference", mode, f"choose one of: {', '.join(allowed)}")
        if mode == "auto":
            # Started from a saved adapter, "before alignment" is the model *with* that adapter.
            fresh_lora = is_peft(self.model) and not self.model_identity["adapter_path"]
            mode = lora_default if fresh_lora else full_default
        if mode == "adapter" and not is_peft(self.model):
            raise UserError("method.reference=adapter needs model.finetune=lora")
        if mode == "snapshot":
            self._frozen = frozen_owners(self.model)
        self.reference_mode = mode

    @torch.no_grad()
    def reference_forward(self, batch: dict, **kwargs):
        """The frozen reference's forward on `batch` (no graph)."""
        if self.reference_mode == "adapter":
            with self.model.disable_adapter():
                return self.forward_model(batch, **kwargs)
        if self.reference_mode == "snapshot":
            with modules_swapped(self.model, self.frozen_modules()):
                return self.forward_model(batch, **kwargs)
        raise RuntimeError(f"no reference forward in reference mode {self.reference_mode!r}")

    def frozen_modules(self) -> dict[str, nn.Module]:
        """The frozen copies on this module's device, in the dtype of the modules they stand in for
        (FSDP2 keeps its shards in fp32 whatever the model was loaded in)."""
        for name, frozen in self._frozen.items():
            live = next(self.model.get_submodule(name).parameters(), None)
            if live is not None and any(t.device != self.device or t.dtype != live.dtype
                                        for t in frozen.parameters() if t.is_floating_point()):
                frozen.to(device=self.device, dtype=live.dtype)
        return self._frozen

    def reference_sequence_nll(self, batch: dict, split: str = "forget") -> torch.Tensor:
        """Per-sequence summed reference NLL [B] of a forget (or retain) batch."""
        if self.reference_mode == "cache":
            cache = self.reference_nll if split == "forget" else self.retain_reference_nll
            missing = [k for k in batch["keys"] if k not in cache]
            if missing:
                raise UserError(f"{split} row {missing[0]} has no cached reference NLL: the {split} set changed "
                                "since the cache was computed (a resumed run must use the same data)")
            return torch.tensor([cache[k] for k in batch["keys"]], device=self.device)
        return sequence_nll(self.reference_forward(batch).logits, batch["labels"])[0]

    @torch.no_grad()
    def compute_reference_nll(self, loader) -> dict[str, float]:
        """Summed NLL of every forget row of `loader` (batches with `keys`) under the current
        (= reference) model, gathered over ranks."""
        cache: dict[str, float] = {}
        # Under the training step's autocast (the precision plugin's train-step context), as the official
        # frozen model's forward runs inside its training_step (llava_unlearn_full_trainer.py:558-559): at
        # θ = ref the policy and cached NLLs then agree to the last bit.
        context = self.trainer.precision_plugin.train_step_context() if self._trainer is not None else nullcontext()
        with context:
            for batch in loader:
                batch = move_data_to_device(batch, self.device)
                nll, _ = sequence_nll(self.forward_model(batch).logits, batch["labels"])
                cache.update(zip(batch["keys"], nll.tolist()))
        return dict(kv for kv in gather_objects(list(cache.items())))

    # -- hooks --------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # After a checkpoint restore (on_load_checkpoint) the cache is already there: never
        # recompute it against a policy that has moved.
        if self.reference_mode == "cache" and not self.reference_nll:
            if self.forget_loader is None:
                raise UserError("method.reference=cache needs the forget set: build the run with "
                                "lightning_modules.run.assembly.build_run")
            self.reference_nll = self.compute_reference_nll(self.forget_loader())
        if self.reference_mode == "cache" and self.needs_retain_reference and not self.retain_reference_nll:
            if self.retain_loader is None:
                raise UserError("this method needs the retain set's reference NLL: build the run with "
                                "lightning_modules.run.assembly.build_run")
            self.retain_reference_nll = self.compute_reference_nll(self.retain_loader())
        data = self.trainer.datamodule
        if self.logger is not None and getattr(data, "cue_report", None):
            self.logger.log_metrics({f"data/{name}_first_{cue}": share for name, report in data.cue_report.items()
                                     for cue, share in report.items() if cue != "n"}, step=0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.reference_nll:
            checkpoint["reference_nll"] = dict(self.reference_nll)
        if self.retain_reference_nll:
            checkpoint["retain_reference_nll"] = dict(self.retain_reference_nll)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.reference_nll = dict(checkpoint.get("reference_nll", {}))
        self.retain_reference_nll = dict(checkpoint.get("retain_reference_nll", {}))
