"""CREDIT_CARD: payment card numbers (PAN) of 12 to 19 digits that pass the Luhn check.

Presidio's pattern only knows the classic 3/4/5/6 prefixes at 13-16 digits, so it misses
Mastercard's 2-series (2221-2720), 19-digit Visa/UnionPay and 12-digit Maestro cards. Here any
issuer prefix is accepted, bare or grouped in fours (Amex 4-6-5), and the Luhn checksum
gates the match. One random number in ten passes Luhn, so only the common 15-16 digit card
lengths score on their own; 12-14 and 17-19 digit runs need a card word nearby.
"""

import regex
from presidio_analyzer import Pattern

from keel.privacy.recognizers._base import KeelPatternRecognizer

_EDGE_L = r"(?<![\w.,/:+-])"
_EDGE_R = r"(?![\w/:]|[.,-]\d)"


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
        Pattern("grouped 4-4-4-4(-3)", rf"{_EDGE_L}[1-6]\d{{3}}(?:[ -]\d{{4}}){{2}}[ -]\d{{4}}(?:[ -]\d{{1,3}})?{_EDGE_R}", 0.5),
        Pattern("grouped 4-6-5", rf"{_EDGE_L}3\d{{3}}[ -]\d{{6}}[ -]\d{{5}}{_EDGE_R}", 0.5),
        Pattern("15-16 digits", rf"{_EDGE_L}[1-6]\d{{14,15}}{_EDGE_R}", 0.4),
        # Maestro (12-13) and long Visa/UnionPay (17-19): too close to order and account numbers.
        Pattern("12-19 digits", rf"{_EDGE_L}[1-6](?:\d{{11,13}}|\d{{16,18}}){_EDGE_R}", 0.15),
    ]
    CONTEXT = ["card", "credit", "debit", "cc", "visa", "mastercard", "amex", "maestro", "payment", "charge"]

    def validate_result(self, pattern_text: str) -> bool | None:
        digits = regex.sub(r"\D", "", pattern_text)
        # None keeps the pattern's score; True would force it to 1.0.
        return None if 12 <= len(digits) <= 19 and luhn_ok(digits) else False
