"""The audit trail catches every kind of tampering the compliance issue lists, and several writers
at once keep valid chains."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from keel import audit

KEY = b"keel-dev-only-audit-key"  # the settings default, so the CLI test verifies with it


def trail(root: Path, n: int = 25, seal_every: int = 10) -> Path:
    w = audit.AuditWriter(root, "gw-1", KEY, seal_every=seal_every)
    for i in range(n):
        w.append("interaction", request_id=f"req-{i}", tenant="demo", tokens=i)
    w.close()  # seals the tail: segments of 10, 10 and 5
    return root / "gw-1"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def first_problem(root: Path) -> str:
    report = audit.verify(root, KEY)
    assert not report.ok
    return str(report.problems[0])


def test_an_untouched_trail_verifies_and_resumes_after_reopen(tmp_path):
    d = trail(tmp_path)
    report = audit.verify(tmp_path, KEY)
    assert report.ok and report.records == {"gw-1": 25} and report.sealed == {"gw-1": 25}
    w = audit.AuditWriter(tmp_path, "gw-1", KEY, seal_every=10)  # reopened: the chain goes on
    w.append("interaction", request_id="req-25")
    report = audit.verify(tmp_path, KEY)
    assert report.ok and report.records == {"gw-1": 26} and report.sealed == {"gw-1": 25}  # one open record
    w.close()
    assert audit.verify(tmp_path, KEY).sealed == {"gw-1": 26}
    assert [r["request_id"] for r in audit.find(tmp_path, "req-3")] == ["req-3"]
    assert sorted(p.name for p in d.iterdir())[:2] == ["digest-00000000.json", "digest-00000001.json"]


def test_one_record_edited(tmp_path):
    seg = trail(tmp_path) / "records-00000001.jsonl"
    ls = lines(seg)
    ls[2] = ls[2].replace('"tokens":12', '"tokens":99')
    seg.write_text("\n".join(ls) + "\n")
    assert first_problem(tmp_path) == "gw-1: record 12 (records-00000001.jsonl line 3): its content does not match its hash (edited)"


@pytest.mark.parametrize("change, seq", [
    (lambda ls: ls[:4] + ls[5:], 14),  # deleted
    (lambda ls: ls[:4] + [ls[5], ls[4]] + ls[6:], 14),  # reordered
    (lambda ls: ls[:4] + [ls[4]] + ls[4:], 15),  # a copy inserted
])
def test_a_record_deleted_reordered_or_inserted(tmp_path, change, seq):
    seg = trail(tmp_path) / "records-00000001.jsonl"
    seg.write_text("\n".join(change(lines(seg))) + "\n")
    assert first_problem(tmp_path).startswith(f"gw-1: record {seq} ")


def test_an_edit_with_every_later_hash_recomputed_is_caught_by_the_signed_digest(tmp_path):
    d = trail(tmp_path)
    prev = json.loads(lines(d / "records-00000000.jsonl")[-1])["hash"]
    for n in (1, 2):  # rewrite the chain from the edit on, consistently, as someone with write access could
        seg = d / f"records-{n:08d}.jsonl"
        out = []
        for line in lines(seg):
            rec = json.loads(line)
            del rec["hash"]
            if rec["seq"] == 12:
                rec["tenant"] = "someone-else"
            rec["prev"] = prev
            text, prev = audit.encode(rec)
            out.append(text)
        seg.write_text("".join(out))
    assert first_problem(tmp_path).startswith("gw-1: digest-00000001.json: seals records 10..19 ending in another hash")


def test_the_tail_truncated_is_caught_by_the_latest_digest(tmp_path):
    seg = trail(tmp_path) / "records-00000002.jsonl"
    seg.write_text("\n".join(lines(seg)[:3]) + "\n")  # 5 sealed records, 3 left
    assert "records were rewritten or truncated after sealing" in first_problem(tmp_path)


def test_a_digest_altered_or_deleted(tmp_path):
    d = trail(tmp_path)
    dig = d / "digest-00000001.json"
    doc = json.loads(dig.read_text())
    doc["last_seq"] = 18
    dig.write_text(json.dumps(doc))
    assert first_problem(tmp_path) == ("gw-1: digest-00000001.json: signature invalid (digest forged or altered, "
                                       "or the wrong key)")
    dig.unlink()
    assert "digest missing" in first_problem(tmp_path)


def test_a_wrong_key_fails_every_digest(tmp_path):
    trail(tmp_path)
    assert "signature invalid" in str(audit.verify(tmp_path, b"not-the-key").problems[0])


def test_several_writers_at_once_keep_valid_chains(tmp_path):
    writers = [audit.AuditWriter(tmp_path, f"replica-{i}", KEY, seal_every=7) for i in range(3)]

    def work(w: audit.AuditWriter) -> None:
        for j in range(50):
            w.append("interaction", request_id=f"{w.writer}-{j}")

    threads = [threading.Thread(target=work, args=(w,)) for w in writers for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in writers:
        w.close()
    report = audit.verify(tmp_path, KEY)
    assert report.ok, report.problems
    assert report.records == {f"replica-{i}": 100 for i in range(3)} == report.sealed


def test_a_line_torn_by_a_crash_is_dropped_on_reopen(tmp_path):
    w = audit.AuditWriter(tmp_path, "job", KEY)
    w.append("batch", job="scrub_us")
    w._file.write('{"seq": 1, "torn')  # the process died mid-write
    w._file.flush()
    w = audit.AuditWriter(tmp_path, "job", KEY)
    assert w.append("batch", job="index_us")["seq"] == 1
    w.close()
    assert audit.verify(tmp_path, KEY).ok


def test_keel_audit_verify_and_show_on_the_zones_storage(tmp_path):
    from keel.settings import load_settings
    from keel.storage import ZoneStorage
    from tests.conftest import run_keel
    from tests.support.services import write_config

    cfg = write_config(tmp_path)
    s = load_settings(cfg)
    root = ZoneStorage.for_zone(s, "eu").audit_root()
    trail(root)
    ok = run_keel("audit", "verify", "--config", str(cfg))
    assert ok.returncode == 0 and b"eu/gw-1: 25 records, 25 sealed" in ok.stdout
    shown = run_keel("audit", "show", "req-7", "--config", str(cfg))
    assert shown.returncode == 0 and json.loads(shown.stdout)["tokens"] == 7
    seg = root / "gw-1" / "records-00000000.jsonl"
    seg.write_text(seg.read_text().replace('"tenant":"demo"', '"tenant":"mallory"', 1))
    bad = run_keel("audit", "verify", "--config", str(cfg))
    assert bad.returncode == 1 and b"eu/gw-1: record 0 (records-00000000.jsonl line 1)" in bad.stderr
    assert run_keel("audit", "show", "req-nope", "--config", str(cfg)).returncode == 1
