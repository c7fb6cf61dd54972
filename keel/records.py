"""Reading `{"id": ..., "text": ...}` JSONL robustly: every input line yields exactly one record.

A line that cannot be used (blank, malformed JSON, invalid UTF-8, binary junk, missing or empty text,
a text above the size limit) becomes a record with an `error` and, where it can be recovered,
its id, so the writer emits one output line per input and nothing is silently dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

# Enough to recover an id from the head of a line that is too large or broken to parse whole.
BOM = b"\xef\xbb\xbf"
_ID_HEAD = re.compile(rb'"id"\s*:\s*("(?:[^"\\]|\\.){0,512}"|-?\d{1,32})')


@dataclass
class Record:
    line: int
    id: str | int | None
    text: str | None = None
    error: str | None = None


def read_records(stream: BinaryIO, max_text_bytes: int) -> Iterator[Record]:
    # A JSON line carries some overhead around its text; allow for escapes doubling the size.
    max_line = 2 * max_text_bytes + 4096
    line_no = 0
    while True:
        raw = stream.readline(max_line + 1)
        if not raw:
            return
        line_no += 1
        if len(raw) > max_line and not raw.endswith(b"\n"):
            head = raw[:4096]
            while raw and not raw.endswith(b"\n"):  # discard the rest of the oversized line
                raw = stream.readline(1 << 20)
            yield Record(line_no, _recover_id(head),
                         error=f"line exceeds the size limit ({max_text_bytes} bytes of text)")
            continue
        if line_no == 1 and raw.startswith(BOM):  # as editors on Windows write UTF-8
            raw = raw[len(BOM):]
        if not raw.strip():  # one output line per input line: a blank one too (a final newline ends a line)
            yield Record(line_no, None, error="blank line")
            continue
        yield parse_line(raw, line_no, max_text_bytes)


def parse_line(raw: bytes, line_no: int, max_text_bytes: int) -> Record:
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(line_no, _recover_id(raw), error=f"invalid UTF-8 at byte {e.start}")
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as e:
        return Record(line_no, _recover_id(raw), error=f"malformed JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return Record(line_no, None, error=f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if rid is None or isinstance(rid, bool) or not isinstance(rid, str | int):
        return Record(line_no, None, error="missing or invalid 'id' (a string or integer is required)")
    text = obj.get("text")
    if not isinstance(text, str):
        return Record(line_no, rid, error="missing 'text' or not a string")
    if not text:
        return Record(line_no, rid, error="empty text")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return Record(line_no, rid, error="text is not valid Unicode (lone surrogate escape)")
    if size > max_text_bytes:
        return Record(line_no, rid, error=f"text is {size} bytes, above the limit of {max_text_bytes}")
    if "\x00" in text:
        return Record(line_no, rid, error="text contains NUL bytes (binary data, not text)")
    return Record(line_no, rid, text=text)


def _recover_id(raw: bytes) -> str | int | None:
    m = _ID_HEAD.search(raw[:4096])
    if not m:
        return None
    try:
        value = json.loads(m.group(1).decode("utf-8", errors="strict"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, str | int) else None


def output_line(record: Record, **fields: object) -> str:
    """One JSONL output line for a record: its id plus either the result fields or its error."""
    out: dict[str, object] = {"id": record.id}
    if record.error is not None:
        out["error"] = record.error
        if record.id is None:
            out["line"] = record.line
    else:
        out.update(fields)
    return json.dumps(out, ensure_ascii=False)
