"""Process sessions: start a service as the leader of its own session, find and stop it whole.

The primitives behind `keel up | status | down` (keel.stack) and the tests' helpers: ports, the
kernel's view of a process (start time, session, memory), spawning and stopping.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields after the command name, from field 3 (state)


def start_time(pid: int) -> int | None:
    st = _stat(pid)
    return int(st[19]) if st and st[0] != "Z" else None  # field 22: start time; a zombie counts as gone


def session_members(sid: int) -> list[int]:
    """Every live process of a session: the leader and all it started, however deep."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) and st[0] != "Z" and int(st[3]) == sid:
            out.append(int(entry.name))
    return out


def processes_naming(*folders: Path) -> list[int]:
    """Live processes whose command line names one of these folders: ours even if one left its session."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and start_time(int(entry.name)) is not None:
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(str(f) in cmd for f in folders):
                out.append(int(entry.name))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the live processes among `pids` have used so far."""
    clock = os.sysconf("SC_CLK_TCK")
    return sum(int(st[11]) + int(st[12]) for pid in pids  # fields 14, 15; a zombie counts as gone
               if (st := _stat(pid)) and st[0] != "Z") / clock


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size: shared pages split between their users, so a sum over processes is
    the real footprint (summed RSS counts a shared library once per process)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def signal_session(sid: int, sig: int) -> None:
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, sig)


def stop_session(sid: int, grace_s: float = 20) -> None:
    signal_session(sid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    signal_session(sid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.1)


def spawn(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a process as the leader of a new session, its output appended to `log` (the owner's only).
    What it and its children create is the owner's only too (umask 077): Airflow's config with its keys,
    databases, raw snapshots, logs."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as out:
        return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,  # noqa: S603 - Keel's own commands
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd, umask=0o077)


def http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 3) -> bool:
    """The server answers, with anything but a 5xx."""
    try:
        request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - Keel's own http:// service URLs
        with urllib.request.urlopen(request, timeout=timeout) as r:  # noqa: S310
            return bool(r.status < 500)
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):
        return False


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
