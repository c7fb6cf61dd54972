"""The PII engine: Presidio's analyzer over offline spaCy, plus Keel's own recognizers.

Built once per process (`get_engine`), because loading spaCy and compiling the recognizers
costs about a second, and every operation (detect, redact, pseudonymize) shares it.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from keel.privacy.context import IndexedContextEnhancer
from keel.privacy.pseudonymize import Vault, pseudonymize_spans, restore
from keel.privacy.redact import RedactionMode, redact_spans
from keel.privacy.spans import Span, resolve_overlaps
from keel.settings import PrivacySettings, get_settings

log = logging.getLogger(__name__)

Profile = Literal["keel", "presidio"]

# Entities Keel reports by default. Left out on purpose: DATE_TIME, NRP, ORGANIZATION, URL, AGE
# (context, not identifiers: redacting every date or company makes documents useless; dates of
# birth are caught by DATE_OF_BIRTH), MAC_ADDRESS and UUID (machine ids).
DEFAULT_ENTITIES = (
    "PERSON",
    "LOCATION",
    "STREET_ADDRESS",
    "PHONE_NUMBER",
    "EMAIL_ADDRESS",
    "CREDIT_CARD",
    "US_SSN",
    "US_ITIN",
    "US_PASSPORT",
    "US_DRIVER_LICENSE",
    "US_BANK_NUMBER",
    "IBAN_CODE",
    "IP_ADDRESS",
    "CRYPTO",
    "MEDICAL_LICENSE",
    "UK_NHS",
    "MEDICAL_RECORD_NUMBER",
    "HEALTH_PLAN_ID",
    "DATE_OF_BIRTH",
    "SECRET",
)

# Presidio recognizers that Keel replaces with stricter or broader versions of its own.
_REPLACED = {"NhsRecognizer", "SpacyRecognizer", "PhoneRecognizer", "UsLicenseRecognizer"}


def _offline_tldextract() -> None:
    """Presidio's e-mail recognizer calls tldextract, which fetches the public suffix list over
    the network on first use. Use the snapshot bundled with tldextract instead: no network,
    no error in the log."""
    import tldextract
    import tldextract.tldextract as impl

    impl.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


class PrivacyEngine:
    """Detects PII and turns it into redaction tokens or reversible placeholders.

    `profile="presidio"` gives Presidio's own default recognizers and threshold, unchanged:
    the baseline that benchmarks/pii_accuracy.py measures Keel against.
    """

    def __init__(self, settings: PrivacySettings | None = None, profile: Profile = "keel") -> None:
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NlpEngineProvider, SpacyNlpEngine

        from keel.privacy.recognizers import keel_recognizers

        self.settings = settings or get_settings().privacy
        self.profile = profile
        _offline_tldextract()
        lang = self.settings.language
        nlp_engine = NlpEngineProvider(
            nlp_configuration={
                "nlp_engine_name": "spacy",
                "models": [{"lang_code": lang, "model_name": self.settings.spacy_model}],
            }
        ).create_engine()
        if profile == "keel" and isinstance(nlp_engine, SpacyNlpEngine):
            # Nothing in Presidio or Keel reads the dependency parse (NER listens to tok2vec, the
            # context enhancer reads lemmas), and the parser costs about a quarter of spaCy's time.
            pipeline = nlp_engine.get_nlp(lang)
            pipeline.disable_pipes(*(p for p in ("parser",) if p in pipeline.pipe_names))
        registry = RecognizerRegistry(supported_languages=[lang])
        registry.load_predefined_recognizers(languages=[lang], nlp_engine=nlp_engine)
        if profile == "keel":
            # `name` is set in Presidio's __init__, whose body the type checker does not read.
            registry.recognizers = [r for r in registry.recognizers if r.name not in _REPLACED]  # type: ignore[has-type]
            for recognizer in keel_recognizers(lang):
                registry.add_recognizer(recognizer)
            self.entities: list[str] | None = list(self.settings.entities or DEFAULT_ENTITIES)
            self.threshold = self.settings.score_threshold
        else:
            self.entities = None  # everything Presidio knows
            self.threshold = 0.0  # Presidio's default
        self.analyzer = AnalyzerEngine(
            registry=registry,
            nlp_engine=nlp_engine,
            supported_languages=[lang],
            default_score_threshold=self.threshold,
            # Same decisions as Presidio's default enhancer, without its quadratic token scan.
            context_aware_enhancer=IndexedContextEnhancer() if profile == "keel" else None,
        )
        self.nlp_engine = nlp_engine
        # Keel's own marks: the batch's redaction tokens ([PERSON], [PERSON:1a2b3c4d]) and the request
        # path's placeholders (<PERSON_1>), of the types this engine knows (so "[JOHN]" is still read).
        # Read again (retrieved passages are scrubbed text), spaCy tagged "DATE" in "[DATE_OF_BIRTH:...]"
        # a PERSON and "PERSON:1c16bcb6" a LOCATION, and the guard made placeholders of the tokens.
        types = "|".join(sorted({*DEFAULT_ENTITIES, *(self.entities or []), *self.analyzer.get_supported_entities()},
                                key=len, reverse=True))
        self.own_marks = re.compile(rf"\[(?:{types})(?::[0-9a-f]{{8}})?\]|<(?:{types})_\d+>")

    # -- detection ---------------------------------------------------------------------------

    def detect(self, text: str) -> list[Span]:
        return self.detect_batch([text])[0]

    def detect_batch(self, texts: Sequence[str], batch_size: int | None = None,
                     progress: Callable[[int], None] | None = None) -> list[list[Span]]:
        """Detect PII in many texts at once: spaCy runs them through nlp.pipe in batches.

        Texts longer than `chunk_chars` are cut into overlapping windows (so an entity on a
        window edge is still seen whole in one of them) and the findings mapped back. `progress`
        is told each window's characters that no earlier window covered, as it is analysed.
        """
        covered = [0] * len(texts)
        pieces: list[tuple[int, int, str]] = []  # (text index, offset, window)
        for i, text in enumerate(texts):
            for offset, window in self._windows(text):
                pieces.append((i, offset, window))
        found: list[list[Span]] = [[] for _ in texts]
        artifacts = self.nlp_engine.process_batch(
            [w for _, _, w in pieces], language=self.settings.language,
            batch_size=batch_size or self.settings.batch_size
        )
        for (i, offset, _), (window, nlp_artifacts) in zip(pieces, artifacts, strict=True):
            results = self.analyzer.analyze(
                text=window,
                language=self.settings.language,
                entities=self.entities,
                nlp_artifacts=nlp_artifacts,
                score_threshold=self.threshold,
            )
            found[i].extend(Span(r.start + offset, r.end + offset, r.entity_type, r.score) for r in results)
            if progress is not None:
                end = offset + len(window)
                progress(max(0, end - covered[i]))
                covered[i] = max(covered[i], end)
        if self.profile != "keel":
            return [resolve_overlaps(spans) for spans in found]
        return [self._without_own_marks(text, spans) for text, spans in zip(texts, found, strict=True)]

    def _without_own_marks(self, text: str, spans: list[Span]) -> list[Span]:
        """`spans` less those wholly inside one of Keel's own marks: a token or placeholder is not PII."""
        marks = [m.span() for m in self.own_marks.finditer(text)]
        if not marks:
            return resolve_overlaps(spans)
        return resolve_overlaps([s for s in spans if not any(a <= s.start and s.end <= b for a, b in marks)])

    def _windows(self, text: str) -> Iterable[tuple[int, str]]:
        size, overlap = self.settings.chunk_chars, self.settings.chunk_overlap
        if len(text) <= size:
            yield 0, text
            return
        start = 0
        while start < len(text):
            end = min(start + size, len(text))
            if end < len(text):  # cut on whitespace so no word is split at the edge
                cut = text.rfind(" ", start + size // 2, end)
                end = cut if cut > 0 else end
            yield start, text[start:end]
            if end >= len(text):
                return
            start = max(end - overlap, start + 1)

    # -- transformations ---------------------------------------------------------------------

    def redact(self, text: str, mode: RedactionMode = "typed") -> str:
        return self.redact_batch([text], mode)[0]

    def redact_batch(self, texts: Sequence[str], mode: RedactionMode = "typed",
                     progress: Callable[[int], None] | None = None) -> list[str]:
        key = self.settings.hash_key.get_secret_value().encode() if self.settings.hash_key else b""
        found = self.detect_batch(texts, progress=progress)
        return [redact_spans(t, s, mode, key) for t, s in zip(texts, found, strict=True)]

    def pseudonymize(self, text: str, vault: Vault | None = None) -> tuple[str, Vault]:
        return pseudonymize_spans(text, self.detect(text), vault)

    def pseudonymize_many(self, texts: Sequence[str]) -> tuple[list[str], Vault]:
        """Pseudonymize several texts (the messages of one conversation) with one shared vault."""
        vault = Vault()
        out = [
            pseudonymize_spans(t, spans, vault, avoid=tuple(texts))[0]
            for t, spans in zip(texts, self.detect_batch(texts), strict=True)
        ]
        return out, vault

    restore = staticmethod(restore)


@functools.lru_cache(maxsize=4)
def get_engine(profile: Profile = "keel") -> PrivacyEngine:
    """The process-wide engine for the configured privacy settings."""
    return PrivacyEngine(get_settings().privacy, profile)
