"""STREET_ADDRESS: postal addresses: a house number and a street, then optional unit, city, region and postcode.

Presidio has no street-address recognizer and spaCy sees only the city. This covers the
common Western layouts: "1356 Impala St, Apt. 4", "Wilgenlaan 40", "46 rue Nationale",
"Rúa Olmos 55", US military addresses (PSC/Unit/USNS ... APO/FPO/DPO), plus the unit,
city, region and postcode that follow on the same or next lines.
"""

from presidio_analyzer import Pattern

from keel.privacy.recognizers._base import KeelPatternRecognizer

_W = r"[^\W\d_][\w'’.-]*"  # a word of letters (any script)
_CAP = r"[^\W\d_a-z][\w'’.-]*"  # a capitalised word
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
    r"gatan|vägen|gata|väg|gate|veien|vej|gade|katu|tie|ulica|ul|utca|ut|allee|chaussee|platz|ring|damm)\.?"
)
_UNIT = r"(?:(?:apt|apartment|suite|ste|unit|flat|floor|fl|room|rm|#)\.?\s?#?\s?[\w-]{1,6})"
# What may follow a street on the same or the next line: unit, city, region, postcode, country.
_TAIL = r"(?:(?:,?[ \t]*\n?[ \t]*|,[ \t]+)(?:" + _UNIT + r"|" + _CAP + r"(?:[ \t]" + _CAP + r"){0,3}(?:,?[ \t]+[A-Z]{2})?(?:[ \t]+\d{4,5}(?:-\d{4})?)?|[A-Z]{2}[ \t]+\d{5}(?:-\d{4})?|\d{4,5}))"

_NUMBER_FIRST = rf"\b\d{{1,6}}[A-Za-z]?(?:[ \t]+\d{{1,6}})?[ \t]+(?:{_W}[ \t]+){{0,4}}(?i:{_TYPE})(?=\W|$)"
_STREET_WORD_FIRST = rf"\b{_CAP}(?:[ \t]+{_W}){{0,3}}(?<=(?i:{_TYPE}))[ \t]+\d{{1,5}}[A-Za-z]?\b"
_COMPOUND_STREET = (
    r"\b[^\W\d_a-z]\w*(?i:straat|laan|weg|gracht|plein|strasse|straße|gasse|allee|platz|gatan|vägen|gata|"
    r"veien|vej|gade|katu|tie|v|g|str)\.?[ \t]+\d{1,5}[A-Za-z]?\b"
)
_ROMANCE = rf"\b\d{{1,5}}[ \t]+(?i:rue|via|viale|calle|avenida|avenue|rua|rúa|carrer|boulevard|bd|chemin|place|allée|impasse|quai)[ \t]+(?:{_W}[ \t]?){{1,4}}"
_MILITARY = (
    r"\b(?:PSC[ \t]+\d{4},?[ \t]+Box[ \t]+\d{4}|Unit[ \t]+\d{4}[ \t]+Box[ \t]+\d{4}|USNS[ \t]+\w+|USNV[ \t]+\w+|USS[ \t]+\w+|USCGC[ \t]+\w+)"
    r"\s*,?\s*(?:APO|FPO|DPO)[ \t]+A[AEP][ \t]+\d{5}\b"
)


class StreetAddressRecognizer(KeelPatternRecognizer):
    ENTITY = "STREET_ADDRESS"
    PATTERNS = [
        Pattern("military address", _MILITARY, 0.85),
        Pattern("number then street", _NUMBER_FIRST + _TAIL + "{0,4}", 0.6),
        Pattern("street then number", _STREET_WORD_FIRST + _TAIL + "{0,4}", 0.5),
        Pattern("compound street then number", _COMPOUND_STREET + _TAIL + "{0,4}", 0.5),
        Pattern("romance street", _ROMANCE + _TAIL + "{0,4}", 0.6),
    ]
    CONTEXT = ["address", "live", "lives", "living", "located", "street", "ship", "deliver", "mail", "visit"]
