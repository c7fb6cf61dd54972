"""Target kinds: each model backend declares itself once, and the core reads that declaration.

A kind is one module of `serving.targets` holding `KIND = TargetKind(...)`: its name, whether it
is external (leaves the cluster), the request features it can ever honour, the schema of its
`options`, the gateway's side of it and, for an in-cluster kind, its Ray Serve deployment. It is
registered as an entry point in the group "keel.target_kinds" (pyproject.toml; another package
can add kinds the same way). Adding a kind is that module plus that one line.

Why entry points: the core (policy, `keel config check`) must answer "is this kind external?"
without importing `serving`, which is built on it, and without a second list of kinds that can
drift from the kinds themselves (the old `EXTERNAL_KINDS`: a new external kind someone forgot to
list there got public and internal text without pseudonymization). A registry that kinds fill in
when imported would answer differently depending on what the process happened to import.

Fail closed: a kind that is not declared, or whose declaration does not load, is external to
`is_external` (its requests are pseudonymized), and a one-line error naming the target and the
field wherever targets are checked or built (`validate_targets`, `resolve`). Loading the policy
does not load kinds: settings are read by DAG parsing and batch jobs, which must not import the
serving stack; `validate_targets` runs where targets are deployed and in `keel config check`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from keel.errors import ConfigError

if TYPE_CHECKING:
    from keel.policy import ModelTarget, Policy
    from keel.settings import GatewaySettings

GROUP = "keel.target_kinds"
# Request features a target may honour: tools, a structured response_format, and content parts other
# than text (images: "image_url", audio: "input_audio", files: "file").
Feature = Literal["tools", "response_format", "images", "audio", "files"]

OptionsT = TypeVar("OptionsT", bound=BaseModel)


@dataclass(frozen=True)
class TargetKind(Generic[OptionsT]):
    name: str
    external: bool  # leaves the cluster: a third party sees what it is sent, so it is always pseudonymized
    options: type[OptionsT]  # validates a target's `options`
    # The gateway's side of a target, built as target(config, options, handle, gateway settings);
    # handle is its deployment's handle, None for a kind without one.
    target: Callable[[ModelTarget, OptionsT, Any, GatewaySettings], object]
    deployment: Callable[[ModelTarget, OptionsT], object] | None = None  # its Serve application in the cluster
    supports: frozenset[Feature] = frozenset()  # the features it can ever honour


def declared_names() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def is_external(name: str) -> bool:
    """Whether a kind leaves the cluster; an unknown or broken kind does, as far as anyone can tell."""
    found = _declared(name)
    return isinstance(found, str) or found.external


def resolve(target: ModelTarget) -> tuple[TargetKind[Any], BaseModel]:
    """A target's kind and its options as that kind's model; ConfigError, one line per problem, if unusable."""
    found, options, problems = _check(target)
    if problems or found is None or options is None:
        raise ConfigError("\n".join(problems))
    return found, options


def validate_targets(policy: Policy) -> list[str]:
    """Every problem with the policy's targets, one line each naming the target and the field
    (an unknown kind, options its kind rejects, a feature it cannot honour); empty if all are usable."""
    return [problem for t in policy.targets for problem in _check(t)[2]]


def _check(target: ModelTarget) -> tuple[TargetKind[Any] | None, BaseModel | None, list[str]]:
    where = f"targets.{target.name}"
    found = _declared(target.kind)
    if isinstance(found, str):
        return None, None, [f"{where}.kind: {found}"]
    problems = [f"{where}.supports: kind {found.name!r} cannot honour {feature!r}"
                for feature in target.supports if feature not in found.supports]
    options: BaseModel | None = None
    try:
        options = found.options.model_validate(target.options)
    except ValidationError as e:
        problems += [f"{where}.options{_dotted(err['loc'])}: {err['msg']}" for err in e.errors()]
    return found, options, problems


def _dotted(loc: tuple[int | str, ...]) -> str:
    return "".join(f".{part}" for part in loc)


@functools.cache
def _declared(name: str) -> TargetKind[Any] | str:
    """The kind declared under this name, or why there is none (entry points are read once per name)."""
    found = entry_points(group=GROUP, name=name)
    if not found:
        return f"unknown target kind {name!r}; declared kinds: {declared_names()}"
    if len({ep.value for ep in found}) > 1:
        return f"target kind {name!r} is declared more than once: {sorted(ep.value for ep in found)}"
    ep = next(iter(found))
    try:
        kind = ep.load()
    except Exception as e:  # noqa: BLE001 - a kind that does not load is undeclared (external) and reported
        return f"target kind {name!r} ({ep.value}) does not load: {type(e).__name__}: {e}"
    if not isinstance(kind, TargetKind) or kind.name != name:
        return f"entry point {name!r} ({ep.value}) is not a TargetKind named {name!r}"
    return kind
