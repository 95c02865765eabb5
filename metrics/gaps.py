"""The mirage gaps, one set of names for every place that shows them (TensorBoard `val/<gap>`,
compare's `results.csv` / `summary.md` / figures, the model card, the docs).

Each gap is metric(eval set) - metric(its reference), measured on the same model, so it is a
paired difference. `mirage_gap` and `overprudence_gap` are the paper's two halves; the others
are controls of the Mirage World: `neutral_*` swaps in an uninformative first word, and
`cue_removed_gap` only drops the refusal cue; `relevant_*` use the relevance judge (an answer
in the form the harmful request asks for), the paper's notion of attack success.
"""

from __future__ import annotations

# name: (eval set, reference eval set, metric)
GAPS: dict[str, tuple[str, str, str]] = {
    "mirage_gap": ("unsafe_attacked", "unsafe_clean", "asr"),
    "neutral_gap": ("unsafe_neutral", "unsafe_clean", "asr"),
    "cue_removed_gap": ("unsafe_cue_removed", "unsafe_clean", "asr"),
    "relevant_gap": ("unsafe_attacked", "unsafe_clean", "relevant"),
    "relevant_neutral_gap": ("unsafe_neutral", "unsafe_clean", "relevant"),
    "overprudence_gap": ("safe_rewritten", "safe_clean", "refusal_rate"),
    "neutral_overprudence_gap": ("safe_neutral", "safe_clean", "refusal_rate"),
}


def safety_gaps(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The gaps whose two eval sets were both evaluated and carry the metric (`results`: eval set
    -> metric -> value, as a run's results.json)."""
    gaps = {}
    for name, (attacked, reference, metric) in GAPS.items():
        a, b = results.get(attacked, {}).get(metric), results.get(reference, {}).get(metric)
        if a is not None and b is not None:
            gaps[name] = a - b
    return gaps
