"""The audit trail catches every kind of tampering the compliance issue lists, and several writers
at once keep valid chains."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from keel import audit

KEY = b"a-test-audit-key"


def trail(root: Path, n: int = 25, seal_every: int = 10, key: bytes = KEY) -> Path:
    w = audit.AuditWriter(root, "gw-1", key, seal_every=seal_every)
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
    assert sorted(p.name for p in d.glob("digest-*"))[:2] == ["digest-00000000.json", "digest-00000001.json"]


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
    assert first_problem(tmp_path) == ("gw-1: digest-00000001.json: signature invalid (forged or altered, "
                                       "or the wrong key)")
    dig.unlink()
    assert "digest missing" in first_problem(tmp_path)


def test_a_wrong_key_fails_every_digest(tmp_path):
    trail(tmp_path)
    assert "not among the known keys" in str(audit.verify(tmp_path, b"not-the-key").problems[0])


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
    os.close(w._held)  # and with it, its lock on the chain
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
    trail(root, key=s.audit_keys().active)
    ok = run_keel("audit", "verify", "--config", str(cfg))
    assert ok.returncode == 0 and b"eu/gw-1: 25 records, 25 sealed by a valid digest (closed)" in ok.stdout
    assert b"audit trail intact: 25 sealed records" in ok.stdout and not ok.stderr
    open_writer = audit.AuditWriter(root, "gw-2", s.audit_keys().active)  # 50 records not sealed yet: counted apart
    for i in range(50):
        open_writer.append("interaction", request_id=f"open-{i}")
    told = run_keel("audit", "verify", "--config", str(cfg))
    assert told.returncode == 0 and b"audit trail intact: 25 sealed records\n  50 records of open writers not sealed " \
                                    b"yet (sealed within 5 s): eu/gw-2 50" in told.stdout
    open_writer.close()
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
    s = s.model_copy(update={"audit": s.audit.model_copy(update={"seal_after_s": seal_after_s,
                                                                 "hmac_key": SecretStr(KEY.decode())})})
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


# -- deletions, the writer index, orphans and keys ---------------------------------------------------


def test_each_deletion_of_sealed_data_is_caught_even_a_whole_writer(tmp_path):
    """On copies of one zone's trail: 50 sealed tail records, a sealed segment with its digest, a whole
    writer's folder, and the index itself. Only writers the signed index names can be checked for."""
    import shutil

    src = tmp_path / "src"
    for name in ("gw-1", "gw-2"):
        w = audit.AuditWriter(src, name, KEY, seal_every=60)
        for i in range(120):
            w.append("interaction", request_id=f"{name}-{i}")
        w.close()
    assert audit.verify(src, KEY).ok

    def copy(name: str) -> Path:
        shutil.copytree(src, tmp_path / name)
        return tmp_path / name

    tail = copy("tail") / "gw-1" / "records-00000001.jsonl"  # the last 50 sealed records
    tail.write_text("\n".join(lines(tail)[:10]) + "\n")
    assert "truncated after sealing" in first_problem(tail.parent.parent)

    seg = copy("segment") / "gw-1"  # the newest sealed segment and its digest: the chain left looks whole
    for name in ("records-00000001.jsonl", "digest-00000001.json", "records-00000002.jsonl"):  # and the open one
        (seg / name).unlink()
    assert first_problem(seg.parent) == ("gw-1: digest-00000001.json: the index has this writer sealed through "
                                         "record 119 by this digest, which is missing or another: sealed records "
                                         "were deleted or replaced")

    folder = copy("folder")
    shutil.rmtree(folder / "gw-2")
    assert first_problem(folder) == ("gw-2: (folder): the writer's folder is missing (deleted?): the index has it "
                                     "sealed through record 119")

    index = copy("index")
    (index / "writers.json").unlink()
    assert first_problem(index) == "(zone): writers.json: the signed index of writers is missing (deleted?)"

    forged = copy("forged")
    doc = json.loads((forged / "writers.json").read_text())
    del doc["writers"]["gw-2"]  # hiding a writer from the index needs the key
    (forged / "writers.json").write_text(json.dumps(doc))
    assert "writers.json: signature invalid" in first_problem(forged)


def test_a_writer_is_in_the_index_before_its_first_seal_and_two_cannot_share_a_chain(tmp_path):
    w = audit.AuditWriter(tmp_path, "gw-1", KEY)
    w.append("interaction", request_id="r0")
    with pytest.raises(audit.WriterBusyError):
        audit.AuditWriter(tmp_path, "gw-1", KEY)  # a second writer would fork the chain
    w.close()
    import shutil

    shutil.rmtree(tmp_path / "gw-1")  # even its only segment, deleted before anything was sealed
    assert "gw-1: (folder): the writer's folder is missing" in first_problem(tmp_path)


def test_unsigned_records_are_told_apart_for_live_and_dead_writers_and_a_dead_ones_are_sealed(tmp_path):
    """A live writer's open segment is sealed within seal_after_s; a writer killed before it sealed leaves
    an orphan, which the next writer to open the zone seals."""
    import subprocess
    import sys

    live = audit.AuditWriter(tmp_path, "gw-live", KEY)
    live.append("interaction", request_id="a")
    code = (f"from keel import audit; w = audit.AuditWriter({str(tmp_path)!r}, 'gw-dead', {KEY!r}); "
            f"[w.append('interaction', request_id=str(i)) for i in range(3)]; import os; os._exit(9)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9  # killed: no close, no seal
    report = audit.verify(tmp_path, KEY)
    assert report.ok and report.live == {"gw-live"}
    assert report.unsigned(live=True) == {"gw-live": 1} and report.unsigned(live=False) == {"gw-dead": 3}
    assert audit.seal_orphans(tmp_path, KEY) == ["gw-dead"]  # the live writer's lock keeps it out
    report = audit.verify(tmp_path, KEY)
    assert report.ok and report.unsigned(live=False) == {} and report.sealed["gw-dead"] == 3
    live.close()
    assert audit.verify(tmp_path, KEY).unsigned(live=True) == {}


def test_digests_name_their_key_and_a_rotated_trail_verifies_with_the_retired_key_known(tmp_path):
    from keel.secret_keys import DEV_AUDIT_KEY, KeySet, key_id

    old, new = b"old-key", b"new-key"
    w = audit.AuditWriter(tmp_path, "gw-1", old, seal_every=5)
    for i in range(5):
        w.append("interaction", request_id=f"r{i}")
    w.close()
    w = audit.AuditWriter(tmp_path, "gw-1", new, seal_every=5)  # after `keel secrets rotate audit`
    for i in range(5, 10):
        w.append("interaction", request_id=f"r{i}")
    w.close()
    ids = [json.loads((tmp_path / "gw-1" / f"digest-0000000{n}.json").read_text())["key_id"] for n in (0, 1)]
    assert ids == [key_id(old), key_id(new)]
    assert audit.verify(tmp_path, KeySet.of(new, [old])).ok
    problem = str(audit.verify(tmp_path, KeySet.of(new)).problems[0])
    assert problem == (f"gw-1: digest-00000000.json: signed with key {key_id(old)}, which is not among the known "
                       f"keys (retired and forgotten, or forged)")
    dev = tmp_path / "dev"
    trail(dev, key=DEV_AUDIT_KEY)  # a trail from before per-install keys: it verifies, and is reported
    report = audit.verify(dev, KeySet.of(new))
    assert report.ok and report.dev_signed == {"gw-1": 3}


def test_trails_seal_the_orphans_of_a_zone_they_open(tmp_path):
    t, root = zone_trails(tmp_path)
    orphan = audit.AuditWriter(root, "gw-0", KEY)
    orphan.append("interaction", request_id="lost?")
    os.close(orphan._held)  # its process died: the lock is free, the segment open
    t.append("us", "interaction", request_id="next")
    t.close()
    report = audit.verify(root, KEY)
    assert report.ok and report.sealed == {"gw-0": 1, "gw-1": 1}
