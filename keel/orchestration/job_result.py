"""The run summary protocol between a Keel Ray job and the Airflow task that submitted it.

A job prints its summary as the last line of its log, `KEEL_RESULT {json}`; the task reads it back
from the Jobs API logs. The committed manifest stays in storage, out of the line.
"""

from __future__ import annotations

import json
from typing import Any

RESULT_PREFIX = "KEEL_RESULT "


def format_result(summary: dict[str, Any]) -> str:
    return RESULT_PREFIX + json.dumps({k: v for k, v in summary.items() if k != "manifest"}, sort_keys=True)


def parse_result(logs: str) -> dict[str, Any] | None:
    """The summary in the newest `KEEL_RESULT` line of a job's log (None: the job printed none)."""
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line[len(RESULT_PREFIX) :]))
    return None
