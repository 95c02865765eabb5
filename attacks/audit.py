"""Spurious-cue audit: how much does the first word alone predict the safe/unsafe label?

    python -m attacks.audit DATA.json [--format json|markdown] [--top 10] [--ngram 1|2]

Cue = first alphabetic token, lower-cased (how VLGuard's "what" counts 869/977 safe vs
61/2000 unsafe; note it makes "N/A" count as "n"); with ``--ngram 2`` the first two tokens.
Log-odds use add-α smoothing (α = 1) over the cue vocabulary V:

    log((safe+α)/(N_safe+α·V)) − log((unsafe+α)/(N_unsafe+α·V))

so positive = over-represented among safe instructions (a *compliance* cue), negative =
among unsafe ones (a *refusal* cue). The first-word classifier predicts each cue's majority
label; its accuracy next to the majority-class baseline shows what the shortcut buys.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

from core.records import strict_json
from core.text import WORD_RE, first_word as core_first_word

from .records import iter_instructions, load_records

NONE = "<none>"  # instructions with no alphabetic token at all
END = "<end>"  # pads a bigram when the instruction has a single word


def first_word(text: str) -> str:
    """First alphabetic token, lower-cased (`core.text.first_word`); NONE where there is none."""
    return core_first_word(text) or NONE


def first_ngram(text: str, n: int = 1) -> str:
    words = [w.lower() for w in WORD_RE.findall(text)[:n]]
    if not words:
        return NONE
    return " ".join(words + [END] * (n - len(words)))


def instruction_frame(records, ngram: int = 1) -> pd.DataFrame:
    """One row per instruction: id, cue, label."""
    rows = [(rid, first_ngram(text, ngram), label) for rid, text, label, _ in iter_instructions(records)]
    return pd.DataFrame(rows, columns=["id", "cue", "label"])


def cue_table(frame: pd.DataFrame, alpha: float = 1.0) -> pd.DataFrame:
    """Per-cue counts and smoothed log-odds, sorted by total count (then cue)."""
    counts = pd.crosstab(frame["cue"], frame["label"]).reindex(columns=["safe", "unsafe"], fill_value=0)
    n_safe, n_unsafe = int(counts["safe"].sum()), int(counts["unsafe"].sum())
    vocab = len(counts)
    table = counts.rename_axis(index="word", columns=None).reset_index()
    table["total"] = table["safe"] + table["unsafe"]
    table["log_odds"] = np.log((table["safe"] + alpha) / (n_safe + alpha * vocab)) - np.log(
        (table["unsafe"] + alpha) / (n_unsafe + alpha * vocab)
    )
    return table.sort_values(["total", "word"], ascending=[False, True], ignore_index=True)


def _majority(labels: pd.Series, fallback: str) -> str:
    """Most common label; ties go to ``fallback`` (the overall majority) for determinism."""
    safe, unsafe = int((labels == "safe").sum()), int((labels == "unsafe").sum())
    return fallback if safe == unsafe else ("safe" if safe > unsafe else "unsafe")


def shortcut_accuracy(train: pd.DataFrame, test: pd.DataFrame) -> tuple[float, float]:
    """(first-word classifier accuracy, majority-class baseline) of ``train``'s rules on ``test``."""
    overall = _majority(train["label"], "unsafe")
    rule = {cue: _majority(g, overall) for cue, g in train.groupby("cue")["label"]}
    pred = test["cue"].map(rule).fillna(overall)  # unseen cue: fall back to the majority label
    return float((pred == test["label"]).mean()), float((test["label"] == overall).mean())


def _cue_list(table: pd.DataFrame, positive: bool, top: int, min_count: int) -> list[dict]:
    sel = table[(table["total"] >= min_count) & ((table["log_odds"] > 0) if positive else (table["log_odds"] < 0))]
    sel = sel.sort_values(["log_odds", "word"], ascending=[not positive, True]).head(top)
    return sel[["word", "safe", "unsafe", "log_odds"]].to_dict("records")


def audit(records, ngram: int = 1, alpha: float = 1.0, min_count: int = 5, top: int = 10, seed: int = 0) -> dict:
    """The whole audit as a JSON-ready dict (``rows`` hold every cue, not only the top)."""
    frame = instruction_frame(records, ngram)
    if frame.empty:
        raise ValueError("no instructions found")
    table = cue_table(frame, alpha)
    acc, base = shortcut_accuracy(frame, frame)
    # Held-out check: a seeded 50/50 split by record id, so a record's paired (or K-shot)
    # instructions never sit on both sides.
    ids = np.array(sorted(frame["id"].unique()))
    train_ids = set(np.random.default_rng(seed).permutation(ids)[: len(ids) // 2])
    in_train = frame["id"].isin(train_ids)
    held = shortcut_accuracy(frame[in_train], frame[~in_train]) if in_train.any() and (~in_train).any() else (None, None)
    table = table.assign(log_odds=table["log_odds"].round(4))
    return {
        "ngram": ngram,
        "alpha": alpha,
        "min_count": min_count,
        "n_safe": int((frame["label"] == "safe").sum()),
        "n_unsafe": int((frame["label"] == "unsafe").sum()),
        "vocab_size": len(table),
        "first_word_accuracy": round(acc, 4),
        "majority_baseline": round(base, 4),
        "heldout_accuracy": None if held[0] is None else round(held[0], 4),
        "heldout_majority_baseline": None if held[1] is None else round(held[1], 4),
        "compliance_cues": _cue_list(table, True, top, min_count),
        "refusal_cues": _cue_list(table, False, top, min_count),
        "rows": table.to_dict("records"),
    }


def _md_table(rows: list[dict], cols: list[str]) -> str:
    return pd.DataFrame(rows, columns=cols).to_markdown(index=False, floatfmt=".3f") if rows else "(none)"


def to_markdown(result: dict, top: int = 10) -> str:
    cols = ["word", "safe", "unsafe", "log_odds"]
    n = result["n_safe"] + result["n_unsafe"]
    held, held_base = result["heldout_accuracy"], result["heldout_majority_baseline"]
    return "\n".join([
        f"# Spurious-cue audit: {result['file']}",
        "",
        f"- instructions: {n} ({result['n_safe']} safe, {result['n_unsafe']} unsafe); "
        f"cue = first {result['ngram']} word(s), {result['vocab_size']} distinct",
        f"- first-word classifier accuracy (same file): {result['first_word_accuracy']:.4f} "
        f"vs majority-class baseline {result['majority_baseline']:.4f}",
        "- held-out (seeded 50/50 split by id): "
        + ("n/a (too few ids)" if held is None else f"{held:.4f} vs baseline {held_base:.4f}"),
        f"- log-odds smoothed with α = {result['alpha']}; cues need ≥ {result['min_count']} occurrences",
        "",
        "## Compliance cues (safe-biased)", "", _md_table(result["compliance_cues"], cols), "",
        "## Refusal cues (unsafe-biased)", "", _md_table(result["refusal_cues"], cols), "",
        f"## Most frequent first words (top {top})", "", _md_table(result["rows"][:top], cols), "",
    ])


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None) -> int:
    p = _Parser(prog="python -m attacks.audit", description=__doc__.split("\n")[0])
    p.add_argument("data", help="VLGuard or LLaVA-conversation JSON file")
    p.add_argument("--format", choices=["json", "markdown"], default="markdown")
    p.add_argument("--top", type=int, default=10, help="cues per list (and table rows in markdown)")
    p.add_argument("--ngram", type=int, choices=[1, 2], default=1)
    p.add_argument("--min-count", type=int, default=5, help="minimum occurrences for a cue")
    p.add_argument("--alpha", type=float, default=1.0, help="add-alpha smoothing of the log-odds")
    args = p.parse_args(argv)
    if not args.alpha > 0:  # alpha = 0 makes an unseen label's log-odds infinite
        p.error(f"--alpha must be > 0, got {args.alpha}")
    if args.top < 1 or args.min_count < 1:
        p.error("--top and --min-count must be >= 1")
    try:
        result = {"file": args.data, **audit(load_records(args.data), args.ngram, args.alpha, args.min_count, args.top)}
    except ValueError as e:
        msg = str(e)
        print(f"error: {msg if args.data in msg else f'{args.data}: {msg}'}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(strict_json(result, indent=2, ensure_ascii=False))  # never NaN / Infinity
    else:
        print(to_markdown(result, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
