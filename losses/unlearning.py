"""Forget-set objectives (GA, GradDiff, NPO, SimNPO) and the retain term.

All are minimised. Inputs come from :mod:`.nll`: ``CE`` = token-mean
cross-entropy (a scalar), ``nll`` = per-sequence summed NLL ([B]).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

NPONormalization = Literal["sequence_sum", "batch_mean_ce"]


def ga_loss(forget_ce: Tensor) -> Tensor:
    """Gradient ascent: L = -CE(D_f)."""
    return -forget_ce


def graddiff_loss(forget_ce: Tensor, retain_ce: Tensor, gamma: float = 1.0, alpha: float = 1.0) -> Tensor:
    """Gradient difference: L = -gamma * CE(D_f) + alpha * CE(D_r)."""
    return -gamma * forget_ce + alpha * retain_ce


def npo_loss(
    policy_nll: Tensor,
    ref_nll: Tensor,
    beta: float,
    normalization: NPONormalization = "sequence_sum",
) -> Tensor:
    """Negative preference optimisation on the forget set.

    L = -(2/beta) * mean_i log sigmoid(beta * (nll_i^theta - nll_i^ref))

    Minimising it raises the policy NLL of forget samples above the reference,
    with a gradient that fades (sigmoid) once they are well above it. At
    theta = ref, L = (2/beta) * log 2.

    ``normalization`` names what the caller passes -- the formula is the same:
      * ``"sequence_sum"`` (default; NPO paper, open-unlearning): ``policy_nll``
        and ``ref_nll`` are [B] per-sequence *summed* NLL (``sequence_nll``).
      * ``"batch_mean_ce"`` (the official Safety-Mirage VLM code): both are 0-dim
        batch token-mean CE scalars (``token_mean_ce`` or HF ``outputs.loss``).
    The log-ratio is ~len_i times larger under ``"sequence_sum"``, so beta does
    NOT transfer between the two (the released beta 0.9 / 0.7 is for
    ``"batch_mean_ce"``). Shapes are checked so the two cannot be mixed up.

    ``ref_nll`` is detached: the reference model is frozen.
    """
    if normalization == "sequence_sum":
        if policy_nll.dim() != 1 or policy_nll.shape != ref_nll.shape:
            raise ValueError(
                "npo_loss(normalization='sequence_sum') expects matching [B] per-sequence NLL, "
                f"got {tuple(policy_nll.shape)} and {tuple(ref_nll.shape)}"
            )
    elif normalization == "batch_mean_ce":
        if policy_nll.dim() != 0 or ref_nll.dim() != 0:
            raise ValueError(
                "npo_loss(normalization='batch_mean_ce') expects 0-dim batch-mean CE scalars, "
                f"got {tuple(policy_nll.shape)} and {tuple(ref_nll.shape)}"
            )
    else:
        raise ValueError(f"unknown NPO normalization {normalization!r}; choose one of: sequence_sum, batch_mean_ce")
    log_ratio = policy_nll - ref_nll.detach()  # = log pi_ref - log pi_theta
    return -(2.0 / beta) * F.logsigmoid(beta * log_ratio).mean()


def npo_retain_loss(
    policy_nll: Tensor,
    ref_nll: Tensor,
    beta: float,
    normalization: NPONormalization = "batch_mean_ce",
) -> Tensor:
    """The official VLM code's NPO term on the retain set (weight it by alpha):

    L = (2/beta) * mean_i log sigmoid(beta * (nll_i^theta - nll_i^ref))

    The forget term with its sign flipped: minimising it lowers the policy NLL of retain samples
    below the reference's (log sigmoid rises with its argument). Same inputs and ``normalization``
    as ``npo_loss``; at theta = ref, L = -(2/beta) * log 2.
    """
    return -npo_loss(policy_nll, ref_nll, beta, normalization)


def simnpo_loss(policy_nll: Tensor, n_tokens: Tensor, beta: float, delta: float = 0.0) -> Tensor:
    """Reference-free NPO with length normalisation (SimNPO).

    L = -(2/beta) * mean_i log sigmoid(beta * (nll_i^theta / len_i - delta))

    Sign convention exactly as the official SimNPO code: delta
    sits inside beta (the paper's gamma equals beta * delta). ``policy_nll``
    and ``n_tokens`` are the two outputs of ``sequence_nll`` ([B] each);
    ``len_i`` is clamped to >= 1 so an empty response cannot divide by zero.
    """
    per_token = policy_nll / n_tokens.clamp_min(1).to(policy_nll.dtype)
    return -(2.0 / beta) * F.logsigmoid(beta * (per_token - delta)).mean()


def retain_weighted(loss: Tensor, retain_ce: Tensor, lam: float = 1.0) -> Tensor:
    """L_total = L + lambda * CE(D_r).

    The official VLM code adds this "LLaVA loss" to every unlearning method;
    without it the model collapses. lambda = 0 returns ``loss``.
    """
    return loss + lam * retain_ce if lam else loss

