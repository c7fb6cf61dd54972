"""Real services for tests: a Ray head on free ports, and a Keel config rooted in a temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from keel import processes, secret_keys
from keel.orchestration import airflow_api
from keel.processes import free_port
from keel.stack import RAY_ENV, ray_head_command, ray_token

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class RayHead:
    address: str  # Jobs API / dashboard
    gcs: str  # for ray.init(address=...)
    metrics: str  # Ray's metrics agent: its Prometheus page, every replica's gateway metrics (serving.metrics)
    env: dict[str, str]
    proc: subprocess.Popen

    def stop(self) -> None:
        """Stop this head by its session: `ray stop` would kill every Ray on the machine."""
        processes.stop_session(self.proc.pid)
        self.proc.wait(10)


def start_ray_head(root: Path, num_cpus: int = 2) -> RayHead:
    token = ray_token(root / "auth_token")
    # A test's gateway has no load balancer to leave: Serve's 30 s drain of a direct-ingress replica would only
    # stall each module's teardown, and race the controller's own 30 s shutdown limit (stop_serve).
    # Workers report metrics every second (Ray's shortest; 10 s by default), so a test reads them soon after.
    env = {**RAY_ENV, "RAY_AUTH_TOKEN_PATH": str(token), "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
           "RAY_metrics_report_interval_ms": "1000"}
    gcs, dash, metrics = free_port(), free_port(), free_port()
    cmd = ray_head_command("127.0.0.1", gcs, dash, metrics, num_cpus, root / "t")
    log = open(root / "ray-head.log", "wb")  # noqa: SIM115 - lives as long as the head
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", f"http://127.0.0.1:{metrics}/metrics", env, proc)
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


def write_config(root: Path, dashboard_port: int | None = None, state_dir: Path | None = None,
                 **pipeline: object) -> Path:
    """The example config with zone storage and state under `root` (landing sources stay data/sample),
    and the state's own secret keys, as the first `keel up` makes them."""
    doc = yaml.safe_load((ROOT / "config" / "keel.example.yaml").read_text())
    doc["state_dir"] = str(state_dir or root / "state")
    for zone in doc["policy"]["zones"].values():
        zone["storage"] = str(root / "storage" / zone["region"])
    doc["pipeline"].update(pipeline)
    if dashboard_port:
        doc["ports"]["ray_dashboard"] = dashboard_port
    root.mkdir(parents=True, exist_ok=True)
    for purpose in secret_keys.PURPOSES:
        secret_keys.ensure(Path(doc["state_dir"]), purpose)
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
        processes.stop_session(self.proc.pid)
        self.proc.wait(10)
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
    return airflow_api.airflow_env(home, cfg, ROOT, port)


def publish_index(settings: Any, chunks: Any, run: str, zone: str = "us") -> None:
    """Commit a table of chunks as `zone`'s current index, as the index job would (a snapshot of its own)."""
    from keel.pipeline import index
    from keel.pipeline.snapshots import SnapshotStore
    from keel.storage import ZoneStorage

    storage = ZoneStorage.for_zone(settings, zone)
    store = SnapshotStore(storage, "index")
    staging = store.begin(run)
    index.write_table(storage.uri(staging.path, "lance"), chunks, storage)
    store.commit(staging, {"counts": {"chunks": chunks.num_rows}})


def stop_serve(timeout_s: float = 90) -> None:
    """serve.shutdown(), then wait until its controller is gone. A controller that takes over 30 s to stop is
    killed by Serve, but its name still resolves for a moment: a serve.start() then would connect to it, ignore
    its new port, and the next module's gateway would listen on Serve's default port instead."""
    import ray
    from ray import serve

    serve.shutdown()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        except ValueError:
            return
        time.sleep(0.5)
    raise RuntimeError(f"Serve's controller still there {timeout_s:g} s after serve.shutdown()")
