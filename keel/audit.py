"""The tamper-evident audit trail: hash-chained records per writer, sealed by signed digests.

Every writer (a gateway replica, a batch job) keeps its own chain: each record carries the hash of
the one before it, so an edited, deleted, reordered or inserted record breaks the chain at that
point. Anyone who can write the files could recompute every later hash, so the chain is sealed in
segments by digests, in the spirit of AWS CloudTrail's digest files: a digest names its segment's
last record and the segment file's SHA-256, links to the previous digest, and is signed with an
HMAC key the writers hold (settings) and the files do not. An edit with every later hash
recomputed, a truncated sealed tail, or a forged digest fails verification.

Why a chain per writer rather than one writer actor: several Serve replicas write at once, and a
single writer would add a cross-process hop to every request and one point of failure to the audit
path; per-writer chains need no coordination, and the reader merges them by time.

Deleting a writer's whole folder, or its newest sealed segments, leaves each remaining chain intact,
so the zone keeps one more signed file: an index of its writers and each one's last sealed digest,
updated under a file lock at every seal. Verification finds every writer the index names, sealed at
least that far.

What stays exposed, honestly: records not yet sealed (at most `seal_after_s` of a live writer's; a
writer killed before sealing leaves an orphan that the next writer to open the zone seals), and a
rollback of the whole zone's folder to an older copy, which only an anchor outside the zone
(write-once storage) could catch.

Layout under <root>/:
    writers.json                   the signed index: writer -> its last sealed segment and digest
    <writer>/records-00000000.jsonl  a segment: one record per line, seq continuing across segments
    <writer>/digest-00000000.json    seals that segment, naming the id of the key that signed it
    <writer>/.lock                 held (flock) while the writer is open: a free lock means a dead writer
The newest segment is open (chained, not yet signed) until it is sealed: every `seal_every` records,
`seal_after_s` after its first record (by Trails' background thread even if no record follows), and
when the writer closes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keel.errors import ServiceUnavailableError
from keel.secret_keys import DEV_AUDIT_KEY_ID, KeySet, key_id

logger = logging.getLogger("keel.audit")

GENESIS = "0" * 64
_SEGMENT = re.compile(r"^records-(\d{8})\.jsonl$")
INDEX = "writers.json"


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def encode(record: dict[str, Any]) -> tuple[str, str]:
    """A record (without its hash) as its line in a segment, and its hash: serialized once, the hash
    taken over those bytes and appended last (verification re-serializes, so key order is free)."""
    body = canonical(record)
    h = hashlib.sha256(body).hexdigest()
    return f'{body[:-1].decode()},"hash":"{h}"}}\n', h


def sign(digest: dict[str, Any], key: bytes) -> str:
    return hmac.new(key, canonical({k: v for k, v in digest.items() if k != "signature"}), hashlib.sha256).hexdigest()


def signed(doc: dict[str, Any], key: bytes) -> dict[str, Any]:
    """`doc` with the id of `key` and its signature."""
    out = {**doc, "key_id": key_id(key)}
    out["signature"] = sign(out, key)
    return out


def check_signature(doc: dict[str, Any], keys: dict[str, bytes]) -> tuple[str | None, str | None]:
    """(the id of the key that signed `doc`, None) or (None, why not). A digest from before key ids
    names none: every known key is tried."""
    named = doc.get("key_id")
    candidates = [named] if named else list(keys)
    for kid in candidates:
        if kid in keys and hmac.compare_digest(str(doc.get("signature", "")), sign(doc, keys[kid])):
            return kid, None
    if named and named not in keys:
        return None, f"signed with key {named}, which is not among the known keys (retired and forgotten, or forged)"
    return None, "signature invalid (forged or altered, or the wrong key)"


def digest_hash(digest: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(digest)).hexdigest()


def segment_file(wdir: Path, n: int) -> Path:
    return wdir / f"records-{n:08d}.jsonl"


def digest_file(wdir: Path, n: int) -> Path:
    return wdir / f"digest-{n:08d}.json"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class WriterBusyError(RuntimeError):
    """Another open writer holds this chain: two writers on one chain would break it."""


def _try_lock(path: Path, flags: int = os.O_RDWR | os.O_CREAT) -> int | None:
    """An fd holding an exclusive flock on `path`, or None if another open file holds it. The kernel
    drops the lock when its process dies, however it dies, which is what tells a dead writer."""
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def is_live(wdir: Path) -> bool:
    """Whether an open writer holds `wdir`'s chain now (on this machine: the trail folder is local)."""
    if not (wdir / ".lock").exists():
        return False
    fd = _try_lock(wdir / ".lock", os.O_RDONLY)  # a verifier may only read the trail
    if fd is None:
        return True
    os.close(fd)
    return False


@contextlib.contextmanager
def _index_locked(root: Path) -> Iterator[dict[str, Any]]:
    """The zone's writer index (unsigned fields), locked against the other writers for the duration;
    what the block leaves in it is signed and written back atomically by the caller's `_write_index`."""
    fd = os.open(root / ".writers.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = root / INDEX
        yield json.loads(path.read_text()) if path.exists() else _adopted(root)
    finally:
        os.close(fd)


def _adopted(root: Path) -> dict[str, Any]:
    """A first index for a zone whose trail predates it: each writer's last digest as found."""
    writers = {}
    for wdir in sorted(p for p in root.iterdir() if p.is_dir()):
        digests = sorted(wdir.glob("digest-*.json"))
        if digests:
            d = json.loads(digests[-1].read_text())
            writers[wdir.name] = {"segment": d["segment"], "last_seq": d["last_seq"], "digest": digest_hash(d)}
    return {"writers": writers}


def _write_index(root: Path, index: dict[str, Any], key: bytes) -> None:
    doc = signed({"writers": index["writers"], "updated": _now()}, key)
    tmp = root / f".{INDEX}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, root / INDEX)


class AuditWriter:
    """Appends records to one writer's chain; thread-safe; resumes an existing chain on open."""

    def __init__(self, root: Path, writer: str, key: bytes, seal_every: int = 1000, seal_after_s: float = 60.0) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", writer):
            raise ValueError(f"audit writer name {writer!r}: letters, digits, '_', '.', '-' only")
        self.root, self.dir = Path(root), Path(root) / writer
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = _try_lock(self.dir / ".lock")
        if lock is None:
            raise WriterBusyError(f"audit writer {writer} is already open in {root}")
        self._held = lock
        self.writer, self.key = writer, key
        self.seal_every, self.seal_after_s = seal_every, seal_after_s
        self._lock = threading.Lock()
        with _index_locked(self.root) as index:  # named before its first record: a deleted folder shows
            if writer not in index["writers"]:
                index["writers"][writer] = {"segment": -1, "last_seq": -1, "digest": GENESIS}
                _write_index(self.root, index, key)
        segments = sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _SEGMENT.match(p.name)))
        self.segment = segments[-1] if segments else 0
        self.seq, self.prev, self.in_segment = 0, GENESIS, 0
        self.prev_digest = GENESIS
        if segments:
            self._resume()
        self._opened = time.monotonic()
        self._file = open(self._records(self.segment), "a", encoding="utf-8")  # noqa: SIM115 - lives with the writer

    def _records(self, n: int) -> Path:
        return segment_file(self.dir, n)

    def _digest(self, n: int) -> Path:
        return digest_file(self.dir, n)

    def _resume(self) -> None:
        if self.segment > 0 or self._digest(self.segment).exists():
            last_sealed = self.segment if self._digest(self.segment).exists() else self.segment - 1
            d = json.loads(self._digest(last_sealed).read_text())
            self.seq, self.prev = d["last_seq"] + 1, d["last_hash"]
            self.prev_digest = digest_hash(d)
            if last_sealed == self.segment:  # the newest segment is sealed: start the next
                self.segment += 1
                return
        path = self._records(self.segment)
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):  # a line torn by a crash was never acknowledged: drop it
            data = data[: data.rfind(b"\n") + 1]
            path.write_bytes(data)
        for line in data.decode("utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                self.seq, self.prev, self.in_segment = rec["seq"] + 1, rec["hash"], self.in_segment + 1

    def append(self, kind: str, /, *, ts: str | None = None, **fields: Any) -> dict[str, Any]:
        """Chain and write one record; returns it (with its seq and hash). `ts` defaults to now; a
        queued record passes the time it was submitted."""
        with self._lock:
            rec = {"seq": self.seq, "ts": ts or _now(), "writer": self.writer, "kind": kind, **fields,
                   "prev": self.prev}
            line, rec["hash"] = encode(rec)
            if self.in_segment == 0:  # seal_after_s bounds how long a record waits unsigned, not idle time
                self._opened = time.monotonic()
            self._file.write(line)
            self._file.flush()
            self.seq, self.prev, self.in_segment = self.seq + 1, rec["hash"], self.in_segment + 1
            if self.in_segment >= self.seal_every or time.monotonic() - self._opened >= self.seal_after_s:
                self._seal()
            return rec

    def seal_if_due(self) -> None:
        """Seal an open segment whose first record is `seal_after_s` old, though no record followed."""
        with self._lock:
            if self.in_segment and time.monotonic() - self._opened >= self.seal_after_s:
                self._seal()

    def _seal(self) -> None:
        if self.in_segment == 0:
            return
        self._file.flush()
        os.fsync(self._file.fileno())  # the sealed bytes are on disk before the digest that names them
        self._file.close()
        data = self._records(self.segment).read_bytes()
        d = signed({"writer": self.writer, "segment": self.segment, "first_seq": self.seq - self.in_segment,
                    "last_seq": self.seq - 1, "last_hash": self.prev,
                    "records_sha256": hashlib.sha256(data).hexdigest(), "prev_digest": self.prev_digest,
                    "ts": _now()}, self.key)
        tmp = self._digest(self.segment).with_suffix(".tmp")
        tmp.write_text(json.dumps(d, indent=1))
        os.replace(tmp, self._digest(self.segment))
        self.prev_digest = digest_hash(d)
        # The digest is on disk before the index names it: a crash in between leaves the index one
        # seal behind, which verification accepts (it checks "at least that far").
        with _index_locked(self.root) as index:
            index["writers"][self.writer] = {"segment": self.segment, "last_seq": d["last_seq"],
                                             "digest": self.prev_digest}
            _write_index(self.root, index, self.key)
        self.segment, self.in_segment, self._opened = self.segment + 1, 0, time.monotonic()
        self._file = open(self._records(self.segment), "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        with self._lock:
            if self._held < 0:
                return
            self._seal()
            self._file.close()
            os.close(self._held)  # releases the chain: it reads as a dead writer from now on
            self._held = -1


def seal_orphans(root: Path, key: bytes) -> list[str]:
    """Seal the open segments of dead writers (a replica killed before it could seal), so their records
    are signed too; returns those writers. A writer still open holds its lock and is left alone."""
    root, sealed = Path(root), []
    for wdir in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        segments = sorted(int(m.group(1)) for p in wdir.iterdir() if (m := _SEGMENT.match(p.name)))
        open_segment = segment_file(wdir, segments[-1]) if segments else None
        if open_segment is None or digest_file(wdir, segments[-1]).exists() or not open_segment.stat().st_size:
            continue
        try:
            AuditWriter(root, wdir.name, key).close()  # resumes the chain and seals its open segment
        except WriterBusyError:
            continue
        sealed.append(wdir.name)
    return sealed


@dataclass
class Problem:
    writer: str
    where: str  # "record 17 (records-00000001.jsonl line 3)" or "digest-00000002.json"
    what: str

    def __str__(self) -> str:
        return f"{self.writer}: {self.where}: {self.what}"


@dataclass
class Report:
    records: dict[str, int] = field(default_factory=dict)  # per writer
    sealed: dict[str, int] = field(default_factory=dict)  # records covered by a valid digest
    live: set[str] = field(default_factory=set)  # writers open now: their unsigned records are sealed soon
    dev_signed: dict[str, int] = field(default_factory=dict)  # digests signed with the development constant
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def unsigned(self, live: bool) -> dict[str, int]:
        """Records not (yet) covered by a digest, of the live or of the dead writers."""
        return {w: n - self.sealed[w] for w, n in self.records.items()
                if n > self.sealed[w] and (w in self.live) == live}


def verify(root: Path, keys: KeySet | bytes) -> Report:
    """Check every writer's chain and digests under `root` against the zone's signed index of writers;
    the first problem per writer is reported (after a break, everything later in that chain is suspect).
    `keys`: the settings' audit keys (the active, the retired and the old development constant), or one key."""
    known = keys.verifying() if isinstance(keys, KeySet) else {key_id(keys): keys}
    report, root = Report(), Path(root)
    wdirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []
    sealed_digests = {}
    for wdir in wdirs:
        problem, sealed_digests[wdir.name] = _verify_writer(wdir, known, report)
        if problem:
            report.problems.append(problem)
        if is_live(wdir):
            report.live.add(wdir.name)
    report.problems += _check_index(root, known, sealed_digests)
    return report


def _check_index(root: Path, keys: dict[str, bytes], sealed: dict[str, list[str]]) -> list[Problem]:
    """Every writer the index names is there, sealed at least as far as the index says; every writer
    with sealed records is in the index."""
    path = root / INDEX
    if not path.exists():
        return [Problem("(zone)", INDEX, "the signed index of writers is missing (deleted?)")] if any(
            sealed.values()) else []
    index = json.loads(path.read_text())
    kid, why = check_signature(index, keys)
    if kid is None:
        return [Problem("(zone)", INDEX, why or "")]
    problems = []
    for w, entry in sorted(index["writers"].items()):
        if w not in sealed:
            problems.append(Problem(w, "(folder)", f"the writer's folder is missing (deleted?): the index has it "
                                                   f"sealed through record {entry['last_seq']}"))
        elif entry["segment"] >= 0 and (len(sealed[w]) <= entry["segment"]
                                        or sealed[w][entry["segment"]] != entry["digest"]):
            problems.append(Problem(w, digest_file(Path(w), entry["segment"]).name,
                                    f"the index has this writer sealed through record {entry['last_seq']} by this "
                                    f"digest, which is missing or another: sealed records were deleted or replaced"))
    for w in sorted(set(sealed) - set(index["writers"])):
        if sealed[w]:
            problems.append(Problem(w, "(folder)", "sealed records of a writer the signed index does not name "
                                                   "(planted, or the index was rolled back)"))
    return problems


def _verify_writer(wdir: Path, keys: dict[str, bytes], report: Report) -> tuple[Problem | None, list[str]]:
    """The first problem of one writer's chain, and the hashes of its valid digests in segment order."""
    w = wdir.name
    report.records[w], report.sealed[w] = 0, 0
    segments = sorted(int(m.group(1)) for p in wdir.iterdir() if (m := _SEGMENT.match(p.name)))
    digests = sorted(int(p.stem.split("-")[1]) for p in wdir.glob("digest-*.json"))
    expected_seq, prev, prev_digest = 0, GENESIS, GENESIS
    sealed: list[str] = []
    last = max([*segments, *digests], default=-1)
    for n in range(last + 1):
        seg, dig = segment_file(wdir, n), digest_file(wdir, n)
        if not seg.exists():
            return Problem(w, seg.name, "segment missing (deleted?)"), sealed
        first_seq = expected_seq
        for lineno, line in enumerate(seg.read_text(encoding="utf-8").splitlines(), 1):
            where = f"record {expected_seq} ({seg.name} line {lineno})"
            try:
                rec = json.loads(line)
            except ValueError:
                return Problem(w, where, "unreadable line"), sealed
            if rec.get("seq") != expected_seq:
                return Problem(w, where, f"found seq {rec.get('seq')}: a record was deleted, inserted or "
                                         f"reordered"), sealed
            if rec.get("prev") != prev:
                return Problem(w, where, "does not chain to the record before it"), sealed
            if rec.get("hash") != record_hash(rec):
                return Problem(w, where, "its content does not match its hash (edited)"), sealed
            prev, expected_seq = rec["hash"], expected_seq + 1
            report.records[w] += 1
        if not dig.exists():
            if n != last:
                return Problem(w, dig.name, "digest missing for a segment that later ones follow (deleted?)"), sealed
            return None, sealed  # the open segment: chained, not yet sealed
        d = json.loads(dig.read_text())
        kid, why = check_signature(d, keys)
        if kid is None:
            return Problem(w, dig.name, why or ""), sealed
        if kid == DEV_AUDIT_KEY_ID:
            report.dev_signed[w] = report.dev_signed.get(w, 0) + 1
        if d.get("prev_digest") != prev_digest:
            return Problem(w, dig.name, "does not link to the digest before it"), sealed
        if (d["first_seq"], d["last_seq"], d["last_hash"]) != (first_seq, expected_seq - 1, prev):
            return Problem(w, dig.name, f"seals records {d['first_seq']}..{d['last_seq']} ending in another hash, "
                                        f"the segment holds {first_seq}..{expected_seq - 1}: records were rewritten "
                                        f"or truncated after sealing"), sealed
        if d["records_sha256"] != hashlib.sha256(seg.read_bytes()).hexdigest():
            return Problem(w, dig.name, "segment file changed after sealing"), sealed
        prev_digest = digest_hash(d)
        sealed.append(prev_digest)
        report.sealed[w] = expected_seq
    return None, sealed


class AuditBacklogError(ServiceUnavailableError):
    """Trails.submit refused a record: the background writer is too far behind (or closed)."""

    code = "audit_backlog"


class Trails:
    """One writer's chains in the audit folder of every zone's storage, each opened on first use.

    `append` writes on the caller's thread (batch jobs); `submit` queues the record for one background
    thread that writes records in submission order and seals idle segments, so an event loop never
    waits on the disk. Its failures go to `on_error(exc, request_id)` and the "keel.audit" log."""

    MAX_QUEUED = 100_000

    def __init__(self, settings: Any, writer: str,
                 on_error: Callable[[BaseException, str | None], None] | None = None) -> None:
        self.settings, self.writer, self.on_error = settings, writer, on_error
        self._open: dict[str, AuditWriter] = {}
        self._lock = threading.Lock()
        self._queue: deque[tuple[str, str, str, dict[str, Any]]] = deque()
        self._cond = threading.Condition()  # guards the queue, the counts, _closed and _thread
        self._submitted = self._done = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def roots(self) -> dict[str, Path]:
        return roots(self.settings)

    def append(self, zone: str, kind: str, /, **fields: Any) -> dict[str, Any]:
        with self._lock:
            w = self._open.get(zone)
            if w is None:
                a, key, root = self.settings.audit, self.settings.audit_keys().active, self.roots()[zone]
                for dead in seal_orphans(root, key):
                    logger.info("zone %s: sealed the open segment of dead audit writer %s", zone, dead)
                w = self._open[zone] = AuditWriter(root, self.writer, key, a.seal_every, a.seal_after_s)
        return w.append(kind, **fields)

    def submit(self, zone: str, kind: str, /, **fields: Any) -> None:
        """Queue one record, stamped now, for the background thread; never waits on the disk."""
        with self._cond:
            if self._closed:
                raise AuditBacklogError(f"audit trails of {self.writer} are closed")
            # A full queue means the disk stalled: refuse at once (the caller counts and logs it) rather
            # than block the event loop or drop records silently.
            if len(self._queue) >= self.MAX_QUEUED:
                raise AuditBacklogError(f"{len(self._queue)} audit records waiting to be written")
            self._queue.append((zone, kind, _now(), fields))  # stamped under the lock: ts follows chain order
            self._submitted += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"audit-{self.writer}", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted before the call is written (or reported to on_error);
        False on timeout."""
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def _run(self) -> None:
        tick = min(self.settings.audit.seal_after_s, 1.0)  # wake to seal idle segments without a record
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed, tick)
                batch, self._queue = self._queue, deque()
                closing = self._closed  # close() refuses later submits, so this batch is the last
            for zone, kind, ts, fields in batch:
                try:
                    self.append(zone, kind, ts=ts, **fields)
                except Exception as e:  # noqa: BLE001 - reported, and the thread goes on
                    self._failed(e, fields.get("request_id"))
            with self._lock:
                writers = list(self._open.values())
            for w in writers:
                try:
                    w.seal_if_due()
                except Exception as e:  # noqa: BLE001
                    self._failed(e, None)
            with self._cond:
                self._done += len(batch)
                self._cond.notify_all()
            if closing:
                return

    def _failed(self, e: Exception, request_id: str | None) -> None:
        logger.exception("audit record for request %s could not be written", request_id, exc_info=e)
        if self.on_error is not None:
            try:
                self.on_error(e, request_id)
            except Exception:  # a failing callback must not stop the writer
                logger.exception("audit on_error callback failed")

    def find(self, request_id: str) -> list[dict[str, Any]]:
        self.flush()  # a reader sees the records submitted before it asked
        return sorted((r for root in self.roots().values() for r in find(root, request_id)), key=lambda r: r["ts"])

    def close(self) -> None:
        """Write what is queued, stop the thread, seal and close every writer; safe to call twice."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._lock:
            for w in self._open.values():
                w.close()
            self._open.clear()


def roots(settings: Any) -> dict[str, Path]:
    """Each zone's trail folder: audit/ in the zone's storage. A zone stored on S3 keeps its trail in a
    local spool (<state_dir>/audit-spool/<zone>): chains are appended line by line, which S3 objects
    cannot do, and shipping sealed segments to the bucket is not built yet (records hold no text)."""
    from keel.storage import ZoneStorage

    out = {}
    for zone in settings.policy.zones:
        storage = ZoneStorage.for_zone(settings, zone)
        out[zone] = (storage.audit_root() if storage.is_local
                     else settings.state / "audit-spool" / zone)
    return out


def records(root: Path) -> Iterator[dict[str, Any]]:
    """Every record of every writer (unverified), in no particular order."""
    for seg in sorted(Path(root).glob("*/records-*.jsonl")):
        for line in seg.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield json.loads(line)


def find(root: Path, request_id: str) -> list[dict[str, Any]]:
    """The records of one request, oldest first."""
    return sorted((r for r in records(root) if r.get("request_id") == request_id), key=lambda r: r["ts"])


# -- explaining a record to a person (`keel audit show`) --------------------------------------------


def explain(record: dict[str, Any]) -> str:
    """One record in words: for an interaction, who asked what of which endpoint, where its data could
    go, how the route was chosen (ranked and excluded targets, with reasons), failovers, who answered
    with how many tokens and how fast, and what the guard did. Other kinds list their fields."""
    head = (f"{record.get('kind', 'record')} {record.get('request_id', '')} at {record.get('ts')} "
            f"(writer {record.get('writer')}, record {record.get('seq')})").replace("  ", " ")
    if record.get("kind") != "interaction":
        skip = {"kind", "request_id", "ts", "writer", "seq", "prev", "hash"}
        return "\n".join([head, *(f"  {k}: {_words(v)}" for k, v in record.items() if k not in skip)])
    lines = [head, f"  tenant {record.get('tenant')} asked {record.get('endpoint')} for model {record.get('model')}: "
                   f"status {record.get('status')} after {record.get('latency_ms')} ms"
                   + (f" (first token at {record['ttft_ms']} ms)" if record.get("ttft_ms") is not None else "")]
    lines.append(f"  data class {record.get('data_class') or '(not decided)'}"
                 + (f", recorded in zone {record['zone']}" if record.get("zone") else ""))
    if route := record.get("route"):
        lines.append(f"  route: strategy {route.get('strategy')}, {route.get('reason')}")
        lines.append(f"    ranked: {', '.join(route.get('ranked') or []) or '(none)'}")
        for name, why in (route.get("excluded") or {}).items():
            lines.append(f"    excluded {name}: {_words(why)}")
    else:
        lines.append("  no route: the request ended before routing")
    for f in record.get("failovers") or []:
        detail = {k: v for k, v in f.items() if k not in ("target", "after_chars")}
        lines.append(f"  failover: {f.get('target')} failed ({_words(detail)}) after {f.get('after_chars', 0)} "
                     f"characters of the answer")
    if record.get("target"):
        usage = record.get("usage") or {}
        lines.append(f"  answered by {record['target']}: {usage.get('prompt_tokens', '?')} prompt + "
                     f"{usage.get('completion_tokens', '?')} completion tokens")
    elif "target" in record:
        lines.append("  no target answered")
    if guard := record.get("guard"):
        lines.append(f"  guard: {_guard_words(guard)}")
    return "\n".join(lines)


def _guard_words(guard: dict[str, Any]) -> str:
    found = guard.get("pii_entities") or {}
    parts = [("pseudonymized before the model: " if guard.get("pseudonymized") else "not pseudonymized; PII found: ")
             + (_words(found) if found else "no PII")]
    if redacted := guard.get("output_redacted"):
        parts.append(f"redacted from the answer: {_words(redacted)}")
    if guard.get("toxicity_action"):
        parts.append(f"toxicity {guard.get('toxicity')} ({guard['toxicity_action']})")
    if guard.get("output_error"):
        parts.append("the answer check failed: the rest of the answer was withheld")
    return "; ".join(parts)


def _words(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_words(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_words(v) for v in value)
    return str(value)
