"""Keel's own recognizers through the real engine: what each finds (type and exact offsets) and
what ordinary text each leaves alone."""

import logging

import pytest

from keel.privacy import get_engine


@pytest.fixture(scope="module")
def engine():
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    return get_engine()


def detect(engine, text):
    return [(s.type, s.start, s.end) for s in engine.detect(text)]


def assert_found(engine, text, entity, value):
    start = text.index(value)
    spans = detect(engine, text)
    assert (entity, start, start + len(value)) in spans, [(t, text[s:e]) for t, s, e in spans]


def assert_clean(engine, text, *entities):
    spans = [(t, text[s:e]) for t, s, e in detect(engine, text)]
    assert not [sp for sp in spans if not entities or sp[0] in entities], spans


# -- PERSON (person_names.py, spacy_ner.py) -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("I want to add Alexandra Dalgety as a beneficiary to my account", "Alexandra Dalgety"),
        ("Cintia is very reliable. You can always depend on her.", "Cintia"),
        ("She named him Batirbek", "Batirbek"),
        ("Regards,\nBibulat Z Sultygov\nSales", "Bibulat Z Sultygov"),
        ('{"note": "Thanks!\\nAnke Junker\\nSupport"}', "Anke Junker"),
        ("Please ask Mr. Okonkwo to call back.", "Okonkwo"),
        ("Please review it before Friday.\n\nThanks,\nPriya Raghunathan\nHead of Finance", "Priya Raghunathan"),
        ("They had 3 kids: Platt, David and Oscar.", "Platt"),
        ("Karel: What a day.\nAlbert: Indeed.", "Albert"),
        ("have you heard benito bianchi speak", "benito bianchi"),
    ],
)
def test_person_found(engine, text, value):
    assert_found(engine, text, "PERSON", value)


@pytest.mark.parametrize(
    "text",
    [
        "Will you mark the grant application as urgent? Hope to hear back in May.",
        "Apple Pay and Visa are accepted; files sync to Cloud Storage.",
        "I'm sure we'll ship it. Don't worry, I've checked. C'mon!",
        "Can I return an item bought on Black Friday?",
        "The Salesperson of the Month award went to the Orchestra team.",
    ],
)
def test_person_not_found_in_ordinary_text(engine, text):
    assert_clean(engine, text, "PERSON")


# -- STREET_ADDRESS (street_address.py) -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("Send it to 1356 Impala St, Apt. 4 please.", "1356 Impala St, Apt. 4"),
        ("He lives on Veslebakken 48.", "Veslebakken 48"),
        ("Ship to 472 Veslebakken 48\nMol\n, VAN\n Belgium 17707", "472 Veslebakken 48\nMol\n, VAN\n Belgium 17707"),
        ("Address:\\n02812 Gilsbakka 57\\n Apt. 710\\n Bíldudalur\\n Iceland 56099",
         "02812 Gilsbakka 57\\n Apt. 710\\n Bíldudalur\\n Iceland 56099"),
        ("The office is at 46 rue Nationale, Lille", "46 rue Nationale, Lille"),
        ("Mail: P.O. Box 101, Springfield", "P.O. Box 101, Springfield"),
        ("Ship to PSC 7327, Box 5998\nAPO AP 82825", "PSC 7327, Box 5998\nAPO AP 82825"),
    ],
)
def test_street_address_found(engine, text, value):
    assert_found(engine, text, "STREET_ADDRESS", value)


@pytest.mark.parametrize(
    "text",
    [
        "Update to Windows 10 before March. In 2019 Apple sold 5 million units.",
        "Need to see last 10 transactions on my statement.",
        "Please contact Megan <3 Order 12 shipped; Top 5 Best 10 picks.",
        "See Chapter 5 and Figure 12 of the manual.",
        "Boarding at Gate 4. Room 101 is on Level 3.",
        "The Supreme Court ruled on Tuesday; files are in Google Drive.",
        "For my take on that, see Guilty Pleasures: 5 Musicians Of The 70s.",
    ],
)
def test_street_address_not_found_in_ordinary_text(engine, text):
    assert_clean(engine, text, "STREET_ADDRESS")


# -- PHONE_NUMBER (international_phone.py) ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("Call me on +46 (0)8 704 655 72 tomorrow.", "+46 (0)8 704 655 72"),
        ("Desk: 650-752-7354x549", "650-752-7354x549"),
        ("They're not answering at 96 466712", "96 466712"),
        ("Fax (07700) 154728 anytime", "(07700) 154728"),
        ("Phone: 61 60 34", "61 60 34"),
        ("Sales\\n03.91.12.17.13 office", "03.91.12.17.13"),
    ],
)
def test_phone_found(engine, text, value):
    assert_found(engine, text, "PHONE_NUMBER", value)


@pytest.mark.parametrize(
    "text",
    [
        "Released on 2024-11-05, version 4.2.1 fixes 12 34 bugs.",
        "Your order ORD-2024-118832 costs $1,299.00 and ships in 3-5 days.",
        "We sold 123 456 units in 2023.",
    ],
)
def test_phone_not_found_in_ordinary_text(engine, text):
    assert_clean(engine, text, "PHONE_NUMBER")


# -- CREDIT_CARD (credit_card.py) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("What is the limit for card 2243150983930104?", "2243150983930104"),  # Mastercard 2-series
        ("My card 4841241182449353489 is lost", "4841241182449353489"),  # 19 digits
        ("Please block card no 503838061748", "503838061748"),  # 12-digit Maestro
        ("Charge 4111 1111 1111 1111 now", "4111 1111 1111 1111"),
        ("My credit card number is 903838061740", "903838061740"),  # no known prefix: the card word counts
    ],
)
def test_credit_card_found(engine, text, value):
    assert_found(engine, text, "CREDIT_CARD", value)


@pytest.mark.parametrize(
    "text",
    [
        "Tracking number 2243150983930105 for your parcel.",  # fails Luhn
        "Invoice 903838061740 was paid.",  # Luhn-valid 12 digits, no issuer prefix, no card word
    ],
)
def test_credit_card_not_found(engine, text):
    assert_clean(engine, text, "CREDIT_CARD")


# -- US_DRIVER_LICENSE (us_driver_license.py) -------------------------------------------------


def test_driver_license_found_with_cue(engine):
    assert_found(engine, "My driver's license number is D1234567.", "US_DRIVER_LICENSE", "D1234567")


def test_driver_license_shapes_need_a_cue(engine):
    assert_clean(engine, "The X200 model and the S3 bucket shipped in Q3.", "US_DRIVER_LICENSE")
    assert_clean(engine, "Sales\\n4317 units\\n", "US_DRIVER_LICENSE")


# -- UK_NHS, MEDICAL_RECORD_NUMBER, HEALTH_PLAN_ID, DATE_OF_BIRTH, SECRET --------------------------


@pytest.mark.parametrize(
    ("text", "entity", "value"),
    [
        ("NHS number 943 476 5919", "UK_NHS", "943 476 5919"),
        ("MRN: 00482913", "MEDICAL_RECORD_NUMBER", "00482913"),
        ("Medicare ID 1EG4-TE5-MK73", "HEALTH_PLAN_ID", "1EG4-TE5-MK73"),
        ("Member ID: XJH445120", "HEALTH_PLAN_ID", "XJH445120"),
        ("DOB: 03/14/1962", "DATE_OF_BIRTH", "03/14/1962"),
        ("born on 29 December 1944", "DATE_OF_BIRTH", "29 December 1944"),
        ("key AKIAIOSFODNN7EXAMPLE", "SECRET", "AKIAIOSFODNN7EXAMPLE"),
        ("password=Tr0ub4dor&3", "SECRET", "Tr0ub4dor&3"),
    ],
)
def test_other_keel_recognizers_found(engine, text, entity, value):
    assert_found(engine, text, entity, value)


@pytest.mark.parametrize(
    "text",
    [
        "The meeting is on 03/14/2024 in room 12.",  # a date without a birth cue
        "Order 00482913 shipped; chart shows growth.",  # a number without an MRN label
        "The password policy requires 12 characters.",
        "Plan ahead: the group meets in 2025.",
    ],
)
def test_other_keel_recognizers_quiet_on_ordinary_text(engine, text):
    assert_clean(engine, text, "UK_NHS", "MEDICAL_RECORD_NUMBER", "HEALTH_PLAN_ID", "DATE_OF_BIRTH", "SECRET")


# -- a realistic document with no PII ---------------------------------------------------------

FAQ = """Frequently asked questions

How long does shipping take? Orders placed before 2 pm ship the same day. Standard delivery takes
3-5 business days and costs $4.99; orders over $50 ship free. Express delivery (1-2 days) is $12.50.

Can I return an item? Yes. Returns are accepted within 30 days of delivery. Please include your order
number (for example #100234 or ORD-2024-118832) with the parcel. Refunds take 5-7 business days.

Which version do I need? The desktop app 4.2.1 requires Windows 10 or macOS 13. Version 3.9 is no
longer supported after March 31, 2025. Download the 64-bit installer (about 150 MB) from the
Downloads page. Release 2.14.0 (2024-11-05) fixed a crash when importing CSV files larger than 2 GB.

Does the Pro plan include support? The Pro plan costs 19.99 EUR per month or 199 EUR per year and
includes priority support, 500 GB of storage and up to 25 users. Apple Pay and Visa are accepted.
Team plans start at 10 seats; see section 4.3 and table 12 for details.
"""


def test_faq_without_pii_has_no_person_phone_or_address(engine):
    assert_clean(engine, FAQ, "PERSON", "PHONE_NUMBER", "STREET_ADDRESS", "CREDIT_CARD", "US_DRIVER_LICENSE")
