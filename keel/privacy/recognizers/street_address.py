"""STREET_ADDRESS: postal addresses: a street line, then the unit, city, region, country and postcode after it.

Presidio has no street-address recognizer and spaCy sees only the city. A match starts at a
street line in one of the common layouts:

* house number, street name, street type: "1356 Impala St", "2914 184th Street";
* street name then house number (most of Europe): "Wilgenlaan 40", "ul. Północna 73",
  "Árpád fejedelem útja 45.", with or without a building number in front ("472 Veslebakken 48");
  without one it needs a street type, an address line after it, or an address cue nearby,
  and it must not be ordinary English ("Windows 10", "see last 10");
* Romance layouts ("46 rue Nationale"), post-office boxes ("P.O. Box 101"), US military
  addresses (PSC/Unit/USNS ... APO/FPO/DPO) and street corners ("the corner of X and Y");

and runs on over what follows on the same line or the next lines: unit ("Apt. 4", "Suite
913"), city, region code, country and postcode. Lines may be real or escaped ("\\n" copied
out of JSON or logs) and may carry a quote or bullet prefix ("> ", "- ").
"""

from __future__ import annotations

import regex
from presidio_analyzer import EntityRecognizer, Pattern, PatternRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts
from spacy.lang.en.stop_words import STOP_WORDS

from keel.privacy.recognizers._base import KeelPatternRecognizer
from keel.privacy.recognizers.person_names import is_common_word, is_english_word

_L = r"(?:(?<![\w.,/:+-])|(?<=\\[ntr]))"  # left edge; an escaped line break counts as a space
_W = r"[^\W\d_][\w'’.-]*"  # a word of letters (any script)
_CAP = r"(?-i:[\p{Lu}\p{Lt}][\w'’./-]*)"  # a capitalised word
_NUM = r"\d{1,6}[A-Za-z]?"
# A dot after it belongs to the number ("útja 45. Apt. 927") only before a unit; otherwise it ends a sentence.
_HNUM = (
    r"\d{1,5}[A-Ha-h]?(?:\.(?=[ \t]*(?:\r?\n|\\[nr])|[ \t]+(?i:apt|apartment|suite|ste|unit|flat|floor|street|st)\b))?"
    r"(?![\w]|[.,/-]\d)"
)  # house number after the street name
# The USPS Publication 28 (appendix C1) street suffixes, spelled out, that the list below lacks.
_USPS_SUFFIXES = {
    "branch", "bridge", "brook", "brooks", "burg", "burgs", "camp", "canyon", "cape", "centers", "circles", "cliff",
    "cliffs", "corner", "corners", "course", "courts", "coves", "crest", "crossroad", "curve", "dale", "dam", "divide",
    "drives", "extension", "extensions", "fall", "falls", "ferry", "flat", "flats", "ford", "fords", "forest", "forge",
    "forges", "forks", "garden", "gateway", "glens", "greens", "groves", "harbors", "hills", "inlet", "islands", "isle",
    "junctions", "key", "keys", "land", "light", "lights", "loaf", "lodge", "mall", "manors", "mills", "mountain",
    "mountains", "neck", "overpass", "parks", "parkways", "passage", "pine", "points", "radial", "ramp", "rapid",
    "rapids", "rest", "ridges", "roads", "squares", "streets", "trafficway", "unions", "valleys", "views", "walks",
    "wall", "ways",
}
# Street types (English and the common European ones), word or suffix.
_TYPE = (
    r"(?:street|st|avenue|ave|av|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|square|sq|"
    r"terrace|ter|circle|cir|parkway|pkwy|highway|hwy|crescent|cres|close|grove|gardens|gdns|row|walk|hill|"
    r"park|view|mews|rise|green|parade|loop|trail|trl|pike|path|pass|plaza|alley|bend|bypass|causeway|"
    r"center|centre|common|commons|crossing|cove|creek|estates?|expressway|fields?|fork|freeway|glen|"
    r"harbor|haven|heights|hollow|island|junction|knolls?|lakes?|landing|locks?|manor|meadows?|mill|"
    r"mission|motorway|mount|orchard|oval|pines|plains?|point|ports?|prairie|ranch|ridge|river|route|"
    r"run|shoals?|shores?|skyway|spring|springs|spur|station|stravenue|stream|summit|throughway|trace|"
    r"track|tunnel|turnpike|underpass|union|valley|viaduct|villages?|ville|vista|wells?|"
    r"rue|via|viale|calle|avenida|rua|rúa|carrer|strasse|straße|str|gasse|weg|laan|straat|gracht|plein|"
    r"gatan|vägen|gata|väg|gate|veien|vej|gade|katu|tie|ulica|ul|utca|ut|út|útja|rakpart|allee|chaussee|platz|ring|damm|"
    + "|".join(sorted(_USPS_SUFFIXES, key=len, reverse=True))
    + r")\.?"
)
# Lower-case words that belong inside a street or place name.
_LOWER_OK = {
    "de", "del", "della", "des", "du", "da", "das", "do", "dos", "di", "la", "le", "les", "el", "los", "las", "y", "e",
    "i", "van", "der", "den", "von", "zu", "am", "an", "im", "auf", "nad", "pod", "pri", "ob", "na", "u", "v", "ve",
    "w", "z", "och", "og", "t", "s", "à", "en", "sur", "sous", "bei",
}
_PARTICLE = "(?:" + "|".join(sorted(_LOWER_OK, key=len, reverse=True)) + ")"
_UNIT = (
    r"(?i:apt|apartment|suite|ste|unit|flat|floor|room|rm|bldg|building|box)\.?[ \t]*#?[ \t]*\d[\w-]{0,5}(?!\w)"
    r"|#[ \t]?\d{1,5}(?!\w)"
)
_POST = (
    r"(?:\d{4,5}(?:-\d{3,4})?|\d{3}[ \t]\d{2}|[A-Z]{1,2}\d[A-Z\d]?[ \t]\d[A-Z]{2}|[A-Z]\d[A-Z][ \t]\d[A-Z]\d)"
    r"(?![\w.]|[-/]\d)"
)
_NOT_PLACE = (
    r"(?!(?i:mobile|phone|tel|fax|desk|office|e-?mail|website|web|name|address|date|personal|card|please|i|we|it|this|"
    r"that|my|our|he|she|they|you|and|or|but|for|in|on|at|to|from|is|was|cc|id|no)\b)"
)
_PLACE = (
    rf"{_NOT_PLACE}{_CAP}(?:(?:[ \t]+|-)(?:{_NOT_PLACE}{_CAP}|(?-i:{_PARTICLE})(?=[ \t]+[\p{{Lu}}\p{{Lt}}])))"
    r"{0,4}(?:[ \t]+\d{1,2}(?![\w.]))?(?:[ \t]+\([^()\n]{1,15}\))?"
)
_ITEM = (
    rf"(?:{_UNIT}|{_PLACE}(?:,?[ \t]+[A-Z]{{2,3}}(?!\w))?(?:,?[ \t]+{_POST})?"
    rf"|[A-Z]{{2,3}}(?!\w)(?:[ \t]+{_POST})?|{_POST})"
)
_BREAK = r"(?:\r?\n|\\[nr])"
# A new line of the address: the break, blank lines, indentation, a bullet or quote prefix, a leading comma.
_NEWLINE = rf"(?:[ \t]*,?[ \t]*{_BREAK}(?:[ \t]*{_BREAK})*[ \t]*(?:[^\w\s\\,(+]{{1,3}}[ \t]*)?,?[ \t]*)"
_SEP = rf"(?:{_NEWLINE}|[ \t]*,[ \t]*|[ \t]+)"
_TAIL = rf"(?:{_SEP}{_ITEM}){{0,7}}"

_NUMBER_FIRST = (
    rf"{_L}{_NUM}(?:[ \t]+\d{{1,6}})?[ \t]+(?:{_W}[ \t]+){{0,3}}"
    rf"(?:{_CAP}|\d{{1,4}}(?:st|nd|rd|th)|[NSEW]\.?)[ \t]+(?i:{_TYPE})(?=\W|$)"
)
# At least one word before the type: a lone type word and a number is a gate or a room, not a street.
_STREET_WORD_FIRST = rf"{_L}{_CAP}(?:[ \t]+{_W}){{1,3}}(?<=\b(?i:{_TYPE}))[ \t]+{_HNUM}"
_COMPOUND_STREET = (
    rf"{_L}[\p{{Lu}}\p{{Lt}}][\w-]*(?i:straat|laan|weg|gracht|plein|strasse|straße|gasse|allee|platz|gatan|vägen|gata|"
    rf"veien|vej|gade|katu|tie|kuja|v|g|str)\.?[ \t]+{_HNUM}"
)
_ROMANCE = (
    rf"{_L}{_NUM}[ \t]+(?i:rue|route|rte|chemin|voie|cours|via|viale|strada|piazza|largo|calle|c/|avenida|avda|"
    rf"paseo|plaza|camino|carretera|travessa|praça|avenue|rua|rúa|carrer|boulevard|bd|place|allée|impasse|quai)"
    rf"\.?[ \t]+(?:{_W}[ \t]?){{1,4}}"
)
# Lower-case street words: "Luige tee 56", "Király u. 23.", "Bem rkp. 97.", "Martin Linges veg 149".
_STREET_WORDS = {
    "tee", "põik", "vei", "veg", "veien", "vegen", "vej", "gate", "gata", "gatan", "gränd", "väg", "vägen", "stig",
    "tie", "katu", "kuja", "polku", "rakpart", "utca", "út", "útja", "u", "rkp", "krt", "tér", "straat", "laan", "weg",
    "gasse", "allee", "rua", "rue", "via", "calle", "carrer", "ulica", "ul", "al", "os", "pl", "str", "route", "chemin",
    "cesta", "trg", "ulice", "náměstí",
}
_INNER_STRICT = (
    rf"(?:{_CAP}|(?-i:{'|'.join(sorted(_LOWER_OK | _STREET_WORDS, key=len, reverse=True))})\.?(?![\w'’])"
    r"|(?-i:[a-z]{1,4}\.)|(?=\p{Ll})\w*[^\x00-\x7f]\w*)"
)
# A street name (a capitalised word, then up to four more words) and a house number.
_PREFIX = r"(?:(?i:ul|al|os|r|av|avda|c|pl|str)(?:\.|/)?[ \t]+)?"
_NAME_NUMBER = rf"{_PREFIX}{_CAP}(?:[ \t]+{_INNER_STRICT}){{0,4}}[ \t]+{_HNUM}"
# Behind a building number any lower-case word may sit in the street name ("Trg revolucije 61");
# English ones are weeded out after matching.
_UNIT_FIRST = r"(?:(?i:apt|apartment|suite|ste|unit|flat)\.?[ \t]*#?[ \t]*\d[\w-]{0,5}[ \t]+)?"
_BUILDING_NAME_NUMBER = (
    rf"{_L}{_UNIT_FIRST}{_NUM}(?:[ \t]+\d{{1,6}})?[ \t]+{_PREFIX}{_CAP}"
    rf"(?:[ \t]+(?:{_CAP}|[^\W\d_][\w'’-]*\.?)){{0,4}}[ \t]+{_HNUM}"
)
_PO_BOX = (
    rf"{_L}(?:{_NUM}[ \t]+)?"
    r"(?i:p\.?[ \t]?o\.?[ \t]?box|post[ \t]?office[ \t]box|postbox|postfach|apartado|caixa postal)[ \t]+\d{1,6}(?!\w)"
)
_CORNER = (
    rf"(?<=(?i:\bcorner[ \t]+of)[ \t]+)(?:[\w.'’-]+[ \t]+){{1,7}}?and[ \t]+"
    rf"(?:{_NUM}[ \t]+)?{_CAP}(?:[ \t]+(?:{_CAP}|{_HNUM})){{0,4}}"
)
# "Carine Summit Street": capitalised words and a spelled-out street type, no number. Not "Court"
# or "Drive" ("The Supreme Court", "Google Drive").
_NAMED_STREET = (
    rf"{_L}(?!(?i:the|a|an|this|that|our|my|your|his|her|their)\b){_CAP}(?:[ \t]+{_CAP}){{0,2}}[ \t]+"
    r"(?-i:Street|Road|Avenue|Lane|Boulevard|Terrace|Crescent|Parkway|Highway|"
    r"Strasse|Straße|Straat|Street)(?![\w'’])"
)
_MILITARY = (
    rf"{_L}(?:PSC[ \t]+\d{{4}},?[ \t]+Box[ \t]+\d{{4}}|Unit[ \t]+\d{{4}}[ \t]+Box[ \t]+\d{{4}}"
    r"|USNS[ \t]+\w+|USNV[ \t]+\w+|USS[ \t]+\w+|USCGC[ \t]+\w+)"
    rf"(?:\s|\\n)*,?(?:\s|\\n)*(?:APO|FPO|DPO)[ \t]+A[AEP][ \t]+\d{{5}}\b"
)


_DATE = regex.compile(
    r"(?i)\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?[ \t]+"
    r"(?:\d{1,2}[ \t,]+)?(?:1[89]|20)\d\d\b"
)


# Scores: the structured layouts score above spaCy's LOCATION (0.85), so a span both report
# is typed STREET_ADDRESS; a bare "name number" scores low and needs an address cue.
class StreetAddressRecognizer(KeelPatternRecognizer):
    ENTITY = "STREET_ADDRESS"
    PATTERNS = [
        Pattern("military address", _MILITARY, 0.9),
        Pattern("street corner", _CORNER, 0.9),
        Pattern("post-office box", _PO_BOX + _TAIL, 0.86),
        Pattern("number then street", rf"{_L}{_UNIT_FIRST}" + _NUMBER_FIRST + _TAIL, 0.86),
        Pattern("street then number [lower]", _STREET_WORD_FIRST + _TAIL, 0.86),
        Pattern("compound street then number", _COMPOUND_STREET + _TAIL, 0.86),
        Pattern("romance street", _ROMANCE + _TAIL, 0.86),
        Pattern("building, street name, number [lower]", _BUILDING_NAME_NUMBER + _TAIL, 0.86),
        Pattern("street name, number, type [lower]",
                rf"{_L}{_NAME_NUMBER}[ \t]+(?i:street|st\.?|road|rd\.?|avenue|ave\.?)(?!\w)" + _TAIL, 0.5),
        # Followed by a unit or another address line: "Gilsbakka 57\n Apt. 710", "Viru 65 Petr Points\n Suite 736".
        Pattern(
            "street name, number, more lines [lower][foreign]",
            rf"{_L}{_NAME_NUMBER}(?:[ \t]+{_PLACE})?(?:{_SEP}{_UNIT}|{_NEWLINE}{_ITEM}){_TAIL}",
            0.45,
        ),
        # Alone it needs an address word nearby ("lives on Veslebakken 48") and a non-English name.
        Pattern("street name, number [foreign]", rf"{_L}{_NAME_NUMBER}", 0.1),
        Pattern("named street", _NAMED_STREET, 0.4),
    ]
    # Presidio matches these as substrings of the lemmas before the match ("located" -> "locate").
    CONTEXT = ["address", "live", "locate", "street", "ship", "deliver", "mail", "visit", "send", "sent", "move",
               "stay", "enter"]

    def __init__(self, supported_language: str = "en") -> None:
        super().__init__(supported_language)
        # One recognizer per pattern: Presidio drops a match contained in a longer one before we
        # see it, so an implausible long match ("They live at X-Gasse 62") would hide a good one.
        self._singles = [
            PatternRecognizer(supported_entity=self.ENTITY, patterns=[p], supported_language=supported_language,
                              name=self.name, global_regex_flags=self.global_regex_flags)
            for p in self.patterns
        ]

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None,
                regex_flags: int | None = None) -> list[RecognizerResult]:
        results = [
            r
            for single in self._singles
            for r in single.analyze(text, entities, nlp_artifacts, regex_flags)
            if _plausible(_pattern_name(r), text[r.start : r.end])
        ]
        for r in results:  # the context enhancer finds a result's recognizer by this id
            r.recognition_metadata[RecognizerResult.RECOGNIZER_IDENTIFIER_KEY] = self.id
        return EntityRecognizer.remove_duplicates(results)


def _pattern_name(result: RecognizerResult) -> str:
    explanation = result.analysis_explanation
    return (explanation.pattern_name or "") if explanation else ""


def _plausible(pattern: str, value: str) -> bool:
    """Weed out ordinary English: "see last 10", "2019 Apple sold 5", "Windows 10", "Chapter 5"."""
    if "[" not in pattern:
        return True
    line = regex.split(r"\r?\n|\\[nr]|,", value, maxsplit=1)[0]
    if _DATE.search(line):
        return False  # "29 December 1944"
    name_words: list[str] = []
    for w in regex.findall(r"[^\W\d_][\w'’-]*", line):
        low = w.casefold()
        if regex.match(r"(?i:apt|apartment|suite|ste|unit|flat|floor|room|rm|bldg|building|box)$", w):
            if name_words:
                break  # the unit and what follows are not part of the street name
            continue
        if low in _STREET_WORDS or regex.match(rf"(?i:{_TYPE})$", w):
            continue
        if (w[0].islower() or low in STOP_WORDS) and low not in _LOWER_OK and is_english_word(low):
            return False  # "lives on", "Musicians Of The 70s"
        name_words.append(low)
    if not name_words:
        return False  # "Gate 4. Room 101": a street type and a unit, but no street name
    if all(is_common_word(w) or w in _LOWER_OK for w in name_words):
        return False  # "3 Order 12", "5 Best 10": everyday words, not a street name
    if "[foreign]" in pattern:
        # A street named only with English words needs more than an address cue.
        return any(not is_english_word(w) and w not in _LOWER_OK for w in name_words)
    return True
