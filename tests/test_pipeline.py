"""The batch chain on a real local Ray: ingest -> scrub -> validate -> chunk/embed/index, on data/sample."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from keel import audit
from keel.audit import canonical
from keel.errors import DataQualityError, ResidencyError
from keel.pipeline.snapshots import SnapshotStore
from keel.settings import load_settings
from keel.storage import ZoneStorage
from ray_jobs import index, ingest, scrub, validate
from tests.conftest import ROOT, run_keel
from tests.support.services import write_config

INGEST_TIME = "2026-11-26T00:00:00+00:00"
PLANTED = json.loads((ROOT / "data" / "sample" / "planted_pii.json").read_text())


def run_chain(cfg: Path, zones=("us", "eu")) -> dict:
    out = {}
    for zone in zones:
        out[zone] = [
            ingest.run(zone, INGEST_TIME, str(cfg)),
            scrub.run(zone, None, str(cfg)),
            validate.run(zone, None, str(cfg)),
            index.run(zone, None, str(cfg)),
        ]
    return out


def committed_files(storage_root: Path) -> dict[str, str]:
    """sha256 of every committed file (snapshots and CURRENT pointers; not staging, not runs, not the
    audit trail, which every run appends to)."""
    return {
        str(p.relative_to(storage_root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(storage_root.rglob("*"))
        if p.is_file() and not {"_staging", "lance", "audit"} & set(p.relative_to(storage_root).parts)
    }


def transformations(cfg: Path, zone: str) -> list[dict]:
    """The zone's `transformation` audit records, after checking its whole trail verifies."""
    settings = load_settings(cfg)
    root = ZoneStorage.for_zone(settings, zone).audit_root()
    report = audit.verify(root, settings.audit_keys())
    assert report.ok, [str(p) for p in report.problems]
    assert report.sealed == report.records  # each job closed its writer: nothing left open
    return sorted((r for r in audit.records(root) if r["kind"] == "transformation"), key=lambda r: r["ts"])


@pytest.fixture(scope="module")
def sample(ray_driver, shared_state, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    cfg = write_config(root, state_dir=shared_state)
    return cfg, root, run_chain(cfg)


def test_chain_counts_and_lineage(sample):
    _, _, results = sample
    raw, scrubbed, verdict, idx = results["us"]
    assert raw["documents"] == 182 and raw["changes"]["added"] == 182
    assert scrubbed["counts"] == {"in": 182, "out": 182, "quarantined": 0, "reused": 0, "scrubbed": 182}
    assert {"PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "MEDICAL_RECORD_NUMBER"} <= set(scrubbed["findings"])
    assert verdict["success"] and all(c["success"] for c in verdict["checks"])
    assert idx["counts"]["documents"] == 182 and idx["counts"]["chunks"] > 182
    # Each stage names its exact input: the lineage the Airflow assets carry in their events.
    assert scrubbed["input"]["raw"] == raw["key"] and idx["input"]["scrubbed"] == scrubbed["key"]
    assert results["eu"][0]["documents"] == 40


def test_each_job_run_leaves_one_transformation_record_in_its_zone(sample):
    cfg, _, results = sample
    settings = load_settings(cfg)
    for zone, classes in (("us", ["phi", "pii", "public"]), ("eu", ["pii"])):
        storage = ZoneStorage.for_zone(settings, zone)
        recs = {r["job"]: r for r in transformations(cfg, zone) if r["status"] == "committed"}
        assert list(recs) == ["raw", "scrubbed", "validation", "index"]  # one per job, in run order
        for r, result in zip(recs.values(), results[zone], strict=True):
            manifest = Path(storage.path(r["job"], "snapshots", result["key"], "_manifest.json"))
            assert r["data_classes"] == classes and r["job_id"]
            assert r["writer"] == f"job-{r['job']}-{r['job_id']}"
            assert r["output"] == {"stage": r["job"], "key": result["key"],
                                   "sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}
            assert r["config_version"] == settings.config_version() and r["duration_s"] >= 0
        # Lineage: each stage's input is the very manifest the stage before it committed.
        assert recs["raw"]["input"]["stage"] == "landing"
        assert recs["scrubbed"]["input"] == recs["raw"]["output"]
        assert recs["validation"]["input"] == recs["index"]["input"] == recs["scrubbed"]["output"]
        raw, scrubbed, _, idx = results[zone]
        assert recs["raw"]["counts"] == {"files": raw["files"], "documents": raw["documents"], **raw["changes"]}
        assert recs["scrubbed"]["counts"] == scrubbed["counts"] and recs["index"]["counts"] == idx["counts"]
        assert recs["validation"]["counts"]["checks_failed"] == 0
        assert not any(p["value"] in json.dumps(recs) for p in PLANTED)


def test_search_finds_the_refund_policy(sample):
    cfg, _, _ = sample
    r = run_keel("search", "refund policy", "--json", "-k", "3", "--config", str(cfg))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    hits = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert len(hits) == 3
    assert any(h["source"].endswith("us/product/refund-policy.md") for h in hits)


def test_no_planted_pii_survives_anywhere(sample):
    """Every scrubbed file and the whole vector index (LanceDB) are free of every planted value."""
    import lancedb

    _, root, _ = sample
    blobs = []
    for f in (root / "storage").rglob("*.parquet"):
        if "raw" in f.relative_to(root / "storage").parts[1:2]:
            continue  # the raw area holds the documents as received, by design
        t = pq.read_table(f)
        for col in ("text", "title", "reason"):
            if col in t.column_names:
                blobs.extend(v for v in t[col].to_pylist() if v)
    for lance_dir in (root / "storage").rglob("lance"):
        tbl = lancedb.connect(str(lance_dir)).open_table("chunks").to_arrow()
        blobs.extend(tbl["text"].to_pylist())
    corpus = "\n".join(blobs)
    assert len(corpus) > 100_000
    leaked = [(p["type"], p["source"]) for p in PLANTED if p["value"] in corpus]
    assert leaked == [], f"{len(leaked)} planted values leaked: {leaked[:10]}"


def test_rerun_is_a_no_op_with_byte_identical_outputs(sample):
    cfg, root, _ = sample
    before = committed_files(root / "storage")
    again = run_chain(cfg)
    for zone in ("us", "eu"):
        assert all(r.get("skipped") == "already committed" for r in again[zone])
        # The re-run is on record too, once per job, naming the snapshots it found instead of new data.
        recs = transformations(cfg, zone)
        committed = {r["job"]: r["output"] for r in recs if r["status"] == "committed"}
        skipped = [r for r in recs if r["status"] == "skipped"]
        assert [r["job"] for r in skipped] == ["raw", "scrubbed", "validation", "index"]  # one each, no more
        assert all(r["output"] == committed[r["job"]] for r in skipped)
    assert committed_files(root / "storage") == before


def test_crash_after_staging_then_rerun_equals_a_clean_run(ray_driver, shared_state, tmp_path, sample):
    """A scrub killed after staging part of its output, re-run, commits exactly what a clean run commits."""
    _, clean_root, _ = sample
    cfg = write_config(tmp_path, state_dir=shared_state)
    settings = load_settings(cfg)
    ingest.run("eu", INGEST_TIME, str(cfg))
    # What the killed attempt left behind: a staging folder holding a truncated part file.
    store = SnapshotStore(ZoneStorage.for_zone(settings, "eu"), "scrubbed")
    clean = SnapshotStore(ZoneStorage.for_zone(load_settings(sample[0]), "eu"), "scrubbed").current()
    staging = store.begin(clean["key"])
    staging.write_bytes(b"PAR1 half a row group", "documents/part-00000.parquet")
    assert store.current() is None and store.committed(clean["key"]) is None  # nothing visible yet

    result = scrub.run("eu", None, str(cfg))
    assert result["key"] == clean["key"]
    rel = Path("eu-west-1") / "scrubbed"
    assert committed_files(tmp_path / "storage" / rel) == committed_files(clean_root / "storage" / rel)
    assert not list((tmp_path / "storage" / rel / "_staging").glob("*"))


def test_changed_and_deleted_documents_replace_and_tombstone(ray_driver, shared_state, tmp_path):
    land = tmp_path / "landing"
    land.mkdir()
    (land / "a.txt").write_text("Ticket from Maria Garcia about the router.")
    (land / "b.md").write_text("# Setup\nPlug the router in and wait for the light.")
    (land / "c.txt").write_text("Old note by John Smith.")
    cfg = write_config(tmp_path, state_dir=shared_state,
                       sources=[{"name": "t", "uri": str(land), "zone": "us", "data_class": "pii"}])
    first = run_chain(cfg, zones=("us",))["us"]
    (land / "a.txt").write_text("Ticket from Maria Garcia about the modem instead.")
    (land / "c.txt").unlink()
    second = run_chain(cfg, zones=("us",))["us"]
    assert second[0]["changes"] == {"added": 0, "replaced": 1, "unchanged": 1, "removed": 1}
    assert second[0]["manifest"]["changes"]["tombstones"] == [f"file://{land}/c.txt"]
    assert second[1]["counts"]["reused"] == 1 and second[1]["counts"]["scrubbed"] == 1
    settings = load_settings(cfg)
    store = SnapshotStore(ZoneStorage.for_zone(settings, "us"), "index")
    chunks = pq.read_table(store.path(store.current()["key"], "chunks"))
    sources = set(chunks["source"].to_pylist())
    assert sources == {f"file://{land}/a.txt", f"file://{land}/b.md"}
    assert any("modem" in t for t in chunks["text"].to_pylist())
    assert not any("router." in t and "Ticket" in t for t in chunks["text"].to_pylist())
    assert first[3]["counts"]["documents"] == 3 and second[3]["counts"]["documents"] == 2


def _poisoned_landing(land: Path) -> None:
    land.mkdir()
    good = [f'{{"id": "ok-{i}", "text": "Customer Ana Lopez asked about order {i}."}}' for i in range(8)]
    bad = ['{"id": "no-text"}', "this is not json", '{"id": "empty", "text": ""}']
    (land / "tickets.jsonl").write_text("\n".join(good + bad) + "\n")
    (land / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    (land / "big.md").write_text("word " * 2000)
    (land / "empty.html").write_text("<html><body>   </body></html>")
    (land / "scan.pdf").write_bytes(b"%PDF-1.7")
    (land / "note.txt").write_text("A fine note.")


def test_poisoned_inputs_are_quarantined_with_reasons(ray_driver, shared_state, tmp_path):
    land = tmp_path / "landing"
    _poisoned_landing(land)
    cfg = write_config(tmp_path, state_dir=shared_state, max_doc_bytes=4096, max_quarantine_share=0.6,
                       sources=[{"name": "t", "uri": str(land), "zone": "us", "data_class": "pii"}])
    raw = ingest.run("us", INGEST_TIME, str(cfg))
    result = scrub.run("us", None, str(cfg))
    c = result["counts"]
    assert raw["documents"] == 16 and c["in"] == 16 and c["out"] + c["quarantined"] == 16  # nothing lost
    assert c["out"] == 9 and c["quarantined"] == 7
    store = SnapshotStore(ZoneStorage.for_zone(load_settings(cfg), "us"), "scrubbed")
    q = pq.read_table(store.path(result["key"], "quarantine")).to_pylist()
    reasons = {r["source"].rsplit("/", 1)[1]: r["reason"] for r in q}
    assert reasons["tickets.jsonl#no-text"] == "wrong schema: missing 'text' or not a string"
    assert reasons["tickets.jsonl#L10"].startswith("wrong schema: malformed JSON")
    assert reasons["tickets.jsonl#empty"] == "empty text"
    assert reasons["binary.txt"].startswith("invalid UTF-8")
    assert reasons["big.md"] == "document is 10000 bytes, above the limit of 4096"
    assert reasons["empty.html"] == "empty text"
    assert reasons["scan.pdf"] == "unsupported file type"
    assert all(r["payload"] for r in q if not r["source"].endswith("#empty"))  # kept for a fix and re-run
    assert validate.run("us", None, str(cfg))["success"]  # 7/16 = 0.44 < 0.6


def test_failed_gate_blocks_the_index(ray_driver, shared_state, tmp_path):
    land = tmp_path / "landing"
    _poisoned_landing(land)
    cfg = write_config(tmp_path, state_dir=shared_state, max_doc_bytes=4096, max_quarantine_share=0.2,
                       sources=[{"name": "t", "uri": str(land), "zone": "us", "data_class": "pii"}])
    ingest.run("us", INGEST_TIME, str(cfg))
    scrub.run("us", None, str(cfg))
    with pytest.raises(DataQualityError, match="failed validation"):
        validate.run("us", None, str(cfg))
    with pytest.raises(DataQualityError, match="has not passed validation: blocked"):
        index.run("us", None, str(cfg))
    assert SnapshotStore(ZoneStorage.for_zone(load_settings(cfg), "us"), "index").current() is None
    # Both failures are on record with their kind; the gate's verdict was committed, the index never was.
    gate, blocked = transformations(cfg, "us")[-2:]
    assert (gate["job"], gate["status"], gate["error_kind"]) == ("validation", "failed", "data_quality")
    assert gate["output"]["stage"] == "validation" and gate["counts"]["checks_failed"] > 0
    assert (blocked["job"], blocked["status"], blocked["error_kind"]) == ("index", "failed", "data_quality")
    assert blocked["output"] is None and blocked["input"] == gate["input"]


def test_a_zone_job_touches_only_its_own_storage(sample):
    cfg, root, _ = sample
    settings = load_settings(cfg)
    eu = ZoneStorage.for_zone(settings, "eu")
    us = ZoneStorage.for_zone(settings, "us")
    with pytest.raises(ResidencyError, match="escapes"):
        eu.path("..", "us-east-1", "raw")
    with pytest.raises(ResidencyError, match="outside the zone's storage"):
        eu.check(us.uri("raw", "CURRENT"))
    with pytest.raises(ResidencyError, match="unknown zone"):
        ZoneStorage.for_zone(settings, "apac")
    # Every file a zone's jobs wrote is under that zone's root.
    for zone, storage in (("us", us), ("eu", eu)):
        sources = set()
        for f in Path(storage.path()).rglob("*.parquet"):
            t = pq.read_table(f)
            if "zone" in t.column_names:
                sources |= set(t["zone"].to_pylist())
        assert sources == {zone}


def test_manifests_are_canonical_and_hold_no_values(sample):
    _, root, _ = sample
    for m in (root / "storage").rglob("_manifest.json"):
        doc = json.loads(m.read_bytes())
        assert m.read_bytes() == canonical(doc)
        text = m.read_text()
        assert not any(p["value"] in text for p in PLANTED)
