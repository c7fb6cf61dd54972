"""The whole local stack, started once per test session by `keel up` (the `keel_stack` fixture), for the
end-to-end suites: the sample corpus loaded through the DAG chain, the gateway with the CPU model, and
four fault-server targets beside it (`healthy`, `ungrounded`, `toxic`, `slow`) that evaluation tests
degrade one quality at a time. Failure alerts go to a capture server the tests read."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from keel import stack
from keel.settings import Ports, load_settings
from tests.support.faults import Fault
from tests.support.services import free_port, write_config

FAULT_TARGETS = ("healthy", "ungrounded", "toxic", "slow")


class AlertCapture:
    """A webhook that keeps every alert POSTed to it (pipeline.alert_webhook)."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        received = self.alerts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body).get("keel_alert") or {})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@dataclass
class KeelStack:
    config: Path
    local: stack.LocalStack
    up_output: str
    up_seconds: float
    faults: dict[str, Fault]
    alerts: AlertCapture
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return (self.local.state / "quickstart_api_key").read_text().strip()


def stack_config(root: Path, faults: dict[str, Fault] | None = None, alert_url: str | None = None) -> Path:
    cfg = write_config(root)
    doc = yaml.safe_load(cfg.read_text())
    doc["ports"] = {name: free_port() for name in Ports.model_fields}  # every one: stacks run side by side
    if alert_url:
        doc["pipeline"]["alert_webhook"] = alert_url
    for name, f in (faults or {}).items():
        doc["policy"]["targets"].append({"name": name, "kind": "openai", "zone": "us", "tier": "small",
                                         "price_per_1k_input": 0.0001, "price_per_1k_output": 0.0002,
                                         "max_context": 8192, "options": {"base_url": f.url + "/v1"}})
    # The runs the new indexes start (keel up's load): the CPU model by name (keel/auto would spread over the
    # fault targets too) on a small sample, so they are quick and the answers repeat (temperature 0).
    doc["evaluation"] = {"targets": ["smollm2-135m-cpu"], "sample_size": 2}
    # The demo tenant keeps its pii exchanges: the feedback loop's dataset is built from them.
    doc["policy"]["tenants"][0]["retain_exchanges"] = ["pii"]
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return cfg


def start(root: Path) -> KeelStack:
    from tests.conftest import run_keel

    faults = {name: Fault(name, root) for name in FAULT_TARGETS}
    alerts = AlertCapture()
    cfg = stack_config(root, faults, alerts.url)
    local = stack.LocalStack(load_settings(cfg), cfg)
    t0 = time.monotonic()
    up = run_keel("up", "--config", str(cfg), timeout=1500)
    out = up.stdout.decode()
    if up.returncode != 0:
        stop(KeelStack(cfg, local, out, 0, faults, alerts))
        raise AssertionError(f"keel up failed:\n{out}\n{up.stderr.decode()[-5000:]}")
    return KeelStack(cfg, local, out, time.monotonic() - t0, faults, alerts)


def stop(s: KeelStack) -> None:
    from tests.conftest import run_keel

    run_keel("down", "--config", str(s.config), timeout=300)
    for f in s.faults.values():
        f.proc.stop()
    s.alerts.close()
