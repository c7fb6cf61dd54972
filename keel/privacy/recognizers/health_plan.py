"""HEALTH_PLAN_ID: health insurance member / subscriber ids (PHI under HIPAA).

US Medicare Beneficiary Identifiers have a fixed 11-character shape (letters exclude S, L, O,
I, B, Z); other plans' member ids are recognised only behind a label ("member id", "policy
number", "subscriber id", "group number").
"""

from presidio_analyzer import Pattern

from keel.privacy.recognizers._base import KeelPatternRecognizer

_MBI_L = "[AC-HJKMNP-RT-Y]"
_MBI_AN = "[AC-HJKMNP-RT-Y0-9]"


class HealthPlanIdRecognizer(KeelPatternRecognizer):
    ENTITY = "HEALTH_PLAN_ID"
    CONTEXT = ["member", "insurance", "medicare", "medicaid", "plan", "beneficiary"]
    PATTERNS = [
        Pattern(
            "Medicare MBI",
            rf"\b[1-9]{_MBI_L}{_MBI_AN}\d-?{_MBI_L}{_MBI_AN}\d-?{_MBI_L}{_MBI_L}\d\d\b",
            0.6,
        ),
        Pattern(
            "labelled member id",
            r"(?i)(?<=\b(?:member|subscriber|policy|insurance|health plan|plan|group|beneficiary|medicaid|medicare)"
            r"(?: id| number| no\.?| #)[\s:#.-]{1,4})(?=[A-Z0-9-]*\d)[A-Z0-9][A-Z0-9-]{5,19}\b",
            0.8,
        ),
    ]

