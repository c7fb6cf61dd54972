"""CREDIT_CARD: payment card numbers (PAN) of 12 to 19 digits that pass the Luhn check.

Presidio's pattern only knows the classic 3/4/5/6 prefixes at 13-16 digits, so it misses
Mastercard's 2-series (2221-2720), 19-digit Visa/UnionPay and 12-digit Maestro cards. Here
12-19 digits, bare or grouped in fours (Amex 4-6-5), count when they pass the Luhn checksum
and start with a card scheme's issuer prefix. One random number in ten passes Luhn, so a run
without a known prefix scores below the threshold and needs a card word nearby.
"""

import regex
from presidio_analyzer import Pattern, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts

from keel.privacy.recognizers._base import KeelPatternRecognizer

_EDGE_L = r"(?:(?<![\w.,/:+-])|(?<=\\[ntr]))"
_EDGE_R = r"(?![\w/:]|[.,-]\d)"
# Issuer prefixes (IIN ranges) of the card schemes in use: Visa, Mastercard (51-55, 2221-2720),
# Amex, Discover, Diners, JCB, UnionPay and Maestro (including the legacy UK 0604/6304 ranges).
_IIN = regex.compile(
    r"4|5[1-5]|2(?:2[2-9]\d|[3-6]\d\d|7[01]\d|720)|3[47]|6011|64[4-9]|65|62|30[0-5]|3[689]|35|2131|1800"
    r"|50[0-9]|5[6-8]|6304|6390|67|0604"
)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class CreditCardLuhnRecognizer(KeelPatternRecognizer):
    ENTITY = "CREDIT_CARD"
    PATTERNS = [
        Pattern("grouped 4-4-4-4(-3)", rf"{_EDGE_L}\d{{4}}(?:[ -]\d{{4}}){{2}}[ -]\d{{4}}(?:[ -]\d{{1,3}})?{_EDGE_R}",
                0.5),
        Pattern("grouped 4-6-5", rf"{_EDGE_L}3\d{{3}}[ -]\d{{6}}[ -]\d{{5}}{_EDGE_R}", 0.5),
        Pattern("12-19 digits", rf"{_EDGE_L}\d{{12,19}}{_EDGE_R}", 0.4),
    ]
    CONTEXT = ["card", "credit", "debit", "cc", "visa", "mastercard", "amex", "maestro", "payment", "charge"]

    def validate_result(self, pattern_text: str) -> bool | None:
        digits = regex.sub(r"\D", "", pattern_text)
        # None keeps the pattern's score; True would force it to 1.0.
        return None if 12 <= len(digits) <= 19 and luhn_ok(digits) else False

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None,
                regex_flags: int | None = None) -> list[RecognizerResult]:
        results = super().analyze(text, entities, nlp_artifacts, regex_flags)
        for r in results:
            # Without a known issuer prefix a Luhn-valid run is as likely an order or account number:
            # it then needs a card word nearby (context lifts it over the threshold).
            if r.score > 0.15 and not _IIN.match(regex.sub(r"\D", "", text[r.start : r.end])):
                r.score = 0.15
        return results
