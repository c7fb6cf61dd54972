"""Builds keel/privacy/data/{first,last}_names.txt, the PERSON recognizer's gazetteer.

Source: the first and last names that Faker (MIT) ships for its Latin-script locales, plus the
romanised Japanese and Chinese names. Not the presidio-evaluator name table: the accuracy
benchmark draws its people from that table, and tuning on it would measure nothing.
Run: .venv/bin/python scripts/build_name_lists.py
"""

from __future__ import annotations

import importlib
import pkgutil
import unicodedata
from pathlib import Path

import faker.providers.person as person_pkg

OUT = Path(__file__).resolve().parent.parent / "keel" / "privacy" / "data"
# The attributes of Faker's person providers that hold first and last names.
FIRST_NAME_ATTRS = (
    "first_names", "first_names_male", "first_names_female", "first_names_nonbinary", "first_romanized_names",
    "first_romanized_names_male", "first_romanized_names_female", "first_name_male_romanized",
    "first_name_female_romanized",
)
LAST_NAME_ATTRS = ("last_names", "last_romanized_names", "last_name_romanized")


def latin(name: str) -> bool:
    return all(c.isascii() or "LATIN" in unicodedata.name(c, "") for c in name if c.isalpha())


def names_of(provider: type, attrs: tuple[str, ...]) -> set[str]:
    found: set[str] = set()
    for attr in attrs:
        value = getattr(provider, attr, None)
        if not isinstance(value, dict | list | tuple | set):
            continue
        if isinstance(value, dict):  # weighted OrderedDicts
            value = list(value)
        for name in value or ():
            for part in str(name).split():
                if len(part) > 1 and latin(part) and part[0].isupper():
                    found.add(part)
    return found


def main() -> None:
    first: set[str] = set()
    last: set[str] = set()
    for mod in pkgutil.iter_modules(person_pkg.__path__):
        provider = importlib.import_module(f"faker.providers.person.{mod.name}").Provider
        first |= names_of(provider, FIRST_NAME_ATTRS)
        last |= names_of(provider, LAST_NAME_ATTRS)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "first_names.txt").write_text("\n".join(sorted(first)) + "\n", encoding="utf-8")
    (OUT / "last_names.txt").write_text("\n".join(sorted(last)) + "\n", encoding="utf-8")
    print(f"{len(first)} first names, {len(last)} last names -> {OUT}")


if __name__ == "__main__":
    main()
