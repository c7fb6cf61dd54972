"""UK_NHS: NHS numbers (10 digits, mod-11 check digit).

Presidio's own recognizer scores any 10 digits that pass the checksum at 1.0, so one US phone
number in eleven is reported as an NHS number. Here the checksum only gates the match and
the score comes from the format and from context words ("NHS", "patient").
"""

from presidio_analyzer import Pattern

from keel.privacy.recognizers._base import KeelPatternRecognizer


def nhs_checksum_ok(digits: str) -> bool:
    if len(digits) != 10 or not digits.isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(digits[:9], range(10, 1, -1), strict=True))
    check = 11 - total % 11
    check = 0 if check == 11 else check
    return check != 10 and check == int(digits[9])


class UkNhsRecognizer(KeelPatternRecognizer):
    ENTITY = "UK_NHS"
    PATTERNS = [
        Pattern("NHS 3-3-4 spaced", r"\b\d{3} \d{3} \d{4}\b", 0.3),
        Pattern("NHS 10 digits", r"\b\d{10}\b", 0.2),
        # Behind an explicit "NHS number" label: above the phone recognizer's score for 3-3-4 digits.
        Pattern("labelled NHS number",
                r"(?<=(?i:\bNHS)(?:\s+(?i:number|no\.?|#))?[\s:#.-]{1,4})\d{3}[ -]?\d{3}[ -]?\d{4}\b", 0.9),
    ]
    CONTEXT = ["nhs", "national health service", "nhs number", "nhs no", "patient", "gp"]


    def validate_result(self, pattern_text: str) -> bool | None:
        # None keeps the pattern's score; True would force it to 1.0.
        return None if nhs_checksum_ok(pattern_text.replace(" ", "").replace("-", "")) else False
