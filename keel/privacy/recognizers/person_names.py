"""PERSON: names that spaCy's small model misses, found with a name gazetteer and token shape.

spaCy en_core_web_sm finds well-known Anglo names in well-formed sentences and misses much of
the rest (foreign names, names in lists and signatures, lower-cased names). This recogniser
reads spaCy's tokens and part-of-speech tags and scores runs of name-like tokens:

* an honorific (Mr, Dr, ...) followed by capitalised words;
* two or more capitalised proper nouns of which at least one is a known first or last name,
  or which hold an initial ("Bibulat Z Sultygov");
* a single capitalised proper noun that is a known name;
* two lower-case words that are a known first name then a known last name.

The gazetteer (keel/privacy/data) holds the names Faker ships for its Latin-script locales;
scripts/build_name_lists.py rebuilds it. Words that are names but mostly something else
("Will", "May", "Long") count only inside a longer name.
"""

from __future__ import annotations

import functools
from importlib import resources

from presidio_analyzer import EntityRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts
from spacy.lang.en.stop_words import STOP_WORDS

HONORIFICS = {"mr", "mrs", "ms", "miss", "mx", "dr", "prof", "professor", "sir", "dame", "madam", "lord", "lady", "rev"}
# spaCy entity labels that say a capitalised word is something other than a person.
NOT_PERSON_LABELS = {"GPE", "LOC", "ORG", "FAC", "NORP", "PRODUCT", "EVENT", "WORK_OF_ART", "LAW", "LANGUAGE", "DATE", "TIME"}
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


@functools.lru_cache(maxsize=1)
def gazetteer() -> tuple[frozenset[str], frozenset[str]]:
    data = resources.files("keel.privacy") / "data"

    def load(name: str) -> frozenset[str]:
        return frozenset(w.casefold() for w in (data / name).read_text(encoding="utf-8").split())

    return load("first_names.txt"), load("last_names.txt")


class PersonNameRecognizer(EntityRecognizer):
    def __init__(self, supported_language: str = "en") -> None:
        super().__init__(
            supported_entities=["PERSON"], supported_language=supported_language, name="KeelPersonNameRecognizer"
        )

    def load(self) -> None:
        self.first, self.last = gazetteer()

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        if nlp_artifacts is None or nlp_artifacts.tokens is None or "PERSON" not in entities:
            return []
        doc = nlp_artifacts.tokens
        results: list[RecognizerResult] = []
        i = 0
        while i < len(doc):
            j = i
            while j < len(doc) and self._name_like(doc[j]) and (j == i or not _line_break(doc[j - 1])):
                j += 1
            if j > i:
                score = self._score_run(doc, i, j)
                if score:
                    results.append(self._result(doc[i].idx, doc[j - 1].idx + len(doc[j - 1]), score))
                i = j
            else:
                i += 1
        return results

    # A token that could be part of a name: a capitalised word, an initial, or a known name.
    def _name_like(self, tok) -> bool:  # noqa: ANN001 - spaCy Token
        t = tok.text
        if tok.ent_type_ in NOT_PERSON_LABELS:
            return False
        if len(t) <= 2 and t[:1].isupper() and t.rstrip(".").isalpha():
            return True  # initial: "Z", "Z."
        if not t[:1].isalpha():
            return False
        if t[0].isupper():
            return t.casefold() not in STOP_WORDS or t.casefold() in self.first
        return self._known(t)

    def _known(self, t: str) -> bool:
        k = t.casefold()
        return k in self.first or k in self.last

    def _score_run(self, doc, i: int, j: int) -> float:  # noqa: ANN001
        toks = list(doc[i:j])
        prev = doc[i - 1].text.rstrip(".").casefold() if i > 0 else ""
        caps = [t for t in toks if t.text[0].isupper()]
        known = [t for t in toks if self._known(t.text)]
        initials = [t for t in toks if len(t.text.rstrip(".")) == 1]
        if prev in HONORIFICS and caps:
            return 0.9
        if len(toks) >= 2 and len(caps) == len(toks):
            if any(t.text.casefold() not in AMBIGUOUS for t in known):
                return 0.85
            if initials and len(toks) - len(initials) >= 1 and all(t.pos_ == "PROPN" for t in toks if t not in initials):
                return 0.6
            return 0.0
        if len(toks) == 2 and not caps:
            f, l = (t.text.casefold() for t in toks)
            if f in self.first and l in self.last and f not in AMBIGUOUS and l not in AMBIGUOUS and f not in STOP_WORDS and l not in STOP_WORDS:
                return 0.5
            return 0.0
        if len(toks) == 1 and caps and known:
            t = toks[0]
            if t.pos_ == "PROPN" and t.text.casefold() not in AMBIGUOUS and len(t.text) > 2:
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


def _line_break(tok) -> bool:  # noqa: ANN001
    return "\n" in tok.whitespace_ or tok.is_space
