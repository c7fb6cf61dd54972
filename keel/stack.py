"""The local stack behind `keel up | status | down`: a Ray head with the Serve gateway, MLflow, Airflow.

Each service is a process started in a session of its own (its PID file in <state>/run/, its log
in <state>/logs/), so `keel down` stops exactly what `keel up` started, with everything those
processes started in turn, and nothing else: never `ray stop`, which kills every Ray on the machine.
A PID file also records the process's start time, so a PID the kernel has since reused is never
mistaken for ours. The gateway lives inside the Ray head (Serve applications are detached), so it
stops with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel import secret_keys
from keel.errors import StackError
from keel.orchestration.airflow_api import AirflowAPI, airflow_credentials, airflow_env
from keel.processes import (
    free_port,
    http_ok,
    port_in_use,
    processes_naming,
    pss_bytes,
    session_members,
    spawn,
    start_time,
    stop_session,
    tail,
)
from keel.settings import KeelSettings, config_path

BIN = Path(sys.executable).parent
# Serve's throughput mode: user code and router on the replica's event loop, buffered access logs,
# direct ingress (the ingress replica serves HTTP itself). Measured in benchmarks/gateway.py.
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray turns a loopback --node-ip-address (and a client's loopback
# address) into the machine's address, and its gRPC servers (GCS, raylet, object manager, dashboard agent,
# each worker and Serve replica) and metrics servers then listen on all interfaces. Ray's switch for
# single-machine clusters keeps 127.0.0.1, so they bind loopback (`ss -ltnp`, Ray 2.60); it also refuses
# other nodes joining, which a one-machine stack never has. Its clients need it too, to reach 127.0.0.1.
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
SERVICES = ("ray", "mlflow", "airflow")  # processes; the gateway is an application inside ray
# An evaluation logs each assessment in a request of its own (about 1,100 per 60 answers), and one
# server process was what scoring waited on: 2 workers on SQLite in WAL mode took scoring the same 60
# answers from 15.5 to 13.6 s (1 worker with WAL 14.6 s, 4 workers 14.7-15.7 s on 2 cores).
MLFLOW_WORKERS = 2


# -- MLflow -------------------------------------------------------------------------------------


def write_ahead_log(db: Path) -> None:
    """Put the tracking store's SQLite file in WAL mode (it persists in the file): readers do not wait for
    the writer, and the server's workers' commits do not each rewrite a rollback journal."""
    import sqlite3

    db.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


# -- Ray ----------------------------------------------------------------------------------------


def ray_head_command(host: str, gcs_port: int, dashboard_port: int, metrics_port: int, num_cpus: int,
                     temp_dir: Path) -> list[str]:
    """`ray start --head --block`: the head stays in the foreground of its own session, stoppable by PID.
    Its internal ports are picked free, so it never collides with another Ray on the machine; its metrics agent's
    is fixed (a scraper's one address for Ray's and every gateway replica's metrics: serving/metrics.py)."""
    return [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(num_cpus), "--node-ip-address", host,
        "--port", str(gcs_port), "--dashboard-host", host, "--dashboard-port", str(dashboard_port),
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--metrics-export-port", str(metrics_port), "--runtime-env-agent-port", str(free_port()),
        "--temp-dir", str(temp_dir), "--disable-usage-stats",
    ]


def ray_temp_dir(preferred: Path) -> Path:
    """Ray's session folder: `preferred`, unless its socket paths would pass the kernel's 107-byte limit
    for AF_UNIX sockets (a deep project folder), then a short folder in /tmp named after it."""
    if len(str(preferred)) <= 30:  # + "/session_<date>_<time>_<pid>/sockets/plasma_store" (about 75 bytes)
        return preferred
    return Path(tempfile.gettempdir()) / f"keel-ray-{hashlib.sha256(str(preferred).encode()).hexdigest()[:10]}"


def ray_token(path: Path) -> Path:
    """The cluster's auth token, made once (0600). Clients find it through RAY_AUTH_TOKEN_PATH."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path


# -- the stack ------------------------------------------------------------------------------------


@dataclass
class ServiceStatus:
    name: str
    state: str  # healthy | unhealthy | stopped
    url: str
    pid: int | None = None
    pss_bytes: int = 0
    detail: str = ""


@dataclass
class UpResult:
    urls: dict[str, str]
    api_key: str
    airflow_user: str
    airflow_password: str
    loaded: str = ""


class LocalStack:
    def __init__(self, settings: KeelSettings, config: Path | None = None) -> None:
        self.s = settings
        self.config = (config or config_path()).resolve()
        self.state = settings.state
        self.run_dir, self.logs = self.state / "run", self.state / "logs"
        self.token = self.state / "ray" / "auth_token"
        self.mlflow_db = self.state / "mlflow" / "mlflow.db"  # the tracking store, set to WAL before MLflow starts
        self.ray_temp = ray_temp_dir(self.state / "ray")
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.airflow_home = self.state / "airflow"
        h, p = settings.host, settings.ports
        self.urls = {
            "gateway": f"http://{h}:{p.gateway}/v1",
            "ray": f"http://{h}:{p.ray_dashboard}",
            "mlflow": f"http://{h}:{p.mlflow}",
            "airflow": f"http://{h}:{p.airflow}",
        }

    # Environment every Keel process of this stack needs: the Ray token, the config, the MLflow server.
    def env(self) -> dict[str, str]:
        env = {**RAY_ENV, "RAY_AUTH_TOKEN_PATH": str(self.token), "KEEL_CONFIG": str(self.config),
               "KEEL_HOME": str(self.s.home)}
        if not self.s.pipeline.mlflow_tracking_uri:
            env["KEEL_PIPELINE__MLFLOW_TRACKING_URI"] = self.urls["mlflow"]
        return env

    def _health(self, name: str) -> tuple[str, dict[str, str]]:
        u = self.urls
        return {
            "ray": (f"{u['ray']}/api/version", {"Authorization": f"Bearer {self._token_text()}"}),
            "mlflow": (f"{u['mlflow']}/health", {}),
            "airflow": (f"{u['airflow']}/api/v2/monitor/health", {}),
            "gateway": (f"http://{self.s.host}:{self.s.ports.gateway}/healthz", {}),
        }[name]

    def _token_text(self) -> str:
        try:
            return self.token.read_text().strip()
        except OSError:
            return ""

    def healthy(self, name: str) -> bool:
        url, headers = self._health(name)
        return http_ok(url, headers)

    # -- PID files --

    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def _record(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self._pidfile(name).read_text()))
        except (OSError, ValueError):
            return None

    def pid(self, name: str) -> int | None:
        """The service's live session leader, or None."""
        rec = self._record(name)
        return int(rec["pid"]) if rec and start_time(rec["pid"]) == rec["start"] else None

    def _clear_stale(self, name: str) -> bool:
        """After a crash: stop what the dead leader left in its session (a raylet, a gunicorn worker)
        and drop its PID file."""
        rec = self._record(name)
        if rec is None or self.pid(name) is not None:
            return False
        stop_session(rec["pid"], grace_s=5)
        self._pidfile(name).unlink(missing_ok=True)
        return True

    def _secret_keys(self, say: Callable[[str], None]) -> None:
        """The install's own audit and hash keys, generated on the first start unless the environment
        sets them: no install signs with a constant from the source."""
        for purpose in secret_keys.PURPOSES:
            if not (self.s.key_source(purpose) or "").startswith("KEEL_"):
                keys, made = secret_keys.ensure(self.state, purpose)
                if made:
                    say(f"  generated the {purpose} key {keys.active_id} in {secret_keys.path(self.state, purpose)} "
                        f"(`keel secrets list` shows it, `keel secrets rotate` replaces it)")
                if made and purpose == "hash":  # it is in the pipeline's config version: never a silent re-run
                    say("  the pipeline's outputs depend on the hash key: documents processed under another key "
                        "are processed again on the next run")

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        p = self.s.ports
        ports = {"ray": ("ray", "ray_metrics"), "mlflow": ("mlflow",), "airflow": ("airflow",)}[name]
        for key in ports:
            if port_in_use(self.s.host, port := getattr(p, key)):
                raise StackError(f"{name}: port {port} on {self.s.host} is taken by a process keel did not start; "
                                 f"stop it or set ports.{key} in keel.yaml (or KEEL_PORTS__{key.upper()})")
        proc = spawn(cmd, env, self.logs / f"{name}.log", cwd=self.s.home)
        self.started[name] = proc  # polled while starting: it reaps an early exit, which would linger as a zombie
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._pidfile(name).write_text(json.dumps({"pid": proc.pid, "start": start_time(proc.pid), "cmd": cmd[:3]}))

    def _commands(self) -> dict[str, tuple[list[str], dict[str, str]]]:
        s, env = self.s, self.env()
        mlflow = self.mlflow_db.parent
        mlflow.mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 2
        return {
            # The autoscaler's and the dashboard's metrics servers have fixed ports (44217, 44227) by default:
            # a second Ray on the machine would take them first.
            "ray": (ray_head_command(s.host, s.ports.ray, s.ports.ray_dashboard, s.ports.ray_metrics, cpus,
                                    self.ray_temp),
                    {**env, "AUTOSCALER_METRIC_PORT": str(free_port()), "DASHBOARD_METRIC_PORT": str(free_port())}),
            "mlflow": ([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.mlflow_db}",
                        "--default-artifact-root", str(mlflow / "artifacts"), "--host", s.host,
                        "--port", str(s.ports.mlflow), "--workers", str(MLFLOW_WORKERS)],
                       {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
            "airflow": ([sys.executable, "-m", "keel.orchestration.airflow_api"],
                        {**env, **airflow_env(self.airflow_home, self.config, s.home, s.ports.airflow, s.host),
                         "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False"}),
        }

    # -- up --

    def up(self, say: Callable[[str], None] = print, load: bool = True, timeout_s: float = 600) -> UpResult:
        # The state folder is the owner's only: keys, secrets, logs, snapshots, and Ray's session folder,
        # which Ray makes world-writable (0777) whatever the umask, are out of other users' reach under it.
        self.state.mkdir(parents=True, exist_ok=True)
        self.state.chmod(0o700)
        ray_token(self.token)
        self._secret_keys(say)
        result = UpResult(self.urls, self.quickstart_key(), "", "")
        self.evaluation_key()
        commands = self._commands()
        pending = set(SERVICES) | {"gateway"}
        for name in SERVICES:
            if self._clear_stale(name):
                say(f"  {name:<8} was not stopped cleanly: cleared its stale PID file and leftovers")
            if (pid := self.pid(name)) is not None:
                say(f"  {name:<8} already running (pid {pid})")
            else:
                if name == "mlflow":  # before its server opens the file
                    write_ahead_log(self.mlflow_db)
                self._start(name, *commands[name])
                say(f"  {name:<8} starting  (log {self.logs / (name + '.log')})")
        deploy: subprocess.Popen[bytes] | None = None
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise StackError(f"not healthy after {timeout_s:.0f} s: {', '.join(sorted(pending))}; "
                                 f"logs in {self.logs}")
            for name in sorted(pending & set(SERVICES)):
                proc = self.started.get(name)
                if (proc is not None and proc.poll() is not None) or self.pid(name) is None:
                    log = self.logs / f"{name}.log"
                    raise StackError(f"{name}: exited while starting; log {log}:\n{tail(log)}")
                if self.healthy(name):
                    pending.discard(name)
                    say(f"  {name:<8} healthy   {self.urls[name]}")
            if "gateway" in pending and "ray" not in pending:
                # Deployed once Ray answers; a running one is kept (`keel serve` redeploys after a config change).
                if deploy is None and ("ray" in self.started or not self.healthy("gateway")):
                    deploy = self._deploy_gateway()
                    say(f"  {'gateway':<8} deploying (log {self.logs / 'gateway.log'})")
                if deploy is not None and deploy.poll() not in (None, 0):
                    log = self.logs / "gateway.log"
                    raise StackError(f"gateway: deployment failed; log {log}:\n{tail(log)}")
                if (deploy is None or deploy.poll() == 0) and self.healthy("gateway"):
                    pending.discard("gateway")
                    say(f"  {'gateway':<8} healthy   {self.urls['gateway']}")
            time.sleep(0.5)
        result.airflow_user, result.airflow_password = airflow_credentials(self.airflow_home)
        say(f"  prompts  {self.seed_prompts()}")
        if load:
            result.loaded = self.load_sample(say, deadline=time.monotonic() + timeout_s)
            say(f"  golden   {self.load_golden()}")
        return result

    def seed_prompts(self) -> str:
        """keel/rag's built-in system prompt as version 1 of `keel-rag` in MLflow's Prompt Registry (once),
        so its variants are registered, chosen among and rated there."""
        from keel.feedback import prompts

        made = prompts.seed(self.mlflow_uri())
        return (f"{prompts.RAG} v{made} registered in MLflow's Prompt Registry" if made
                else f"{prompts.RAG} already in MLflow's Prompt Registry")

    def load_golden(self) -> str:
        """The golden sets as MLflow evaluation datasets (one per set version, made once), so the first
        evaluation, and a person browsing MLflow, find them."""
        from keel.evaluation import golden, runs

        folder = self.s.home / self.s.evaluation.golden_dir
        sets = [golden.load(folder, name) for name in golden.SETS]
        runs.register(self.mlflow_uri(), sets)
        return "sets in MLflow (experiment keel-evaluation): " + ", ".join(
            f"{gs.name} {len(gs.items)} items ({gs.version})" for gs in sets)

    def _deploy_gateway(self) -> subprocess.Popen[bytes]:
        cmd, env = self.gateway_deployment()
        return spawn(cmd, env, self.logs / "gateway.log", cwd=self.s.home)

    def deploy(self, address: str | None = None) -> int:
        """`keel serve`: (re)deploy the gateway in the foreground, its output on this terminal; its exit status."""
        cmd, env = self.gateway_deployment(address)
        return subprocess.run(cmd, env={**os.environ, **env}, cwd=self.s.home, check=False).returncode  # noqa: S603 - our own interpreter and module

    def gateway_deployment(self, address: str | None = None) -> tuple[list[str], dict[str, str]]:
        """The command that deploys the gateway (`python -m serving.app`, a process of its own: the core
        does not import serving) and its environment: to this stack's Ray head with its token, or to
        the cluster at `address`, whose token is the caller's RAY_AUTH_* variables if they name one."""
        env = self.env()
        if address and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                        or not self.token.exists()):
            del env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN_PATH"]
        if address and not address.startswith(("127.", "localhost")):  # a cluster's node, at its own address
            del env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
        cmd = [sys.executable, "-m", "serving.app", "--config", str(self.config),
               "--address", address or self.head_address()]
        return cmd, env

    def head_address(self) -> str:
        """host:port of the Ray head this stack's `keel up` started; StackError, in one line, when none runs."""
        pid = self.pid("ray")
        if pid is None:
            raise StackError(f"no Ray head of this stack is running (state in {self.state}): start it with `keel up`, "
                             f"or name a cluster with --address")
        if not self.healthy("ray"):
            raise StackError(f"the Ray head of this stack (pid {pid}) does not answer at {self.urls['ray']}; "
                             f"log {self.logs / 'ray.log'}")
        return f"{self.s.host}:{self.s.ports.ray}"

    def quickstart_key(self) -> str:
        """A working key for the printed examples, kept (0600) beside the key store so a second `keel up`
        prints the same one; `keel keys revoke` retires it like any other."""
        if not self.s.policy.tenants:
            raise StackError("policy.tenants is empty: the gateway needs a tenant to issue an API key to")
        return self._kept_key("quickstart_api_key", self.s.policy.tenants[0].name, "quickstart")

    def evaluation_key(self) -> str | None:
        """The evaluation tenant's key (keel.evaluation.client reads it), made once like the quickstart
        key; None when the policy has no such tenant or a key comes from the environment."""
        from keel.evaluation.client import KEY_FILE

        ev = self.s.evaluation
        if ev.api_key is not None or ev.tenant not in {t.name for t in self.s.policy.tenants}:
            return None
        return self._kept_key(KEY_FILE, ev.tenant, "evaluation")

    def _kept_key(self, file: str, tenant: str, name: str) -> str:
        from keel.keys import KeyRing, KeyStore

        f = self.state / file
        if f.exists() and KeyRing(self.s).tenant(key := f.read_text().strip()) == tenant:
            return key
        key, _ = KeyStore(self.s).create(tenant, name)
        f.unlink(missing_ok=True)
        f.touch(mode=0o600)
        f.write_text(key + "\n")
        return key

    def mlflow_uri(self) -> str:
        return self.s.pipeline.mlflow_tracking_uri or self.urls["mlflow"]

    def airflow(self) -> AirflowAPI:
        return AirflowAPI(self.urls["airflow"], *airflow_credentials(self.airflow_home))

    def load_sample(self, say: Callable[[str], None], deadline: float) -> str:
        """The configured landing sources through the DAG chain (keel.orchestration.chain): its first,
        clock-started DAG, then each DAG that an asset published by a finished run starts, down the
        chain. A stage that found its output already committed publishes nothing, so nothing after it
        is waited for. Skipped when a run of the first DAG has already succeeded."""
        from keel.orchestration import chain
        from keel.orchestration.stages import zones_with_sources

        api = self.airflow()
        dags = chain.dag_ids(zones_with_sources(self.s))
        for dag in dags:
            api.wait_for_dag(dag, deadline)
        first = dags[0]
        runs = api.runs(first)
        if any(r["state"] == "success" for r in runs):
            return f"already loaded (trigger {first} in the Airflow UI to load again)"
        run = runs[0] if runs else api.trigger(first)  # the daily schedule may have queued one
        say(f"  loading  the sample corpus: {first} run {run['dag_run_id']}")
        api.wait_run(first, run["dag_run_id"], deadline)

        def started(dag: str, run_id: str) -> list[str]:
            tasks = api.call("GET", f"/api/v2/dags/{dag}/dagRuns/{run_id}/taskInstances")["task_instances"]
            return [d for t in tasks if t["state"] == "success" for d in chain.started_by(t["task_id"])]

        todo = started(first, run["dag_run_id"])
        while todo:
            dag = todo.pop(0)
            done = api.wait_any_run(dag, deadline)
            say(f"  loading  {dag}: {done['state']} ({done['run_type']})")
            if done["state"] != "success":
                raise StackError(f"{dag} failed: see the Airflow UI, {self.urls['airflow']}/dags/{dag}")
            todo += started(dag, done["dag_run_id"])
        return f"loaded by {first} run {run['dag_run_id']}"

    # -- status and down --

    def status(self) -> list[ServiceStatus]:
        out = []
        for name in SERVICES:
            pid = self.pid(name)
            members = session_members(pid) if pid else []
            state = "stopped" if pid is None else ("healthy" if self.healthy(name) else "unhealthy")
            out.append(ServiceStatus(name, state, self.urls[name], pid, pss_bytes(members),
                                     f"{len(members)} processes"))
            if name == "ray":
                gw = "stopped" if pid is None else ("healthy" if self.healthy("gateway") else "unhealthy")
                out.append(ServiceStatus("gateway", gw, self.urls["gateway"], None, 0, "a Serve application in ray"))
        return out

    def down(self, say: Callable[[str], None] = print) -> list[int]:
        """Stop every service by its session; returns the PIDs still alive afterwards (none, normally)."""
        sessions = []
        for name in reversed(SERVICES):
            self._clear_stale(name)
            pid = self.pid(name)
            if pid is None:
                say(f"  {name:<8} not running")
                continue
            sessions.append(pid)
            stop_session(pid)
            self._pidfile(name).unlink(missing_ok=True)
            say(f"  {name:<8} stopped (pid {pid})")
        # Anything still alive in those sessions, and any Ray process that left its session (none is
        # known to): reported, not killed, since a person's `tail -f` of a Ray log names the folder too.
        return sorted({*(p for sid in sessions for p in session_members(sid)), *processes_naming(self.ray_temp)})
