"""Keel's privacy engine: detect PII, redact it for storage, pseudonymize it for models.

    from keel.privacy import detect, redact, pseudonymize, restore
    masked, vault = pseudonymize("Call John Smith")   # "Call <PERSON_1>"
    restore(masked, vault)                             # "Call John Smith"

`redact` is irreversible (`[PERSON]` or keyed-hash `[PERSON:1a2b3c4d]`), for the batch pipeline;
`pseudonymize`/`restore` are for the request path. Entity names are Presidio's, plus those listed
in keel.privacy.recognizers.

Detection is Presidio's analyzer; the substitution is Keel's own small pure functions
(redact.py, pseudonymize.py) rather than presidio-anonymizer operators, because the reversible
path needs what those operators cannot express (one vault per conversation, placeholders that
never collide with literal text, restore that touches only its own placeholders), and one
splice over resolved spans then serves both token formats.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from keel.privacy.pseudonymize import StreamRestorer, Vault, restore
from keel.privacy.redact import RedactionMode
from keel.privacy.spans import Span

if TYPE_CHECKING:
    from keel.privacy.engine import DEFAULT_ENTITIES, PrivacyEngine, get_engine

_ENGINE_NAMES = ("DEFAULT_ENTITIES", "PrivacyEngine", "get_engine")


def __getattr__(name: str) -> Any:
    # The engine (Presidio, spaCy) is imported on first use, not with the package: the pure parts
    # (redact_spans, restore, Span) stay light for processes that never detect, such as a Ray job's
    # driver, which only hands batches to actors (measured: 456 MB with the engine imported, 4 s).
    if name in _ENGINE_NAMES:
        from keel.privacy import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def without_torch() -> Iterator[None]:
    """Load the engine without torch: spaCy (thinc) and Presidio import torch and transformers whenever
    installed, only to probe for GPUs, and Keel's NER is spaCy's CPU pipeline. An engine loads in 1.7 s
    and 175 MB instead of 5.2 s and 492 MB, with the same spans.

    Inside the block torch is unfindable (as if not installed); after it, a later `import torch` works
    again (the one-off ONNX export needs it), and the probes that ran inside stay answered "no torch".
    The modules are hidden by an import hook, not set to None in sys.modules: scipy and scikit-learn
    take any entry there for the real module."""
    finder = _NoTorch()
    os.environ.setdefault("PRESIDIO_DEVICE", "cpu")  # Presidio's device probe imports torch otherwise
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.partition(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r} (not loaded for the PII engine)", name=name)


def detect(text: str) -> list[Span]:
    return _engine().detect(text)


def detect_batch(texts: Sequence[str]) -> list[list[Span]]:
    return _engine().detect_batch(texts)


def redact(text: str, mode: RedactionMode = "typed") -> str:
    return _engine().redact(text, mode)


def redact_batch(texts: Sequence[str], mode: RedactionMode = "typed") -> list[str]:
    return _engine().redact_batch(texts, mode)


def pseudonymize(text: str, vault: Vault | None = None) -> tuple[str, Vault]:
    return _engine().pseudonymize(text, vault)


def _engine() -> PrivacyEngine:
    from keel.privacy.engine import get_engine

    return get_engine()


__all__ = [
    "DEFAULT_ENTITIES",
    "PrivacyEngine",
    "Span",
    "StreamRestorer",
    "Vault",
    "detect",
    "detect_batch",
    "get_engine",
    "pseudonymize",
    "redact",
    "redact_batch",
    "restore",
    "without_torch",
]
