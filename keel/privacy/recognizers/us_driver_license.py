"""US_DRIVER_LICENSE: US driver's license numbers, reported only with a license cue nearby.

Replaces Presidio's UsLicenseRecognizer, which matches case-insensitively at a score equal to
Keel's threshold: it reports model numbers and codes ("X200", "S3", "Q3") and the "n4317" of
an escaped line break ("\\n4317"). State formats are letter-digit shapes (A1234567, AB123456,
123456789A, ...) that mean nothing alone, so the shapes score low and count only with a word
such as "driver", "license" or "DL" before them; a number right behind such a label counts.
"""

from presidio_analyzer import Pattern

from keel.privacy.recognizers._base import KeelPatternRecognizer

_L = r"(?:(?<![\w\\])|(?<=\\[ntr]))"
_SHAPES = (
    r"(?:[A-Z]\d{3,14}|[A-Z]{2}\d{3,7}|\d{2}[A-Z]{3}\d{5,6}|[A-Z]\d{6}R|\d{9}[A-Z]|[A-Z]{2}\d{6}[A-Z]|\d{8}[A-Z]{2}"
    r"|\d{3}[A-Z]{2}\d{4}|[A-Z]\d[A-Z]\d[A-Z]|\d{7,8}[A-Z])"
)


class UsDriverLicenseRecognizer(KeelPatternRecognizer):
    ENTITY = "US_DRIVER_LICENSE"
    PATTERNS = [
        Pattern("state license shape", rf"{_L}{_SHAPES}(?!\w)", 0.1),
        Pattern(
            "labelled license number",
            r"(?<=(?i:\bdriver'?s?\s+licen[cs]e|\bdriving\s+licen[cs]e|\bDL)(?:\s+(?i:no\.?|number|#))?[\s:#.-]{1,4})"
            r"(?=[A-Z0-9-]*\d)[A-Z0-9][A-Z0-9-]{4,19}(?!\w)",
            0.6,
        ),
    ]
    CONTEXT = ["driver", "license", "licence", "permit", "dl", "driving"]
