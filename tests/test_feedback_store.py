"""The feedback store (keel.feedback.store) on both of its databases: a SQLite file and a real Postgres server.

Timestamps are explicit (a fake clock from T0): the store never reads the time itself.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Column, Float, Integer, MetaData, String, Table, create_engine, event, select

from keel.errors import ConfigError
from keel.feedback.bandit import Arm
from keel.feedback.store import (
    EXCHANGES,
    REQUESTS,
    Exchange,
    Feedback,
    Link,
    Stores,
    ZoneStore,
    database_url,
)
from keel.settings import KeelSettings, load_settings
from tests.support import postgres as pg
from tests.support.services import write_config

T0 = 1_700_000_000.0
BACKENDS = ["sqlite", "postgres"]
_names = itertools.count()


@pytest.fixture(scope="module")
def postgres() -> Iterator[pg.Postgres]:
    """One server for the module (under a second to start); each test gets schemas of its own."""
    server = pg.start()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fresh(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], str]:
    """Makes the URL of a new, empty database of the test's backend."""
    if backend == "sqlite":
        return lambda name: f"sqlite:///{tmp_path / name}.db"
    server: pg.Postgres = request.getfixturevalue("postgres")
    return lambda name: server.fresh(f"{name}_{next(_names)}")


@pytest.fixture
def store(fresh: Callable[[str], str]) -> Iterator[ZoneStore]:
    s = ZoneStore("us", fresh("us"))
    yield s
    s.close()


def link(rid: str, tenant: str = "acme", prompt: str | None = "support", version: int | None = 1,
         created_at: float = T0) -> Link:
    return Link(request_id=rid, tenant=tenant, endpoint="chat", model="keel/auto", target="smollm2",
                strategy="blend", data_class="internal", prompt=prompt, prompt_version=version, status=200,
                created_at=created_at)


def exchange(rid: str, tenant: str = "acme", expires_at: float = T0 + 100, answer: str = "Reset the router.",
             messages: list[dict[str, Any]] | None = None, pseudonymized: bool = True) -> Exchange:
    return Exchange(request_id=rid, tenant=tenant, data_class="internal", endpoint="chat",
                    messages=messages or [{"role": "user", "content": "My <PERSON_1> router is down"}],
                    answer=answer, pseudonymized=pseudonymized, created_at=T0, expires_at=expires_at)


def fb(rid: str, key: str = "k1", score: float = 1.0, at: float = T0, tenant: str = "acme",
       **kw: Any) -> Feedback:
    return Feedback(request_id=rid, tenant=tenant, key_id=key, score=score, updated_at=at, **kw)


def exchanges_in(s: ZoneStore) -> dict[str, dict[str, Any]]:
    with s.engine.connect() as c:
        return {r["request_id"]: dict(r) for r in c.execute(select(EXCHANGES)).mappings()}


# -- one zone's store -------------------------------------------------------------------------------


def test_add_keeps_the_first_row_of_a_request_id_and_link_is_the_tenants_own(store: ZoneStore) -> None:
    store.add([link("r1"), link("r1", tenant="beta", prompt=None, version=None)], [exchange("r1")])
    # A caller reusing its x-request-id: the first row stays, the batch still goes in.
    store.add([replace(link("r1"), target="other", created_at=T0 + 5), link("r2")],
              [exchange("r1", answer="a second answer")])
    assert store.link("r1", "acme") == link("r1")
    assert store.link("r1", "beta") == link("r1", tenant="beta", prompt=None, version=None)
    assert store.link("r2", "beta") is None and store.link("nope", "acme") is None  # another tenant's id
    assert store.count("requests") == 3 and store.count("exchanges") == 1
    kept = exchanges_in(store)["r1"]
    assert kept["answer"] == "Reset the router." and json.loads(kept["messages"]) == exchange("r1").messages


def test_put_creates_once_per_key_then_updates_and_copies_the_route(store: ZoneStore) -> None:
    first = link("r1", prompt="support", version=3)
    store.add([first])
    stored, created = store.put(fb("r1", score=0.0, rating="down", comment="too slow", at=T0 + 10), first)
    assert created and stored.created_at == T0 + 10
    stored, created = store.put(fb("r1", score=1.0, rating="up", correction="Unplug it.", at=T0 + 20), first)
    assert not created and stored.created_at == T0 + 10 and store.count("feedback") == 1
    [row] = store.feedback()
    assert (row["score"], row["rating"], row["comment"], row["correction"]) == (1.0, "up", None, "Unplug it.")
    assert (row["created_at"], row["updated_at"]) == (T0 + 10, T0 + 20)
    assert {k: row[k] for k in ("endpoint", "model", "target", "strategy", "data_class", "prompt", "prompt_version")} \
        == {"endpoint": "chat", "model": "keel/auto", "target": "smollm2", "strategy": "blend",
            "data_class": "internal", "prompt": "support", "prompt_version": 3}
    _, created = store.put(fb("r1", key="k2", score=0.5, at=T0 + 30), first)  # the tenant's other key
    assert created and store.count("feedback") == 2


def test_reads_feedback_rated_exchanges_totals_and_counts(store: ZoneStore) -> None:
    links = {"r1": link("r1"), "r2": link("r2"), "r3": link("r3", version=2),
             "r4": link("r4", prompt=None, version=None)}
    store.add(list(links.values()), [exchange("r1"), exchange("r2"), exchange("r3", expires_at=T0 + 50)])
    for rid, key, score, kw in [("r1", "k1", 1.0, {"rating": "up"}), ("r1", "k2", 0.25, {"correction": "Unplug it."}),
                                ("r2", "k1", 0.0, {"rating": "down"}), ("r3", "k1", 1.0, {}), ("r4", "k1", 0.5, {})]:
        store.put(fb(rid, key, score, at=T0 + int(rid[1]) + int(key[1]) / 10, **kw), links[rid])
    assert [(r["request_id"], r["key_id"]) for r in store.feedback()] \
        == [("r1", "k1"), ("r1", "k2"), ("r2", "k1"), ("r3", "k1"), ("r4", "k1")]
    assert [r["request_id"] for r in store.feedback(since=T0 + 2.1)] == ["r2", "r3", "r4"]

    # r1 rated up by one key and corrected by another; r2 rated down; r3's exchange has expired by then.
    rated = store.rated_exchanges(now=T0 + 60)
    assert [(r["request_id"], r["key_id"], r["score"], r["correction"]) for r in rated] \
        == [("r1", "k1", 1.0, None), ("r1", "k2", 0.25, "Unplug it.")]
    assert rated[0]["messages"] == exchange("r1").messages and rated[0]["answer"] == "Reset the router."
    assert (rated[0]["target"], rated[0]["prompt"], rated[0]["prompt_version"]) == ("smollm2", "support", 1)
    assert [r["request_id"] for r in store.rated_exchanges(now=T0 + 49)] == ["r1", "r1", "r3"]
    assert store.rated_exchanges(now=T0 + 100) == []  # expires_at is the first moment it is gone

    assert store.totals() == {("support", 1): Arm(1.25, 1.75), ("support", 2): Arm(1.0, 0.0)}  # r4: no variant
    assert [store.count(t) for t in ("requests", "feedback", "exchanges")] == [4, 5, 3]


def test_expire_drops_exchanges_and_old_request_rows_and_keeps_feedback(store: ZoneStore) -> None:
    window = 100.0
    store.add([link("old"), link("new", created_at=T0 + 50)],
              [exchange("old", expires_at=T0 + 10), exchange("new", expires_at=T0 + 20)])
    store.put(fb("old", score=1.0, at=T0 + 1), link("old"))
    assert store.expire(now=T0 + 9.999, window_s=window) == {"exchanges": 0, "requests": 0, "words": 0}
    # at its expires_at
    assert store.expire(now=T0 + 10, window_s=window) == {"exchanges": 1, "requests": 0, "words": 0}
    assert set(exchanges_in(store)) == {"new"}
    # created at now - window
    assert store.expire(now=T0 + 100, window_s=window) == {"exchanges": 1, "requests": 1, "words": 0}
    assert store.link("old", "acme") is None and store.link("new", "acme") is not None
    assert store.count("exchanges") == 0 and store.count("feedback") == 1  # the aggregates outlive the requests
    assert store.totals() == {("support", 1): Arm(1.0, 0.0)}
    assert store.expire(now=T0 + 150, window_s=window) == {"exchanges": 0, "requests": 1, "words": 0}


def test_expire_erases_the_words_of_feedback_past_retention_and_keeps_its_score(store: ZoneStore) -> None:
    store.add([link("a"), link("b")])
    store.put(fb("a", score=0.0, at=T0, comment="It named [PERSON] wrongly", correction="Say hello"), link("a"))
    store.put(fb("b", score=1.0, at=T0 + 50, comment="Good"), link("b"))
    assert store.expire(now=T0 + 60, window_s=1000, retention_s=30)["words"] == 1
    rows = {r["request_id"]: r for r in store.feedback()}
    assert (rows["a"]["comment"], rows["a"]["correction"], rows["a"]["score"]) == (None, None, 0.0)
    assert rows["b"]["comment"] == "Good"
    assert store.expire(now=T0 + 60, window_s=1000, retention_s=30)["words"] == 0  # nothing left to erase
    assert store.totals() == {("support", 1): Arm(1.0, 1.0)}


def earlier_requests_table(url: str, rows: list[Link]) -> None:
    """keel_requests as the version before the usage columns made it, holding `rows`."""
    old = Table("keel_requests", MetaData(), Column("request_id", String(128), primary_key=True),
                Column("tenant", String(64), primary_key=True),
                *(Column(name, String(64)) for name in ("endpoint", "model", "target", "strategy", "data_class",
                                                        "prompt")),
                Column("prompt_version", Integer), Column("status", Integer),
                Column("created_at", Float, nullable=False, index=True))
    engine = create_engine(url)
    old.metadata.create_all(engine)
    with engine.begin() as c:
        for row in rows:
            c.execute(old.insert().values({k: v for k, v in asdict(row).items() if k in old.c}))
    engine.dispose()


def test_a_database_of_an_earlier_version_gets_the_usage_columns_on_open(fresh: Callable[[str], str]) -> None:
    url = fresh("earlier")
    earlier_requests_table(url, [link("r-old")])
    s = ZoneStore("us", url)
    assert s.link("r-old", "acme") == link("r-old")  # its usage unknown: None
    used = replace(link("r-new"), prompt_tokens=12, completion_tokens=5, cost=0.0022)
    s.add([used])
    assert s.link("r-new", "acme") == used
    s.close()
    again = ZoneStore("us", url)  # the next open finds nothing to add
    assert again.link("r-new", "acme") == used
    again.close()


H = 1_699_999_200.0  # on the hour (a multiple of 3600): usage buckets are counted from the epoch


def used(rid: str, at: float, target: str | None = "smollm2", tokens: tuple[int, int] | None = None,
         cost: float | None = None, tenant: str = "acme") -> Link:
    """A request row with its usage (None: the target reported none)."""
    return replace(link(rid, tenant=tenant, created_at=at), target=target, cost=cost,
                   prompt_tokens=tokens[0] if tokens else None, completion_tokens=tokens[1] if tokens else None)


def bucket(start: float, target: str | None, requests: int, prompt: int, completion: int,
           cost: float) -> dict[str, Any]:
    return {"start_time": int(start), "target": target, "requests": requests, "prompt_tokens": prompt,
            "completion_tokens": completion, "cost": pytest.approx(cost)}


def test_usage_sums_a_tenants_answers_per_bucket_and_target_in_the_window(store: ZoneStore) -> None:
    store.add([used("a1", H, tokens=(10, 5), cost=0.001),  # the window's first moment: in
               used("a2", H + 3599.5, tokens=(20, 10), cost=0.002),
               used("a3", H + 100, target="big", tokens=(1, 1), cost=0.5),
               used("a4", H + 3600),  # the next bucket's first moment; no usage reported
               used("a5", H + 3700, target=None),
               used("a6", H + 7200, tokens=(1, 1), cost=1.0),  # the window's end: out
               used("a7", H - 0.5, tokens=(1, 1), cost=1.0),  # before it: out
               used("b1", H + 10, tokens=(100, 100), cost=9.0, tenant="beta")])
    assert store.usage("acme", H, H + 7200, 3600) == [
        bucket(H, "big", 1, 1, 1, 0.5), bucket(H, "smollm2", 2, 30, 15, 0.003),
        bucket(H + 3600, None, 1, 0, 0, 0.0), bucket(H + 3600, "smollm2", 1, 0, 0, 0.0)]
    # A window starting inside a bucket: the bucket keeps its epoch-aligned start, with what is in the window.
    assert store.usage("acme", H + 50, H + 3600, 3600) == [bucket(H, "big", 1, 1, 1, 0.5),
                                                           bucket(H, "smollm2", 1, 20, 10, 0.002)]
    assert store.usage("acme", H, H + 7200, 60)[:2] == [bucket(H, "smollm2", 1, 10, 5, 0.001),
                                                        bucket(H + 60, "big", 1, 1, 1, 0.5)]
    assert store.usage("beta", H, H + 7200, 3600) == [bucket(H, "smollm2", 1, 100, 100, 9.0)]
    assert store.usage("gamma", H, H + 7200, 3600) == []
    with pytest.raises(ValueError, match="bucket_s"):
        store.usage("acme", H, H + 7200, 0)


@pytest.mark.parametrize("earlier", [False, True], ids=["new", "earlier-version"])
def test_replicas_starting_together_create_the_tables_once(backend: str, fresh: Callable[[str], str],
                                                            earlier: bool) -> None:
    """Also when they find an earlier version's table: one adds the columns, the others find them."""
    for round_ in range(4):
        url, start, errors = fresh(f"race{round_}"), threading.Barrier(6), list[Exception]()
        if earlier:
            earlier_requests_table(url, [link("r-old")])

        def open_one(url: str = url, start: threading.Barrier = start, errors: list[Exception] = errors) -> None:
            start.wait()
            try:
                ZoneStore("us", url).close()
            except Exception as e:  # noqa: BLE001 - collected, the test asserts there are none
                errors.append(e)

        threads = [threading.Thread(target=open_one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == [], f"round {round_}: {errors[0]!r}"


def _write_many(url: str, name: str, n: int, start: Any) -> None:
    """One process of the concurrency test: its own requests, then the shared ones both write."""
    s = ZoneStore("us", url)
    start.wait()
    for i in range(n):
        s.add([link(f"{name}-{i}")])
        s.put(fb(f"{name}-{i}", at=T0 + i), link(f"{name}-{i}"))
    for i in range(50):  # both add the same request and rate it from the same key: one row each
        s.add([link(f"shared-{i}")])
        s.put(fb(f"shared-{i}", key="k-shared", at=T0 + i), link(f"shared-{i}"))
    s.close()


def test_two_processes_writing_one_store_at_once_lose_nothing(fresh: Callable[[str], str]) -> None:
    """SQLite: WAL and the busy timeout; both: a feedback insert lost to the other process updates instead."""
    s = ZoneStore("us", fresh("us"))  # the tables exist before the writers start (the race above is its own)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_many, args=(s.engine.url.render_as_string(hide_password=False), name, 200,
                                                   start)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (s.count("requests"), s.count("feedback")) == (450, 450)
    s.close()


# -- each zone's database ---------------------------------------------------------------------------


def settings_with(tmp_path: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> KeelSettings:
    cfg = write_config(tmp_path)
    if edit is not None:
        doc = yaml.safe_load(cfg.read_text())
        edit(doc)
        cfg.write_text(yaml.safe_dump(doc))
    return load_settings(cfg)


def test_a_zone_without_a_url_keeps_a_private_sqlite_file_in_its_storage(tmp_path: Path) -> None:
    settings = settings_with(tmp_path)
    path = tmp_path / "storage" / settings.policy.zones["us"].region / "feedback" / "feedback.db"
    assert database_url(settings, "us") == f"sqlite:///{path}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    s = ZoneStore("us", database_url(settings, "us"))  # a second call finds the file as it is
    s.add([link("r1")])
    wal = path.with_name("feedback.db-wal")  # SQLite gives its journal the database's own mode
    assert s.count("requests") == 1 and stat.S_IMODE(wal.stat().st_mode) == 0o600
    s.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_zone_stored_on_s3_needs_a_database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def on_s3(doc: dict[str, Any]) -> None:
        doc["policy"]["zones"]["eu"]["storage"] = "s3://keel-eu/storage"

    with pytest.raises(ConfigError, match="KEEL_FEEDBACK__DATABASES") as e:
        database_url(settings_with(tmp_path, on_s3), "eu")
    assert "s3://keel-eu/storage" in str(e.value)
    with pytest.raises(ConfigError, match="KEEL_FEEDBACK__DATABASES"):
        Stores(settings_with(tmp_path, on_s3))  # the gateway does not start
    url = f"sqlite:///{tmp_path / 'eu.db'}"
    monkeypatch.setenv("KEEL_FEEDBACK__DATABASES", json.dumps({"eu": url}))
    assert database_url(settings_with(tmp_path, on_s3), "eu") == url


def test_a_configured_url_wins_and_stays_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql+psycopg://keel:hunter2@db.us.internal/keel"
    monkeypatch.setenv("KEEL_FEEDBACK__DATABASES", json.dumps({"us": url}))
    settings = settings_with(tmp_path)
    assert database_url(settings, "us") == url and "hunter2" not in repr(settings)
    assert not (tmp_path / "storage" / settings.policy.zones["us"].region / "feedback").exists()
    assert database_url(settings, "eu").startswith("sqlite:///")  # the zone without one


def test_databases_name_known_zones_and_never_live_in_keel_yaml(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def in_file(doc: dict[str, Any]) -> None:
        doc["feedback"] = {"window_days": 7, "databases": {"us": "postgresql+psycopg://keel:hunter2@db/keel"}}

    with pytest.raises(ConfigError) as e:
        settings_with(tmp_path, in_file)
    msg = str(e.value)
    assert "secrets never live in keel.yaml" in msg and "hunter2" not in msg
    assert "field feedback.databases: set KEEL_FEEDBACK__DATABASES" in msg
    assert settings_with(tmp_path, lambda d: d.update(feedback={"window_days": 7})).feedback.window_days == 7

    monkeypatch.setenv("KEEL_FEEDBACK__DATABASES", json.dumps({"apac": "sqlite:///x.db"}))
    with pytest.raises(ConfigError, match=r"feedback.databases: unknown zone\(s\) \['apac'\]"):
        settings_with(tmp_path)


# -- every zone's store, and the gateway's writer -----------------------------------------------------


@pytest.fixture
def zones(backend: str, fresh: Callable[[str], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KeelSettings:
    """Settings whose zones us and eu keep their feedback in the test's backend: SQLite files in their
    storage (the default), or a Postgres database each (KEEL_FEEDBACK__DATABASES)."""
    if backend == "postgres":
        monkeypatch.setenv("KEEL_FEEDBACK__DATABASES", json.dumps({"us": fresh("us"), "eu": fresh("eu")}))
    return settings_with(tmp_path)


def request_ids(settings: KeelSettings, zone: str) -> set[str]:
    """Read a zone's database afresh, apart from the Stores that wrote it."""
    engine = create_engine(database_url(settings, zone))
    with engine.connect() as c:
        ids = set(c.execute(select(REQUESTS.c.request_id)).scalars())
    engine.dispose()
    return ids


def test_stores_write_each_request_in_its_zone_and_sum_totals_across(zones: KeelSettings) -> None:
    stores = Stores(zones)
    stores.submit("eu", link("r-eu"))
    stores.submit("us", link("r-us"), exchange("r-us"))
    stores.flush()
    assert (request_ids(zones, "eu"), request_ids(zones, "us")) == ({"r-eu"}, {"r-us"})
    if not zones.feedback.databases:
        assert database_url(zones, "eu") != database_url(zones, "us")  # one file in each zone's storage
    found = stores.find("r-eu", "acme")
    assert found is not None and found[0].zone == "eu" and found[1] == link("r-eu")
    assert stores.find("r-eu", "beta") is None and stores.find("nope", "acme") is None

    for rid, score in (("r-eu", 1.0), ("r-us", 0.0)):
        store, lnk = stores.find(rid, "acme") or pytest.fail(rid)
        store.put(fb(rid, score=score), lnk)
    assert stores.zones["eu"].totals() == {("support", 1): Arm(1.0, 0.0)}
    assert stores.totals() == {("support", 1): Arm(1.0, 1.0)}
    stores.close()


def test_sequential_submits_share_a_transaction_per_zone_and_flush_cuts_the_gathering_short(
        zones: KeelSettings) -> None:
    """Answers arriving one by one (the gateway under sequential load) are written together: one commit per
    zone for what arrives within the gather window; flush wakes the writer instead of waiting the window out."""
    stores = Stores(zones, gather_s=30.0)
    commits = {zone: 0 for zone in stores.zones}
    for zone, store in stores.zones.items():
        event.listen(store.engine, "commit", lambda _conn, zone=zone: commits.__setitem__(zone, commits[zone] + 1))
    for i in range(40):
        stores.submit("us" if i % 4 else "eu", link(f"r{i}"))
        time.sleep(0.002)  # one at a time, as requests finish
    start = time.monotonic()
    stores.flush()
    assert time.monotonic() - start < 5.0  # not the 30 s window
    assert commits == {"us": 1, "eu": 1}
    assert len(request_ids(zones, "us")) == 30 and len(request_ids(zones, "eu")) == 10
    stores.flush()  # nothing queued: at once, no transaction
    assert commits == {"us": 1, "eu": 1}
    stores.close()


def test_find_recent_waits_out_another_replicas_gather_window(zones: KeelSettings) -> None:
    """Two gateway replicas on one database: feedback posted to one on an answer the other gave a moment ago
    finds it, though that replica's writer still gathers (its flush is not this one's)."""
    answering, asked = Stores(zones, gather_s=0.2), Stores(zones, gather_s=0.2)
    answering.submit("eu", link("r1"))
    assert asked.find("r1", "acme") is None  # still in the answering replica's writer
    found = asked.find_recent("r1", "acme")
    assert found is not None and found[1] == link("r1")
    start = time.monotonic()
    assert asked.find_recent("never", "acme") is None and time.monotonic() - start >= 0.4  # two windows
    answering.close()
    asked.close()


def test_stores_usage_merges_every_zone_per_bucket_and_target(zones: KeelSettings) -> None:
    stores = Stores(zones)
    for zone, row in [("us", used("u1", H, tokens=(10, 5), cost=0.001)),
                      ("eu", used("e1", H + 10, tokens=(3, 2), cost=0.0005)),  # the same target, the other zone
                      ("eu", used("e2", H + 20, target="mistral-eu", tokens=(7, 7), cost=0.01)),
                      ("us", used("u2", H + 3600, tokens=(1, 1), cost=0.0001)),
                      ("eu", used("x1", H, tokens=(50, 50), cost=1.0, tenant="beta"))]:
        stores.submit(zone, row)
    stores.flush()
    assert stores.usage("acme", H, H + 7200, 3600) == [
        bucket(H, "mistral-eu", 1, 7, 7, 0.01), bucket(H, "smollm2", 2, 13, 7, 0.0015),
        bucket(H + 3600, "smollm2", 1, 1, 1, 0.0001)]
    assert stores.usage("beta", H, H + 7200, 3600) == [bucket(H, "smollm2", 1, 50, 50, 1.0)]
    stores.close()


def test_the_writer_keeps_going_after_a_failed_batch(zones: KeelSettings) -> None:
    errors: list[Exception] = []
    stores = Stores(zones, on_error=errors.append)
    stores.submit("us", replace(link("bad"), created_at=None))  # type: ignore[arg-type]  # NOT NULL: fails
    stores.flush()
    assert len(errors) == 1 and "created_at" in str(errors[0])
    stores.submit("us", link("good"))
    stores.flush()
    assert len(errors) == 1 and stores.find("good", "acme") is not None and stores.find("bad", "acme") is None
    stores.close()


def test_an_exchange_sent_as_is_is_scrubbed_before_it_is_kept(zones: KeelSettings) -> None:
    raw = exchange("r1", pseudonymized=False, answer="Hello Maria Gonzalez", messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "I am Maria Gonzalez"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    seen: list[list[str]] = []

    def scrub(texts: list[str]) -> list[str]:
        seen.append(texts)
        return [t.replace("Maria Gonzalez", "<PERSON>") for t in texts]

    stores = Stores(zones, scrub=scrub)
    stores.submit("us", link("r1"), raw)
    stores.flush()
    assert seen == [["Be brief.", "I am Maria Gonzalez", "Hello Maria Gonzalez"]]  # one call: messages, answer
    kept = exchanges_in(stores.zones["us"])["r1"]
    assert json.loads(kept["messages"]) == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "I am <PERSON>"}]
    assert kept["answer"] == "Hello <PERSON>"
    stores.close()


def test_without_a_scrubber_only_pseudonymized_exchanges_are_kept(zones: KeelSettings) -> None:
    stores = Stores(zones)
    stores.submit("us", link("raw"), exchange("raw", pseudonymized=False, answer="Hello Maria Gonzalez"))
    stores.submit("us", link("pseudo"), exchange("pseudo"))
    stores.close()  # what was queued is written before the writer stops
    assert not stores._writer._thread.is_alive()
    assert request_ids(zones, "us") == {"raw", "pseudo"}  # the request still takes feedback
    s = ZoneStore("us", database_url(zones, "us"))
    assert set(exchanges_in(s)) == {"pseudo"}
    s.close()
