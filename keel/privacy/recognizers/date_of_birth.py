"""DATE_OF_BIRTH: a date stated as someone's birth date (PHI; other dates are not reported).

Numeric (12/29/1944, 1944-12-29, 29.12.1944) and written (29 December 1944, Dec 29, 1944) dates,
reported only when a birth cue ("DOB", "date of birth", "born") precedes them closely.
"""

from presidio_analyzer import Pattern

from keel.privacy.recognizers._base import KeelPatternRecognizer

_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_DATE = (
    r"(?:\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})"
    r"|\d{4}-\d{2}-\d{2}"
    rf"|\d{{1,2}}(?:st|nd|rd|th)? (?:of )?{_MONTH},? \d{{4}}"
    rf"|{_MONTH} \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}})"
)
_CUE = r"(?:dob|d\.o\.b\.?|date of birth|birth ?date|birthday|born(?: on)?|b\.)"


class DateOfBirthRecognizer(KeelPatternRecognizer):
    ENTITY = "DATE_OF_BIRTH"
    CONTEXT = ["born", "birth", "dob"]
    PATTERNS = [Pattern("date after a birth cue",
                        rf"(?i)(?<=\b{_CUE}[^\w\n]{{0,3}}(?:is |was |it's |of |on )?){_DATE}\b", 0.85)]

