"""Alert sinks: where a classified failure is announced the moment it happens.

Always the log; also a webhook (`pipeline.alert_webhook`, JSON POST) when configured. A sink never
raises: an alert that cannot be delivered is logged, and the task's own failure still stands.
Alerts carry ids, kinds and messages, never document contents.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from dataclasses import asdict, dataclass
from typing import Protocol

log = logging.getLogger("keel.alerts")


@dataclass(frozen=True)
class Alert:
    kind: str
    dag_id: str
    task_id: str
    run_id: str
    try_number: int
    will_retry: bool
    message: str
    log_url: str | None = None


class AlertSink(Protocol):
    def send(self, alert: Alert) -> None: ...


class LogSink:
    def send(self, alert: Alert) -> None:
        log.error("KEEL ALERT %s", json.dumps(asdict(alert), sort_keys=True))


class WebhookSink:
    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url, self.timeout = url, timeout

    def send(self, alert: Alert) -> None:
        body = json.dumps({"keel_alert": asdict(alert)}).encode()
        # S310: the URL is pipeline.alert_webhook, from the operator's settings, not user input.
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"}, method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                resp.read()
        except Exception as e:  # noqa: BLE001 - delivery trouble must not mask the task's failure
            log.error("alert webhook %s failed: %s", self.url, e)


def sinks(webhook_url: str | None) -> list[AlertSink]:
    return [LogSink(), *([WebhookSink(webhook_url)] if webhook_url else [])]


def send(alert: Alert, webhook_url: str | None) -> None:
    for sink in sinks(webhook_url):
        sink.send(alert)
