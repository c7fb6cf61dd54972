"""Model targets behind one protocol (serving.targets.base.Target).

A new backend is one module here declaring `KIND = TargetKind(...)` plus its entry point in
pyproject.toml (see keel.target_kinds); these two functions only look kinds up.
"""

from __future__ import annotations

from typing import Any, cast

from keel.errors import ConfigError
from keel.policy import ModelTarget
from keel.settings import GatewaySettings
from keel.target_kinds import resolve
from serving.targets.base import Target


def deployment_for(config: ModelTarget) -> Any | None:
    """The Ray Serve application a target needs inside the cluster (None for external endpoints)."""
    kind, options = resolve(config)
    return None if kind.deployment is None else kind.deployment(config, options)


def make_target(config: ModelTarget, handle: Any, gateway: GatewaySettings) -> Target:
    """The gateway's side of a target; `handle` is its deployment's handle for in-cluster kinds."""
    kind, options = resolve(config)
    if kind.deployment is not None and handle is None:
        raise ConfigError(f"targets.{config.name}: kind {config.kind!r} needs its deployment, and none was deployed")
    return cast(Target, kind.target(config, options, handle, gateway))
