"""GPU memory of a training run per device, estimated from the model's shape before any weight is loaded.

Model states (bytes per device; N = trainable parameters, F = frozen ones, w = bytes of model.dtype,
P = processes). The update path is models/precision.py's:

- one GPU / DDP, fp32 masters (optim.master_weights=fp32): trainable weights 4·N, frozen w·F;
  their 16-bit copies made by autocast, cached for the backward (w·N); gradients 4·N; AdamW moments
  8·N. 4+4+8 = 16 bytes per trainable parameter plus the compute copies.
- kahan: weights w·(N+F), gradients w·N, moments 2w·N, Kahan compensation w·N (10 bytes at bf16).
- none: weights w·(N+F), gradients w·N, moments 2w·N (moments at the weights' dtype: the rounded path).
- DeepSpeed (bf16 mode: 16-bit weights and gradients, fp32 masters and moments inside the ZeRO
  optimizer; the ZeRO paper's 2 + 2 + 12 = 16 bytes per trainable parameter). ZeRO-3 divides all of it by
  P; ZeRO-2 keeps the 16-bit weights whole and divides the 14 other bytes. A frozen parameter holds
  only its 16-bit weight (divided by P under ZeRO-3). An offloaded optimizer moves masters, moments and
  the fp32 gradients to CPU RAM; offloaded parameters move the weights too.
- FSDP with fp32 sharded parameters (a 16-bit compute policy, fp32 gradient reduction): 4 + 4 + 8 = 16
  bytes per trainable parameter, frozen ones at w, everything divided by P.

Transient buffers:
- optimizer-step temporary: torch's foreach AdamW allocates a temporary the size of the parameters it
  steps (one fp32 tensor list, 4·N); the fused AdamW (CUDA, outside DeepSpeed: what the module uses)
  none; torch-optimi's Kahan step, run one tensor at a time (foreach off), none either; DeepSpeed's optimizer step holds the fp32 gradient
  partition (4·N/P, the "4_grads_32bit" of DeepSpeed's own estimator).
- DDP gradient buckets: a second copy of the gradients (the reducer's flat buckets).
- gathered-layer buffers (ZeRO-3, FSDP): the block being computed and the one prefetched, each
  gathered whole with its 16-bit gradient (2 · block · 2w).
- reference: a frozen copy of the trainable tensors when the reference model is a snapshot.
- CUDA context, cuBLAS workspace and allocator slack (~1 GiB), NCCL buffers with P > 1 (~0.5 GiB).

Activations (training): per decoder layer ~34·B·T·h bytes at 16 bits (Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", with fused attention: no T² term);
with gradient checkpointing only each layer's input (2·B·T·h) is kept and one layer is recomputed;
plus the fp32 logits and their gradient (2·4·B·T·V). Unlearning holds the forget and the retain graph
at once (`graphs`=2). Validation's generation holds a KV cache instead: 2 (K, V) · layers · B_eval ·
(prompt + new tokens) · kv_heads · head_dim at 16 bits; the two never coexist, so the total counts the
larger. An estimate: the allocator's fragmentation and kernels' scratch space are not in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1024 ** 3
ACTIVATION_BYTES_PER_LAYER = 34  # x B·T·h at 16 bits
CUDA_OVERHEAD = 1.0 * GiB  # context + cuBLAS workspace + allocator slack
NCCL_OVERHEAD = 0.5 * GiB  # communicator buffers when P > 1
STRATEGIES = ("single", "ddp", "zero2", "zero3", "fsdp")


@dataclass(frozen=True)
class MemoryEstimate:
    rows_: tuple = field(default=())  # ((name, bytes, kind)...), kind: state | activation | overhead

    def part(self, kind: str) -> float:
        return sum(v for _, v, k in self.rows_ if k == kind)

    @property
    def model_states(self) -> float:
        """Weights, gradients, masters, optimizer state, step temporaries and gathered buffers: the
        quantity DeepSpeed's estimate_zero*_model_states_mem_needs reports."""
        return self.part("state")

    @property
    def activations(self) -> float:
        return max(self.part("activation"), self.part("generation"))

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.part("overhead")

    def value(self, name: str) -> float:
        return sum(v for n, v, _ in self.rows_ if n == name)

    def rows(self) -> list[tuple[str, float]]:
        shown = [(n, v) for n, v, _ in self.rows_ if v]
        return shown + [("model states", self.model_states), ("total", self.total)]


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    trainable_params: int
    n_layers: int
    hidden: int
    vocab: int
    block_params: int = 0  # parameters of one decoder layer (gathered whole under ZeRO-3 / FSDP)
    kv_heads: int = 0
    head_dim: int = 0


def model_state_rows(shape: ModelShape, *, weight_bytes: int, path: str, strategy: str, world: int,
                     fused: bool = True, offload_optimizer: bool = False, offload_params: bool = False,
                     reference_params: int = 0) -> list[tuple[str, float, str]]:
    """(name, bytes, "state") per device for the update `path` (fp32 | kahan | none | strategy) under
    `strategy` (single | ddp | zero2 | zero3 | fsdp) on `world` processes (module doc)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    n, f, w = shape.trainable_params, shape.total_params - shape.trainable_params, weight_bytes
    p = max(world, 1)
    rows: list[tuple[str, float]] = []
    if strategy in ("zero2", "zero3"):
        weights_sharded = strategy == "zero3"
        rows.append(("weights (16-bit)", 0.0 if offload_params else (n + f) * w / (p if weights_sharded else 1)))
        rows.append(("gradients (16-bit)", n * w / p))
        cpu = offload_optimizer
        rows.append(("fp32 master weights", 0.0 if cpu else 4 * n / p))
        rows.append(("AdamW moments (fp32)", 0.0 if cpu else 8 * n / p))
        rows.append(("optimizer-step fp32 grads", 0.0 if cpu else 4 * n / p))
        if weights_sharded:
            rows.append(("gathered-layer buffers", 2 * shape.block_params * 2 * w))
    elif strategy == "fsdp":
        rows.append(("weights (fp32 shards)", (4 * n + w * f) / p))
        rows.append(("gradients (fp32 shards)", 4 * n / p))
        rows.append(("AdamW moments (fp32)", 8 * n / p))
        rows.append(("optimizer-step temporary", 4 * n / p))
        rows.append(("gathered-layer buffers", 2 * shape.block_params * 2 * w))
    else:  # one GPU or DDP: the module's own optimizer on whole tensors
        if path == "fp32":
            rows.append(("weights", 4 * n + w * f))
            rows.append(("16-bit compute copies", w * n if w < 4 else 0.0))
            grad = 4
            rows.append(("gradients", grad * n))
            rows.append(("AdamW moments (fp32)", 8 * n))
            rows.append(("optimizer-step temporary", 0.0 if fused else 4 * n))
        else:
            grad = w
            rows.append(("weights", w * (n + f)))
            rows.append(("gradients", w * n))
            rows.append(("AdamW moments", 2 * w * n))
            if path == "kahan":
                rows.append(("Kahan compensation", w * n))
                rows.append(("optimizer-step temporary", 0.0))  # torch-optimi stepped one tensor at a time
            else:
                rows.append(("optimizer-step temporary", 0.0 if fused else w * n))
        if strategy == "ddp":
            rows.append(("DDP gradient buckets", grad * n))
    rows.append(("reference copy", reference_params * w))
    return [(name, float(value), "state") for name, value in rows]


def activation_rows(shape: ModelShape, *, seq_len: int, batch: int, checkpointing: bool, graphs: int = 1,
                    act_bytes: int = 2, eval_batch: int = 0, eval_tokens: int = 0) -> list[tuple[str, float, str]]:
    """Training activations and validation's KV cache per device (module doc)."""
    tokens = batch * seq_len
    scale = act_bytes / 2  # the 34·B·T·h rule is for 16-bit activations
    h = shape.hidden
    if checkpointing:
        layers = (shape.n_layers * 2 * tokens * h + ACTIVATION_BYTES_PER_LAYER * tokens * h) * scale
    else:
        layers = shape.n_layers * ACTIVATION_BYTES_PER_LAYER * tokens * h * scale
    logits = 2 * 4 * tokens * shape.vocab
    kv_width = (shape.kv_heads * shape.head_dim) or h
    kv = 2 * shape.n_layers * eval_batch * eval_tokens * kv_width * act_bytes
    return [("activations", float(graphs * (layers + logits)), "activation"),
            ("generation KV cache", float(kv), "generation")]


def estimate_memory(shape: ModelShape, *, weight_bytes: int, path: str, strategy: str = "single", world: int = 1,
                    seq_len: int, batch: int, checkpointing: bool, graphs: int = 1, reference_params: int = 0,
                    fused: bool = True, offload_optimizer: bool = False, offload_params: bool = False,
                    act_bytes: int = 2, eval_batch: int = 0, eval_tokens: int = 0) -> MemoryEstimate:
    """Every term of the module doc for one device."""
    rows = model_state_rows(shape, weight_bytes=weight_bytes, path=path, strategy=strategy, world=world, fused=fused,
                            offload_optimizer=offload_optimizer, offload_params=offload_params,
                            reference_params=reference_params)
    rows += activation_rows(shape, seq_len=seq_len, batch=batch, checkpointing=checkpointing, graphs=graphs,
                            act_bytes=act_bytes, eval_batch=eval_batch, eval_tokens=eval_tokens)
    rows.append(("CUDA/NCCL overhead", CUDA_OVERHEAD + (NCCL_OVERHEAD if world > 1 else 0.0), "overhead"))
    return MemoryEstimate(tuple(rows))
