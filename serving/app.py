"""Build the Serve application from keel.yaml and deploy it to a Ray cluster.

    python -m serving.app [--config keel.yaml] [--address ray://... | auto]

One application, "keel": the Gateway ingress on <host>:<ports.gateway>, plus one deployment per
in-cluster target (llama.cpp, vLLM). External targets need none: the gateway calls them itself.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from keel.settings import KeelSettings, get_settings, load_settings

APP_NAME = "keel"


def build(settings: KeelSettings) -> Any:
    from serving.gateway import Gateway
    from serving.targets import deployment_for

    handles = {t.name: d for t in settings.policy.targets if (d := deployment_for(t)) is not None}
    g = settings.gateway
    return Gateway.options(
        num_replicas=g.replicas,
        # Serve must hand every request to the replica, which answers 429 (OpenAI-shaped) itself past
        # its bound; Serve's own limits sit well above it, as a backstop that never queues unbounded.
        max_ongoing_requests=2 * g.max_in_flight_per_replica + 16,
        max_queued_requests=4 * g.max_in_flight_per_replica,
        backpressure_config={"status_code": 429, "retry_after_s": g.retry_after_s},
    ).bind(settings, handles)


def deploy(settings: KeelSettings, address: str | None = None, blocking: bool = False) -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS", "auto"), logging_level=logging.WARNING)
    serve.start(http_options={"host": settings.host, "port": settings.ports.gateway})
    serve.run(build(settings), name=APP_NAME, route_prefix="/", blocking=blocking)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else auto)")
    a = p.parse_args()
    settings = load_settings(a.config) if a.config else get_settings()
    deploy(settings, a.address)
    print(f"keel gateway: http://{settings.host}:{settings.ports.gateway}/v1", flush=True)


if __name__ == "__main__":
    main()
