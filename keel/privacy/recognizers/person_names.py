"""PERSON: names that spaCy's small model misses, found with a name gazetteer, token shape and cues.

spaCy en_core_web_sm finds well-known Anglo names in well-formed sentences and misses much of
the rest: foreign names (often tagged ORG, GPE or NORP), names in lists and signatures,
lower-cased names, single first names. This recogniser splits the text into words itself
(escaped line breaks such as a literal "\\n" from JSON or logs count as line breaks, which
spaCy's tokenizer glues into words), uses spaCy's tags only as hints, and scores runs of
name-like words on one line:

* an honorific (Mr, Dr, ...) followed by capitalised words;
* two or more capitalised words of which one is a known first or last name, or which hold
  an initial ("Bibulat Z Sultygov"), or which are all foreign-looking proper nouns (not
  English words) behind a person cue or on a line of their own;
* a single capitalised word that is a known name and not an English word ("Cintia"), or any
  capitalised non-English word right behind or before a person cue ("named Batirbek",
  "Batirbek said", a "Batirbek:" speaker label);
* two lower-case words that are a known first name then a known last name.

Runs that hold organisation or place words (Inc, Bank, Street, Republic) or follow a house
number are left to the other recognizers. English-ness comes from the WordNet word index
that ships with spaCy's English lemmatizer; the gazetteer (keel/privacy/data) holds the
names Faker ships for its locales (scripts/build_name_lists.py rebuilds it).
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import regex
from presidio_analyzer import EntityRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts
from spacy.lang.en.stop_words import STOP_WORDS

HONORIFICS = {"mr", "mrs", "ms", "miss", "mx", "dr", "prof", "professor", "sir", "dame", "madam", "lord", "lady", "rev", "mister"}
# spaCy labels that, with no name evidence, say a capitalised word is something other than a person.
NOT_PERSON_LABELS = {"GPE", "LOC", "FAC", "PRODUCT", "EVENT", "WORK_OF_ART", "LAW", "LANGUAGE", "DATE", "TIME", "MONEY", "QUANTITY", "PERCENT", "CARDINAL", "ORDINAL"}
# Lower-case words that sit inside names: "Christiane de Vaan", "Ludwig van der Berg".
PARTICLES = {"de", "van", "der", "den", "von", "da", "di", "del", "della", "dos", "das", "du", "la", "le", "ten", "ter", "bin", "ibn", "al", "el", "zu", "af", "y"}
# Words that make a capitalised run an organisation, a place or a title rather than a person.
NOT_NAME_WORDS = {
    "inc", "corp", "corporation", "ltd", "llc", "plc", "co", "company", "group", "bank", "trust", "fund", "holdings", "capital",
    "partners", "university", "college", "school", "hospital", "clinic", "institute", "association", "foundation", "society",
    "acquisition", "technologies", "technology", "systems", "solutions", "services", "international", "industries", "limited",
    "incorporated", "ag", "sa", "gmbh", "nv", "bv", "ab", "as", "oy", "spa", "srl", "etf", "shares", "index", "series", "club",
    "street", "st", "avenue", "ave", "road", "rd", "lane", "ln", "drive", "dr", "boulevard", "blvd", "court", "place", "square",
    "way", "apt", "suite", "unit", "box", "republic", "kingdom", "states", "city", "county", "island", "islands", "province",
    "region", "district", "airport", "station", "park", "river", "lake", "mount", "bay", "beach", "valley", "north", "south",
    "east", "west", "new", "saint", "san", "santa", "st.", "fort", "port", "cedex", "app", "website", "email", "e-mail",
    "phone", "fax", "mobile", "office", "address", "name", "date", "personal", "info", "the", "card", "account", "number",
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
    "called", "named", "name", "names", "dear", "hi", "hello", "hey", "thanks", "thank", "said", "told", "tell", "ask", "asked",
    "met", "meet", "meeting", "with", "by", "from", "to", "and", "him", "her", "me", "us", "love", "married", "marry", "son",
    "daughter", "wife", "husband", "brother", "sister", "mother", "father", "mom", "dad", "friend", "uncle", "aunt",
    "cousin", "boss", "colleague", "manager", "partner", "assistant", "given", "gave", "heard", "saw", "sent", "contact",
    "cc", "attn", "attention", "signed", "regards", "cheers", "sincerely", "ms", "mr", "mrs", "dr", "via", "ex",
    "including", "about", "for", "under", "as", "like", "kid", "baby", "boy", "girl", "guy", "man", "woman", "is",
}
# Words right after a single name that say it is a person ("Ella said", "Ella's").
CUES_AFTER = {
    "said", "says", "asked", "asks", "told", "tells", "replied", "wrote", "writes", "is", "was", "has", "had", "will", "would",
    "can", "could", "lives", "lived", "spent", "went", "called", "thinks", "thought", "wants", "wanted", "and", "or",
    "who", "himself", "herself", "speak", "speaks", "talking", "listed", "loves", "likes", "knows", "works", "worked",
}

_ESCAPE = regex.compile(r"\\[ntr]")
_WORD = regex.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")


@functools.lru_cache(maxsize=1)
def gazetteer() -> tuple[frozenset[str], frozenset[str]]:
    data = resources.files("keel.privacy") / "data"

    def load(name: str) -> frozenset[str]:
        return frozenset(w.casefold() for w in (data / name).read_text(encoding="utf-8").split())

    return load("first_names.txt"), load("last_names.txt")


@functools.lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """The WordNet lemmas spaCy's English lemmatizer ships (about 83,000 words), or nothing."""
    try:
        import spacy
        from spacy.lookups import Lookups

        from keel.settings import get_settings

        root = Path(spacy.util.get_package_path(get_settings().privacy.spacy_model))
        folder = next(root.glob("**/lemmatizer/lookups"))
        table = Lookups().from_disk(folder).get_table("lemma_index")
        return frozenset(w for words in table.values() for w in words if w.isalpha())
    except Exception:  # noqa: BLE001 - a missing table only makes the recogniser stricter
        return frozenset()


class _Tok:
    __slots__ = ("text", "start", "end", "low", "cap", "initial", "pos", "ent", "line_break_before", "gap")

    def __init__(self, text: str, start: int, end: int) -> None:
        self.text, self.start, self.end = text, start, end
        self.low = text.casefold()
        self.cap = text[:1].isupper() and not (len(text) > 1 and text.isupper())
        self.initial = len(text) == 1 and text.isupper()
        self.pos = self.ent = ""
        self.line_break_before = False
        self.gap = ""


class PersonNameRecognizer(EntityRecognizer):
    def __init__(self, supported_language: str = "en") -> None:
        super().__init__(
            supported_entities=["PERSON"], supported_language=supported_language, name="KeelPersonNameRecognizer"
        )

    def load(self) -> None:
        self.first, self.last = gazetteer()
        self.english = english_words()

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        if "PERSON" not in entities:
            return []
        toks = self._tokens(text, nlp_artifacts)
        results: list[RecognizerResult] = []
        i = 0
        while i < len(toks):
            if not self._starts_run(toks[i]):
                i += 1
                continue
            j = i + 1
            while j < len(toks) and self._continues_run(toks, j):
                j += 1
            while j - 1 > i and toks[j - 1].low in PARTICLES:  # a run ends on a name, not a particle
                j -= 1
            score = self._score_run(toks, i, j)
            if score:
                results.append(self._result(toks[i].start, toks[j - 1].end + (1 if toks[j - 1].initial and text[toks[j - 1].end : toks[j - 1].end + 1] == "." else 0), score))
            i = j
        return results

    # -- tokens ------------------------------------------------------------------------------

    def _tokens(self, text: str, nlp_artifacts: NlpArtifacts | None) -> list[_Tok]:
        masked = _ESCAPE.sub("\n ", text)
        toks = [_Tok(m.group(), m.start(), m.end()) for m in _WORD.finditer(masked)]
        doc = nlp_artifacts.tokens if nlp_artifacts is not None else None
        if doc is not None and len(doc):
            starts = [t.idx for t in doc]
            k = 0
            for t in toks:
                while k + 1 < len(starts) and starts[k + 1] <= t.start:
                    k += 1
                st = doc[k]
                if st.idx <= t.start < st.idx + len(st.text):
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
        if low in self.english or low in STOP_WORDS:
            return True
        return any(low.endswith(suf) and low[: -len(suf)] in self.english for suf in ("s", "es", "ed", "ing", "er", "ly")) 

    def _name_word(self, t: _Tok) -> bool:
        return t.cap and not t.initial and t.low not in NOT_NAME_WORDS and (t.low not in STOP_WORDS or t.low in self.first)

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
        prev = toks[i - 1] if i > 0 and not run[0].line_break_before else None
        nxt = toks[j] if j < len(toks) and not toks[j].line_break_before and not toks[j].gap.strip(" ") else None
        after = toks[j].gap if j < len(toks) else ""
        if nxt is not None and nxt.cap and nxt.low in NOT_NAME_WORDS:
            return 0.0
        if regex.search(r"\d\s*$", run[0].gap) or regex.search(r"^\s*\d", after or " "):
            return 0.0  # "12 Baker Street", "Station Nord 3972": addresses and codes
        if run[0].text.islower():
            if len(run) == 2 and all(not self._english(t.low) for t in run):
                return 0.5
            return 0.0
        words = [t for t in run if not t.initial and t.low not in PARTICLES]
        initials = [t for t in run if t.initial]
        known = [t for t in words if self._known(t.low) and t.low not in AMBIGUOUS]
        foreign = [t for t in words if not self._english(t.low)]
        cue_before = prev is not None and (prev.low in CUES_BEFORE or prev.low in HONORIFICS)
        cue_after = (nxt is not None and nxt.low in CUES_AFTER) or bool(regex.match(r"['’]s\b|\s*:", after))
        alone = run[0].line_break_before or i == 0
        line_end = j == len(toks) or toks[j].line_break_before
        if prev is not None and prev.low in HONORIFICS:
            return 0.9
        if any(t.ent in NOT_PERSON_LABELS for t in words) and not known:
            return 0.0
        if len(words) >= 2 or (words and initials):
            if known:
                return 0.85
            if initials and all(t.pos == "PROPN" or t in foreign for t in words):
                return 0.6
            if len(foreign) == len(words) and (cue_before or cue_after or (alone and line_end)):
                return 0.6
            return 0.0
        if len(words) != 1:
            return 0.0
        t = words[0]
        if len(t.text) <= 2:
            return 0.0
        if known and t not in foreign:
            return 0.5 if (cue_before or cue_after) and t.pos == "PROPN" else 0.0
        if known:
            return 0.6 if (cue_before or cue_after or alone) else 0.5
        if t in foreign and t.pos in ("PROPN", "NOUN", "ADJ", "") and (cue_before or cue_after):
            return 0.5
        return 0.0

    def _result(self, start: int, end: int, score: float) -> RecognizerResult:
        return RecognizerResult(
            entity_type="PERSON",
            start=start,
            end=end,
            score=score,
            analysis_explanation=None,
            recognition_metadata={
                RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
            },
        )
