"""`keel up | status | down`: the process rules on their own (fast), then the whole local stack (slow):
a chat through the gateway, the DAG chain through Airflow's REST API, the MLflow run it logged, a fast
second `keel up`, a clean restart after a crash, and no process left after `keel down`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

from keel import processes, stack
from keel.orchestration import airflow_api, chain
from keel.orchestration.stages import zones_with_sources
from keel.settings import Ports, load_settings
from tests.conftest import run_keel
from tests.support.services import free_port, write_config


def test_a_session_is_found_whole_and_stopped_whole(tmp_path):
    # A leader that starts a child which starts a grandchild: all three are in the leader's session.
    proc = processes.spawn(["sh", "-c", "sh -c 'sleep 300' & sleep 300"], {}, tmp_path / "log")
    try:
        deadline = time.monotonic() + 5
        while len(processes.session_members(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = processes.session_members(proc.pid)
        assert proc.pid in members and len(members) >= 3
        assert processes.pss_bytes(members) > 0
        processes.stop_session(proc.pid)
        assert processes.session_members(proc.pid) == []
    finally:
        proc.kill()
        proc.wait()


def test_cpu_seconds_sums_a_sessions_live_processes(tmp_path):
    # A busy child under a shell: the session's CPU is the child's, and nothing once the session is gone.
    proc = processes.spawn(["sh", "-c", "python3 -c 'while True: pass' & wait"], {}, tmp_path / "log", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while processes.cpu_seconds(members := processes.session_members(proc.pid)) < 0.3:
            assert time.monotonic() < deadline, members
            time.sleep(0.1)
        assert len(members) == 2
    finally:
        processes.stop_session(proc.pid, grace_s=5)
        proc.wait()
    assert processes.cpu_seconds(members) == 0


def test_a_stale_pid_file_is_cleared_with_what_its_dead_leader_left(tmp_path):
    cfg = write_config(tmp_path)
    s = load_settings(cfg)
    local = stack.LocalStack(s, cfg)
    # An orphan left in the session of a leader that died: the shape a crashed `ray start` leaves.
    # The pid is written aside and renamed, so the file appears whole (CI once read it empty).
    proc = processes.spawn(["sh", "-c", "sleep 300 & echo $! > orphan.tmp && mv orphan.tmp orphan; wait"], {},
                           tmp_path / "log", cwd=tmp_path)
    deadline = time.monotonic() + 5
    while not (tmp_path / "orphan").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    orphan = int((tmp_path / "orphan").read_text())
    local.run_dir.mkdir(parents=True)
    (local.run_dir / "mlflow.pid").write_text(json.dumps({"pid": proc.pid, "start": processes.start_time(proc.pid)}))
    assert local.pid("mlflow") == proc.pid
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert local.pid("mlflow") is None and processes.start_time(orphan) is not None
    assert [r.state for r in local.status() if r.name == "mlflow"] == ["stopped"]
    assert local._clear_stale("mlflow")
    assert processes.start_time(orphan) is None and not (local.run_dir / "mlflow.pid").exists()


def test_a_port_taken_by_someone_else_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = write_config(tmp_path)
        doc = yaml.safe_load(cfg.read_text())
        doc["ports"]["mlflow"] = taken.getsockname()[1]
        cfg.write_text(yaml.safe_dump(doc))
        local = stack.LocalStack(load_settings(cfg), cfg)
        with pytest.raises(stack.StackError, match=r"mlflow: port \d+ .* taken by a process keel did not start"):
            local._start("mlflow", ["true"], {})


def test_a_service_that_dies_while_starting_is_named_with_its_log(tmp_path, monkeypatch):
    cfg = _stack_config(tmp_path)
    local = stack.LocalStack(load_settings(cfg), cfg)
    wait = (["sleep", "60"], {})
    fail = (["sh", "-c", "echo 'no such backend' >&2; exit 3"], {})
    monkeypatch.setattr(local, "_commands", lambda: {"ray": wait, "airflow": wait, "mlflow": fail})
    try:
        with pytest.raises(stack.StackError) as err:
            local.up(say=lambda _: None, load=False, timeout_s=60)
        log = local.logs / "mlflow.log"
        assert str(err.value).startswith(f"mlflow: exited while starting; log {log}")
        assert "no such backend" in str(err.value)
    finally:
        assert local.down(say=lambda _: None) == []


def test_keel_writes_airflows_admin_password_owner_only_and_airflow_prints_none(tmp_path):
    # Airflow's own SimpleAuthManager, as its API server starts it: it finds the admin Keel wrote and generates
    # (and prints) nothing. Without Keel's file it prints "Password for user 'admin': ..." to stdout.
    home = tmp_path / "airflow"
    airflow_api.admin_password(home)
    f = home / airflow_api.PASSWORDS
    user, password = airflow_api.airflow_credentials(home)
    assert user == "admin" and len(password) >= 32 and f.stat().st_mode & 0o777 == 0o600
    airflow_api.admin_password(home)
    assert airflow_api.airflow_credentials(home) == (user, password)  # made once
    code = ("from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager as M\n"
            "m = M(); m.init(); print(sorted(m.get_passwords()))")
    env = {**os.environ, **airflow_api.airflow_env(home, tmp_path / "keel.yaml", tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300, check=False)
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 0 and "['admin']" in out, out[-3000:]
    assert password not in out and "Password for user" not in out


def _address(hexaddr: str) -> str:
    """An address as /proc/net/tcp{,6} writes it (each 32-bit word in host order), IPv4-mapped ones as IPv4."""
    raw = bytes.fromhex(hexaddr)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    return address.removeprefix("::ffff:")


def _listeners(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of each TCP socket these processes listen on."""
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":  # LISTEN
                address, port = f[1].rsplit(":", 1)
                listening[f[9]] = (_address(address), int(port, 16))
    out = []
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            fds = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue  # ended meanwhile
        out += [(pid, name, *listening[fd[8:-1]]) for fd in fds if fd.startswith("socket:[") and fd[8:-1] in listening]
    return out


def _open_to_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & 0o077)
    except FileNotFoundError:  # a service's temporary file, gone since it was listed
        return False


def _stack_config(root: Path) -> Path:
    cfg = write_config(root)
    doc = yaml.safe_load(cfg.read_text())
    doc["ports"] = {name: free_port() for name in Ports.model_fields}
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return cfg


@pytest.mark.slow
def test_keel_up_runs_the_whole_stack_and_keel_down_leaves_nothing(keel_stack):
    cfg, local, out, first_up_s = keel_stack.config, keel_stack.local, keel_stack.up_output, keel_stack.up_seconds
    try:
        key = keel_stack.key
        assert key in out and local.urls["airflow"] in out and "password" in out and "corpus   loaded" in out
        assert "keel eval show" in out  # what the first evaluation costs, and where to read it
        from keel.evaluation import golden

        rag = golden.load(local.s.home / local.s.evaluation.golden_dir, "rag")
        assert "golden   sets in MLflow" in out and f"rag {len(rag.items)} items ({rag.version})" in out
        assert (local.state / "evaluation_api_key").stat().st_mode & 0o777 == 0o600
        # State is the owner's only: the folder (Ray's own session folder inside it is 0777 by Ray's choice),
        # and every file in it (Airflow's admin password, its config with its keys, logs, databases, models),
        # and the raw snapshots in each zone's storage.
        assert local.state.stat().st_mode & 0o777 == 0o700
        raw = [p for zone in local.s.policy.zones.values() for p in Path(local.s.resolve(zone.storage)).rglob("*")
               if "raw" in p.parts and p.is_file()]  # the ingest stage's snapshots, in each zone's storage
        written = [p for p in local.state.rglob("*") if p.is_file() and local.ray_temp not in p.parents]
        assert local.airflow_home / airflow_api.PASSWORDS in written and local.logs / "airflow.log" in written
        assert raw and [p for p in [*written, *raw] if _open_to_others(p)] == []

        # A chat through the gateway with the printed key, on the openai SDK.
        from openai import OpenAI

        client = OpenAI(base_url=local.urls["gateway"], api_key=key)
        answer = client.chat.completions.create(model="keel/auto", max_tokens=16,
                                                messages=[{"role": "user", "content": "Say hello."}])
        assert answer.choices[0].message.content and answer.usage.completion_tokens > 0

        # Every listener of the stack is on its configured host (127.0.0.1), but one per Serve replica: its
        # inter-deployment gRPC server, which Ray 2.60 binds to [::] (serve/_private/replica.py), behind Ray's
        # token interceptor. Airflow's log servers are not started.
        pids = {p for name in stack.SERVICES for p in processes.session_members(local.pid(name) or -1)}
        pids |= set(processes.processes_naming(local.state, local.ray_temp))
        found = _listeners(pids)
        ports = {port for *_, port in found}
        assert {local.s.ports.gateway, local.s.ports.ray, local.s.ports.ray_dashboard, local.s.ports.mlflow,
                local.s.ports.airflow} <= ports and not {8793, 8794} & ports, found
        exposed = [(pid, name, address) for pid, name, address, _ in found if address != local.s.host]
        assert all(name.startswith("ray::ServeReplica") and address == "::" for _, name, address in exposed), found
        assert len({pid for pid, *_ in exposed}) == len(exposed), found  # one per replica

        # The DAG chain, triggered again through Airflow's REST API on the unchanged landing: ingest finds
        # its snapshots committed, so its tasks end skipped, publish no asset event, and nothing downstream
        # runs again; the run is still logged to MLflow.
        api = local.airflow()
        deadline = time.monotonic() + 900
        downstream = chain.dag_ids(zones_with_sources(local.s))[1:]
        before = {d: len(api.runs(d)) for d in downstream}
        assert all(before.values()), before  # the first `keel up` ran every DAG of the chain
        # A task's log, through the API, from the local log folder (there is no log server to ask).
        loaded = api.runs("keel_ingest")[-1]["dag_run_id"]
        task = api.call("GET", f"/api/v2/dags/keel_ingest/dagRuns/{loaded}/taskInstances")["task_instances"][0]
        log = api.call("GET", f"/api/v2/dags/keel_ingest/dagRuns/{loaded}/taskInstances/{task['task_id']}/logs/1")
        text = json.dumps(log["content"])
        assert str(local.airflow_home / "logs") in text and "Pre Execute" in text, text[:3000]
        assert "Could not read served logs" not in text, text[:3000]
        run = api.trigger("keel_ingest")
        api.wait_run("keel_ingest", run["dag_run_id"], deadline)
        tasks = api.call("GET", f"/api/v2/dags/keel_ingest/dagRuns/{run['dag_run_id']}/taskInstances")
        assert {t["state"] for t in tasks["task_instances"]} == {"skipped"}, tasks
        query = urllib.parse.urlencode({"source_dag_id": "keel_ingest", "source_run_id": run["dag_run_id"]})
        assert api.call("GET", f"/api/v2/assets/events?{query}")["asset_events"] == []
        time.sleep(20)  # several scheduler loops: an asset event would have queued a run by now
        assert {d: len(api.runs(d)) for d in downstream} == before
        from mlflow.tracking import MlflowClient

        mlflow = MlflowClient(local.urls["mlflow"])
        exp = mlflow.get_experiment_by_name("keel-pipeline")
        logged = mlflow.search_runs([exp.experiment_id], f"tags.airflow_run_id = '{run['dag_run_id']}'")
        assert len(logged) == 1 and logged[0].data.tags["airflow_dag_id"] == "keel_ingest"
        # A skipped stage reports that it skipped, not counts it did not produce; the run ended.
        assert logged[0].data.metrics == {} and logged[0].data.tags["ingest_us.skipped"] == "true"
        assert logged[0].info.status == "FINISHED"

        # A second `keel up` finds everything up and returns at once.
        t0 = time.monotonic()
        again = run_keel("up", "--config", str(cfg), timeout=300)
        assert again.returncode == 0 and "already running" in again.stdout.decode()
        assert "already loaded" in again.stdout.decode()
        assert time.monotonic() - t0 < min(60, first_up_s / 2)
        status = run_keel("status", "--json", "--config", str(cfg))
        assert status.returncode == 0, status.stdout
        rows = {r["name"]: r for r in json.loads(status.stdout)}
        assert {n: r["state"] for n, r in rows.items()} == dict.fromkeys(("ray", "gateway", "mlflow", "airflow"),
                                                                         "healthy")
        pss = ", ".join(f"{n} {r['pss_bytes'] / 2**20:.0f} MB" for n, r in rows.items())
        print(f"first keel up {first_up_s:.0f} s; PSS {pss}")

        # After a crash (MLflow killed), `keel up` restarts what is gone and keeps the rest.
        os.kill(rows["mlflow"]["pid"], signal.SIGKILL)
        time.sleep(1)
        again = run_keel("up", "--no-load", "--config", str(cfg), timeout=300)
        text = again.stdout.decode()
        assert again.returncode == 0 and "mlflow   starting" in text and "ray      already running" in text, text
    finally:
        down = run_keel("down", "--config", str(cfg), timeout=300)
    assert down.returncode == 0, down.stdout.decode() + down.stderr.decode()
    assert "no keel process left" in down.stdout.decode()
    assert processes.processes_naming(local.state, local.ray_temp) == []
    status = run_keel("status", "--config", str(cfg))
    assert status.returncode == 3 and status.stdout.decode().count("stopped") == 4


@pytest.mark.slow
def test_no_secret_or_planted_pii_value_is_in_any_log(keel_stack):
    """After the stack's suites (the evaluation suite's module sorts before this one; the test above ran
    `keel down`): no key, password, token or planted PII value in Keel's logs, Airflow's task and DAG
    processor logs, or the Ray sessions' logs."""
    local = keel_stack.local
    s = load_settings(keel_stack.config)
    secrets = {
        "quickstart API key": keel_stack.key,
        "evaluation API key": (local.state / "evaluation_api_key").read_text().strip(),
        "Airflow admin password": airflow_api.airflow_credentials(local.airflow_home)[1],
        "Ray token": local.token.read_text().strip(),
    }
    for name, key in (("audit.hmac_key", s.audit.hmac_key), ("privacy.hash_key", s.privacy.hash_key)):
        if key is not None:
            secrets[name] = key.get_secret_value()
    # The install's keys as the settings resolve them (the environment's, else <state>/keys/), retired ones too.
    secrets |= {f"audit key {kid}": k.decode() for kid, k in s.audit_keys().keys.items()}
    secrets["privacy hash key"] = s.hash_key().decode()
    cfg = (local.airflow_home / "airflow.cfg").read_text().splitlines()
    for option in ("fernet_key", "secret_key", "jwt_secret"):  # Airflow's own, made in its airflow.cfg
        secrets[f"Airflow {option}"] = next(line.split("=", 1)[1].strip() for line in cfg
                                            if line.startswith(f"{option} ="))
    assert all(v and len(v) >= 16 for v in secrets.values()), secrets.keys()
    root = Path(__file__).resolve().parent.parent
    pii = {p["value"] for p in json.loads((root / "data/sample/planted_pii.json").read_text())}
    for line in (root / "data/golden/privacy.jsonl").read_text().splitlines():  # what evaluations send
        pii |= set(json.loads(line).get("pii", []))
    needles = {v.encode(): f"{name}" for name, v in secrets.items()} | {v.encode(): f"PII {v!r}" for v in pii}

    logs = [p for p in local.logs.rglob("*") if p.is_file()]
    logs += [p for p in (local.airflow_home / "logs").rglob("*") if p.is_file()]
    logs += [p for p in local.ray_temp.glob("session_2*/logs/**/*") if p.is_file()]
    assert len(logs) > 20 and any("gcs_server" in p.name for p in logs), logs
    hits = []
    for path in logs:
        data = path.read_bytes()
        hits += [f"{what} in {path}" for needle, what in needles.items() if needle in data]
    assert hits == [], "\n".join(hits)


def test_make_down_without_a_stack_is_harmless(tmp_path):
    cfg = _stack_config(tmp_path)
    down = run_keel("down", "--config", str(cfg))
    assert down.returncode == 0 and "no keel process left" in down.stdout.decode()
