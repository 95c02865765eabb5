"""Token negative log-likelihood in the Hugging Face causal-LM convention.

Position t of ``logits`` predicts ``labels[:, t + 1]``; positions whose label is
``ignore_index`` (prompt, image and padding tokens) contribute nothing.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def sequence_nll(
    logits: Tensor, labels: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Per-sequence summed NLL over response tokens.

    nll_i = -sum_{t : y_{i,t+1} != ignore} log p_theta(y_{i,t+1} | x_i, y_{i,<=t})
    len_i = #{t : y_{i,t+1} != ignore}

    Args:
        logits: [B, T, V] model outputs (any float dtype; upcast to fp32 as HF does).
        labels: [B, T] token ids, ``ignore_index`` where there is no target.

    Returns:
        (nll_sum [B] float32, n_tokens [B] int64).

    Memory: instead of slicing ``logits[:, :-1]`` (a non-contiguous view that
    ``reshape`` would copy, i.e. a second [B, T, V] tensor) the labels are
    shifted left and padded with ``ignore_index`` -- HF's own trick -- so the
    logits are only viewed. ``cross_entropy(reduction="none")`` keeps one
    [B*T] loss vector, not a full log-softmax tensor, alive for backward.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    B, T, V = logits.shape
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # [B, T]
    tok = F.cross_entropy(
        logits.float().reshape(B * T, V),  # .float() is a no-op for fp32 inputs
        shift_labels.reshape(B * T),
        ignore_index=ignore_index,
        reduction="none",  # ignored positions come back as exactly 0
    ).view(B, T)
    return tok.sum(dim=1), (shift_labels != ignore_index).sum(dim=1)


def token_mean_ce(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Batch token-mean cross-entropy: CE = sum_i nll_i / sum_i len_i.

    Equals ``LlamaForCausalLM(..., labels=labels).loss``. A batch with no
    response token returns 0 (with a graph) rather than HF's NaN, so one
    all-masked batch cannot poison training.
    """
    return pooled_ce(*sequence_nll(logits, labels, ignore_index))


def pooled_ce(nll: Tensor, n_tokens: Tensor) -> Tensor:
    """The batch token-mean CE from per-sequence summed NLLs and token counts (0 for no tokens)."""
    return nll.sum() / n_tokens.sum().clamp_min(1)


def mean_token_nll(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-sequence mean NLL over its response tokens, nll_i / len_i (NaN where len_i = 0):
    how unlikely the model finds each labelled answer, comparable across answer lengths."""
    nll, n = sequence_nll(logits, labels, ignore_index)
    return nll / n.to(nll.dtype).where(n > 0, nll.new_tensor(float("nan")))
