"""Real services for tests: a Ray head on free ports, and a Keel config rooted in a temp folder."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    address: str  # Jobs API / dashboard
    gcs: str  # for ray.init(address=...)
    env: dict[str, str]
    proc: subprocess.Popen

    def stop(self) -> None:
        """Stop this head by its process group: `ray stop` would kill every Ray on the machine."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_ray_head(root: Path, num_cpus: int = 2) -> RayHead:
    root.mkdir(parents=True, exist_ok=True)
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           # Serve's own throughput mode: user code and router on the replica's event loop, buffered
           # access logs, direct ingress (the ingress replica serves HTTP itself, no proxy hop).
           "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    gcs, dash = free_port(), free_port()
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(num_cpus), "--node-ip-address", "127.0.0.1",
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
        "--temp-dir", str(root / "t"), "--disable-usage-stats",
    ]
    log = open(root / "ray-head.log", "wb")  # noqa: SIM115 - lives as long as the head
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", env, proc)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited: {(root / 'ray-head.log').read_text()[-3000:]}")
        try:
            import urllib.request

            req = urllib.request.Request(f"{head.address}/api/version",
                                         headers={"Authorization": f"Bearer {token.read_text()}"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return head
        except OSError:
            pass
        time.sleep(1)
    head.stop()
    raise RuntimeError(f"ray head not healthy in 120 s: {(root / 'ray-head.log').read_text()[-3000:]}")


def write_config(root: Path, dashboard_port: int | None = None, state_dir: Path | None = None, **pipeline: object) -> Path:
    """The example config with zone storage and state under `root` (landing sources stay data/sample)."""
    doc = yaml.safe_load((ROOT / "config" / "keel.example.yaml").read_text())
    doc["state_dir"] = str(state_dir or root / "state")
    for zone in doc["policy"]["zones"].values():
        zone["storage"] = str(root / "storage" / zone["region"])
    doc["pipeline"].update(pipeline)
    if dashboard_port:
        doc["ports"]["ray_dashboard"] = dashboard_port
    root.mkdir(parents=True, exist_ok=True)
    path = root / "keel.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Service:
    """A background process in its own process group, stopped by PID (with everything it started)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> None:
        self.name, self.log = name, log
        self._log = open(log, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=cwd)

    def wait_http(self, url: str, timeout: float = 180) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=3) as r:
                    if r.status < 500:
                        return
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} not healthy in {timeout} s: {self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue
        self._log.close()


def start_mlflow(root: Path) -> tuple[Service, str]:
    """A real MLflow tracking server: sqlite backend, one worker, job execution off (about 420 MB)."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    svc = Service(
        "mlflow",
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        root / "mlflow.log",
    )
    url = f"http://127.0.0.1:{port}"
    svc.wait_http(f"{url}/health", timeout=120)
    return svc, url


def airflow_env(home: Path, cfg: Path, port: int | None = None) -> dict[str, str]:
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
        "KEEL_CONFIG": str(cfg),
        "KEEL_HOME": str(ROOT),
        # `airflow standalone` starts its parts as plain `airflow ...`: the venv's bin must come first.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if port:
        env["AIRFLOW__API__PORT"] = str(port)
        env["AIRFLOW__API__BASE_URL"] = f"http://127.0.0.1:{port}"
    return env
