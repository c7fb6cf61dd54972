"""Airflow, as Keel drives it from outside: the environment of a small local instance, its generated
admin credentials, and the few REST calls `keel up` and the tests make."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from keel.errors import StackError

BIN = Path(sys.executable).parent


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
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
        "KEEL_CONFIG": str(keel_config),
        "KEEL_HOME": str(keel_home),
        # `airflow standalone` starts its parts as plain `airflow ...`: the venv's bin must come first.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if port:
        env["AIRFLOW__API__PORT"] = str(port)
        env["AIRFLOW__API__BASE_URL"] = f"http://{host}:{port}"
    return env


def airflow_credentials(home: Path, timeout_s: float = 60) -> tuple[str, str]:
    """The admin user and password Airflow standalone generates (SimpleAuthManager), once written."""
    f = home / "simple_auth_manager_passwords.json.generated"
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
