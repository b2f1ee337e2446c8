"""Keyword tier: lexicon look-up plus the labelling guide's boundary rules, no model.

It answers in well under a millisecond: the chain's last tier before ``general``, the fallback when no
model is loaded, and the reading the e5-small tier blends in.  The lexicons are the TSV files in
``mlx_intent/lexicons`` (one per language, all merged so code-switched queries work).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_intent import calibration
from mlx_intent.normalize import normalize
from mlx_intent.schema import FALLBACK_INTENT, INTENTS, MAX_INTENTS, SOCIAL_INTENT
from mlx_intent.settings import settings_home

LEXICON_DIR = Path(__file__).parent / "lexicons"
# Platt scaling of the confidence; the fit that belongs to this version of the lexicons ships beside them.
CALIBRATION_PATH = LEXICON_DIR / "calibration.json"
# `mlx-intent calibrate keyword` writes <models home>/calibration/keyword.json instead (never into the package),
# naming the lexicons it was fitted for; the tier prefers it while they are the ones installed.
FIT_NAME = "keyword"
PLATT_RANGE = ((0.0, 100.0), (-100.0, 100.0))  # a > 0 keeps the ranking of answers; b any sane offset

# Evidence at or above this is a request of its own; below it a term only anchors
# a request (a landmark or district named inside "best kebab in Kadıköy").
REQUEST = 1.0
NO_MATCH_CONFIDENCE = 0.25
CUE = 0.8  # a single term this strong names a need of its own (a landmark does, a district does not)
WEAK = 0.6  # below this nothing is asked: "ok" alone is general, "thanks, see you tomorrow" greeting
SOCIAL = 0.7  # hello/thanks beat cues this weak and a place named in passing: "thanks, Moda was lovely"
LEAD = 0.5  # a later request beats the first one asked only with 1/LEAD times its evidence
# A social term this strong is a remark ("the ferry was lovely", "what a view", "lovely weather"):
# in a text that asks nothing, the places and things named before it are what the remark is about.
# A request after it is asked ("Topkapı was amazing, now where do we eat"), and so is a request as
# strong as a remark ("best month for nice weather, not too hot, not too rainy").  In a question a
# remark is no social word at all ("il fait beau demain ?" asks about the weather).
REMARK = 2.0
# Not an intent: a lexicon line `quote<TAB>how do you say` marks a question about words.  The
# social words in such a text are what is asked about ("how do you say thank you in Turkish",
# "merhaba ne demek"), so they are no greeting.
QUOTE = "quote"
# Not intents either.  `narration<TAB>heading to` marks the traveller telling what they do (going,
# arriving, sitting, checking in): in a social text that asks nothing, the places and things in
# that clause are where they are, not what they want ("bye! heading to the Grand Bazaar now").
# `ask<TAB>need` marks a request typed without a question mark ("hi, just landed, need a taxi"):
# with one anywhere, narration counts for nothing.
NARRATION = "narration"
ASK = "ask"
MARKERS = (QUOTE, NARRATION, ASK)
_MARKS = {NARRATION, ASK}  # markers that take no words from the terms around them
_CLAUSE = re.compile(r"([,.;:!…\n،؛?؟¿]+)")  # the group keeps the marks: a "?" ends a question

# Near X is nearby_locations unless the point is plainly food (or shops, hidden spots), with this
# much evidence: a cup of tea is food, but "market" alone may be the corner grocery.
_NEAR_EXEMPT = {"restaurant": WEAK, "shopping": REQUEST, "hidden_gems": REQUEST}
# Sights and districts named inside a request about food, shops, hidden spots or events only
# say where; they need a cue of their own ("opening hours") to compete.
_ANCHORS = ("attraction", "neighborhood")
_ANCHORED = ("restaurant", "shopping", "hidden_gems", "events")
# Requests that stand on their own, not a way of getting somewhere or a place used as an anchor.
_INDEPENDENT = ("restaurant", "shopping", "events", "weather", "hidden_gems", "general")

Weights = dict[str, float]

# Ties go to the more specific intent; landmark and district names mostly anchor another need.
_TIE_ORDER: tuple[str, ...] = (
    "airport_transport",
    "gps_route_planning",
    "museum_route_planning",
    "route_planning",
    "nearby_locations",
    "restaurant",
    "shopping",
    "events",
    "weather",
    "hidden_gems",
    "transportation",
    "attraction",
    "neighborhood",
    "greeting",
    "general",
)

_ELONGATED = re.compile(r"([^\W\d_])\1{2,}")

# Uppercase IST is the airport; folded to "ist" it would be German for "is".
_AIRPORT_CODE = re.compile(r"\bIST\b")

# Arabic glues the article and some particles to the word: المطار, للمطار, بالمطار, ومتحف.
_AR_ARTICLES = ("وال", "بال", "فال", "كال", "لل", "ال")
_AR_PARTICLES = ("و", "ب", "ل")

# Emoji carry intent but normalize() drops symbols, so name the telling ones first.
# A smile, a thumbs-up or a sun (the decoration of a "good morning ☀️") is social on its own and
# adds nothing to a request (the lexicons weigh "smiley" weakly).
_EMOJI = str.maketrans(
    dict.fromkeys("☔☂🌧🌦⛅🌥☁❄🌨🌩⛈🌬🌡", " weather ")
    | dict.fromkeys("👋", " hello ")
    | {"🙏": " thanks "}
    | dict.fromkeys("😊🙂☺😀😃😄😁🥰😍👍❤😂😅🤣😆🙈😻🥳🤩🍻☀🌞🌤", " smiley ")
)


class LexiconError(ValueError):
    """A lexicon line that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Lexicon:
    """Normalized terms (tuples of words) mapped to the evidence they give each intent."""

    exact: dict[tuple[str, ...], Weights]
    stems: dict[tuple[str, ...], Weights]  # last word is a stem: ("muze",) matches "muzeleri"
    max_words: int
    stem_lengths: tuple[int, ...]  # lengths of the stem words, longest first


def _strip_article(word: str) -> str:
    """Drop a glued Arabic article so المطار and مطار match the same term."""
    if "\u0621" <= word[0] <= "\u064a":
        for article in _AR_ARTICLES:
            if word.startswith(article) and len(word) - len(article) >= 2:
                return word[len(article) :]
        if word[0] in _AR_PARTICLES and len(word) >= 4:
            return word[1:]
    return word


def _words(text: str) -> tuple[str, ...]:
    """Folded words, letters typed three or more times once ("hellooo", "günaydınnn"), Arabic
    articles off."""
    return tuple(_strip_article(w) for w in _ELONGATED.sub(r"\1", normalize(text)).split())


def _clauses(text: str, n_words: int) -> tuple[list[int], set[int]]:
    """The clause (between commas, full stops, question marks...) of each of the text's words, and
    the clauses that end at a question mark."""
    pieces = _CLAUSE.split(text)  # text, marks, text, marks, ..., text
    ids = [i for i, piece in enumerate(pieces[::2]) for _ in _words(piece)]
    questions = {i for i, marks in enumerate(pieces[1::2]) if any(m in marks for m in "?؟¿")}
    return (ids, questions) if len(ids) == n_words else ([0] * n_words, {0} if questions else set())


def _parse_line(path: Path, lineno: int, line: str) -> tuple[str, tuple[str, ...], bool, float]:
    """One `intent<TAB>term[<TAB>weight]` line -> (intent, words, is_stem, weight)."""
    where = f"{path}:{lineno}"
    parts = line.split("\t")
    if len(parts) not in (2, 3):
        raise LexiconError(f"{where}: expected 'intent<TAB>term[<TAB>weight]', got {line!r}")
    intent, term = parts[0].strip(), parts[1].strip()
    if intent not in INTENTS and intent not in MARKERS:
        raise LexiconError(f"{where}: unknown intent {intent!r} (known: {', '.join(INTENTS + MARKERS)})")
    is_stem = term.endswith("*")
    if "*" in term.rstrip("*"):
        raise LexiconError(f"{where}: '*' may only end a term, got {term!r}")
    words = _words(term.rstrip("*"))
    if not words:
        raise LexiconError(f"{where}: term {term!r} has no letters or digits")
    weight = 1.0
    if len(parts) == 3:
        try:
            weight = float(parts[2])
        except ValueError:
            raise LexiconError(f"{where}: bad weight {parts[2]!r}, expected a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise LexiconError(f"{where}: bad weight {parts[2]!r}, expected a finite number >= 0")
    return intent, words, is_stem, weight


def load_lexicons(folder: Path | None = None) -> Lexicon:
    """Read every *.tsv in folder (default: the package's lexicons) into one Lexicon."""
    folder = Path(folder) if folder is not None else LEXICON_DIR
    files = sorted(folder.glob("*.tsv"))
    if not files:
        raise LexiconError(f"{folder}: no *.tsv lexicon files")
    exact: dict[tuple[str, ...], Weights] = {}
    stems: dict[tuple[str, ...], Weights] = {}
    for path in files:
        with path.open(encoding="utf-8") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                intent, words, is_stem, weight = _parse_line(path, lineno, line)
                entry = (stems if is_stem else exact).setdefault(words, {})
                # The same term in several languages ("metro") counts once, at its strongest.
                entry[intent] = max(entry.get(intent, 0.0), weight)
    keys = [*exact, *stems]
    return Lexicon(
        exact=exact,
        stems=stems,
        max_words=max(len(k) for k in keys),
        stem_lengths=tuple(sorted({len(k[-1]) for k in stems}, reverse=True)),
    )


@functools.cache
def default_lexicon() -> Lexicon:
    """The package lexicons, loaded once on first use."""
    return load_lexicons()


def _lookup(lex: Lexicon, key: tuple[str, ...]) -> Weights | None:
    """Exact term first, then the longest stem that the last word starts with."""
    hit = lex.exact.get(key)
    if hit is not None or not lex.stems:
        return hit
    head, last = key[:-1], key[-1]
    for n in lex.stem_lengths:
        if n <= len(last):
            hit = lex.stems.get((*head, last[:n]))
            if hit is not None:
                return hit
    return None


def _matches(words: tuple[str, ...], lex: Lexicon) -> list[tuple[int, int, Weights]]:
    """(first word, word count, evidence) of each term, greedy longest match left to right, so
    "blue mosque" is one term and "mosque" does not count again.  A term that only marks
    (narration, ask) takes no words: "on mange" narrates, and "mange" still asks for food."""
    found: list[tuple[int, int, Weights]] = []
    i = 0
    while i < len(words):
        for n in range(min(lex.max_words, len(words) - i), 0, -1):
            hit = _lookup(lex, words[i : i + n])
            if hit is not None and not hit.keys() <= _MARKS:
                found.append((i, n, hit))
                i += n
                break
        else:
            i += 1
    return found


def _marked(words: tuple[str, ...], lex: Lexicon, marker: str) -> list[int]:
    """Where a marker term starts, also inside a longer term ("how do I get to" holds "how")."""
    return [
        i
        for i in range(len(words))
        if any(
            marker in (_lookup(lex, words[i : i + n]) or {}) for n in range(1, min(lex.max_words, len(words) - i) + 1)
        )
    ]


def _absorb(scores: dict[str, float], winner: str, losers: tuple[str, ...]) -> None:
    """The winner of a boundary rule takes over the evidence of the intents it overrides."""
    scores.setdefault(winner, 0.0)
    for loser in losers:
        if loser != winner and loser in scores:
            scores[winner] += scores.pop(loser)


@dataclass
class _Evidence:
    """What the matched terms say: summed weight per intent, where each intent is first
    mentioned, its strongest single term, and how many museums versus other sights or
    districts a plan names (rule 4); a layover puts the plan before the airport (rule 2)."""

    scores: dict[str, float]
    first: dict[str, int]
    peak: dict[str, float]
    museums: int = 0
    other_stops: int = 0
    stopover: bool = False  # a term naming both an airport and a plan: a layover to fill
    remark: int | None = None  # where the last social remark is, in a text that asks nothing


def _asks(matches: list[tuple[int, int, Weights]], clause: list[int], questions: set[int]) -> bool:
    """Whether a question mark asks something: one that closes social words alone ("Hallo! Wie
    gehts? Mir gehts super") is small talk.  A remark is no social word here ("il fait beau ?")."""
    plain = set()  # question clauses with terms, all of them plain social words
    for pos, _, hit in matches:
        if clause[pos] in questions:
            if any(i not in MARKERS and w > 0 and (i != SOCIAL_INTENT or w >= REMARK) for i, w in hit.items()):
                return True
            plain.add(clause[pos])
    return plain != questions  # a question clause with no term at all asks


def _evidence(text: str, lex: Lexicon) -> _Evidence:
    ev = _Evidence(scores=dict.fromkeys(INTENTS, 0.0), first={}, peak={})
    text = _AIRPORT_CODE.sub("IST airport", text).translate(_EMOJI)
    words = _words(text)
    matches = _matches(words, lex)
    clause, questions = _clauses(text, len(words))
    asks = _asks(matches, clause, questions)
    quoted = any(QUOTE in hit for _, _, hit in matches)
    told: set[int] = set()  # clauses that narrate, in a social text that asks nothing
    if not (asks or quoted) and any(hit.get(SOCIAL_INTENT, 0.0) >= WEAK for _, _, hit in matches):
        said = {i for pos, n, hit in matches if hit.keys() == {SOCIAL_INTENT} for i in range(pos, pos + n)}
        if not set(_marked(words, lex, ASK)) - said:  # the "how" of "how are you" asks nothing
            told = {clause[pos] for pos in _marked(words, lex, NARRATION)}
    for pos, _, hit in matches:
        if clause[pos] in told:  # only the social words of a narrating clause count
            hit = {SOCIAL_INTENT: hit[SOCIAL_INTENT]} if SOCIAL_INTENT in hit else {}
        for intent, weight in hit.items():
            if intent in MARKERS or (intent == SOCIAL_INTENT and quoted):
                continue
            if intent == SOCIAL_INTENT and weight >= REMARK:  # a remark says what a text is, not what it asks
                ev.remark = None if asks else pos
                continue
            if weight > 0:  # weight 0 only shields its words
                ev.scores[intent] += weight
                ev.first.setdefault(intent, pos)
                ev.peak[intent] = max(ev.peak.get(intent, 0.0), weight)
        ev.stopover |= hit.get("airport_transport", 0.0) > 0 and hit.get("route_planning", 0.0) > 0
        if "museum_route_planning" in hit:
            ev.museums += 1
        elif "attraction" in hit or "neighborhood" in hit:
            ev.other_stops += 1
    return ev


def _decide(ev: _Evidence) -> tuple[str, list[str], dict[str, float]]:
    """Apply the boundary rules (schema.BOUNDARY_RULES) in order; return primary, all_intents, final scores."""
    s = {i: v for i, v in ev.scores.items() if v > 0}
    greeting = s.pop(SOCIAL_INTENT, 0.0)  # rule 1: social words never outrank a request

    def strong(intent: str) -> bool:
        return s.get(intent, 0.0) >= REQUEST

    if s.get("route_planning", 0.0) == 0 and not strong("museum_route_planning"):
        s.pop("museum_route_planning", None)  # a museum named without a plan is a sight
    remark = ev.remark is not None and all(s[i] < REMARK and (ev.first[i] <= ev.remark or s[i] < REQUEST) for i in s)
    social = remark or (
        greeting >= REQUEST and all(s[i] < REQUEST and ev.peak[i] < (REQUEST if i in _ANCHORS else SOCIAL) for i in s)
    )
    if remark:
        greeting = max(greeting, REQUEST)  # a remark is social talk as plainly as a hello
    if social or max(s.values(), default=0.0) < WEAK:  # rule 7, or social talk with no request
        s = {}
    forced: str | None = None
    extras: list[str] = []
    if strong("airport_transport") and not (ev.stopover and strong("route_planning")):  # rule 2
        forced = "airport_transport"
        _absorb(s, forced, ("transportation", "gps_route_planning"))
    elif strong("gps_route_planning"):  # rule 3
        forced = "gps_route_planning"
        _absorb(s, forced, ("transportation", "attraction", "neighborhood"))
    elif strong("route_planning") or strong("museum_route_planning"):  # rule 4
        explicit = ev.peak.get("museum_route_planning", 0.0) >= REQUEST  # "museum tour"
        museum_led = explicit or (ev.museums > 0 and ev.museums >= ev.other_stops)
        forced = "museum_route_planning" if museum_led else "route_planning"
        _absorb(s, forced, ("route_planning", "museum_route_planning", "attraction", "neighborhood"))
    elif strong("nearby_locations"):  # rule 5: what is near, unless the point is food (or shops, gems)
        plain = [i for i, least in _NEAR_EXEMPT.items() if s.get(i, 0.0) >= least]
        if plain:
            forced, extras = min(plain, key=lambda i: ev.first[i]), ["nearby_locations"]
        else:
            forced = "nearby_locations"
            _absorb(s, forced, ("attraction", "neighborhood", "transportation"))
    if forced is not None:
        rivals = [s[i] for i in _INDEPENDENT if i in s and i != forced]
        if max(rivals, default=0.0) >= max(2 * REQUEST, 1.5 * s[forced]):
            forced = None  # an overwhelming separate request (say, food at the airport) keeps its place
    if forced is not None:
        primary = forced
    elif s:
        primary = _first_request(s, ev)
    else:
        primary = SOCIAL_INTENT if greeting >= WEAK else FALLBACK_INTENT
    ranked = sorted(s, key=lambda i: (-s[i], _TIE_ORDER.index(i)))
    others = [i for i in ranked if s[i] >= REQUEST and (i not in _ANCHORS or ev.peak[i] >= REQUEST)]
    if greeting >= REQUEST:
        others.append(SOCIAL_INTENT)
    final = {**s, SOCIAL_INTENT: greeting} if greeting else s
    return primary, list(dict.fromkeys([primary, *extras, *others]))[:MAX_INTENTS], final


def _first_request(s: dict[str, float], ev: _Evidence) -> str:
    """Of the requests cued by a full term, the one asked first ("dinner, and will it rain?"),
    unless another has far more evidence; with no cue, the best-supported anchor (rule 6)."""
    if s.get("hidden_gems", 0.0) >= REQUEST:  # "quiet mosques few tourists know": the mosque is the object
        s = {i: v for i, v in s.items() if i not in _ANCHORS}
    anchored = any(s.get(i, 0.0) >= REQUEST for i in _ANCHORED)
    cued = [i for i in s if ev.peak[i] >= (REQUEST if anchored and i in _ANCHORS else CUE)]
    if not cued:
        return min(s, key=lambda i: (-s[i], _TIE_ORDER.index(i)))
    top = max(s[i] for i in cued)
    return min((i for i in cued if s[i] > LEAD * top), key=lambda i: (ev.first[i], _TIE_ORDER.index(i)))


def _confidence(primary: str, scores: dict[str, float]) -> float:
    """More evidence and a wider lead over the runner-up give more confidence; never 1.0."""
    top = scores.get(primary, 0.0)
    if top <= 0:
        return NO_MATCH_CONFIDENCE
    second = max((v for i, v in scores.items() if i not in (primary, SOCIAL_INTENT)), default=0.0)
    strength = 1.0 - math.exp(-top)
    margin = top / (top + second)
    return round(min(0.95, 0.3 + 0.65 * strength * margin), 4)


def classify_keywords(text: str, lexicon: Lexicon | None = None) -> dict[str, Any]:
    """Classify one query; the first three keys follow schema.validate, `scores` shows the evidence."""
    ev = _evidence(text, lexicon if lexicon is not None else default_lexicon())
    primary, all_intents, final = _decide(ev)
    return {
        "primary_intent": primary,
        "confidence": _confidence(primary, final),
        "all_intents": all_intents,
        "scores": {i: round(v, 4) for i, v in ev.scores.items()},
    }


def lexicon_fingerprint() -> str:
    """What a fit under the models home was fitted for: the package's lexicon files."""
    return calibration.fingerprint(sorted(LEXICON_DIR.glob("*.tsv")))


def _parse_calibration(record: dict, path: Path) -> dict:
    """{"platt": (a, b), "accuracy": float or None}, checked; a fit under the home must name these lexicons."""
    (a_low, a_high), (b_low, b_high) = PLATT_RANGE
    a, b = calibration.numbers(record.get("platt"), "platt", 2)
    platt = (
        calibration.checked(a, "platt a", a_low, a_high, open_low=True),
        calibration.checked(b, "platt b", b_low, b_high),
    )
    accuracy = calibration.number(record, "accuracy", 0.0, 1.0, default=None)
    if "lexicons" in record and record["lexicons"] != lexicon_fingerprint():
        raise calibration.CalibrationError("fitted for other lexicons than these (refit: mlx-intent calibrate keyword)")
    return {"platt": platt, "accuracy": accuracy}


def load_fit(path: Path | None = None, *, home: Path) -> calibration.Loaded:
    """The tier's fit: ``path`` alone when given, else the home's (mlx-intent calibrate keyword), else the
    packaged one.  A bad file is warned about and skipped, so the tier always answers (raw at worst)."""
    candidates = [path] if path is not None else [calibration.home_file(FIT_NAME, home), CALIBRATION_PATH]
    return calibration.load(candidates, _parse_calibration, "keyword tier")


def load_calibration(path: Path | None = None, *, home: Path) -> tuple[float, float] | None:
    """(a, b) of the fitted Platt scaling, or None when there is no usable fit (raw confidences)."""
    fit = load_fit(path, home=home).fit
    return None if fit is None else fit["platt"]


def calibrated_accuracy(path: Path | None = None, *, home: Path) -> float | None:
    """The tier's accuracy on the data its calibration was fitted on, or None without a fit."""
    fit = load_fit(path, home=home).fit
    return None if fit is None else fit["accuracy"] or None


def platt_scale(confidence: float, a: float, b: float) -> float:
    """sigmoid(a * logit(c) + b): monotone for a > 0, so the ranking of answers never changes."""
    c = min(max(confidence, 1e-6), 1 - 1e-6)
    return 1 / (1 + math.exp(-(a * math.log(c / (1 - c)) + b)))


def calibrate(confidence: float, platt: tuple[float, float] | None) -> float:
    """The calibrated confidence, to the four decimals an answer carries (unchanged without a fit)."""
    return confidence if platt is None else round(platt_scale(confidence, *platt), 4)


class KeywordClassifier:
    """The keyword tier behind the same `classify(text) -> dict` call as the model tiers,
    with the calibrated confidence when `mlx-intent calibrate keyword` has fitted one."""

    def __init__(
        self,
        lexicon: Lexicon | None = None,
        platt: tuple[float, float] | None | str = "saved",
        home: Path | None = None,
    ) -> None:
        """``platt`` "saved": the fit of ``load_fit(home=home)`` (kept in ``calibration``, with any file ignored)."""
        self.lexicon = lexicon if lexicon is not None else default_lexicon()
        if platt == "saved":  # a library call's home, as the settings would read it
            home = settings_home() if home is None else Path(home).expanduser()
        self.calibration = load_fit(home=home) if platt == "saved" else calibration.Loaded()
        if platt == "saved":
            platt = self.calibration.fit["platt"] if self.calibration.fit else None
        self.platt = platt

    def classify(self, text: str) -> dict[str, Any]:
        result = classify_keywords(text, self.lexicon)
        result["confidence"] = calibrate(result["confidence"], self.platt)
        return result
