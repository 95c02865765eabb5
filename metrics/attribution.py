"""First-token attribution of the refuse / comply decision by occlusion.

At the first generated position the model's decision is summarised by the log-odds
    L(x) = log sum_{r in R} p(r | x) - log p(c | x)
where R is the set of first tokens of refusals and c the first token of the query's answer
(the hazard answer for unsafe queries, the benign answer for safe ones). The attribution of a
part of the input (the first word, the image, the rest of the query) is how much L drops when
that part is occluded: A_part = L(x) - L(x with the part occluded). A_part > 0: the part pushes
toward refusing; < 0: toward complying.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def refusal_log_odds(last_logits: Tensor, refusal_ids: list[int], comply_ids: Tensor) -> Tensor:
    """L per row of `last_logits` [B, V] (the logits at the first generated position);
    `comply_ids` [B] is each row's compliance token."""
    logp = torch.log_softmax(last_logits.float(), dim=-1)
    refuse = torch.logsumexp(logp[:, refusal_ids], dim=-1)
    return refuse - logp.gather(1, comply_ids.view(-1, 1)).squeeze(1)


def summarize_attribution(full: list[float], occluded: dict[str, list[float]]) -> dict:
    """{part: {mean, sd, n}} of A_part = L(full) - L(occluded), plus the mean full log-odds."""
    out = {"log_odds": {"mean": _mean(full), "sd": _sd(full), "n": len(full)}}
    for part, values in occluded.items():
        diffs = [f - o for f, o in zip(full, values)]
        out[part] = {"mean": _mean(diffs), "sd": _sd(diffs), "n": len(diffs)}
    return out


def _mean(x: list[float]) -> float:
    return sum(x) / len(x) if x else math.nan


def _sd(x: list[float]) -> float:
    if len(x) < 2:
        return math.nan
    m = _mean(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))
