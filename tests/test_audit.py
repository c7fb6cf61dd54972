"""The audit trail catches every kind of tampering the compliance issue lists, and several writers
at once keep valid chains."""

from __future__ import annotations

import json
import threading
import time
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
    assert first_problem(tmp_path) == ("gw-1: record 12 (records-00000001.jsonl line 3): its content does not match "
                                       "its hash (edited)")


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
    assert b"audit trail intact: 25 records" in ok.stdout
    shown = run_keel("audit", "show", "req-7", "--json", "--config", str(cfg))
    assert shown.returncode == 0 and json.loads(shown.stdout)["tokens"] == 7
    told = run_keel("audit", "show", "req-7", "--config", str(cfg))
    assert told.returncode == 0 and told.stdout.decode().startswith("interaction req-7 at ")
    seg = root / "gw-1" / "records-00000000.jsonl"
    seg.write_text(seg.read_text().replace('"tenant":"demo"', '"tenant":"mallory"', 1))
    bad = run_keel("audit", "verify", "--config", str(cfg))
    assert bad.returncode == 1 and b"eu/gw-1: record 0 (records-00000000.jsonl line 1)" in bad.stderr
    assert run_keel("audit", "show", "req-nope", "--config", str(cfg)).returncode == 1


def zone_trails(tmp_path: Path, seal_after_s: float = 60.0, **kw) -> tuple[audit.Trails, Path]:
    """Trails over the example config's zones in tmp_path, and the "us" zone's writer folder."""
    from keel.settings import load_settings
    from tests.support.services import write_config

    s = load_settings(write_config(tmp_path))
    s = s.model_copy(update={"audit": s.audit.model_copy(update={"seal_after_s": seal_after_s})})
    t = audit.Trails(s, "gw-1", **kw)
    return t, t.roots()["us"]


def test_submits_from_several_threads_land_in_order_stamped_at_submit_time(tmp_path):
    t, root = zone_trails(tmp_path)
    stamps: dict[str, tuple[str, str]] = {}

    def work(i: int) -> None:
        for j in range(200):
            before = audit._now()
            t.submit("us", "interaction", request_id=f"t{i}-{j}", thread=i, n=j)
            stamps[f"t{i}-{j}"] = (before, audit._now())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    with t._lock:  # no writer can open until every submit is done: writing happens strictly later
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        written_after = audit._now()
    assert t.flush(timeout=5)
    report = audit.verify(root, KEY)
    assert report.ok, report.problems
    recs = sorted(audit.records(root), key=lambda r: r["seq"])
    assert len(recs) == 800
    for i in range(4):
        assert [r["n"] for r in recs if r["thread"] == i] == list(range(200))  # each thread's order kept
    assert all(stamps[r["request_id"]][0] <= r["ts"] <= stamps[r["request_id"]][1] < written_after for r in recs)
    assert [r["ts"] for r in recs] == sorted(r["ts"] for r in recs)  # time follows the chain
    t.submit("us", "interaction", request_id="late")
    assert [r["request_id"] for r in t.find("late")] == ["late"]  # find flushes first
    t.close()


def test_a_failed_background_append_is_reported_and_later_submits_still_land(tmp_path, caplog):
    errors: list[tuple[BaseException, str | None]] = []
    t, root = zone_trails(tmp_path, on_error=lambda e, rid: errors.append((e, rid)))
    t.submit("us", "interaction", request_id="ok-1")
    t.submit("us", "interaction", request_id="bad", blob=object())  # not JSON-serializable
    t.submit("nowhere", "interaction", request_id="no-zone")  # no such zone
    t.submit("us", "interaction", request_id="ok-2")
    assert t.flush(timeout=5)
    assert [(type(e), rid) for e, rid in errors] == [(TypeError, "bad"), (KeyError, "no-zone")]
    assert sum("could not be written" in r.getMessage() for r in caplog.records if r.name == "keel.audit") == 2
    assert [r["request_id"] for r in sorted(audit.records(root), key=lambda r: r["seq"])] == ["ok-1", "ok-2"]
    t.close()
    assert audit.verify(root, KEY).ok


def test_an_idle_writer_gets_its_open_segment_sealed_without_another_record(tmp_path):
    t, root = zone_trails(tmp_path, seal_after_s=0.2)
    t.submit("us", "interaction", request_id="r-0")
    t.submit("us", "interaction", request_id="r-1")
    assert t.flush(timeout=5)
    digest = root / "gw-1" / "digest-00000000.json"
    deadline = time.monotonic() + 1.5
    while not digest.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    report = audit.verify(root, KEY)
    assert digest.exists() and report.ok and report.records == {"gw-1": 2} == report.sealed
    t.close()


def test_close_writes_and_seals_everything_submitted_and_is_safe_twice(tmp_path):
    t, root = zone_trails(tmp_path)
    for i in range(300):
        t.submit("eu" if i % 3 else "us", "interaction", request_id=f"r-{i}")
    t.close()
    t.close()
    for zone, n in (("us", 100), ("eu", 200)):
        report = audit.verify(t.roots()[zone], KEY)
        assert report.ok and report.records == {"gw-1": n} == report.sealed
    with pytest.raises(audit.AuditBacklogError):
        t.submit("us", "interaction", request_id="too-late")
    never_started, _ = zone_trails(tmp_path / "other")
    assert never_started.flush(timeout=0)
    never_started.close()
    never_started.close()


def test_show_explains_one_decision_in_words():
    record = {
        "seq": 4, "ts": "2026-12-04T07:00:00.000000+00:00", "writer": "gateway-a", "kind": "interaction",
        "request_id": "req-1", "tenant": "demo", "endpoint": "chat", "model": "keel/auto", "status": 200,
        "latency_ms": 812.5, "ttft_ms": 120.0, "data_class": "pii", "zone": "us",
        "route": {"strategy": "blend", "reason": "blend of latency, cost and complexity", "ranked": ["small", "big"],
                  "excluded": {"eu-model": "residency: zone eu not allowed",
                               "tiny": "context: 9000+512 tokens > 8192"}},
        "failovers": [{"target": "small", "error": "timeout", "message": "no first token in 30 s", "after_chars": 0}],
        "target": "big", "usage": {"prompt_tokens": 35, "completion_tokens": 12, "total_tokens": 47},
        "guard": {"pseudonymized": True, "pii_entities": {"PERSON": 2, "EMAIL_ADDRESS": 1},
                  "output_redacted": {"US_SSN": 1}, "toxicity": 0.91, "toxicity_action": "flagged",
                  "output_error": False},
        "prompt_hmac": "ab" * 32, "prev": "0" * 64, "hash": "cd" * 32,
    }
    assert audit.explain(record).splitlines() == [
        "interaction req-1 at 2026-12-04T07:00:00.000000+00:00 (writer gateway-a, record 4)",
        "  tenant demo asked chat for model keel/auto: status 200 after 812.5 ms (first token at 120.0 ms)",
        "  data class pii, recorded in zone us",
        "  route: strategy blend, blend of latency, cost and complexity",
        "    ranked: small, big",
        "    excluded eu-model: residency: zone eu not allowed",
        "    excluded tiny: context: 9000+512 tokens > 8192",
        "  failover: small failed (error timeout, message no first token in 30 s) after 0 characters of the answer",
        "  answered by big: 35 prompt + 12 completion tokens",
        "  guard: pseudonymized before the model: PERSON 2, EMAIL_ADDRESS 1; redacted from the answer: US_SSN 1; "
        "toxicity 0.91 (flagged)",
    ]
    refused = {"seq": 0, "ts": "t", "writer": "w", "kind": "interaction", "request_id": "req-2", "tenant": "demo",
               "endpoint": "chat", "model": "keel/auto", "status": 403, "latency_ms": 1.0}
    assert "no route: the request ended before routing" in audit.explain(refused)
