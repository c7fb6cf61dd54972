"""Airflow, as Keel drives it from outside: the environment of a small local instance, its components
(`python -m keel.orchestration.airflow_api` runs them, in place of `airflow standalone`), the admin
credentials Keel makes for it, and the few REST calls `keel up` and the tests make."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from keel.errors import StackError

BIN = Path(sys.executable).parent
ADMIN = "admin"
PASSWORDS = "simple_auth_manager_passwords.json.generated"
# `airflow standalone`'s parts, less what it adds: the scheduler's and the triggerer's log servers, which
# bind 0.0.0.0:8793/8794 whatever the configured host. Everything runs on one machine, so the API server
# reads task logs from the local log folder (for a running task it also asks the absent server, and says so).
COMPONENTS = (("api-server",), ("scheduler", "--skip-serve-logs"), ("dag-processor",),
              ("triggerer", "--skip-serve-logs"))


def airflow_env(home: Path, keel_config: Path, keel_home: Path, port: int | None = None,
                host: str = "127.0.0.1") -> dict[str, str]:
    """Airflow 3, small: DAGs from dags/, low parallelism, one API worker, bound to `host`."""
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(keel_home / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__WORKERS": "1",
        # What `airflow standalone` forced, and one admin whose password Keel writes (admin_password).
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / PASSWORDS),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
        "KEEL_CONFIG": str(keel_config),
        "KEEL_HOME": str(keel_home),
        # Tasks and `airflow standalone` (tests/test_airflow.py) start plain `airflow ...`: the venv's bin first.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if port:
        env["AIRFLOW__API__PORT"] = str(port)
        env["AIRFLOW__API__BASE_URL"] = f"http://{host}:{port}"
    return env


def admin_password(home: Path) -> None:
    """The admin's password, made once (0600) before any part of Airflow starts: SimpleAuthManager then
    finds the user it has and generates nothing, so it prints no password into the log."""
    f = home / PASSWORDS
    if f.exists():
        f.chmod(0o600)  # one `airflow standalone` generated before Keel ran Airflow's parts itself was 0644
    else:
        home.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp")  # renamed into place whole: a reader never sees it half written
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(json.dumps({ADMIN: secrets.token_urlsafe(24)}) + "\n")
        tmp.replace(f)


def run_components(home: Path) -> int:
    """Airflow as one service: its database migrated, then its components, each a child of this process (in
    the session `keel up` started it in, so `keel down` stops them with it). When one exits, the others are
    stopped and its status is returned, so the service is whole or gone, never half up."""
    admin_password(home)
    airflow = str(BIN / "airflow")
    if code := subprocess.run([airflow, "db", "migrate"], check=False).returncode:  # noqa: S603 - the venv's airflow
        return code
    procs = {" ".join(c): subprocess.Popen([airflow, *c]) for c in COMPONENTS}  # noqa: S603
    while all(p.poll() is None for p in procs.values()):
        time.sleep(1)
    name, code = next((n, p.returncode) for n, p in procs.items() if p.returncode is not None)
    print(f"keel: airflow {name} exited ({code}); stopping the others", flush=True)
    for p in procs.values():
        p.terminate()
    for p in procs.values():
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return code if code > 0 else 1


def airflow_credentials(home: Path, timeout_s: float = 60) -> tuple[str, str]:
    """The admin user and password in SimpleAuthManager's passwords file, once written."""
    f = home / PASSWORDS
    deadline = time.monotonic() + timeout_s
    while not f.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    user, password = next(iter(json.loads(f.read_text()).items()))
    return str(user), str(password)


class AirflowAPI:
    """The few Airflow 3 REST calls `keel up` and its test make (JWT from /auth/token)."""

    def __init__(self, base: str, user: str, password: str) -> None:
        self.base = base
        login = _json_call("POST", f"{base}/auth/token", {"username": user, "password": password})
        self.token = str(login["access_token"])

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return _json_call(method, self.base + path, body, {"Authorization": f"Bearer {self.token}"})

    def trigger(self, dag: str, conf: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"logical_date": None} | ({"conf": conf} if conf else {})
        return dict(self.call("POST", f"/api/v2/dags/{dag}/dagRuns", body))

    def wait_done(self, dag: str, run_id: str, deadline: float) -> dict[str, Any]:
        """The run once it has finished, succeeded or failed."""
        while time.monotonic() < deadline:
            run = self.call("GET", f"/api/v2/dags/{dag}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                return dict(run)
            time.sleep(3)
        raise StackError(f"{dag} run {run_id} did not finish in time")

    def runs(self, dag: str) -> list[dict[str, Any]]:
        return list(self.call("GET", f"/api/v2/dags/{dag}/dagRuns?order_by=-run_after")["dag_runs"])

    def wait_for_dag(self, dag: str, deadline: float) -> None:
        while True:
            try:
                self.call("GET", f"/api/v2/dags/{dag}")
                return
            except urllib.error.HTTPError:
                if time.monotonic() > deadline:
                    raise StackError(f"Airflow never parsed DAG {dag}: see its import errors in the UI") from None
                time.sleep(2)

    def wait_run(self, dag: str, run_id: str, deadline: float) -> dict[str, Any]:
        while time.monotonic() < deadline:
            run = self.call("GET", f"/api/v2/dags/{dag}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                if run["state"] != "success":
                    raise StackError(f"{dag} run {run_id} failed: see the Airflow UI, {self.base}/dags/{dag}")
                return dict(run)
            time.sleep(3)
        raise StackError(f"{dag} run {run_id} did not finish in time")

    def wait_any_run(self, dag: str, deadline: float, after: int = 0) -> dict[str, Any]:
        """The newest finished run once more than `after` runs have finished."""
        while time.monotonic() < deadline:
            done = [r for r in self.runs(dag) if r["state"] in ("success", "failed")]
            if len(done) > after:
                return done[0]
            time.sleep(3)
        raise StackError(f"no run of {dag} finished in time")


def _json_call(method: str, url: str, body: dict[str, Any] | None, headers: dict[str, str] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    # The URL is the stack's own Airflow (http://host:port from settings), never a caller's.
    req = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})},  # noqa: S310
                                 method=method)
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310
        return json.loads(r.read() or b"{}")


if __name__ == "__main__":
    sys.exit(run_components(Path(os.environ["AIRFLOW_HOME"])))
