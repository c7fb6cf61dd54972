"""Landing files -> raw document records, and raw records -> text. Pure functions, no I/O; and the
metadata columns every stage keeps of a document.

A landing file is one document (.txt, .md, .html) or one document per line (.jsonl, each line
`{"id": ..., "text": ...}`). Ingest keeps the raw bytes of each record untouched, so a record
that cannot be decoded is quarantined by the scrub stage with its reason, not lost at ingest.

A document's id is a hash of its source URI and its bytes: the same content at the same source
is one document however often it is ingested; changed content is a new document that replaces
the old one from the same source.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from html.parser import HTMLParser

import pyarrow as pa

from keel.errors import DataQualityError
from keel.records import parse_line

# What every stage's table keeps of a document besides its content (raw, scrubbed, quarantined):
# its id, where it came from, its zone and data class, and when it was first ingested.
METADATA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("source_name", pa.string()),
        ("zone", pa.string()),
        ("data_class", pa.string()),
        ("ingest_time", pa.string()),
    ]
)
FORMATS = {".jsonl": "jsonl", ".txt": "text", ".md": "markdown", ".html": "html", ".htm": "html"}
_JSON_ID = re.compile(rb'"id"\s*:\s*("(?:[^"\\]|\\.){0,256}"|-?\d{1,32})')


@dataclass(frozen=True)
class RawRecord:
    source: str  # file URI, plus "#<id>" for a JSONL record
    format: str
    payload: bytes

    @property
    def doc_id(self) -> str:
        return document_id(self.source, self.payload)


def document_id(source: str, payload: bytes) -> str:
    return hashlib.sha256(source.encode("utf-8") + b"\0" + payload).hexdigest()[:32]


def format_of(name: str) -> str | None:
    for ext, fmt in FORMATS.items():
        if name.lower().endswith(ext):
            return fmt
    return None


def split_file(uri: str, data: bytes) -> list[RawRecord]:
    """The raw records of one landing file."""
    fmt = format_of(uri)
    if fmt is None:
        raise DataQualityError(f"unsupported file type: {uri}")
    if fmt != "jsonl":
        return [RawRecord(uri, fmt, data)]
    records, seen = [], set()
    for n, line in enumerate(data.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        key = _line_key(line) or f"L{n}"
        if key in seen:  # two lines with one id: both are kept, the second keyed by its line
            key = f"{key}@L{n}"
        seen.add(key)
        records.append(RawRecord(f"{uri}#{key}", fmt, line))
    return records


def _line_key(line: bytes) -> str | None:
    m = _JSON_ID.search(line[:4096])
    if not m:
        return None
    try:
        value = json.loads(m.group(1))
    except ValueError:
        return None
    return str(value) if value != "" else None


@dataclass(frozen=True)
class Decoded:
    text: str | None
    error: str | None = None
    title: str | None = None


def decode(record_format: str, payload: bytes, max_bytes: int) -> Decoded:
    """The text of a raw record, or the reason it cannot be used (for quarantine)."""
    limit = 2 * max_bytes + 4096 if record_format == "jsonl" else max_bytes  # a JSON line may escape its text
    if len(payload) > limit:
        return Decoded(None, f"document is {len(payload)} bytes, above the limit of {max_bytes}")
    if record_format == "jsonl":
        rec = parse_line(payload, 0, max_bytes)
        if rec.error:
            return Decoded(None, _schema_reason(rec.error))
        title = _json_title(payload)
        return Decoded(rec.text, title=title)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        return Decoded(None, f"invalid UTF-8 at byte {e.start}")
    if "\x00" in text:
        return Decoded(None, "contains NUL bytes (binary data, not text)")
    title = None
    if record_format == "html":
        text, title = html_to_text(text)
    text = text.strip()
    if not text:
        return Decoded(None, "empty text")
    return Decoded(text, title=title)


def _schema_reason(error: str) -> str:
    if error.startswith(("invalid UTF-8", "text is", "empty text", "text contains")):
        return error
    return f"wrong schema: {error}"


def _json_title(payload: bytes) -> str | None:
    try:
        title = json.loads(payload).get("title")
    except ValueError:
        return None
    return title if isinstance(title, str) else None


class _HtmlText(HTMLParser):
    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre", "table"}
    _SKIP = {"script", "style", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: str | None = None
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in self._SKIP:
            self._skip += 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in self._SKIP:
            self._skip = max(0, self._skip - 1)
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title = (self.title or "") + data.strip()
        elif not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> tuple[str, str | None]:
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    text = re.sub(r"[ \t]+", " ", "".join(parser.parts))
    return re.sub(r"\n\s*\n+", "\n\n", text).strip(), parser.title
