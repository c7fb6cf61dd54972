"""Shared base for Keel's pattern recognizers."""

import regex
from presidio_analyzer import Pattern, PatternRecognizer


class KeelPatternRecognizer(PatternRecognizer):
    """A Presidio PatternRecognizer whose patterns are case-sensitive unless they say `(?i)`.

    Presidio matches case-insensitively by default, which turns shape-based patterns (key
    prefixes, Medicare ids, capitalised street names) into noise.
    """

    ENTITY: str
    PATTERNS: list[Pattern]
    CONTEXT: list[str] = []
    # Set by Presidio's __init__; declared here because the type checker does not read installed code's bodies.
    name: str
    patterns: list[Pattern]

    def __init__(self, supported_language: str = "en") -> None:
        super().__init__(
            supported_entity=self.ENTITY,
            patterns=self.PATTERNS,
            context=self.CONTEXT,
            supported_language=supported_language,
            name="Keel" + type(self).__name__,
            global_regex_flags=regex.DOTALL | regex.MULTILINE,
        )
