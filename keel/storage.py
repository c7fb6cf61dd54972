"""Zone storage: every byte a batch job reads or writes goes through the storage of one zone.

A zone's storage root is a local folder or an `s3://bucket/prefix` (policy.zones.<zone>.storage).
`ZoneStorage` hands out paths under that root only: a path that escapes it, or a URI of
another root, raises `keel.errors.ResidencyError`, so residency is an error at the point of access and
never a warning in a log. pyarrow's filesystem layer serves both local disks and S3; LanceDB
and Parquet take the same URIs.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from keel.errors import ResidencyError
from keel.policy import Zone
from keel.settings import KeelSettings


@dataclass(frozen=True)
class ZoneStorage:
    zone: str
    root_uri: str  # absolute: file:///... or s3://bucket/prefix
    s3_endpoint: str | None = None
    region: str | None = None

    @classmethod
    def for_zone(cls, settings: KeelSettings, zone: str) -> ZoneStorage:
        if zone not in settings.policy.zones:
            raise ResidencyError(f"unknown zone {zone!r}; configured zones: {sorted(settings.policy.zones)}")
        z: Zone = settings.policy.zones[zone]
        root = settings.resolve(z.storage)
        return cls(zone, root.rstrip("/") if "://" in root else "file://" + root.rstrip("/"), z.s3_endpoint, z.region)

    # -- paths --------------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return self.root_uri.startswith("file://")

    @property
    def fs(self) -> pafs.FileSystem:
        if self.is_local:
            return pafs.LocalFileSystem()
        return pafs.S3FileSystem(region=self.region, endpoint_override=self.s3_endpoint)

    def _root_path(self) -> str:
        return self.root_uri.removeprefix("file://") if self.is_local else self.root_uri.removeprefix("s3://")

    def path(self, *parts: str) -> str:
        """A filesystem path (for `self.fs`) under the zone root; escaping the root is refused."""
        rel = posixpath.normpath(posixpath.join(*parts)) if parts else "."
        if rel.startswith("../") or rel == ".." or rel.startswith("/"):
            raise ResidencyError(f"zone {self.zone}: path {posixpath.join(*parts)!r} escapes the zone's storage")
        root = self._root_path().rstrip("/")
        return root if rel == "." else f"{root}/{rel}"

    def audit_root(self) -> Path:
        """The zone's audit trail folder on local storage (keel.audit.roots spools an s3:// zone's trail)."""
        if not self.is_local:
            raise ResidencyError(f"zone {self.zone}: the audit trail needs local storage for now, not {self.root_uri}")
        return Path(self.path("audit"))

    def uri(self, *parts: str) -> str:
        """The same location as a URI (for Airflow assets, LanceDB and logs)."""
        p = self.path(*parts)
        return f"file://{p}" if self.is_local else f"s3://{p}"

    def check(self, uri: str) -> str:
        """Refuse a URI outside this zone's root; return its filesystem path."""
        root = self.root_uri.rstrip("/")
        if uri != root and not uri.startswith(root + "/"):
            raise ResidencyError(f"zone {self.zone}: {uri} is outside the zone's storage {root}")
        return self.path(uri[len(root) :].lstrip("/")) if uri != root else self.path()

    # -- small file helpers -------------------------------------------------------------------

    def exists(self, *parts: str) -> bool:
        return bool(self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return bytes(f.read())

    def write_bytes(self, data: bytes, *parts: str) -> None:
        path = self.path(*parts)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def listdir(self, *parts: str) -> list[str]:
        """Names directly under a folder (empty if it does not exist)."""
        info = self.fs.get_file_info(pafs.FileSelector(self.path(*parts), allow_not_found=True))
        return sorted(posixpath.basename(i.path) for i in info)

    def delete_dir(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.delete_dir(self.path(*parts))
