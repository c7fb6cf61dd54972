"""Feedback storage: one database per zone (SQLAlchemy), so feedback stays where its request's data went.

A zone's database is its URL in `feedback.databases` (Postgres in production), else a SQLite file in
the zone's own storage. Three tables:

- `keel_requests`: each answer that may take feedback, by request id and tenant: its route and prompt
  variant, never its text. It links feedback to the request's audit record (same request id) and is
  deleted after `feedback.window_days`.
- `keel_feedback`: one row per request and API key (posting again updates it): the rating as a score
  in [0, 1], the comment and correction scrubbed, and the request's route copied in, so the aggregates
  outlive the request rows.
- `keel_exchanges`: opt-in (policy.tenants[].retain_exchanges): the prompt and the answer as the model
  saw them, pseudonymized, deleted at `expires_at`.

The gateway writes request rows and exchanges from a thread of its own (`Stores.submit`), never on
the event loop; feedback is written by the feedback endpoint, in a worker thread.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeAlias

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from keel.batching import BatchWriter
from keel.errors import ConfigError
from keel.feedback.bandit import Arm
from keel.settings import KeelSettings

log = logging.getLogger("keel.feedback")

_meta = MetaData()


def _route_columns() -> list[Column[Any]]:
    """What a request was routed by: its endpoint, the model asked, the target that answered, the
    strategy, its data class and the prompt variant it got (None: no variant)."""
    return [Column("endpoint", String(16)), Column("model", String(128)), Column("target", String(128)),
            Column("strategy", String(32)), Column("data_class", String(16)), Column("prompt", String(64)),
            Column("prompt_version", Integer)]


REQUESTS = Table("keel_requests", _meta,
                 Column("request_id", String(128), primary_key=True), Column("tenant", String(64), primary_key=True),
                 *_route_columns(), Column("status", Integer),
                 Column("created_at", Float, nullable=False, index=True),
                 # added later: a database of an earlier version gets them on open (_add_missing_columns)
                 Column("prompt_tokens", Integer), Column("completion_tokens", Integer), Column("cost", Float))
FEEDBACK = Table("keel_feedback", _meta,
                 Column("request_id", String(128), primary_key=True), Column("tenant", String(64), primary_key=True),
                 Column("key_id", String(32), primary_key=True),
                 Column("rating", String(8)), Column("score", Float, nullable=False),
                 Column("comment", Text), Column("correction", Text), *_route_columns(),
                 Column("created_at", Float, nullable=False), Column("updated_at", Float, nullable=False, index=True))
EXCHANGES = Table("keel_exchanges", _meta,
                  Column("request_id", String(128), primary_key=True), Column("tenant", String(64), primary_key=True),
                  Column("data_class", String(16)), Column("endpoint", String(16)),
                  Column("messages", Text, nullable=False), Column("answer", Text, nullable=False),
                  Column("created_at", Float, nullable=False), Column("expires_at", Float, nullable=False, index=True))


@dataclass(frozen=True)
class Link:
    """A request that may take feedback: its ids and route, no text."""

    request_id: str
    tenant: str
    endpoint: str
    model: str | None
    target: str | None
    strategy: str | None
    data_class: str | None
    prompt: str | None
    prompt_version: int | None
    status: int
    created_at: float
    prompt_tokens: int | None = None  # the answer's usage, where the target reported it
    completion_tokens: int | None = None
    cost: float | None = None  # USD at the answering target's prices


ROUTE = ("endpoint", "model", "target", "strategy", "data_class", "prompt", "prompt_version")


@dataclass(frozen=True)
class Exchange:
    """A kept exchange: the messages and the answer as the model saw them. `pseudonymized` false: the
    request went to its model as sent (a class the policy lets through), so it is scrubbed before it is
    stored (Stores' `scrub`)."""

    request_id: str
    tenant: str
    data_class: str
    endpoint: str
    messages: list[dict[str, Any]]
    answer: str
    pseudonymized: bool
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class Feedback:
    request_id: str
    tenant: str
    key_id: str  # which of the tenant's keys rated it: one rating per request and key
    score: float  # 1 up, 0 down, or the caller's score
    rating: str | None = None  # "up" or "down" when the caller rated that way
    comment: str | None = None  # scrubbed
    correction: str | None = None  # scrubbed: the answer the caller would have preferred
    created_at: float = 0.0
    updated_at: float = 0.0


class ZoneStore:
    """One zone's feedback database."""

    def __init__(self, zone: str, url: str) -> None:
        self.zone = zone
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        for attempt in range(3):  # replicas starting together race to create the tables; the losers find them
            try:
                _meta.create_all(self.engine)
                _add_missing_columns(self.engine, REQUESTS)
                break
            except (OperationalError, IntegrityError, ProgrammingError):  # locked; a duplicate type or column
                if attempt == 2:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        self.engine.dispose()

    # -- the gateway's writes ------------------------------------------------------------------

    def add(self, links: Sequence[Link], exchanges: Sequence[Exchange] = ()) -> None:
        """Request rows and kept exchanges; a request id its tenant already used keeps its first row
        (callers may set x-request-id themselves)."""
        with self.engine.begin() as c:
            if links:
                c.execute(self._insert_new(REQUESTS), [asdict(x) for x in links])
            if exchanges:
                c.execute(self._insert_new(EXCHANGES), [
                    {"request_id": x.request_id, "tenant": x.tenant, "data_class": x.data_class,
                     "endpoint": x.endpoint, "messages": json.dumps(x.messages), "answer": x.answer,
                     "created_at": x.created_at, "expires_at": x.expires_at} for x in exchanges])

    def _insert_new(self, table: Table) -> Any:
        if self.engine.dialect.name in ("sqlite", "postgresql"):
            dialect = __import__(f"sqlalchemy.dialects.{self.engine.dialect.name}", fromlist=["insert"])
            return dialect.insert(table).on_conflict_do_nothing()
        return insert(table)  # another database: a repeated id fails its batch, logged by the writer

    # -- feedback ------------------------------------------------------------------------------

    def link(self, request_id: str, tenant: str) -> Link | None:
        with self.engine.connect() as c:
            row = c.execute(select(REQUESTS).where(REQUESTS.c.request_id == request_id,
                                                   REQUESTS.c.tenant == tenant)).mappings().first()
        return Link(**row) if row else None

    def put(self, fb: Feedback, link: Link) -> tuple[Feedback, bool]:
        """Store a request's feedback from one key, or update the one it gave before; (stored, created)."""
        values = {"rating": fb.rating, "score": fb.score, "comment": fb.comment, "correction": fb.correction,
                  "updated_at": fb.updated_at}
        key = and_(FEEDBACK.c.request_id == fb.request_id, FEEDBACK.c.tenant == fb.tenant,
                   FEEDBACK.c.key_id == fb.key_id)
        for _ in range(2):  # two posts racing: the loser of the insert updates
            with self.engine.begin() as c:
                first = c.execute(select(FEEDBACK.c.created_at).where(key)).scalar()
                if first is not None:
                    c.execute(update(FEEDBACK).where(key).values(values))
                    return replace(fb, created_at=first), False
                try:
                    c.execute(insert(FEEDBACK).values(
                        {**values, "request_id": fb.request_id, "tenant": fb.tenant, "key_id": fb.key_id,
                         "created_at": fb.updated_at, **{k: getattr(link, k) for k in ROUTE}}))
                    return replace(fb, created_at=fb.updated_at), True
                except IntegrityError:
                    continue
        raise RuntimeError(f"feedback on {fb.request_id} could not be stored")  # pragma: no cover

    # -- the loop's reads (the keel_feedback DAG, the gateway's posteriors) --------------------

    def feedback(self, since: float | None = None) -> list[dict[str, Any]]:
        """Every feedback row (updated since `since`), with the request's route; comments are scrubbed."""
        q = select(FEEDBACK).order_by(FEEDBACK.c.updated_at)
        if since is not None:
            q = q.where(FEEDBACK.c.updated_at >= since)
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def rated_exchanges(self, now: float, min_score: float = 0.5) -> list[dict[str, Any]]:
        """Kept exchanges not yet expired that someone rated well or corrected, with their feedback
        (one row per feedback: a request rated by two keys comes twice)."""
        q = (select(EXCHANGES, FEEDBACK.c.key_id, FEEDBACK.c.score, FEEDBACK.c.rating, FEEDBACK.c.correction,
                    FEEDBACK.c.target, FEEDBACK.c.prompt, FEEDBACK.c.prompt_version, FEEDBACK.c.updated_at)
             .join(FEEDBACK, and_(FEEDBACK.c.request_id == EXCHANGES.c.request_id,
                                  FEEDBACK.c.tenant == EXCHANGES.c.tenant))
             .where(EXCHANGES.c.expires_at > now,
                    or_(FEEDBACK.c.score >= min_score, FEEDBACK.c.correction.is_not(None)))
             .order_by(EXCHANGES.c.created_at, EXCHANGES.c.request_id, FEEDBACK.c.key_id))
        with self.engine.connect() as c:
            return [{**r, "messages": json.loads(r["messages"])} for r in c.execute(q).mappings()]

    def totals(self) -> dict[tuple[str, int], Arm]:
        """Feedback per prompt variant, scores summed (successes) with their complements (failures): the
        bandit's evidence."""
        q = (select(FEEDBACK.c.prompt, FEEDBACK.c.prompt_version, func.sum(FEEDBACK.c.score),
                    func.sum(1.0 - FEEDBACK.c.score))
             .where(FEEDBACK.c.prompt.is_not(None), FEEDBACK.c.prompt_version.is_not(None))
             .group_by(FEEDBACK.c.prompt, FEEDBACK.c.prompt_version))
        with self.engine.connect() as c:
            return {(p, int(v)): Arm(float(s or 0), float(f or 0)) for p, v, s, f in c.execute(q)}

    def expire(self, now: float, window_s: float, retention_s: float | None = None) -> dict[str, int]:
        """Delete what has expired: kept exchanges past their expires_at, request rows older than the window,
        and (given `retention_s`) the words of feedback last changed longer ago: its comment and correction,
        user text even scrubbed, go with the exchanges; its score stays for the aggregates."""
        with self.engine.begin() as c:
            gone = c.execute(delete(EXCHANGES).where(EXCHANGES.c.expires_at <= now)).rowcount
            old = c.execute(delete(REQUESTS).where(REQUESTS.c.created_at <= now - window_s)).rowcount
            words = 0
            if retention_s is not None:
                words = c.execute(update(FEEDBACK).where(
                    FEEDBACK.c.updated_at <= now - retention_s,
                    or_(FEEDBACK.c.comment.is_not(None), FEEDBACK.c.correction.is_not(None)),
                ).values(comment=None, correction=None)).rowcount
        return {"exchanges": int(gone or 0), "requests": int(old or 0), "words": int(words or 0)}

    def count(self, table: str) -> int:
        t = {"requests": REQUESTS, "feedback": FEEDBACK, "exchanges": EXCHANGES}[table]
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(t)).scalar() or 0)

    # -- usage (GET /v1/usage) ------------------------------------------------------------------

    def usage(self, tenant: str, start: float, end: float, bucket_s: int) -> list[dict[str, Any]]:
        """The tenant's answers created in [start, end), per bucket of bucket_s seconds (from the epoch) and
        answering target: requests, tokens and cost summed (usage not reported counts as none)."""
        if bucket_s <= 0:
            raise ValueError(f"bucket_s must be positive, not {bucket_s}")
        bucket = (cast(func.floor(REQUESTS.c.created_at / bucket_s), BigInteger) * bucket_s).label("start_time")
        q = (select(bucket, REQUESTS.c.target, func.count().label("requests"),
                    func.coalesce(func.sum(REQUESTS.c.prompt_tokens), 0).label("prompt_tokens"),
                    func.coalesce(func.sum(REQUESTS.c.completion_tokens), 0).label("completion_tokens"),
                    func.coalesce(func.sum(REQUESTS.c.cost), 0.0).label("cost"))
             .where(REQUESTS.c.tenant == tenant, REQUESTS.c.created_at >= start, REQUESTS.c.created_at < end)
             .group_by(bucket, REQUESTS.c.target))
        with self.engine.connect() as c:
            return sorted((_usage_row(r) for r in c.execute(q).mappings()), key=_usage_order)


USAGE_SUMS = ("requests", "prompt_tokens", "completion_tokens", "cost")


def _usage_row(r: Mapping[Any, Any]) -> dict[str, Any]:
    return {"start_time": int(r["start_time"]), "target": r["target"], "requests": int(r["requests"]),
            "prompt_tokens": int(r["prompt_tokens"]), "completion_tokens": int(r["completion_tokens"]),
            "cost": float(r["cost"])}


def _usage_order(row: Mapping[str, Any]) -> tuple[int, bool, str]:
    """By bucket, then target (no target first)."""
    return row["start_time"], row["target"] is not None, row["target"] or ""


def _add_missing_columns(engine: Engine, table: Table) -> None:
    """The minimal migration: a table made by an earlier version gets the nullable columns it lacks (its
    old rows read None there). Two replicas adding one column: the loser fails and retries, finding it."""
    have = {c["name"] for c in inspect(engine).get_columns(table.name)}
    missing = [c for c in table.columns if c.name not in have]
    if not missing:
        return
    quote = engine.dialect.identifier_preparer.quote
    with engine.begin() as c:
        for col in missing:
            if not col.nullable:  # old rows would have no value: that needs a real migration
                raise RuntimeError(f"{table.name}.{col.name} is missing and cannot be added as NOT NULL")
            c.exec_driver_sql(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(col.name)} "
                              f"{col.type.compile(dialect=engine.dialect)}")


def _sqlite_pragmas(conn: Any, _record: Any) -> None:
    # WAL: the replicas, `keel` and the DAG's tasks read while one writes; a writer waits for another.
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def database_url(settings: KeelSettings, zone: str) -> str:
    """The zone's database: its configured URL, else a SQLite file in the zone's local storage (made
    0600, in a 0700 folder: it holds scrubbed comments and pseudonymized exchanges). A zone stored on
    S3 without a URL fails closed: a local file would keep its feedback outside the zone."""
    from keel.storage import ZoneStorage

    if (url := settings.feedback.databases.get(zone)) is not None:
        return url.get_secret_value()
    storage = ZoneStorage.for_zone(settings, zone)
    if not storage.is_local:
        raise ConfigError(f"zone {zone!r} is stored on S3 ({storage.root_uri}): its feedback needs a database in "
                          f"the zone; set KEEL_FEEDBACK__DATABASES='{{\"{zone}\": \"postgresql+psycopg://...\"}}'")
    path = Path(storage.path("feedback", "feedback.db"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    return f"sqlite:///{path}"


def open_zone(settings: KeelSettings, zone: str) -> ZoneStore:
    return ZoneStore(zone, database_url(settings, zone))


GATHER_S = 0.1  # how long the writer gathers after a first item: sequential answers share a transaction
MAX_BATCH = 500  # items in one batch at most

_Row: TypeAlias = tuple[str, Link, Exchange | None]  # a zone, its request row, the kept exchange


class Stores:
    """Every zone's store, and the gateway's writer: request rows and exchanges are queued by `submit`
    (on the event loop: no I/O) and written by a BatchWriter, one transaction per zone for what arrives
    within `gather_s` of a batch's first item (`flush` and `close` cut the wait short). A batch that
    cannot be written is logged and counted (`on_error`), never retried forever; a full queue refuses
    at once."""

    def __init__(self, settings: KeelSettings, scrub: Callable[[list[str]], list[str]] | None = None,
                 on_error: Callable[[Exception], None] | None = None, max_queued: int = 10_000,
                 gather_s: float = GATHER_S, max_batch: int = MAX_BATCH) -> None:
        self.zones: dict[str, ZoneStore] = {}
        try:
            for z in settings.policy.zones:
                self.zones[z] = open_zone(settings, z)
        except Exception:
            for store in self.zones.values():
                store.close()
            raise
        self.scrub, self.on_error, self.gather_s = scrub, on_error, gather_s
        self._writer = BatchWriter(self._write, name="keel-feedback-writer", max_queued=max_queued,
                                   gather_s=gather_s, max_batch=max_batch)

    def submit(self, zone: str, link: Link, exchange: Exchange | None = None) -> None:
        """Queue a request row (and its exchange); raises queue.Full when the writer is far behind or gone."""
        self._writer.submit((zone, link, exchange))

    def flush(self) -> None:
        """Wait until everything queued before now is written (a feedback on a fresh answer finds it)."""
        self._writer.flush()

    def find(self, request_id: str, tenant: str) -> tuple[ZoneStore, Link] | None:
        """The request of this tenant with this id, in whichever zone it went to."""
        for store in self.zones.values():
            if (link := store.link(request_id, tenant)) is not None:
                return store, link
        return None

    def find_recent(self, request_id: str, tenant: str) -> tuple[ZoneStore, Link] | None:
        """`find` for an answer that may have been given a moment ago: by this replica (flushed first) or
        by another, whose writer may hold it for its gather window: a miss looks again until two windows
        have passed (an unknown id's answer waits as long)."""
        self.flush()
        deadline = time.monotonic() + 2 * self.gather_s
        while (found := self.find(request_id, tenant)) is None and time.monotonic() < deadline:
            time.sleep(self.gather_s / 4)
        return found

    def usage(self, tenant: str, start: float, end: float, bucket_s: int) -> list[dict[str, Any]]:
        """Every zone's `ZoneStore.usage` of the tenant, a bucket and target found in two zones summed."""
        out: dict[tuple[int, str | None], dict[str, Any]] = {}
        for store in self.zones.values():
            for row in store.usage(tenant, start, end, bucket_s):
                if (seen := out.setdefault((row["start_time"], row["target"]), row)) is not row:
                    seen.update({k: seen[k] + row[k] for k in USAGE_SUMS})
        return sorted(out.values(), key=_usage_order)

    def totals(self) -> dict[tuple[str, int], Arm]:
        """Every zone's feedback per prompt variant, summed: counts and scores only, no text, cross zones."""
        out: dict[tuple[str, int], Arm] = defaultdict(Arm)
        for store in self.zones.values():
            for k, arm in store.totals().items():
                out[k] = Arm(out[k].successes + arm.successes, out[k].failures + arm.failures)
        return dict(out)

    def close(self) -> None:
        self._writer.close()
        for store in self.zones.values():
            store.close()

    def _write(self, rows: list[_Row]) -> None:
        try:
            by_zone: dict[str, tuple[list[Link], list[Exchange]]] = defaultdict(lambda: ([], []))
            for zone, link, exchange in rows:
                by_zone[zone][0].append(link)
                if exchange is not None and (kept := self._kept(exchange)) is not None:
                    by_zone[zone][1].append(kept)
            for zone, (links, exchanges) in by_zone.items():
                self.zones[zone].add(links, exchanges)
        except Exception as e:  # counted and logged: the requests were answered already
            log.exception("feedback links of %d request(s) could not be written", len(rows))
            if self.on_error is not None:
                self.on_error(e)

    def _kept(self, x: Exchange) -> Exchange | None:
        """The exchange as stored: scrubbed here when it went to its model as sent. Without a scrubber it
        is not kept (fail closed): the caller's values never reach the store."""
        if x.pseudonymized:
            return x
        if self.scrub is None:
            log.warning("exchange of request %s not kept: it was not pseudonymized and no scrubber is loaded",
                        x.request_id)
            return None
        slots = _text_slots(x.messages)
        clean = self.scrub([t for _, t in slots] + [x.answer])
        messages = [dict(m) for m in x.messages]
        for (i, _), text in zip(slots, clean, strict=False):
            messages[i]["content"] = text
        return replace(x, messages=messages, answer=clean[-1], pseudonymized=True)


def _text_slots(messages: Sequence[Mapping[str, Any]]) -> list[tuple[int, str]]:
    """(index, text) of each message whose content is text; content parts are joined to their text."""
    from keel.messages import text_of

    return [(i, text_of(m.get("content"))) for i, m in enumerate(messages)]
