"""PERSON: names that spaCy's small model misses, found with a name gazetteer, token shape and cues.

spaCy en_core_web_sm finds well-known Anglo names in well-formed sentences and misses much of
the rest: foreign names (often tagged ORG, GPE or NORP), names in lists and signatures,
lower-cased names, single first names. This recogniser splits the text into words itself
(escaped line breaks such as a literal "\\n" from JSON or logs count as line breaks, which
spaCy's tokenizer glues into words), uses spaCy's tags only as hints, and scores runs of
name-like words on one line:

* an honorific or title (Mr, Dr, Captain, ...) followed by capitalised words;
* two or more capitalised words, scored by the evidence each word gives: a known first or last
  name or an initial counts for a name, a word that is no English word ("Oyokawa") counts a
  little, an English verb, adjective or stop word ("Pay", "Killed") counts against it, an
  English noun not at all (WordNet also lists many surnames);
* a single capitalised known name that is no common English word ("Cintia"; WordNet lists
  "Albert" only as a noun, which is its proper noun), or any single name-like word with a
  person cue: "named Batirbek", "Batirbek said", a "Batirbek:" speaker label, "Nanase, can
  you ...", or a place in a list of names ("Platt, David and Oscar");
* two lower-case words that are a known first name then a known last name.

Runs that hold organisation or place words (Inc, Bank, Street, Republic) or sit next to a
house number are left to the other recognizers, and everyday words at either end of a run are
dropped ("Dennis Boone Order 12"). English-ness comes from the WordNet word index that ships
with spaCy's English lemmatizer; the gazetteer (keel/privacy/data) holds the names Faker ships
for its locales (scripts/build_name_lists.py rebuilds it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import regex
from presidio_analyzer import EntityRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts
from spacy.lang.en.stop_words import STOP_WORDS

HONORIFICS = {"mr", "mrs", "ms", "miss", "mx", "dr", "prof", "professor", "sir", "dame", "madam", "lord", "lady", "rev",
              "mister"}
# Titles: they introduce a name ("Captain Okafor") but are never part of one ("Princess Royal").
TITLES = {"prince", "princess", "king", "queen", "duke", "duchess", "emperor", "empress", "pope", "captain",
          "president", "senator", "judge", "sergeant", "officer", "chief", "general", "colonel", "lieutenant", "father",
          "sister", "brother", "uncle", "aunt", "saint", "royal", "baron", "count", "countess", "sheikh"}
# spaCy labels that, with no name evidence, say a capitalised word is something other than a person.
NOT_PERSON_LABELS = {"GPE", "LOC", "FAC", "PRODUCT", "EVENT", "WORK_OF_ART", "LAW", "LANGUAGE", "DATE", "TIME", "MONEY",
                     "QUANTITY", "PERCENT", "CARDINAL", "ORDINAL"}
# Lower-case words that sit inside names: "Christiane de Vaan", "Ludwig van der Berg".
PARTICLES = {"de", "van", "der", "den", "von", "da", "di", "del", "della", "dos", "das", "du", "la", "le", "ten", "ter",
             "bin", "ibn", "al", "el", "zu", "af", "y"}
# Words that make a capitalised run an organisation, a place or a title rather than a person.
NOT_NAME_WORDS = {
    "inc", "corp", "corporation", "ltd", "llc", "plc", "co", "company", "group", "bank", "trust", "fund", "holdings",
    "capital", "partners", "university", "college", "school", "hospital", "clinic", "institute", "association",
    "foundation", "society", "acquisition", "technologies", "technology", "systems", "solutions", "services",
    "international", "industries", "limited", "incorporated", "ag", "sa", "gmbh", "nv", "bv", "ab", "as", "oy", "spa",
    "srl", "etf", "shares", "index", "series", "club", "street", "st", "avenue", "ave", "road", "rd", "lane", "ln",
    "drive", "dr", "boulevard", "blvd", "court", "place", "square", "way", "apt", "suite", "unit", "box", "republic",
    "kingdom", "states", "city", "county", "island", "islands", "province", "region", "district", "airport", "station",
    "park", "river", "lake", "mount", "bay", "beach", "valley", "north", "south", "east", "west", "new", "saint", "san",
    "santa", "st.", "fort", "port", "cedex", "app", "website", "email", "e-mail", "phone", "fax", "mobile", "office",
    "address", "name", "date", "personal", "info", "the", "card", "account", "number",
}
# Common English words that are also in the name lists; they count only next to other name tokens.
AMBIGUOUS = {
    "will", "may", "long", "grant", "rose", "bill", "mark", "hope", "summer", "page", "young", "hall", "king",
    "green", "brown", "white", "black", "little", "price", "hill", "wood", "ward", "best", "rich", "north",
    "south", "west", "east", "case", "love", "joy", "faith", "art", "dawn", "day", "ray", "sky", "star",
    "storm", "house", "church", "street", "bank", "card", "cash", "money", "email", "phone", "account",
    "new", "major", "general", "august", "april", "june", "july", "january", "march", "monday", "friday",
    "sunday", "christmas", "easter", "god", "lord", "city", "state", "thank", "thanks", "hello", "dear",
    "please", "sorry", "yes", "no", "ok", "okay", "hi", "hey", "can", "call", "sign", "so", "see", "read",
}
# Words right before a single name that say a person follows ("called Ella", "thanks, Ella").
CUES_BEFORE = {
    "called", "named", "name", "names", "dear", "hi", "hello", "hey", "thanks", "thank", "said", "told", "tell", "ask",
    "asked", "met", "meet", "meeting", "with", "by", "from", "to", "and", "him", "her", "me", "us", "love", "married",
    "marry", "son", "daughter", "wife", "husband", "brother", "sister", "mother", "father", "mom", "dad", "friend",
    "uncle", "aunt", "cousin", "boss", "colleague", "manager", "partner", "assistant", "given", "gave", "heard", "saw",
    "sent", "contact", "cc", "attn", "attention", "signed", "regards", "cheers", "sincerely", "ms", "mr", "mrs", "dr",
    "via", "ex", "including", "about", "for", "under", "as", "like", "kid", "baby", "boy", "girl", "guy", "man",
    "woman", "is", "starring", "featuring", "feat", "directed", "written", "produced", "says", "asks", "replied",
    "added", "according",
}
# Cues strong enough for a word no name list knows ("named Batirbek", "leave me Vinka", "Batirbek said").
PEOPLE_CUES_BEFORE = {
    "called", "named", "name", "dear", "hi", "hello", "hey", "thanks", "thank", "said", "told", "tell", "ask", "asked",
    "met", "married", "marry", "son", "daughter", "wife", "husband", "brother", "sister", "mother", "father", "mom",
    "dad", "friend", "uncle", "aunt", "cousin", "boss", "colleague", "manager", "partner", "assistant", "him", "her",
    "me", "kid", "baby", "boy", "girl", "guy", "man", "woman", "attn", "regards", "cheers", "sincerely", "signed",
    "given", "gave", "heard", "ex",
}
PEOPLE_CUES_AFTER = {
    "said", "says", "asked", "asks", "told", "tells", "replied", "wrote", "writes", "shouted", "lives", "lived",
    "spent", "thinks", "thought", "himself", "herself", "who", "began", "married", "died", "smiled", "laughed",
    "answered",
}
# Words right after a single name that say it is a person ("Ella said", "Ella's").
CUES_AFTER = {
    "said", "says", "asked", "asks", "told", "tells", "replied", "wrote", "writes", "is", "was", "has", "had", "will",
    "would", "can", "could", "lives", "lived", "spent", "went", "called", "thinks", "thought", "wants", "wanted", "who",
    "himself", "herself", "speak", "speaks", "talking", "listed", "loves", "likes", "knows", "works", "worked",
}

_PLACE_LABELS = {"GPE", "LOC", "FAC"}
# Words that are never part of a name but, unlike "Inc" or "Street", say nothing when they follow one
# ("Amanda Rodriguez The meeting ...").
_LABELS = {"the", "as", "new", "app", "website", "email", "e-mail", "phone", "fax", "mobile", "office", "address",
           "name", "date", "personal", "info", "card", "account", "number", "no", "id"}
_VETO_LABELS = _PLACE_LABELS | {"DATE", "TIME", "MONEY", "QUANTITY", "PERCENT", "CARDINAL", "ORDINAL", "LANGUAGE"}
# Words that introduce a name but are not part of it ("Hi Karítas", "Dr. Rustad", "Thanks Anna").
NOT_IN_RUN = HONORIFICS | TITLES | {"hi", "hello", "hey", "dear", "thanks", "thank", "regards", "cheers", "sincerely",
                                    "attn", "greetings"}
# Strong cues: what follows is a name whatever the word ("My name is Rive", "called Will").
STRONG_CUES = {"name", "named", "called", "dear", "hi", "hello", "hey", "mr", "mrs", "ms", "dr"}


def _list_gap(toks: list[_Tok], lo: int, hi: int) -> bool:
    """Between two list items there is only a comma, an "and"/"or"/"&", or both."""
    if toks[hi].line_break_before:
        return False
    if hi == lo:
        return bool(regex.fullmatch(r"\s*(?:,|&)\s*", toks[hi].gap))
    mid = toks[lo]
    return (
        mid.low in ("and", "or")
        and bool(regex.fullmatch(r",?\s*", mid.gap))
        and bool(regex.fullmatch(r"\s*", toks[hi].gap))
    )


# "I'm", "Don't", "We'll", "C'mon": contractions, not names like "O'Brien" or "D'Angelo".
_CONTRACTION = regex.compile(r"^\w+['’](?i:m|t|d|ll|ve|re|s)$|^\w['’]\p{Ll}")
_ESCAPE = regex.compile(r"\\[ntr]")
_WORD = regex.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")


@functools.lru_cache(maxsize=1)
def gazetteer() -> tuple[frozenset[str], frozenset[str]]:
    data = resources.files("keel.privacy") / "data"

    def load(name: str) -> frozenset[str]:
        return frozenset(w.casefold() for w in (data / name).read_text(encoding="utf-8").split())

    return load("first_names.txt"), load("last_names.txt")


@functools.lru_cache(maxsize=1)
def _wordnet() -> dict[str, frozenset[str]]:
    """The WordNet lemmas spaCy's English lemmatizer ships, by part of speech, or nothing."""
    try:
        import spacy
        from spacy.lookups import Lookups

        from keel.settings import get_settings

        root = Path(spacy.util.get_package_path(get_settings().privacy.spacy_model))
        folder = next(root.glob("**/lemmatizer/lookups"))
        table = Lookups().from_disk(folder).get_table("lemma_index")
        parts = ("noun", "verb", "adj", "adv")
        return {pos: frozenset(w for w in table[pos] if w.isalpha()) for pos in parts if pos in table}
    except Exception:  # noqa: BLE001 - a missing table only makes the recognisers stricter
        return {}


@functools.lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """Every WordNet lemma (about 83,000 words, proper nouns such as "paris" or "david" included)."""
    return frozenset().union(*_wordnet().values())


@functools.lru_cache(maxsize=1)
def common_words() -> frozenset[str]:
    """WordNet verbs, adjectives and adverbs: the words a name can be mistaken for ("will", "frank",
    "grant"). Names that are only nouns in WordNet ("lucy", "albert") are mostly its proper nouns."""
    wn = _wordnet()
    return frozenset().union(*(wn.get(pos, frozenset()) for pos in ("verb", "adj", "adv")))


def _inflected(low: str, words: frozenset[str]) -> bool:
    suffixes = ("s", "es", "ed", "ing", "ly")
    return low in words or any(low.endswith(suf) and low[: -len(suf)] in words for suf in suffixes)


def is_english_word(low: str) -> bool:
    """A lower-case word (or a plain inflection of one) is in the WordNet index or a stop word."""
    return low in STOP_WORDS or _inflected(low, english_words())


def is_common_word(low: str) -> bool:
    """An English stop word, verb, adjective or adverb (or a plain inflection of one)."""
    return low in STOP_WORDS or _inflected(low, common_words())


def name_evidence(words: list[str]) -> int:
    """How strongly a run of words reads as a person's name: known names and non-English words
    count for it, English verbs, adjectives and stop words against it, English nouns not at all."""
    first, last = gazetteer()
    total = 0
    for w in words:
        low = w.casefold().rstrip(".")
        if len(low) == 1 and w[:1].isupper():
            total += 1  # an initial
        elif low in PARTICLES:
            continue
        elif (low in first or low in last) and low not in AMBIGUOUS:
            total += 1 if is_common_word(low) else 2
        elif low in first or low in last or not is_english_word(low):
            total += 1
        elif is_common_word(low):
            total -= 1
    return total


class _Tok:
    __slots__ = ("text", "start", "end", "low", "cap", "initial", "pos", "ent", "line_break_before", "gap")

    def __init__(self, text: str, start: int, end: int) -> None:
        self.text, self.start, self.end = text, start, end
        self.low = text.casefold()
        self.cap = text[:1].isupper() and not (len(text) > 1 and text.isupper())
        self.initial = len(text) == 1 and text.isupper() and text != "I"
        self.pos = self.ent = ""
        self.line_break_before = False
        self.gap = ""


@dataclass
class _Run:
    """Tokens [first, end) that may be one name, and their score (0: not a name)."""

    first: int
    end: int
    score: float


class PersonNameRecognizer(EntityRecognizer):
    name: str  # set by Presidio's __init__

    def __init__(self, supported_language: str = "en") -> None:
        super().__init__(
            supported_entities=["PERSON"], supported_language=supported_language, name="KeelPersonNameRecognizer"
        )

    def load(self) -> None:
        self.first, self.last = gazetteer()
        self.common = common_words()

    def analyze(self, text: str, entities: list[str],
                nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        if "PERSON" not in entities:
            return []
        toks = self._tokens(text, nlp_artifacts)
        runs: list[_Run] = []
        i = 0
        while i < len(toks):
            if not self._starts_run(toks[i]):
                i += 1
                continue
            j = i + 1
            while j < len(toks) and self._continues_run(toks, j):
                j += 1
            # A run ends on a name, not a particle or an everyday word ("Dennis Boone Order 12").
            while j - 1 > i and (toks[j - 1].low in PARTICLES or self._everyday(toks[j - 1])):
                j -= 1
            k = i
            while k < j - 1 and self._everyday(toks[k]):  # nor start on one ("Killed My Baby")
                k += 1
            runs.append(_Run(k, j, self._score_run(toks, k, j)))
            i = j
        self._lists(toks, runs)
        results = []
        for run in runs:
            if run.score:
                last = toks[run.end - 1]
                end = last.end + (1 if last.initial and text[last.end : last.end + 1] == "." else 0)
                results.append(self._result(toks[run.first].start, end, run.score))
        return results

    def _lists(self, toks: list[_Tok], runs: list[_Run]) -> None:
        """A capitalised word in a list with names is a name too: "Platt, David, Claudia and Oscar"."""
        for _ in range(2):
            for k, run in enumerate(runs):
                i, j = run.first, run.end
                if run.score or j - i != 1 or toks[i].low in NOT_NAME_WORDS or toks[i].low in STOP_WORDS:
                    continue
                linked = 0
                for m in (k - 1, k + 1):
                    if 0 <= m < len(runs) and runs[m].score:
                        lo, hi = (runs[m].end, i) if m < k else (j, runs[m].first)
                        if hi - lo <= 1 and _list_gap(toks, lo, hi):
                            linked += 1
                if linked:
                    run.score = 0.5

    # -- tokens ------------------------------------------------------------------------------

    def _tokens(self, text: str, nlp_artifacts: NlpArtifacts | None) -> list[_Tok]:
        masked = _ESCAPE.sub("\n ", text)
        toks = []
        for m in _WORD.finditer(masked):
            word, end = m.group(), m.end()
            if len(word) > 3 and word[-2] in "'’" and word[-1] in "sS":  # possessive: "Carine's"
                word, end = word[:-2], end - 2
            toks.append(_Tok(word, m.start(), end))
        doc = nlp_artifacts.tokens if nlp_artifacts is not None else None
        if doc is not None and len(doc):
            starts = [t.idx for t in doc]
            k = 0
            for t in toks:
                while k + 1 < len(starts) and starts[k + 1] <= t.start:
                    k += 1
                st = doc[k]
                if st.idx == t.start and len(st.text) == t.end - t.start:  # glued tokens carry no usable tags
                    t.pos, t.ent = st.pos_, st.ent_type_
        prev_end = 0
        for t in toks:
            t.gap = masked[prev_end : t.start]
            t.line_break_before = "\n" in t.gap
            prev_end = t.end
        return toks

    def _known(self, low: str) -> bool:
        return low in self.first or low in self.last

    def _english(self, low: str) -> bool:
        return is_english_word(low)

    def _name_word(self, t: _Tok) -> bool:
        if _CONTRACTION.match(t.text) or t.low in NOT_IN_RUN:
            return False
        return (
            t.cap and not t.initial and t.low not in NOT_NAME_WORDS and (t.low not in STOP_WORDS or t.low in AMBIGUOUS)
        )

    def _starts_run(self, t: _Tok) -> bool:
        if t.initial:
            return False
        if self._name_word(t):
            return True
        return t.text.islower() and t.low in self.first and not self._english(t.low)

    def _continues_run(self, toks: list[_Tok], j: int) -> bool:
        t, prev = toks[j], toks[j - 1]
        if t.line_break_before or t.gap.strip(" .") or (t.gap.count(".") and not prev.initial):
            return False
        if prev.text.islower() and prev.low not in PARTICLES:  # lower-case run: first name then last name
            return t.text.islower() and t.low in self.last
        if t.low in PARTICLES:
            return j + 1 < len(toks) and toks[j + 1].cap and not toks[j + 1].line_break_before
        return t.initial or self._name_word(t)

    # -- scoring -----------------------------------------------------------------------------

    def _score_run(self, toks: list[_Tok], i: int, j: int) -> float:
        run = toks[i:j]
        prev = None
        if i > 0 and not run[0].line_break_before:
            before = toks[i - 1]
            if "." not in run[0].gap or before.low in HONORIFICS or before.initial:
                prev = before
        nxt = toks[j] if j < len(toks) and not toks[j].line_break_before and not toks[j].gap.strip(" ") else None
        after = toks[j].gap if j < len(toks) else ""
        if nxt is not None and nxt.cap and nxt.low in NOT_NAME_WORDS and nxt.low not in _LABELS:
            return 0.0
        if regex.search(r"\d[ \t]*$", run[0].gap) or regex.match(r"[ \t]*\d", after):
            return 0.0  # "12 Baker Street", "Station Nord 3972": addresses and codes
        if run[0].text.islower():
            if len(run) == 2 and all(not self._english(t.low) for t in run):
                return 0.5
            return 0.0
        words = [t for t in run if not t.initial and t.low not in PARTICLES]
        initials = [t for t in run if t.initial]
        known = [t for t in words if self._known(t.low) and t.low not in AMBIGUOUS]
        # A known name that WordNet lists only as a noun is mostly its proper noun ("albert").
        common = [t for t in words if (t in known and self._common(t.low)) or (t not in known and self._english(t.low))]
        foreign = [t for t in words if t not in common]
        strong = prev is not None and (
            prev.low in STRONG_CUES
            or prev.low in HONORIFICS
            or (prev.low in ("is", "was") and i > 1 and toks[i - 2].low == "name")
        )
        cue_before = strong or (prev is not None and prev.low in CUES_BEFORE)
        cue_after = (
            (nxt is not None and (nxt.low in CUES_AFTER or (nxt.pos in ("VERB", "AUX") and nxt.text.islower())))
            or bool(regex.match(r"[ \t]*:|['’]s\b", after))
        )
        sentence_start = i == 0 or run[0].line_break_before or bool(regex.search(r"[.!?:\"“]\s*$", run[0].gap))
        vocative = sentence_start and bool(regex.match(r"[ \t]*,", after))
        line_end = j == len(toks) or toks[j].line_break_before
        if prev is not None and (prev.low in HONORIFICS or prev.low in TITLES):
            return 0.9 if sum(self._evidence(t, known) for t in words) >= 1 else 0.0
        if len(words) >= 2 or (words and initials):
            # Each word is evidence for or against a name: "Anke Junker" and "Nanase Oyokawa" are
            # people, "Apple Pay", "Cloud Storage" and "Building B" are not.
            evidence = sum(self._evidence(t, known) for t in words) + (1 if initials else 0)
            strong_known = any(t not in common for t in known)
            # spaCy's place and number labels veto a weak run; its WORK_OF_ART or PRODUCT on a line of
            # foreign words ("Bibulat Z Sultygov") is a guess.
            if all(t.ent in _VETO_LABELS for t in words) and not strong_known and not strong and evidence < 3:
                return 0.0
            if strong:
                return 0.9
            if evidence >= 2:
                return 0.85 if strong_known else 0.6
            if evidence == 1 and (cue_before or cue_after or (sentence_start and line_end)):
                return 0.6
            return 0.0
        if any(t.ent in NOT_PERSON_LABELS for t in words) and not known and not strong:
            return 0.0
        if len(words) != 1:
            return 0.0
        t = words[0]
        if len(t.text) <= 2 or t.low in AMBIGUOUS and not strong:
            return 0.0
        if strong:
            return 0.6
        if t.ent in _PLACE_LABELS:
            return 0.0
        cued = cue_before or cue_after or vocative
        people_after = (nxt is not None and nxt.low in PEOPLE_CUES_AFTER) or bool(
            regex.match(r"[ \t]*:|['’]s\b", after)
        )
        if known and t in common:  # "Grant", "Baby": only right behind a cue or before a people verb
            return 0.5 if (cue_before or people_after or vocative) and t.pos in ("PROPN", "") else 0.0
        if known and self._english(t.low):  # a noun too ("visa", "apple"): only with a cue
            return 0.5 if cued else 0.0
        if known:
            return 0.6 if (cued or sentence_start) else 0.5
        # A word no list knows needs a cue that points at a person, not just any preposition or verb.
        people_before = prev is not None and prev.low in PEOPLE_CUES_BEFORE
        if t in foreign and t.pos in ("PROPN", "NOUN", "ADJ", "") and (people_before or people_after or vocative):
            return 0.5
        return 0.0

    def _evidence(self, t: _Tok, known: list[_Tok]) -> int:
        if t in known:
            return 1 if self._common(t.low) else 2
        if self._known(t.low) or not self._english(t.low):
            return 1  # an ambiguous name ("Hill") or no English word ("Oyokawa")
        if t.low in STOP_WORDS or self._common(t.low):
            return -1  # "Pay", "Can"
        return 0  # an English noun: WordNet also lists many surnames ("Kleist", "Hague")

    def _everyday(self, t: _Tok) -> bool:
        return not t.initial and not self._known(t.low) and is_common_word(t.low)

    def _common(self, low: str) -> bool:
        return low in STOP_WORDS or _inflected(low, self.common)

    def _result(self, start: int, end: int, score: float) -> RecognizerResult:
        return RecognizerResult(
            entity_type="PERSON",
            start=start,
            end=end,
            score=score,
            recognition_metadata={
                RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
            },
        )
