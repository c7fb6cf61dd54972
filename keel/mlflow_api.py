"""MLflow's tracking server by its REST API, for the processes that do not import mlflow (the gateway's
replicas, Airflow's listener): importing it costs seconds and hundreds of MB per process."""

from __future__ import annotations

import httpx


def find_experiment(http: httpx.Client, tracking_uri: str, name: str) -> str | None:
    """The id of experiment `name`, None when there is none."""
    r = http.get(_api(tracking_uri, "get-by-name"), params={"experiment_name": name})
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return str(r.json()["experiment"]["experiment_id"])


def experiment(http: httpx.Client, tracking_uri: str, name: str) -> str:
    """The id of experiment `name`, created when missing."""
    for _ in range(2):  # a concurrent creator (another replica) wins: read what it made
        if (found := find_experiment(http, tracking_uri, name)) is not None:
            return found
        r = http.post(_api(tracking_uri, "create"), json={"name": name})
        if r.status_code == 200:
            return str(r.json()["experiment_id"])
    raise LookupError(f"MLflow experiment {name!r} could not be read or created at {tracking_uri}")


def _api(tracking_uri: str, call: str) -> str:
    return f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/experiments/{call}"
