"""JSONL input: every line gives exactly one record; bad lines give a reason, never a crash."""

import io
import json

from keel.records import Record, output_line, read_records

LIMIT = 1000


def read(data: bytes, limit: int = LIMIT) -> list[Record]:
    return list(read_records(io.BytesIO(data), limit))


def test_good_and_bad_lines_each_give_one_record():
    lines = [
        b'{"id": "a", "text": "hello"}',
        b'{"id": 7, "text": "seven"}',
        b'{"id": "e", "text": ""}',
        b'{"id": "m"}',
        b'{"text": "no id"}',
        b'{"id": true, "text": "bool id"}',
        b'{"id": "n", "text": 5}',
        b'not json at all',
        b'{"id": "cut", "text": "unterminated',
        b'{"id": "u8", "text": "caf\xc3"}',
        b'\x00\x01\xfe\xff junk',
        b'["id", "text"]',
        b'{"id": "sur", "text": "\\udc80"}',
        b'{"id": "nul", "text": "a\\u0000b"}',
    ]
    recs = read(b"\n".join(lines) + b"\n\n")  # a blank line last: an input line too
    assert len(recs) == len(lines) + 1
    assert [r.line for r in recs] == list(range(1, len(lines) + 2))
    assert (recs[-1].id, recs[-1].error) == (None, "blank line")
    got = {r.line: (r.id, r.error) for r in recs}
    assert got[1] == ("a", None) and recs[0].text == "hello"
    assert got[2] == (7, None)
    assert got[3] == ("e", "empty text")
    assert got[4][0] == "m" and "text" in got[4][1]
    assert got[5][0] is None and "id" in got[5][1]
    assert got[6][0] is None
    assert got[7] == ("n", "missing 'text' or not a string")
    assert got[8][0] is None and got[8][1].startswith("malformed JSON")
    assert got[9] == ("cut", got[9][1]) and got[9][1].startswith("malformed JSON")  # id recovered from the head
    assert got[10][0] == "u8" and got[10][1].startswith("invalid UTF-8")
    assert got[11][0] is None and "UTF-8" in got[11][1]
    assert "JSON object" in got[12][1]
    assert "lone surrogate" in got[13][1]
    assert "NUL" in got[14][1]


def test_oversized_text_and_oversized_line():
    big = "x" * (LIMIT + 1)
    recs = read(json.dumps({"id": "big", "text": big}).encode() + b"\n" + b'{"id": "after", "text": "ok"}\n')
    assert recs[0].id == "big" and "above the limit" in recs[0].error
    assert recs[1].id == "after" and recs[1].error is None
    huge = b'{"id": "huge", "text": "' + b"y" * (3 * LIMIT + 10_000) + b'"}\n{"id": "next", "text": "fine"}\n'
    recs = read(huge)
    assert [(r.id, r.error is None) for r in recs] == [("huge", False), ("next", True)]
    assert "size limit" in recs[0].error


def test_last_line_without_newline_is_read():
    assert [r.id for r in read(b'{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}')] == [1, 2]


def test_output_line_shapes():
    ok = Record(1, "a", text="t")
    bad = Record(3, None, error="malformed JSON")
    assert json.loads(output_line(ok, entities=[])) == {"id": "a", "entities": []}
    assert json.loads(output_line(bad, entities=[])) == {"id": None, "error": "malformed JSON", "line": 3}


def test_a_byte_order_mark_is_not_part_of_the_first_record_and_blank_lines_are_answered():
    recs = read(b'\xef\xbb\xbf{"id": "a", "text": "hello"}\n\n   \n{"id": "b", "text": "there"}')
    assert [(r.line, r.id, r.text, r.error) for r in recs] == [
        (1, "a", "hello", None), (2, None, None, "blank line"), (3, None, None, "blank line"), (4, "b", "there", None)]
    assert json.loads(output_line(recs[1])) == {"id": None, "error": "blank line", "line": 2}
