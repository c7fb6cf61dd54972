"""PHONE_NUMBER in international and local layouts that Presidio's libphonenumber matcher misses.

Presidio only tries a fixed list of regions; real text carries "+46 (0)8 704 655 72",
"03.91.12.17.13", "(07700) 154728", "96 466712", "650-752-7354x549" or "9822 3749". A phone is
a run of digit groups with phone-like separators, 7 to 15 digits in all, optionally with a
country prefix and an extension. Bare digit runs and short local numbers score low and need
context to count; 6-digit local numbers count only right behind a phone label ("Phone:",
"call me on") or in front of one ("... office", "... fax").

Keel uses this in place of Presidio's libphonenumber PhoneRecognizer, whose US and UK
parsing also reads digit runs inside ids ("ORD-2024-118832") and dates as phones.

Text copied out of JSON or logs often holds escaped line breaks ("...\\n650-752-7354"): a
literal \\n, \\t or \\r counts as a boundary, not as a letter glued to the number.
"""

import regex
from presidio_analyzer import Pattern, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts

from keel.privacy.recognizers._base import KeelPatternRecognizer

_EXT = r"(?:[ \t]?(?:x|ext\.?|extension)[ \t]?\d{1,6})?"
_GROUP = r"(?:\(\d{1,5}\)|\d{1,5})"
_SEP = r"(?:[ \t.-]|\)[ \t]?)"
_ESC = r"(?<=\\[ntr,;])"  # an escaped line break or separator just before
_L = rf"(?:(?<![\w.,/:+-])|{_ESC})"
_R = r"(?![\w/:]|[.,-]\d)"
# Dates share the shape of a local number: 2024-11-05, 05.11.2024, 11/05/24.
_DATE = regex.compile(
    r"(?:19|20)\d\d([-./])(?:0?[1-9]|1[0-2])\1(?:0?[1-9]|[12]\d|3[01])"
    r"|(?:0?[1-9]|[12]\d|3[01])([-./])(?:0?[1-9]|1[0-2])\2(?:19|20)?\d\d"
)
_LOCAL = r"\d{2,5}(?:[ \t.-]\d{2,8}){1,4}"
_LABEL_BEFORE = (
    r"(?<=(?i:(?:\b|(?<=\\[ntr]))(?:phone|tel|telephone|mobile|cell|fax|desk|office|home|work|whatsapp)\b"
    r"\.?[ \t]*(?:no\.?|number|#)?[ \t]*:?"
    r"|\b(?:call|text|reach|ring)(?: me| us)?(?: at| on)?|\bregistered)[ \t]*(?:\\n)?[ \t]*)"
)
_LABEL_AFTER = r"(?=[ \t]*-?[ \t]*(?i:office|fax|mobile|cell|home|work|desk|phone|tel)\b)"


class InternationalPhoneRecognizer(KeelPatternRecognizer):
    ENTITY = "PHONE_NUMBER"
    PATTERNS = [
        Pattern(
            "country prefix",
            rf"(?:(?<![\w+])|{_ESC})(?:\+|00)\d{{1,3}}[ \t.-]?(?:\(0\)[ \t]?)?{_GROUP}"
            rf"(?:{_SEP}?\d{{1,5}}){{1,5}}{_EXT}(?!\w)",
            0.7,
        ),
        Pattern("area code in parentheses",
                rf"(?:(?<![\w)])|{_ESC})\(\d{{2,5}}\)[ \t.-]?\d{{2,5}}(?:[ \t.-]?\d{{2,5}}){{0,3}}{_EXT}(?!\w)", 0.6),
        Pattern("separated groups", rf"{_L}{_LOCAL}{_EXT}{_R}", 0.4),
        Pattern("trunk-prefixed digits", rf"{_L}0\d{{9,10}}{_R}", 0.4),
        # Ten bare digits in the North American shape (area code and exchange 2-9), scored as
        # Presidio's libphonenumber matcher scored them.
        Pattern("bare NANP digits", rf"{_L}1?[2-9]\d{{2}}[2-9]\d{{6}}{_R}", 0.4),
        Pattern("labelled before", rf"{_LABEL_BEFORE}(?:{_LOCAL}|\d{{7,12}}){_EXT}{_R}", 0.6),
        Pattern("labelled after", rf"{_L}(?:{_LOCAL}|\d{{7,12}}){_EXT}{_LABEL_AFTER}", 0.6),
    ]
    CONTEXT = ["phone", "call", "tel", "telephone", "mobile", "cell", "fax", "number", "reach", "text", "contact",
               "office", "whatsapp"]

    def validate_result(self, pattern_text: str) -> bool | None:
        if _DATE.fullmatch(pattern_text.strip()):
            return False
        n = _digit_count(pattern_text)
        return None if 6 <= n <= 15 else False

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None,
                regex_flags: int | None = None) -> list[RecognizerResult]:
        results = super().analyze(text, entities, nlp_artifacts, regex_flags)
        # Six digits is a phone only behind or before a phone label; unlabelled it is a code or an amount.
        return [r for r in results if _labelled(r) or _digit_count(text[r.start : r.end]) >= 7]


def _labelled(result: RecognizerResult) -> bool:
    explanation = result.analysis_explanation
    return bool(explanation and (explanation.pattern_name or "").startswith("labelled"))


def _digit_count(value: str) -> int:
    value = regex.sub(r"(?i)(?:x|ext\.?|extension)[ \t]?\d+$", "", value)
    return sum(c.isdigit() for c in value)
