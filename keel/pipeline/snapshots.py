"""Write aside, then commit atomically: how every batch stage makes its output idempotent.

A stage's output for one input is a snapshot, keyed by (stage, input manifest hash, config
version). A run stages its files under `<stage>/_staging/<key>.<attempt>/`, and only a complete
staging folder becomes `<stage>/snapshots/<key>/` (one rename on a local disk; on S3 the files
are copied and the manifest goes last, so a snapshot without `_manifest.json` does not exist).
`<stage>/CURRENT` then names the committed key. So:

* a re-run with the same key finds the committed snapshot and does nothing;
* a run killed mid-write leaves only a staging folder, which the next attempt removes and
  redoes from scratch, giving the same bytes a clean run gives (outputs are deterministic);
* readers never see a half-written snapshot.

Manifests hold no clock times, so the same input gives byte-identical snapshots; timings go to
the run summary instead.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from keel.audit import canonical
from keel.errors import SnapshotNotFoundError
from keel.storage import ZoneStorage

MANIFEST = "_manifest.json"


def manifest_hash(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(manifest)).hexdigest()


def snapshot_key(stage: str, input_hash: str, config_version: str) -> str:
    """The idempotency key of one stage run: same stage, same input, same config -> same key."""
    return hashlib.sha256(f"{stage}\0{input_hash}\0{config_version}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Staging:
    """A private folder a run writes into before it commits."""

    store: SnapshotStore
    key: str
    path: str  # relative to the zone root

    def file(self, name: str) -> str:
        """Filesystem path (for the zone's pyarrow fs) of a file in this staging folder."""
        return self.store.storage.path(self.path, name)

    def write_bytes(self, data: bytes, name: str) -> None:
        self.store.storage.write_bytes(data, self.path, name)


class SnapshotStore:
    def __init__(self, storage: ZoneStorage, stage: str, keep: int = 3) -> None:
        self.storage = storage
        self.stage = stage
        self.keep = keep

    def _snap(self, key: str, *parts: str) -> tuple[str, ...]:
        return (self.stage, "snapshots", key, *parts)

    def uri(self, key: str | None = None) -> str:
        return self.storage.uri(*self._snap(key)) if key else self.storage.uri(self.stage)

    def path(self, key: str, *parts: str) -> str:
        return self.storage.path(*self._snap(key, *parts))

    def committed(self, key: str) -> dict[str, Any] | None:
        """The manifest of snapshot `key`, if it is committed."""
        if not self.storage.exists(*self._snap(key, MANIFEST)):
            return None
        return dict(json.loads(self.read_file(key, MANIFEST)))

    def read_file(self, key: str, name: str) -> bytes:
        """A file of snapshot `key`."""
        return self.storage.read_bytes(*self._snap(key, name))

    def current(self) -> dict[str, Any] | None:
        if not self.storage.exists(self.stage, "CURRENT"):
            return None
        return self.committed(self.storage.read_bytes(self.stage, "CURRENT").decode().strip())

    def resolve(self, key: str | None) -> dict[str, Any]:
        """The manifest of snapshot `key`, or of CURRENT when key is None; missing is an error."""
        manifest = self.committed(key) if key else self.current()
        if manifest is None:
            raise SnapshotNotFoundError(f"zone {self.storage.zone}: no committed {self.stage} snapshot "
                                    f"{key or '(CURRENT)'} in {self.uri()}")
        return manifest

    def begin(self, key: str) -> Staging:
        """A fresh staging folder; leftovers of crashed attempts for any key are removed first.

        One writer per stage and zone at a time: the DAGs run with max_active_runs=1.
        """
        self.storage.delete_dir(self.stage, "_staging")
        path = posixpath.join(self.stage, "_staging", f"{key}.{uuid.uuid4().hex[:8]}")
        self.storage.fs.create_dir(self.storage.path(path), recursive=True)
        return Staging(self, key, path)

    def commit(self, staging: Staging, manifest: dict[str, Any]) -> dict[str, Any]:
        """Seal the staged files with a manifest (file hashes added here) and publish them."""
        fs, storage = self.storage.fs, self.storage
        files = {}
        for info in fs.get_file_info(pafs.FileSelector(storage.path(staging.path), recursive=True)):
            if info.type == pafs.FileType.File:
                name = posixpath.relpath(info.path, storage.path(staging.path))
                files[name] = {"bytes": info.size, "sha256": _sha256(fs, info.path)}
        manifest = {**manifest, "stage": self.stage, "key": staging.key, "zone": storage.zone, "files": files}
        staging.write_bytes(canonical(manifest), MANIFEST)
        existing = self.committed(staging.key)
        if existing is None:
            final = storage.path(*self._snap(staging.key))
            storage.delete_dir(*self._snap(staging.key))  # an uncommitted (manifest-less) S3 leftover
            fs.create_dir(posixpath.dirname(final), recursive=True)
            if storage.is_local:
                fs.move(storage.path(staging.path), final)  # one rename: all or nothing
            else:
                for name in sorted(files):
                    fs.copy_file(staging.file(name), posixpath.join(final, name))
                fs.copy_file(staging.file(MANIFEST), posixpath.join(final, MANIFEST))  # the commit point
                storage.delete_dir(staging.path)
            existing = manifest
        else:
            storage.delete_dir(staging.path)  # someone committed the same key first: same bytes
        self._set_current(staging.key)
        self._prune(staging.key)
        return existing

    def _set_current(self, key: str) -> None:
        tmp = posixpath.join(self.stage, f"_staging_CURRENT.{uuid.uuid4().hex[:8]}")
        self.storage.write_bytes(key.encode() + b"\n", tmp)
        self.storage.fs.move(self.storage.path(tmp), self.storage.path(self.stage, "CURRENT"))

    def _prune(self, current: str) -> None:
        """Keep the newest `keep` snapshots (by commit order of their folders) besides the current one."""
        infos = self.storage.fs.get_file_info(
            pafs.FileSelector(self.storage.path(self.stage, "snapshots"), allow_not_found=True)
        )
        old = sorted((i for i in infos if posixpath.basename(i.path) != current), key=lambda i: i.mtime_ns or 0)
        for info in old[: max(0, len(old) - (self.keep - 1))]:
            self.storage.fs.delete_dir(info.path)


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- Parquet parts -----------------------------------------------------------------------------


def write_parts(staging: Staging, name: str, table: pa.Table, sort_by: str, rows_per_part: int = 50_000) -> int:
    """Write `table` sorted by `sort_by` as `<name>/part-00000.parquet`, ...: the same rows give the same bytes."""
    import pyarrow.parquet as pq

    table = table.sort_by(sort_by) if table.num_rows else table
    fs = staging.store.storage.fs
    fs.create_dir(staging.file(name), recursive=True)
    parts = max(1, -(-table.num_rows // rows_per_part))
    for i in range(parts):
        part = table.slice(i * rows_per_part, rows_per_part)
        pq.write_table(part, staging.file(f"{name}/part-{i:05d}.parquet"), filesystem=fs, compression="zstd")
    return int(table.num_rows)


def read_parts(store: SnapshotStore, manifest: dict[str, Any], name: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of `<name>/part-*.parquet` in a committed snapshot."""
    import pyarrow.parquet as pq

    files = sorted(f for f in manifest["files"] if f.startswith(f"{name}/part-"))
    fs = store.storage.fs
    tables = [pq.read_table(store.path(manifest["key"], f), filesystem=fs, columns=columns) for f in files]
    return pa.concat_tables(tables) if tables else pa.table({})
