"""Alignment losses as pure functions: tensors in, scalar (or per-sequence) tensors out.

Every unlearning method adds lambda * CE(D_r) on top (``retain_weighted``).
"""

from .nll import pooled_ce, sequence_nll, token_mean_ce
from .rmu import make_control_vector, rmu_forget_loss, rmu_retain_loss
from .unlearning import ga_loss, graddiff_loss, npo_loss, npo_retain_loss, retain_weighted, simnpo_loss

__all__ = [
    "pooled_ce",
    "sequence_nll",
    "token_mean_ce",
    "ga_loss",
    "graddiff_loss",
    "npo_loss",
    "npo_retain_loss",
    "simnpo_loss",
    "retain_weighted",
    "rmu_forget_loss",
    "rmu_retain_loss",
    "make_control_vector",
]
