"""PHONE_NUMBER in international and local layouts that Presidio's libphonenumber matcher misses.

Presidio only tries a fixed list of regions; real text carries "+46 (0)8 704 655 72",
"03.91.12.17.13", "(07700) 154728" or "9822 3749". A phone is a run of digit groups with
phone-like separators, 7 to 15 digits in all, optionally with a country prefix and an
extension. Bare digit runs and short local numbers score low and need context to count.
"""

import regex
from presidio_analyzer import Pattern

from keel.privacy.recognizers._base import KeelPatternRecognizer

_EXT = r"(?:[ \t]?(?:x|ext\.?|extension)[ \t]?\d{1,6})?"
_GROUP = r"(?:\(\d{1,5}\)|\d{1,5})"
_SEP = r"(?:[ \t.-]|\)[ \t]?)"


class InternationalPhoneRecognizer(KeelPatternRecognizer):
    ENTITY = "PHONE_NUMBER"
    PATTERNS = [
        Pattern("country prefix", rf"(?<![\w+])(?:\+|00)\d{{1,3}}[ \t.-]?(?:\(0\)[ \t]?)?{_GROUP}(?:{_SEP}?\d{{1,5}}){{1,5}}{_EXT}(?!\w)", 0.7),
        Pattern("area code in parentheses", rf"(?<![\w)])\(\d{{2,5}}\)[ \t.-]?\d{{2,5}}(?:[ \t.-]?\d{{2,5}}){{0,3}}{_EXT}(?!\w)", 0.6),
        Pattern("separated groups", rf"(?<![\w.,/:+-])\d{{2,5}}(?:[ \t.-]\d{{2,5}}){{1,4}}{_EXT}(?![\w/:]|[.,-]\d)", 0.4),
        Pattern("trunk-prefixed digits", r"(?<![\w.,/:+-])0\d{9,10}(?![\w/:]|[.,-]\d)", 0.4),
    ]
    CONTEXT = ["phone", "call", "tel", "telephone", "mobile", "cell", "fax", "number", "reach", "text", "contact", "office", "whatsapp"]

    def validate_result(self, pattern_text: str) -> bool | None:
        digits = regex.sub(r"(?i)(?:x|ext\.?|extension)[ \t]?\d+$", "", pattern_text)
        n = sum(c.isdigit() for c in digits)
        return None if 7 <= n <= 15 else False
