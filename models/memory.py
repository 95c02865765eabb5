"""GPU memory of a training run, estimated from the model's shape before any weight is loaded.

Per device, in bytes:
- weights: every parameter at its dtype;
- gradients and AdamW's two moments: the trainable parameters at their dtype (Lightning's
  bf16-mixed keeps a bf16 model's parameters, gradients and moments in bf16);
- reference: a frozen copy of the trainable tensors when the reference model is a snapshot;
- activations: per decoder layer ~34·B·T·h bytes at 16 bits (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", with fused attention: no T² term); with
  gradient checkpointing only each layer's input (2·B·T·h) is kept and one layer is recomputed;
  plus the fp32 logits and their gradient (2·4·B·T·V). Unlearning holds the forget and the retain
  graph at once (`graphs`=2).
Sharded strategies (ZeRO-3, FSDP) divide weights, gradients and moments by the process count.
It is an estimate (allocator slack, CUDA context ~0.5-1 GiB and temporary buffers are not in it).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024 ** 3
ACTIVATION_BYTES_PER_LAYER = 34  # x B·T·h at 16 bits


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    reference: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.reference + self.activations

    def rows(self) -> list[tuple[str, float]]:
        return [("weights", self.weights), ("gradients", self.gradients), ("AdamW moments", self.optimizer),
                ("reference copy", self.reference), ("activations", self.activations), ("total", self.total)]


def estimate_training_memory(*, total_params: int, trainable_params: int, param_bytes: int, n_layers: int,
                             hidden: int, vocab: int, seq_len: int, batch: int, checkpointing: bool,
                             graphs: int = 1, reference_params: int = 0, shards: int = 1) -> MemoryEstimate:
    """Bytes per device (see the module doc for each term)."""
    tokens = batch * seq_len
    scale = param_bytes / 2  # the 34·B·T·h rule is for 16-bit activations
    if checkpointing:
        layers = (n_layers * 2 * tokens * hidden + ACTIVATION_BYTES_PER_LAYER * tokens * hidden) * scale
    else:
        layers = n_layers * ACTIVATION_BYTES_PER_LAYER * tokens * hidden * scale
    logits = 2 * 4 * tokens * vocab
    return MemoryEstimate(weights=total_params * param_bytes / shards,
                          gradients=trainable_params * param_bytes / shards,
                          optimizer=2 * trainable_params * param_bytes / shards,
                          reference=reference_params * param_bytes,
                          activations=graphs * (layers + logits))
