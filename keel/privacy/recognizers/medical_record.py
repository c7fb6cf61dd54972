"""MEDICAL_RECORD_NUMBER: hospital medical record numbers (PHI), which have no universal format.

Reported only with an explicit label next to the number ("MRN", "medical record", "chart #"):
a bare 6-10 digit number is far more often something else.
"""

from presidio_analyzer import Pattern

from keel.privacy.recognizers._base import KeelPatternRecognizer


class MedicalRecordNumberRecognizer(KeelPatternRecognizer):
    ENTITY = "MEDICAL_RECORD_NUMBER"
    CONTEXT = ["mrn", "medical record", "chart", "patient"]
    PATTERNS = [
        Pattern(
            "labelled MRN",
            r"(?i)(?<=\b(?:mrn|medical record(?: number| no\.?| #)?|chart(?: number| no\.?| #)?"
            r"|patient id|patient number)[\s:#.-]{1,4})"
            r"[A-Z]{0,3}-?\d{5,12}\b",
            0.85,
        ),
        Pattern("MRN-prefixed", r"\bMRN[-:]?\d{5,12}\b", 0.85),
    ]

