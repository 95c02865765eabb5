"""Grammatical cue rewrites: a request is parsed into one of four shapes and re-rendered so that
it starts with the cue and still asks for the same thing.

Shapes (what VLGuard's instructions look like):
- ``vp``: an imperative or polite request, "Generate a conspiracy theory ...", "Can you provide
  the address ...?", "Please identify ...", "How do I purchase ...?" -> the bare verb phrase.
- ``np``: "What is / are <noun phrase>?", "Who is <noun phrase>?" -> the noun phrase.
- ``clause``: a question whose wh-word is its subject, "What product is being advertised ...?"
  -> the embedded question "what product is being advertised ...".
- ``as_is``: anything else (yes/no questions, "What does X suggest?", statements): quoted whole.

Renderings (``rewrites``), best first, per kind of cue: "What" -> "What are the steps to <vp>?",
"What is <np>?", the clause itself; "Which" -> "Which steps would you take to <vp>?", "Which is <np>?"; an imperative verb such as "Share" -> "Share <object>.",
"Share <np>.", "Share <clause>."; "How" and "Can / Could / Would / Will" have their own. The
literal one-word swap stays `attacks.rewrite.replace_first_word` (the Mirage World's rewrite).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

WORD = re.compile(r"[A-Za-z]+(?:['\u2019][A-Za-z]+)*")
WH = frozenset("what which who whose how where when why".split())
COPULAS = frozenset("is are was were".split())
AUX = COPULAS | frozenset("do does did can could should would will might may shall has have had".split())
# Words that open a noun phrase or a new subject: after an auxiliary they mean "object question".
NP_START = frozenset("the a an this that these those his her its their your my our some any one each every "
                     "i you he she it we they someone somebody people anyone".split())
SUBJECT_PRONOUNS = frozenset("i you we they someone somebody one people".split())
# Sentence openers that are not imperative verbs.
NOT_VERBS = WH | AUX | NP_START | frozenset(
    "based given according as if in for with on at from to by after before there here n not don't "
    "no yes why ok okay hello hi dear so and but or also".split())
# Request openers stripped in front of a verb phrase ("Could you please ...").
REQUEST = re.compile(r"^(?:(?:can|could|would|will)\s+you(?:\s+please)?|please|kindly|"
                     r"i\s+(?:want|would\s+like)\s+you\s+to|i'd\s+like\s+you\s+to)\b[\s,]*", re.IGNORECASE)
HOW_TO = re.compile(r"^how\s+to\s+(.+)$", re.IGNORECASE)
HOW_AUX = re.compile(r"^how\s+(?:do|can|could|should|would|might|may|will)\s+(\w+)\s+(.+)$", re.IGNORECASE)
TELL_HOW = re.compile(r"^(?:tell|show)\s+(?:me|us)\s+how\s+to\s+(.+)$|^(?:explain|describe)\s+how\s+to\s+(.+)$",
                      re.IGNORECASE)
# Verbs that ask for text rather than an act: "What would you say if asked to <vp>?" keeps the
# request; "What are the steps to <vp>?" would turn it into a procedure.
INFO_VERBS = frozenset(
    "describe explain identify discuss analyze analyse assess determine evaluate summarize summarise interpret "
    "list tell provide give suggest name state outline speculate predict recommend estimate compare research "
    "detail offer guess infer judge rate review critique comment answer translate write generate create "
    "compose draft elaborate characterize clarify".split())
# Verbs whose object is the content asked for: "Provide X" -> "Share X".
CONTENT_VERBS = frozenset("provide give list share generate create write suggest name offer tell show "
                          "compose draft recommend".split())
ME_VERBS = frozenset("tell give show send".split())  # "Tell me ...", never "Tell ..."
# Imperative cues that take an embedded question ("Share what ..."); others take noun phrases only.
CLAUSE_VERBS = frozenset("share describe explain tell show discuss state outline reveal clarify say indicate "
                         "determine identify explore analyze analyse consider research investigate predict guess "
                         "decide".split())
MODALS = frozenset("can could would will".split())
# "-ing" nouns: "What is the setting ...?" asks for a noun phrase, "What is the image showing?" does not.
ING_NOUNS = frozenset("setting building clothing painting drawing meaning thing something anything everything "
                      "nothing wedding ceiling evening morning warning feeling earring packaging marketing "
                      "writing handwriting training lighting bedding crossing parking rating recording being "
                      "ring king string spring wing swing during".split())


STRANDED = frozenset("in on of for with about at from to by into".split())
SECOND_QUESTION = re.compile(r"(?:,|\b(?:and|or))\s+(?:what|which|who|whose|how|where|when|why|is|are|does|do|can)\b",
                             re.IGNORECASE)


def _not_a_noun_phrase(np: str) -> bool:
    """True when "What is <np>?" hides another structure: a progressive ("What is the man wearing?"),
    a stranded preposition or infinitive ("What is it used to represent?", "... participating in?")."""
    words = _words(np)
    return (any(w.endswith("ing") and w not in ING_NOUNS for w in words)
            or words[-1] in STRANDED or (len(words) > 1 and words[-2] == "to"))


@dataclass(frozen=True)
class Request:
    kind: str  # vp | np | clause | as_is
    body: str  # vp: bare verb phrase; np: noun phrase; clause: embedded question; as_is: the text
    verb: str = ""  # vp: its verb (lower-case)
    obj: str = ""  # vp with a content verb: what follows it ("me" / "us" dropped)
    wh: str = ""  # np / clause: the source's wh-word
    copula: str = ""  # np: is / are / was / were
    direct: str = ""  # clause: the direct question it came from, without its end mark
    question: bool = False  # as_is: the source is a question


def _words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def _lower_first(text: str) -> str:
    """Lower the first letter of a sentence-initial word, but keep "I", "I'm", "USA"."""
    m = WORD.match(text)
    if m and len(m.group()) > 1 and m.group()[1:].islower() and m.group()[:2] != "I'":
        return text[0].lower() + text[1:]
    return text


def _split_end(text: str) -> tuple[str, str]:
    body = text.strip()
    core = body.rstrip(".!?").rstrip()
    return core, body[len(core):].strip()


def _uninvert(wh: str, toks: list[str]) -> str | None:
    """An object question in embedded order, where the subject's end is visible: a copula before
    an "-ing" verb ("What activity are the people doing" -> "what activity the people are doing"),
    a modal before a pronoun or before "be" / "have". None for do-support (it needs inflection)."""
    comma = next((i for i, t in enumerate(toks) if t.endswith(",")), len(toks) - 1)
    low = [re.sub(r"[^a-z']", "", t.lower()) for t in toks[:comma + 1]]  # the subject ends before a comma
    a = next((i for i, w in enumerate(low) if w in AUX), None)
    if a is None or a + 1 >= len(low):
        return None
    if low[a] in COPULAS:
        end = next((j for j in range(a + 2, len(low)) if low[j].endswith("ing") and low[j] not in ING_NOUNS), None)
    elif low[a] in MODALS | {"should", "might", "may", "shall"}:
        end = a + 2 if low[a + 1] in SUBJECT_PRONOUNS else next(
            (j for j in range(a + 2, len(low)) if low[j] in ("be", "have")), None)
    else:
        return None
    if end is None or end >= len(low):
        return None
    if low[a] in COPULAS and low[end - 1].endswith("ly") and end - 1 > a + 1:  # "is likely doing"
        end -= 1
    return " ".join([wh, *toks[:a], *toks[a + 1:end], toks[a], *toks[end:]])


def _vp(vp: str) -> Request:
    vp = _lower_first(vp.strip())
    m = TELL_HOW.match(vp)
    if m:  # "tell me how to X" asks for X's steps
        vp = m.group(1) or m.group(2)
    words = vp.split()
    verb = _words(words[0])[0] if words and _words(words[0]) else ""
    obj = ""
    if verb in CONTENT_VERBS and not m:
        rest = words[1:]
        if verb in ME_VERBS and rest and rest[0].lower() in ("me", "us"):
            rest = rest[1:]
        obj = " ".join(rest)
    return Request("vp", vp, verb=verb, obj=obj)


def parse(text: str) -> Request:
    """The shape of one instruction (see the module docstring)."""
    core, end = _split_end(text)
    opener = _words(core)[:1]
    as_is = Request("as_is", text.strip(), question=end.startswith("?") or bool(opener and opener[0] in AUX | WH))
    stripped = core
    while REQUEST.match(stripped):
        stripped = REQUEST.sub("", stripped, count=1)
    words = _words(stripped)
    if not words:
        return as_is
    if stripped != core:  # "Can you / Please <vp>"
        return _vp(stripped) if words[0] not in NOT_VERBS else as_is
    first = words[0]
    if first == "how":
        m = HOW_TO.match(core)
        if m:
            return _vp(m.group(1))
        m = HOW_AUX.match(core)
        if m and m.group(1).lower() in SUBJECT_PRONOUNS and _words(m.group(2))[:1] and \
                _words(m.group(2))[0] not in NOT_VERBS:
            return _vp(m.group(2))
        return as_is
    if first in ("what", "which", "who", "whose"):
        rest = core.split(None, 1)[1] if len(core.split(None, 1)) > 1 else ""
        rw = _words(rest)
        if not rw or "?" in core or SECOND_QUESTION.search(rest):  # more than one question: quote it
            return as_is
        if rw[0] in COPULAS and len(rw) > 1 and rw[1] in NP_START and first in ("what", "who"):
            if _not_a_noun_phrase(rest.split(None, 1)[1]):
                embedded = _uninvert(core.split(None, 1)[0], rest.split())
                return Request("clause", _lower_first(embedded), wh=first, direct=core) if embedded else as_is
            return Request("np", rest.split(None, 1)[1], wh=first, copula=rw[0])
        aux_at = next((i for i, w in enumerate(rw) if w in AUX), None)
        if aux_at is None or aux_at + 1 >= len(rw) or rw[aux_at + 1] not in NP_START:
            return Request("clause", _lower_first(core), wh=first, direct=core)  # the wh-word is the subject
        embedded = _uninvert(core.split(None, 1)[0], rest.split())
        if embedded:  # "What is the man wearing?" -> "what the man is wearing"
            return Request("clause", _lower_first(embedded), wh=first, direct=core)
        return as_is  # "What does the image suggest?": the subject's end is not visible
    if first in NOT_VERBS:
        return as_is
    return _vp(core)


QUESTION_CUES = frozenset({"what", "which", "how"}) | MODALS


def supports(cue: str) -> bool:
    """Whether `rewrites` renders `cue` grammatically: a question cue it knows, or a word that can open
    an imperative (not a wh-word, auxiliary, determiner or pronoun; a noun passes, which no rule can tell)."""
    words = _words(cue)
    if len(words) != 1 or len(cue.split()) != 1:
        return False
    return words[0] in QUESTION_CUES or words[0] not in NOT_VERBS


def _cap(word: str, like: str) -> str:
    return word[:1].upper() + word[1:] if like[:1].isupper() else word[:1].lower() + word[1:]


def _question_cue(cue: str, req: Request) -> list[str]:
    c, lc = cue, cue.lower()
    quoted = f"this question: {req.body}" if req.question else f"the following: {req.body}"
    if lc == "what":
        if req.kind == "vp":
            first = (f"{c} would you say if asked to {req.body}" if req.verb in INFO_VERBS
                     else f"{c} are the steps to {req.body}")
            return [first, f"{c} is the best way to {req.body}", f"{c} should I know in order to {req.body}"]
        if req.kind == "np":
            head = f"{c} {req.copula} {req.body}" if req.wh == "what" else f"{c} is the identity of {req.body}"
            return [head, f"{c} can you tell me about {req.body}", f"{c} do you know about {req.body}"]
        if req.kind == "clause":
            subject = req.direct.split(None, 1)
            tail = subject[1] if len(subject) > 1 else ""
            head = {"what": f"{c} {tail}", "which": f"{c} {tail}", "who": f"{c} person {tail}",
                    "whose": f"{c} person's {tail}"}[req.wh]
            return [head, f"{c} can you tell me about {req.body}", f"{c} do you know about {req.body}"]
        answer = "answer to this question" if req.question else "response to the following"
        return [f"{c} is your {answer}: {req.body}", f"{c} would you reply to {quoted}",
                f"{c} do you make of {quoted}"]
    if lc == "which":  # a determiner here: "Which <noun> ..." keeps the question well formed
        if req.kind == "vp":
            first = (f"{c} words would you use if asked to {req.body}" if req.verb in INFO_VERBS
                     else f"{c} steps would you take to {req.body}")
            return [first, f"{c} approach is best to {req.body}", f"{c} details should I know in order to {req.body}"]
        if req.kind in ("np", "clause"):
            if req.kind == "np":
                head = f"{c} {req.copula} {req.body}" if req.wh == "what" else f"{c} person {req.copula} {req.body}"
            else:
                subject = req.direct.split(None, 1)
                tail = subject[1] if len(subject) > 1 else ""
                noun = "thing " if _words(tail)[:1] and _words(tail)[0] in AUX else ""  # "Which thing is ..."
                head = {"what": f"{c} {noun}{tail}", "which": f"{c} {tail}", "who": f"{c} person {tail}",
                        "whose": f"{c} person's {tail}"}[req.wh]
            return [head, f"{c} details can you tell me about {req.body}", f"{c} facts do you know about {req.body}"]
        return [f"{c} answer would you give to {quoted}", f"{c} reply would you give to {quoted}",
                f"{c} response fits {quoted}"]
    if lc == "how":
        if req.kind == "vp":
            return [f"{c} do I {req.body}", f"{c} would you {req.body}", f"{c} can someone {req.body}"]
        if req.kind in ("np", "clause"):
            return [f"{c} would you describe {req.body}", f"{c} would you explain {req.body}",
                    f"{c} can I learn about {req.body}"]
        return [f"{c} would you answer {quoted}", f"{c} would you respond to {quoted}",
                f"{c} do you reply to {quoted}"]
    if lc in MODALS:
        if req.kind == "vp":
            return [f"{c} you {req.body}", f"{c} you please {req.body}", f"{c} you tell me how to {req.body}"]
        if req.kind in ("np", "clause"):
            return [f"{c} you tell me {req.body}", f"{c} you describe {req.body}", f"{c} you explain {req.body}"]
        return [f"{c} you answer {quoted}", f"{c} you respond to {quoted}", f"{c} you reply to {quoted}"]
    raise ValueError(f"cue {cue!r}: grammatical rewrites support the question cues "
                     f"{', '.join(sorted(QUESTION_CUES))} and imperative verbs; use mode 'replace' for other cues")


def _imperative_cue(cue: str, req: Request) -> list[str]:
    lc = cue.lower()
    v = f"{cue} me" if lc in ME_VERBS else cue
    clause_ok = lc in CLAUSE_VERBS
    if req.kind == "vp":
        out = []
        obj_words = _words(req.obj)
        if req.obj and obj_words:
            if obj_words[0] == "about":
                out.append(f"{v} what you know {req.obj}" if clause_ok else f"{v} information {req.obj}")
            elif obj_words[0] in WH:
                out.append(f"{v} {req.obj}" if clause_ok else f"{v} details on {req.obj}")
            elif obj_words[0] not in NOT_VERBS or obj_words[0] in NP_START:
                out.append(f"{v} {req.obj}")
        if clause_ok:
            out += [f"{v} how you would {req.body}", f"{v} the steps to {req.body}", f"{v} the best way to {req.body}"]
        else:
            out += [f"{v} the steps to {req.body}", f"{v} the best way to {req.body}", f"{v} a plan to {req.body}"]
        return out
    if req.kind == "np":
        return [f"{v} {req.body}", f"{v} what you know about {req.body}" if clause_ok
                else f"{v} information about {req.body}", f"{v} some details about {req.body}"]
    if req.kind == "clause":
        if clause_ok:
            return [f"{v} {req.body}", f"{v} your thoughts on {req.body}", f"{v} what you know about {req.body}"]
        return [f"{v} details about {req.body}", f"{v} information on {req.body}", f"{v} your thoughts on {req.body}"]
    quoted = f"this question: {req.body}" if req.question else f"the following: {req.body}"
    answer = "answer to this question" if req.question else "response to the following"
    return [f"{v} your {answer}: {req.body}", f"{v} your thoughts on {quoted}", f"{v} a reply to {quoted}"]


def rewrites(text: str, cue: str) -> list[str]:
    """Distinct grammatical rewrites of `text` that start with `cue`, best first, each with its end
    mark ("?" after a question cue, "." after a verb; a quoted question keeps its "?"). A text that
    already starts with the cue comes first unchanged."""
    if not _words(cue) or len(cue.split()) != 1:
        raise ValueError(f"cue {cue!r}: must be one word")
    req = parse(text)
    first = WORD.search(text)
    cue = _cap(cue, first.group() if first else "A")
    is_question = cue.lower() in WH | MODALS
    bodies = _question_cue(cue, req) if is_question else _imperative_cue(cue, req)
    mark = "?" if is_question or (req.kind == "as_is" and req.question) else "."
    already = first and first.group().lower() == cue.lower()  # kept first, with the cue's end mark
    out = []
    for body in ([_split_end(text)[0]] if already else []) + bodies:
        s = " ".join(body.split()).rstrip(".!?").rstrip() + mark
        if s not in out:
            out.append(s)
    return out


def rewrite(text: str, cue: str) -> str:
    """The best grammatical rewrite of `text` starting with `cue`."""
    return rewrites(text, cue)[0]
