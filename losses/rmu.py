"""Representation misdirection for unlearning (RMU).

L_RMU = mse(h_l^theta(x_f), c*u) + alpha * mse(h_l^theta(x_r), h_l^ref(x_r))   [+ lambda * CE(D_r)]

``mse`` follows the official RMU code (``F.mse_loss``): the mean of the
squared error over positions AND hidden dims, i.e. ||h - target||^2 / d
averaged over positions -- the usual "mean||h - c*u||^2" divided by d. That is
the scale at which the released c = 10, alpha = 1 were used.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

RMUReduction = Literal["masked", "all"]


def _mse(hidden: Tensor, target: Tensor, mask: Tensor | None, reduction: RMUReduction) -> Tensor:
    if reduction not in ("masked", "all"):
        raise ValueError(f"unknown RMU reduction {reduction!r}; choose one of: masked, all")
    target = torch.broadcast_to(target, hidden.shape)
    if reduction == "masked" and mask is not None:
        if mask.shape != hidden.shape[:-1]:
            raise ValueError(f"mask {tuple(mask.shape)} must be hidden's [B, T] {tuple(hidden.shape[:-1])}")
        keep = mask.bool()
        # Select real tokens *before* subtracting: padded positions then get an
        # exactly-zero gradient even if their activations are inf/NaN.
        hidden, target = hidden[keep], target[keep]
    sq = (hidden - target).pow(2)
    return sq.sum() / max(sq.numel(), 1)  # = F.mse_loss, but 0 (not NaN) if nothing is kept


def rmu_forget_loss(
    hidden: Tensor, control: Tensor, mask: Tensor | None = None, reduction: RMUReduction = "masked"
) -> Tensor:
    """Forget term: mean over kept elements of (h_l^theta(x_f) - c*u)^2.

    Args:
        hidden: [B, T, d] output hidden state of decoder layer l on forget inputs.
        control: [d] the already-scaled steering vector c*u (``make_control_vector``).
        mask: [B, T], 1/True on real tokens (attention mask, optionally without
            image tokens). Used only with ``reduction="masked"`` (the default).
        reduction: ``"masked"`` averages over real tokens only (the better default);
            ``"all"`` averages over every position incl. padding and image tokens,
            like the official VLM code. ``mask=None`` means every position counts.
    """
    return _mse(hidden, control.to(hidden.dtype), mask, reduction)


def rmu_retain_loss(
    hidden: Tensor, ref_hidden: Tensor, mask: Tensor | None = None, reduction: RMUReduction = "masked"
) -> Tensor:
    """Retain term: mean over kept elements of (h_l^theta(x_r) - h_l^ref(x_r))^2.

    Same shapes and ``mask``/``reduction`` conventions as ``rmu_forget_loss``;
    ``ref_hidden`` ([B, T, d], frozen model) is detached. Multiply by alpha.
    """
    return _mse(hidden, ref_hidden.detach(), mask, reduction)


def make_control_vector(
    dim: int,
    coeff: float,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """c*u with u ~ U[0,1)^d / ||.||, so ||c*u|| = coeff.

    Drawn on the CPU in fp32 from its own ``torch.Generator(seed)``: the same
    seed gives the same vector on every device and rank, and the global RNG is
    left untouched. Cast to ``dtype``/``device`` afterwards.
    """
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(dim, generator=gen, dtype=torch.float32)
    return (coeff * u / u.norm()).to(device=device, dtype=dtype)
