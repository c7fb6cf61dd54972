"""A throwaway Postgres server for tests: Debian's server binaries, a cluster in a temp folder, stopped by PID.

initdb and postgres refuse to run as root, so as root they run as the `postgres` user (the folder is
chowned to it). The folder is made directly under the temp dir: pytest's own are 0700 to root, which
the `postgres` user could not enter, and the unix socket's path must stay under 107 characters.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from keel.processes import free_port


@dataclass
class Postgres:
    url: str  # SQLAlchemy: postgresql+psycopg://postgres@127.0.0.1:PORT/postgres
    conninfo: str  # libpq, for psycopg directly
    folder: Path
    proc: subprocess.Popen[bytes]

    def fresh(self, name: str) -> str:
        """The SQLAlchemy URL of a new, empty schema on this server (its connections' search_path): a
        test's own database in all but name, made in a millisecond where CREATE DATABASE takes 0.3 s."""
        with psycopg.connect(self.conninfo, autocommit=True) as c:
            c.execute(f'CREATE SCHEMA "{name}"')  # a test's own name, not input
        return f"{self.url}?options=-csearch_path%3D{name}"

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), then the folder goes."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def server_bin() -> Path:
    """The newest installed server's bin folder (/usr/lib/postgresql/<major>/bin)."""
    found = sorted((p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1)
    if not found:
        raise RuntimeError("no Postgres server under /usr/lib/postgresql/*/bin: "
                           "apt-get install --no-install-recommends postgresql (.ci/run does)")
    return found[-1]


def start(timeout: float = 30) -> Postgres:
    """A new cluster (trust auth: nothing but this machine reaches 127.0.0.1) on a free port; durability
    is off (fsync, full-page writes): a crash loses nothing a test needs."""
    bin_ = server_bin()
    as_user: dict[str, Any] = {}
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("as root, Postgres runs as the `postgres` user, and there is none here") from None
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    folder = Path(tempfile.mkdtemp(prefix="keel-pg-"))
    if as_user:
        os.chown(folder, as_user["user"], as_user["group"])
    data, log = folder / "data", folder / "server.log"
    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
    try:
        subprocess.run([str(bin_ / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--locale=C", "--no-sync"],
                       cwd=folder, env=env, capture_output=True, check=True, timeout=timeout, **as_user)
    except subprocess.CalledProcessError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {e.stderr.decode(errors='replace')[-2000:]}") from None
    port = free_port()
    with open(log, "wb") as out:  # the server holds its own copy of the descriptor
        proc = subprocess.Popen(
            [str(bin_ / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(folder),
             "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off"],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **as_user)
    pg = Postgres(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
                  f"host=127.0.0.1 port={port} user=postgres dbname=postgres", folder, proc)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-3000:]
            pg.stop()
            raise RuntimeError(f"postgres did not start: {text}")
        try:
            psycopg.connect(pg.conninfo, connect_timeout=1).close()
            return pg
        except psycopg.OperationalError:
            time.sleep(0.05)
