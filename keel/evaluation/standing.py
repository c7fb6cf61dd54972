"""A target's standing: what its evaluations allow automatic routing to do with it.

- A target whose latest completed evaluation regressed leaves automatic routing (`keel/auto`,
  `keel/fast`, ...: exclusion reason `quality`) until an evaluation passes again or an operator
  clears it (`keel eval clear <target>` tags the failed run). Called by name, it still answers.
- A target marked `canary: true` enters only after its first passing evaluation, with
  `evaluation.canary_share` of the traffic that could go to it, plus `canary_step` per further pass
  in a row, up to all of it; a regression takes it out again.
- A target never evaluated serves (it was there before evaluation was): evidence takes a serving
  target out, and evidence lets a new one in. Runs of an alias (keel/auto) judge no one target.

The verdicts live in MLflow (experiment keel-evaluation). Each gateway replica reads them on an
interval in a thread of its own (`StandingBoard`), never on a request's path, so every replica sees
the same standings within one interval; when MLflow cannot be read it keeps the last it read.
The fail-safe (a regression never excludes the last eligible target of a request) is routing's:
keel.routing.plan, with `consequence` saying so in the regression's alert.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from keel.evaluation.runs import COMPLETE_TAG, EXPERIMENT
from keel.policy import ModelTarget, Policy

log = logging.getLogger("keel.evaluation")

CLEARED_TAG = "quality_cleared"  # set by `keel eval clear` on a failed run: it no longer excludes its target
State = Literal["serving", "canary", "excluded"]


@dataclass(frozen=True)
class Verdict:
    """One completed evaluation of one target, as MLflow holds it."""

    run_id: str
    passed: bool
    cleared: bool = False  # a failed run an operator cleared
    why: str = ""  # the regressions, for a failed run

    @property
    def counts_as_pass(self) -> bool:
        return self.passed or self.cleared


@dataclass(frozen=True)
class Standing:
    state: State
    share: float  # of the automatic traffic that could go to it: 1 serving, 0 excluded, between for a canary
    reason: str  # for people: the run and why
    run_id: str | None = None

    def public(self) -> dict[str, Any]:
        return {"state": self.state, "share": round(self.share, 3), "reason": self.reason, "run_id": self.run_id}


SERVING = Standing("serving", 1.0, "no evaluation yet")


def standing(target: ModelTarget, history: Sequence[Verdict], share0: float, step: float) -> Standing:
    """`history`: the target's completed evaluations, newest first."""
    if not history:
        return Standing("excluded", 0.0, "canary: no evaluation yet") if target.canary else SERVING
    latest = history[0]
    if not latest.counts_as_pass:
        return Standing("excluded", 0.0, f"regressed in run {latest.run_id}: {latest.why}"[:300], latest.run_id)
    cleared = " (regression cleared by an operator)" if latest.cleared else ""
    if not target.canary:
        return Standing("serving", 1.0, f"passed in run {latest.run_id}{cleared}", latest.run_id)
    passes = next((i for i, v in enumerate(history) if not v.counts_as_pass), len(history))
    share = min(1.0, share0 + step * (passes - 1))
    if share >= 1.0:
        return Standing("serving", 1.0, f"canary done: {passes} passing evaluations in a row", latest.run_id)
    return Standing("canary", share, f"canary at {share:.0%} after {passes} passing evaluation(s){cleared}",
                    latest.run_id)


def standings(targets: Sequence[ModelTarget], histories: Mapping[str, Sequence[Verdict]], share0: float,
              step: float) -> dict[str, Standing]:
    return {t.name: standing(t, histories.get(t.name, ()), share0, step) for t in targets}


def history_needed(share0: float, step: float) -> int:
    """Verdicts a canary's share can depend on: the passes in a row it takes to reach all traffic, and one."""
    return int((1.0 - share0) / step + 0.999) + 2


def consequence(policy: Policy, target: str, now: Mapping[str, Standing]) -> str:
    """What a regression of `target` does to routing, for its alert: it leaves automatic routing, or it
    keeps serving where it is the last target not excluded (the fail-safe): its zone, which requests
    kept there (a class allowed only there, or a caller's x-keel-zone) can go nowhere else."""
    excluded = {n for n, s in now.items() if s.state == "excluded"} | {target}
    zone = next((t.zone for t in policy.targets if t.name == target), None)
    if zone is not None and not [t for t in policy.targets if t.zone == zone and t.name not in excluded]:
        return (f"{target} keeps serving automatic routing in zone {zone}: it is the last eligible target there, "
                f"and a regression never leaves requests without one (fail-safe); fix or replace it")
    return (f"{target} leaves automatic routing (reason quality) until an evaluation passes again or "
            f"`keel eval clear {target}`; called by name it still answers")


def clear(tracking_uri: str, target: str) -> str | None:
    """An operator's override (`keel eval clear`): the target's latest evaluation, if it regressed, no
    longer excludes it. Returns the cleared run's id; None when the latest did not regress."""
    import getpass

    from keel.errors import NotFoundError
    from keel.evaluation import runs

    c = runs.client(tracking_uri)
    latest = runs.latest(c, runs.experiment_id(c), target)
    if latest is None:
        raise NotFoundError(f"{target} has no completed evaluation run")
    if latest.data.tags.get("gate") == "passed" or latest.data.tags.get(CLEARED_TAG) == "true":
        return None
    run_id = str(latest.info.run_id)
    c.set_tag(run_id, CLEARED_TAG, "true")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    c.set_tag(run_id, f"{CLEARED_TAG}_by", f"{getpass.getuser()} at {when}")
    return run_id


# -- reading the verdicts from MLflow (its REST API: the gateway does not import mlflow) -------------


def source_for(tracking_uri: str | None) -> VerdictSource | None:
    """A reader of the verdicts where MLflow is a server (its REST API); None otherwise."""
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return VerdictSource(tracking_uri)
    return None


def read_once(tracking_uri: str | None, targets: Sequence[ModelTarget], share0: float, step: float,
              ) -> dict[str, Standing]:
    """Every target's standing now, as the gateway reads it (the CLI, an alert); {} without a server."""
    source = source_for(tracking_uri)
    if source is None:
        return {}
    try:
        return source.standings(targets, share0, step)
    finally:
        source.close()


class VerdictSource:
    """The completed evaluations of each target, newest first, from an MLflow tracking server."""

    def __init__(self, tracking_uri: str, timeout_s: float = 5.0) -> None:
        import httpx

        self.tracking_uri, self.api = tracking_uri, tracking_uri.rstrip("/") + "/api/2.0/mlflow"
        self._http = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def histories(self, targets: Sequence[str], depth: int) -> dict[str, list[Verdict]]:
        from keel import mlflow_api

        exp = mlflow_api.find_experiment(self._http, self.tracking_uri, EXPERIMENT)
        if exp is None:  # no evaluation ever ran
            return {}
        out = {}
        for name in targets:
            body = {"experiment_ids": [exp], "max_results": depth, "order_by": ["attributes.start_time DESC"],
                    "filter": f"tags.target = '{name}' and tags.`{COMPLETE_TAG}` = 'true'"}
            r = self._http.post(f"{self.api}/runs/search", json=body)
            r.raise_for_status()
            out[name] = [_verdict(run) for run in r.json().get("runs", [])]
        return out

    def standings(self, targets: Sequence[ModelTarget], share0: float, step: float) -> dict[str, Standing]:
        found = self.histories([t.name for t in targets], history_needed(share0, step))
        return standings(targets, found, share0, step)


def _verdict(run: dict[str, Any]) -> Verdict:
    tags = {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}
    why = tags.get("failure", "").removeprefix("[regression] ")
    return Verdict(run["info"]["run_id"], tags.get("gate") == "passed", tags.get(CLEARED_TAG) == "true", why)


class StandingBoard:
    """A replica's view of every target's standing, refreshed from MLflow every `refresh_s` in a daemon
    thread. `current` is a plain dict swapped whole, so the request path reads it without a lock."""

    def __init__(self, targets: Sequence[ModelTarget], source: VerdictSource | None, refresh_s: float,
                 share0: float, step: float) -> None:
        self.targets, self.source, self.refresh_s = list(targets), source, refresh_s
        self.share0, self.step = share0, step
        # Until the first read: targets serve, canaries wait (no evidence either way).
        self.current: dict[str, Standing] = standings(self.targets, {}, share0, step)
        self.updated_at: float | None = None
        self.error: str | None = None if source else "no MLflow tracking server configured"
        self._stop = threading.Event()
        if source is not None:
            threading.Thread(target=self._loop, name="keel-standing", daemon=True).start()

    def refresh(self) -> None:
        if self.source is None:
            return
        try:
            new = self.source.standings(self.targets, self.share0, self.step)
        except Exception as e:  # noqa: BLE001 - MLflow down: keep the last standings, and say so
            if self.error is None:
                log.warning("evaluation standings not refreshed (kept the last read): %s", e)
            self.error = f"{type(e).__name__}: {e}"[:300]
            return
        for name, s in new.items():
            if s != self.current.get(name):
                log.info("standing of %s: %s (%s)", name, s.state, s.reason)
        self.current, self.updated_at, self.error = new, time.time(), None

    def public(self) -> dict[str, Any]:
        age = None if self.updated_at is None else round(time.time() - self.updated_at, 1)
        return {"refreshed_s_ago": age, "error": self.error,
                "targets": {n: s.public() for n, s in self.current.items()}}

    def close(self) -> None:
        self._stop.set()
        if self.source is not None:
            self.source.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.refresh_s)
