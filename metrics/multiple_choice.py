"""Multiple-choice accuracy (ScienceQA-IMG, MMBench): which option letter an answer picks, read
by each benchmark's own reference rule, nothing more lenient (a lenient reader credits "Not B" or
"Neither A nor B" to B).

The prompt is LLaVA's (`datamodules.benchmarks.prompts`): the question, one line per option
("A. text"), then "Answer with the option's letter from the given choices directly."

`scienceqa_letter` -- LLaVA's `llava/eval/eval_science_qa.py` (c121f04), on the answer as written:

1. the whole answer is one of "A" .. "E" (:65);
2. else it is at least 3 characters, starts with one of "A" .. "E" and then ". " (:67), e.g. "B. cat";
3. else the regular expression `The answer is ([A-Z]).` (the "." matches any character) is found
   exactly once: its letter (:70-73), e.g. "The answer is C. Option A is wrong." -> C;
4. else no letter ("FAILED", :75).
A letter beyond the problem's options is wrong (`get_pred_idx`, :32-35). No lower-casing, no
stripping: "b", " B" and "(B)" read nothing.

`mmbench_letter` -- MMBench's rule-based matching (`can_infer`), as lmms-eval's
`tasks/mmbench/mmbench_evals.py` runs it before asking ChatGPT:

1. `can_infer_option` (:79-105): split on white space; if exactly one of "A" .. "E" is a whole
   word, that letter -- unless "A" is a word and there are more than 3 words ("A" may be the
   article, :94); else, for each wrapping in turn -- "X.", "X,", "X:", "X)", "X).", "(X)", "(X).",
   ":X", ":X,", ":X.", ":X)", ":X)." -- if exactly one letter appears so wrapped, that letter;
2. else `can_infer_text` (:107-119): the one option whose lower-cased text occurs in the
   lower-cased answer, if exactly one does;
3. else nothing: the official evaluator then asks ChatGPT (:182-203), which is not run here, so
   the answer is scored wrong; `extracted` in the results is the share read by rules 1-2.
So "Not B" -> B and "A is correct" -> A (one letter word), "Neither A nor B" and "both A and C" ->
nothing (two letter words), as the reference reads them.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Optional, Sequence

from core.errors import UserError

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py:15 (--options default, a list)
MMBENCH_LETTERS = "ABCDE"  # mmbench_evals.py:79-80 (num_choice=5)
_SCIENCEQA_PHRASE = re.compile(r"The answer is ([A-Z]).")  # eval_science_qa.py:70
# mmbench_evals.py:99: the (prefix, suffix) wrappings tried in turn
_WRAPPINGS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
              (":", ","), (":", "."), (":", ")"), (":", ")."))


def scienceqa_letter(response: str, options: Mapping[str, str]) -> Optional[str]:
    """The letter LLaVA's ScienceQA script reads (module docstring), or None (FAILED or out of range)."""
    if response in SCIENCEQA_OPTIONS:
        letter = response
    elif len(response) >= 3 and response[0] in SCIENCEQA_OPTIONS and response[1:3] == ". ":
        letter = response[0]
    else:
        found = _SCIENCEQA_PHRASE.findall(response)
        letter = found[0] if len(found) == 1 else None
    return letter if letter is not None and letter in SCIENCEQA_OPTIONS[:len(options)] else None


def _one_wrapped(words: list[str], prefix: str, suffix: str) -> Optional[str]:
    hits = [c for c in MMBENCH_LETTERS if prefix + c + suffix in words]
    return hits[0] if len(hits) == 1 else None


def mmbench_letter(response: str, options: Mapping[str, str]) -> Optional[str]:
    """The letter MMBench's rule-based matching reads (module docstring), or None (it would ask ChatGPT)."""
    words = response.split()
    bare = _one_wrapped(words, "", "")
    if bare is not None and not ("A" in words and len(words) > 3):
        return bare
    for prefix, suffix in _WRAPPINGS:
        letter = _one_wrapped(words, prefix, suffix)
        if letter is not None:
            return letter
    low = response.lower()
    hits = [k for k, text in options.items() if str(text).lower() in low]
    return hits[0] if len(hits) == 1 else None


LETTER_READERS: dict[str, Callable[[str, Mapping[str, str]], Optional[str]]] = {
    "scienceqa_img": scienceqa_letter, "mmbench": mmbench_letter}


def read_letter(kind: str, response: str, options: Mapping[str, str]) -> Optional[str]:
    if kind not in LETTER_READERS:
        raise UserError(f"no letter reader for {kind!r}; choose from {', '.join(LETTER_READERS)}")
    return LETTER_READERS[kind](response, options)


def multiple_choice_accuracy(kind: str, responses: Sequence[str], golds: Sequence[str],
                             options: Sequence[Mapping[str, str]]) -> float:
    """Share of responses whose letter (read by `kind`'s rule) is the gold letter, in [0, 1]; each
    response scored alone (MMBench's CircularEval is `metrics.benchmark_scores.score_task`'s)."""
    if not (len(responses) == len(golds) == len(options)) or not responses:
        raise UserError(f"multiple_choice_accuracy: {len(responses)} responses, {len(golds)} gold letters, "
                        f"{len(options)} option sets")
    return sum(read_letter(kind, r, o) == g for r, g, o in zip(responses, golds, options)) / len(responses)
