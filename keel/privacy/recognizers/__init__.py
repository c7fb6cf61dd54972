"""Keel's own recognizers, one per file, for what Presidio's defaults miss.

Entity names Keel adds to Presidio's (PERSON, EMAIL_ADDRESS, PHONE_NUMBER, LOCATION, ...):

| entity                | recognizer file       | what                                               |
|-----------------------|-----------------------|----------------------------------------------------|
| STREET_ADDRESS        | street_address.py     | house number + street, unit, city, postcode        |
| MEDICAL_RECORD_NUMBER | medical_record.py     | labelled medical record numbers (PHI)              |
| HEALTH_PLAN_ID        | health_plan.py        | Medicare MBI, labelled member/policy ids (PHI)     |
| DATE_OF_BIRTH         | date_of_birth.py      | a date after a birth cue (PHI)                     |
| SECRET                | secrets.py            | API keys, tokens, private keys, passwords          |

and stronger recognizers for existing names: PERSON (person_names.py: gazetteer and shape),
PHONE_NUMBER (international_phone.py: international and local layouts), CREDIT_CARD
(credit_card.py: Luhn-checked 12-19 digit cards, 2-series Mastercard and Maestro included) and UK_NHS (uk_nhs.py:
checksum-gated, scored by context instead of forced to 1.0). spacy_ner.py replaces Presidio's spaCy
recognizer: same entities, but PERSON spans must read as names (no "Apple Pay", no song titles);
international_phone.py also replaces Presidio's libphonenumber PhoneRecognizer (which reads order
ids such as "ORD-2024-118832" as phones) and us_driver_license.py its UsLicenseRecognizer (which
reports "X200" or "Q3" at the threshold): both need a license or phone cue for weak shapes.
"""

from presidio_analyzer import EntityRecognizer

from keel.privacy.recognizers.credit_card import CreditCardLuhnRecognizer
from keel.privacy.recognizers.date_of_birth import DateOfBirthRecognizer
from keel.privacy.recognizers.health_plan import HealthPlanIdRecognizer
from keel.privacy.recognizers.international_phone import InternationalPhoneRecognizer
from keel.privacy.recognizers.medical_record import MedicalRecordNumberRecognizer
from keel.privacy.recognizers.person_names import PersonNameRecognizer
from keel.privacy.recognizers.secrets import SecretRecognizer
from keel.privacy.recognizers.spacy_ner import KeelSpacyRecognizer
from keel.privacy.recognizers.street_address import StreetAddressRecognizer
from keel.privacy.recognizers.uk_nhs import UkNhsRecognizer
from keel.privacy.recognizers.us_driver_license import UsDriverLicenseRecognizer

ALL = (
    PersonNameRecognizer,
    StreetAddressRecognizer,
    InternationalPhoneRecognizer,
    UkNhsRecognizer,
    CreditCardLuhnRecognizer,
    MedicalRecordNumberRecognizer,
    HealthPlanIdRecognizer,
    DateOfBirthRecognizer,
    SecretRecognizer,
    KeelSpacyRecognizer,
    UsDriverLicenseRecognizer,
)


def keel_recognizers(language: str = "en") -> list[EntityRecognizer]:
    return [cls(supported_language=language) for cls in ALL]
