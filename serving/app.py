"""Build the Serve application from keel.yaml and deploy it to a Ray cluster.

    python -m serving.app [--config keel.yaml] [--address host:port | auto]

One application, "keel": the Gateway ingress on <host>:<ports.gateway>, plus one deployment per
in-cluster target (llama.cpp, vLLM). External targets need none: the gateway calls them itself.
`keel serve` and `keel up` run this module as a process of their own (the core does not import
serving). Everything is checked and built before anything is deployed, so a bad config is a
one-line error per problem and the gateway already running keeps serving.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from keel.errors import ConfigError
from keel.policy import ModelTarget
from keel.settings import KeelSettings, load_settings, read_secret
from keel.target_kinds import validate_targets

APP_NAME = "keel"


def with_target_secrets(settings: KeelSettings) -> KeelSettings:
    """Settings whose targets carry their keys, read here (this environment or $KEEL_SECRETS_DIR) as
    SecretStr in options.api_key: they reach the replicas inside its init arguments, not through the
    Ray head's environment or a runtime_env (whose agent logs it). SecretStr prints as '**********',
    so neither logs nor the audit record's config see a key. ConfigError, one line per problem naming
    the target and the field, when a target is unusable (its kind's checks: a key written into keel.yaml
    is one) or a key is missing."""
    problems = validate_targets(settings.policy)
    targets: list[ModelTarget] = []
    for t in settings.policy.targets:
        if (var := t.options.get("api_key_env")) is None:
            targets.append(t)
        elif (key := read_secret(str(var))) is None:
            problems.append(f"targets.{t.name}.options.api_key_env: {var} is not set here "
                            f"(nor a file {var} in $KEEL_SECRETS_DIR)")
        else:
            targets.append(t.model_copy(update={"options": {**t.options, "api_key": key}}))
    if problems:
        raise ConfigError("\n".join(problems))
    return settings.model_copy(update={"policy": settings.policy.model_copy(update={"targets": targets})})


def build(settings: KeelSettings) -> Any:
    from serving.gateway import Gateway
    from serving.targets import deployment_for

    settings = with_target_secrets(settings)
    handles = {t.name: d for t in settings.policy.targets if (d := deployment_for(t)) is not None}
    g = settings.gateway
    deployment: Any = Gateway  # a Serve Deployment (@serve.deployment), which mypy cannot see through
    return deployment.options(
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

    application = build(settings)  # before connecting: a bad config changes nothing in the cluster
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS", "auto"), logging_level=logging.WARNING)
    serve.start(http_options={"host": settings.host, "port": settings.ports.gateway})
    serve.run(application, name=APP_NAME, route_prefix="/", blocking=blocking)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else auto)")
    a = p.parse_args()
    try:
        settings = load_settings(a.config)
        deploy(settings, a.address)
    except ConfigError as e:
        sys.exit(f"keel gateway not deployed: {e}")
    except ConnectionError as e:
        sys.exit(f"keel gateway not deployed: cannot reach the Ray cluster at {a.address or 'auto'}: {e}")
    except RuntimeError as e:  # serve.run: a replica failed to start; the message ends with its error
        last = next((line for line in reversed(str(e).splitlines()) if line.strip()), type(e).__name__)
        sys.exit(f"keel gateway: deployment failed: {last.strip()} (the Serve controller's log has the rest)")
    print(f"keel gateway: http://{settings.host}:{settings.ports.gateway}/v1", flush=True)


if __name__ == "__main__":
    main()
