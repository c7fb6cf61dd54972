"""PERSON, LOCATION, ORGANIZATION, DATE_TIME, NRP from spaCy's named-entity model, with PERSON checked.

Replaces Presidio's SpacyRecognizer. The small English model calls many capitalised phrases
people: product names ("Apple Pay", "Cloud Storage"), song titles ("Killed My Baby"), job
titles ("Salesperson"). A PERSON span is kept only when its words read as a name (a known
first or last name, an initial or a non-English word, not outweighed by English verbs and
adjectives; see person_names.name_evidence). Text with escaped line breaks ("Anna Berg\\nSales
Manager") makes spaCy glue lines together, so a PERSON span is cut at the first line break, and
at the first symbol, number or everyday word after the name ("Megan Chang Please").
Other entity types pass through unchanged.
"""

from __future__ import annotations

import regex
from presidio_analyzer import RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts
from presidio_analyzer.predefined_recognizers import SpacyRecognizer

from keel.privacy.recognizers.person_names import gazetteer, is_common_word, name_evidence

_LINE_BREAK = regex.compile(r"\r?\n|\\[nr]")
_WORD = regex.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*\.?")


class KeelSpacyRecognizer(SpacyRecognizer):
    def __init__(self, supported_language: str = "en") -> None:
        super().__init__(supported_language=supported_language, name="KeelSpacyRecognizer")

    def analyze(self, text: str, entities: list[str],
                nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        results = []
        for r in super().analyze(text, entities, nlp_artifacts):
            if r.entity_type == "PERSON":
                cut = _LINE_BREAK.search(text, r.start, r.end)
                if cut:
                    r.end = cut.start()
                r.end = _trim(text, r.start, r.end)
                value = text[r.start : r.end].strip()
                if not value or name_evidence(_WORD.findall(value)) < 1:
                    continue
            results.append(r)
        return results


def _trim(text: str, start: int, end: int) -> int:
    """Cut a PERSON span where the name stops: at a symbol or number, or before trailing everyday
    words ("Megan Chang Please", "Kathleen Lowe <3 Order")."""
    first, last = gazetteer()
    keep = start
    pos = start
    for m in _WORD.finditer(text, start, end):
        if text[pos : m.start()].strip(" .,'’-"):
            break  # a symbol or a number between words
        word = m.group().rstrip(".").casefold()
        if m.start() > start and is_common_word(word) and word not in first and word not in last:
            break
        keep, pos = m.end(), m.end()
    return keep if keep > start else end
