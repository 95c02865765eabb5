"""VQA accuracy as the VQAv2 and TextVQA evaluations define it.

Normalisation (the EvalAI answer processor that the VQAv2 server, LLaVA's submission script,
TextVQA's M4C evaluator and lmms-eval all use):

1. lower-case; drop "," and "?"; "'s" -> " 's"; newlines and tabs -> spaces;
2. punctuation `; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`: deleted if the text has it next to a
   space (or has a comma between digits anywhere), else replaced by a space;
3. a period not followed by a digit is deleted ("dogs." -> "dogs", "2.5" stays);
4. number words "none", "zero" .. "ten" -> digits; articles "a", "an", "the" dropped;
5. contractions written without the apostrophe get it back ("dont" -> "don't").

Score of one answer against the human answers (ten per question): for each human answer left
out in turn, min(#other humans who gave the answer / 3, 1); the mean over the leave-one-out
subsets. With ten humans: 1 match 0.3, 2 matches 0.6, 3 matches 0.9, 4 or more 1.0. The same rule
with fewer references (LLaVA's `m4c_evaluator.py:237-244`, lmms-eval's `textvqa/utils.py:27-32`):
one reference gives 0.0 whether it matches or not (no other answer remains to agree with).

VQAv2's own evaluation normalises the human answers (steps 2-5) only when they disagree;
TextVQA's normalises them always (`always_normalize=True`). The prediction is always normalised.
"""

from __future__ import annotations

import re
from typing import Sequence

from core.errors import UserError

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")

# The apostrophe-less spellings the evaluation restores (its table, keys as it lists them).
_CONTRACTIONS = """aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|
hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|
Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|
let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've|
mustnt mustn't|mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|
'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's|
somethingd something'd|somethingd've something'd've|something'dve something'd've|somethingll something'll|
thats that's|thered there'd|thered've there'd've|there'dve there'd've|therere there're|theres there's|
theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|
whats what's|whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd|
whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|whys why's|
wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|
yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|
youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've"""
CONTRACTIONS = dict(pair.split() for pair in _CONTRACTIONS.replace("\n", "").split("|"))


def strip_punctuation(text: str) -> str:
    """Step 2 and 3 of the module docstring."""
    glue = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if glue or f"{p} " in text or f" {p}" in text else " ")
    return _PERIOD.sub("", out)


def normalize_words(text: str) -> str:
    """Step 4 and 5: number words, articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The full EvalAI normalisation (steps 1-5) applied to a model's answer."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return normalize_words(strip_punctuation(text))


def vqa_score(prediction: str, answers: Sequence[str], always_normalize: bool = False) -> float:
    """The leave-one-out soft score of `prediction` against the human `answers`."""
    if not answers:
        raise UserError("vqa_score: no reference answers to score against")
    pred = normalize_vqa_answer(prediction)
    refs = [str(a).replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if always_normalize:
        refs = [normalize_vqa_answer(a) for a in refs]
    elif len(set(refs)) > 1:
        refs = [normalize_words(strip_punctuation(a)) for a in refs]
        pred = normalize_words(strip_punctuation(pred))
    matches = [r == pred for r in refs]
    total = sum(matches)
    # each reference left out in turn, the others counted (m4c_evaluator.py:237-244): with a single
    # reference nothing is left to count, so the official score is 0.0 even for a matching answer
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(refs)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]], always_normalize: bool = False) -> float:
    """Mean `vqa_score` over questions, in [0, 1]."""
    if len(predictions) != len(answers) or not predictions:
        raise UserError(f"vqa_accuracy: {len(predictions)} predictions for {len(answers)} questions")
    return sum(vqa_score(p, a, always_normalize) for p, a in zip(predictions, answers)) / len(predictions)
