"""Tenants and sources: a tenant's retrieval (the gateway's RAG, `keel search --tenant`, chunks by id)
reads the sources it may read only, on a real index the batch chain built (real Ray, Presidio, MiniLM,
LanceDB)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from keel.pipeline.snapshots import SnapshotStore
from keel.retrieval import Retriever
from keel.settings import load_settings
from keel.storage import ZoneStorage
from tests.conftest import run_keel
from tests.support.services import write_config

INGEST_TIME = "2026-11-26T00:00:00+00:00"
ASK = "How are annual plans refunded?"
DOCS = {"shared": "Refunds: annual plans can be refunded in full within 30 days of purchase.",
        "acme-private": "Refund exception for annual plans bought before March: a full refund within 90 days.",
        "globex-private": "Refund exception for annual plans: refunded only as store credit, never in cash."}
READERS = {"shared": None, "acme-private": ["acme"], "globex-private": ["globex"]}


def with_readers(cfg: Path, readers: dict[str, list[str] | None], name: str = "keel.yaml") -> Path:
    """`cfg` (written as `name` beside it) with the sources named in `readers`, each over its landing
    folder of DOCS, and the tenants acme and globex."""
    doc = yaml.safe_load(cfg.read_text())
    doc["pipeline"]["sources"] = [{"name": n, "uri": str(cfg.parent / "landing" / n), "zone": "us",
                                   "data_class": "public", **({"tenants": t} if t is not None else {})}
                                  for n, t in readers.items()]
    tenants = {t["name"]: t for t in doc["policy"]["tenants"]}
    doc["policy"]["tenants"] = [*tenants.values(), *[{"name": n, "allowed_classes": ["public"],
                                                       "default_class": "public"} for n in ("acme", "globex")
                                                      if n not in tenants]]
    out = cfg.with_name(name)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def source_of(uri: str) -> str:
    return uri.rsplit("/", 2)[-2]  # .../landing/<source name>/refunds.md


@pytest.fixture(scope="module")
def landed(ray_driver, shared_state, tmp_path_factory):
    from ray_jobs import index, ingest, scrub, validate

    root = tmp_path_factory.mktemp("tenants")
    for name, text in DOCS.items():
        (root / "landing" / name).mkdir(parents=True)
        (root / "landing" / name / "refunds.md").write_text(text)
    cfg = with_readers(write_config(root, state_dir=shared_state), READERS)
    ingest.run("us", INGEST_TIME, str(cfg))
    scrub.run("us", None, str(cfg))
    validate.run("us", None, str(cfg))
    built = index.run("us", None, str(cfg))
    assert built["counts"]["chunks"] == 3
    return root, cfg


def test_the_index_names_each_chunks_source(landed):
    _, cfg = landed
    store = SnapshotStore(ZoneStorage.for_zone(load_settings(cfg), "us"), "index")
    chunks = pq.read_table(store.path(store.current()["key"], "chunks"))
    assert {source_of(s): n for s, n in zip(chunks["source"].to_pylist(), chunks["source_name"].to_pylist(),
                                            strict=True)} == {n: n for n in DOCS}


def test_a_tenant_retrieves_the_shared_source_and_its_own_never_anothers(landed):
    _, cfg = landed
    r = Retriever(load_settings(cfg))
    for tenant, own, other in (("acme", "acme-private", "globex-private"),
                               ("globex", "globex-private", "acme-private")):
        hits = r.search(ASK, ["us"], 10, ["public"], tenant=tenant)
        assert {source_of(h.source) for h in hits} == {"shared", own}, tenant
        # Asked in the other's words, the other's chunk is the nearest, and still never comes back:
        # filtered before the nearest-neighbour search, so k hits of its own come back instead.
        nearest = r.search(DOCS[other], ["us"], 2, tenant=tenant)
        assert [source_of(h.source) for h in nearest].count(other) == 0 and len(nearest) == 2
        assert source_of(r.search(DOCS[other], ["us"], 1)[0].source) == other  # no tenant: an operator's query
    # demo has no private source: the shared one only; a name that is no tenant reads nothing (fail closed).
    assert {source_of(h.source) for h in r.search(ASK, ["us"], 10, tenant="demo")} == {"shared"}
    assert r.search(ASK, ["us"], 10, tenant="nobody") == []
    assert {source_of(h.source) for h in r.search(ASK, ["us"], 10)} == set(DOCS)


def test_chunks_by_id_are_found_only_in_the_sources_the_tenant_may_read(landed):
    _, cfg = landed
    r = Retriever(load_settings(cfg))
    ids = {source_of(h.source): h.chunk_id for h in r.search(ASK, ["us"], 10)}
    assert set(r.chunks(list(ids.values()), ["us"], tenant="acme")) == {ids["shared"], ids["acme-private"]}
    assert set(r.chunks([ids["globex-private"]], ["us"], tenant="acme")) == set()
    assert set(r.chunks(list(ids.values()), ["us"])) == set(ids.values())


def test_a_change_of_readers_takes_effect_at_once_and_a_dropped_source_is_read_by_no_tenant(landed):
    _, cfg = landed
    after = load_settings(with_readers(cfg, {**READERS, "globex-private": ["acme", "globex"]}, "shared.yaml"))
    assert after.config_version() == load_settings(cfg).config_version()  # the index stands: no stage runs again
    hits = Retriever(after).search(ASK, ["us"], 10, tenant="acme")
    assert {source_of(h.source) for h in hits} == set(DOCS)
    dropped = {n: t for n, t in READERS.items() if n != "globex-private"}
    gone = Retriever(load_settings(with_readers(cfg, dropped, "dropped.yaml")))
    # Its chunks stay in the index until the next run, but no tenant names it among the sources it reads.
    assert {source_of(h.source) for h in gone.search(ASK, ["us"], 10, tenant="globex")} == {"shared"}
    assert {source_of(h.source) for h in gone.search(ASK, ["us"], 10)} == set(DOCS)


def test_keel_search_as_a_tenant(landed):
    _, cfg = landed
    r = run_keel("search", ASK, "--json", "-k", "5", "--tenant", "globex", "--config", str(cfg))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert {source_of(json.loads(line)["source"]) for line in r.stdout.decode().splitlines()} == {
        "shared", "globex-private"}
    r = run_keel("search", ASK, "--tenant", "globx", "--config", str(cfg))
    assert r.returncode == 2 and b"unknown tenant 'globx'" in r.stderr


def test_an_index_written_before_chunks_named_their_source_is_read_by_no_tenant(tmp_path, shared_state):
    """Until the next pipeline run rebuilds it (index_columns are in the config version), an old index
    answers operators only: without source_name no tenant's filter can hold, so none is read half-blind."""
    import lancedb
    import pyarrow as pa

    from keel.pipeline import index

    cfg = with_readers(write_config(tmp_path, state_dir=shared_state), READERS)
    settings = load_settings(cfg)
    r = Retriever(settings)
    old = pa.schema([f for f in index.CHUNKS_SCHEMA if f.name != "source_name"])
    chunks = pa.table({"chunk_id": ["c0"], "doc_id": ["d0"], "seq": pa.array([0], pa.int32()),
                       "source": [str(tmp_path / "landing" / "shared" / "refunds.md")], "title": [None],
                       "data_class": ["public"], "text": [DOCS["shared"]],
                       "vector": pa.array(r.embed([DOCS["shared"]]).tolist(), old.field("vector").type)}, schema=old)
    storage = ZoneStorage.for_zone(settings, "us")
    store = SnapshotStore(storage, "index")
    staging = store.begin("old-index")
    lancedb.connect(storage.uri(staging.path, "lance")).create_table(index.TABLE, data=chunks)
    store.commit(staging, {"counts": {"chunks": 1}})
    assert [h.chunk_id for h in r.search(ASK, ["us"], 5)] == ["c0"]
    assert r.search(ASK, ["us"], 5, tenant="acme") == [] and r.chunks(["c0"], ["us"], tenant="acme") == {}
