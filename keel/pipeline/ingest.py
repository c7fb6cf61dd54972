"""Ingest: landing locations -> the zone's raw snapshot (every current document, as raw bytes).

The raw snapshot always holds the whole current set of documents of the zone's sources, so a
document deleted at its source disappears downstream on the next run (its tombstone is listed
in the manifest), and a changed document (new content, new id) replaces its old version.
The run's idempotency key comes from the landing listing (path, size, mtime of every file):
the same listing is the same run.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import astuple, dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from keel.errors import ResidencyError, SourceNotFoundError
from keel.pipeline.documents import METADATA, RawRecord, format_of, split_file
from keel.settings import KeelSettings, LandingSource

RAW_SCHEMA = pa.schema([*METADATA, ("format", pa.string()), ("payload", pa.binary())])


@dataclass(frozen=True)
class LandingFile:
    source_name: str
    uri: str
    size: int
    mtime_ns: int


def zone_sources(settings: KeelSettings, zone: str) -> list[LandingSource]:
    if zone not in settings.policy.zones:
        raise ResidencyError(f"unknown zone {zone!r}")
    return [s for s in settings.pipeline.sources if s.zone == zone]


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    fs, path = pafs.FileSystem.from_uri(uri if "://" in uri else "file://" + uri)
    return fs, str(path)


def list_landing(settings: KeelSettings, zone: str) -> list[LandingFile]:
    """Every file under the zone's landing sources, sorted; a missing source folder is an error."""
    files = []
    for src in zone_sources(settings, zone):
        root = settings.resolve(src.uri)
        fs, base = _fs(root)
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            raise SourceNotFoundError(f"landing source {src.name!r}: {root} is not a folder")
        scheme = "file://" if "://" not in root else root.split("://", 1)[0] + "://"
        for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            if info.type == pafs.FileType.File and not posixpath.basename(info.path).startswith("."):
                files.append(LandingFile(src.name, scheme + info.path, info.size, info.mtime_ns or 0))
    return sorted(files, key=lambda f: f.uri)


def listing_hash(settings: KeelSettings, zone: str, files: list[LandingFile]) -> str:
    h = hashlib.sha256()
    for src in zone_sources(settings, zone):
        h.update(repr((src.name, settings.resolve(src.uri), src.data_class.value)).encode())
    for f in files:
        h.update(repr(astuple(f)).encode())
    return h.hexdigest()


def read_file_records(f: LandingFile) -> list[RawRecord]:
    """One landing file's raw records; an unsupported type becomes one record the scrub stage quarantines."""
    fs, path = _fs(f.uri)
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    if format_of(f.uri) is None:
        return [RawRecord(f.uri, "unsupported", data)]
    return split_file(f.uri, data)


def raw_rows(
    records: list[tuple[LandingFile, RawRecord]],
    settings: KeelSettings,
    zone: str,
    previous_times: dict[str, str],
    ingest_time: str,
) -> pa.Table:
    """The raw table; a document keeps the ingest time of its first ingest."""
    classes = {s.name: s.data_class.value for s in zone_sources(settings, zone)}
    rows: dict[str, dict[str, object]] = {}
    for f, rec in records:
        doc_id = rec.doc_id
        if doc_id in rows:  # the same bytes at the same source twice cannot happen; be safe anyway
            continue
        rows[doc_id] = {"doc_id": doc_id, "source": rec.source, "source_name": f.source_name, "zone": zone,
                        "data_class": classes[f.source_name], "ingest_time": previous_times.get(doc_id, ingest_time),
                        "format": rec.format, "payload": rec.payload}
    return pa.Table.from_pylist(list(rows.values()), schema=RAW_SCHEMA)


def changes(previous: pa.Table | None, current: pa.Table) -> dict[str, object]:
    """Added, replaced, unchanged and removed (tombstoned) documents, by source."""
    prev = dict(zip(previous["source"].to_pylist(), previous["doc_id"].to_pylist(), strict=True)) if previous else {}
    cur = dict(zip(current["source"].to_pylist(), current["doc_id"].to_pylist(), strict=True))
    added = [s for s in cur if s not in prev]
    replaced = [s for s in cur if s in prev and prev[s] != cur[s]]
    removed = sorted(s for s in prev if s not in cur)
    return {
        "added": len(added),
        "replaced": len(replaced),
        "unchanged": len(cur) - len(added) - len(replaced),
        "removed": len(removed),
        "tombstones": removed,
    }
