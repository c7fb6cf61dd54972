"""The batch chain, declared once (STAGES below): each stage, the Ray job that runs it, the
snapshot store it reads and the one it commits, and the asset its success publishes.

Scrub publishes nothing: its snapshot reaches the next DAG only through validate, which publishes
the scrubbed asset naming the snapshot that passed, so a failed gate leaves the index DAG blocked.

The DAGs follow from the stages, in order: a stage reading the landing starts a DAG run by the
clock (keel_ingest), one task per zone; a stage reading an asset that an earlier stage publishes
starts a DAG that asset triggers, one per zone (keel_scrub_<zone>, keel_index_<zone>: each zone's
assets update on their own); any other stage runs after the stage before it, in that stage's DAG,
reading what it committed. A DAG is named after its first stage.

Derived from STAGES: the Airflow DAGs, their schedules, inlets, outlets and task ids
(keel.orchestration.stages, called by the one DAG file dags/keel_batch.py); the stores each Ray
job reads and writes (ray_jobs._job); the DAGs `keel up` waits for (keel.stack).

Adding a stage touches three files: its line in STAGES, its Ray job `ray_jobs/<stage>.py`, and its
logic in `keel/pipeline/<stage>.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from keel.errors import ConfigError

SCHEDULE = "0 0 * * *"  # daily (UTC), the DAG that reads the landing; every other DAG runs when its input updates


@dataclass(frozen=True)
class Stage:
    name: str  # its task is `<name>_<zone>`
    job: str  # the Ray job module its task runs (`python -m <job>`)
    reads: str | None  # the snapshot store it reads; None: the zone's landing sources
    commits: str  # the snapshot store it commits to
    publishes: str | None  # the store whose snapshot its success announces as an asset; None: no asset
    doc: str


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "ray_jobs.ingest", reads=None, commits="raw", publishes="raw",
          doc="landing sources -> the zone's raw snapshot (every current document, as received)"),
    Stage("scrub", "ray_jobs.scrub", reads="raw", commits="scrubbed", publishes=None,
          doc="raw -> scrubbed: PII redacted as policy says, unusable records quarantined with their reason"),
    Stage("validate", "ray_jobs.validate", reads="scrubbed", commits="validation", publishes="scrubbed",
          doc="the Great Expectations gate: only a scrubbed snapshot that passed is published"),
    Stage("index", "ray_jobs.index", reads="scrubbed", commits="index", publishes="index",
          doc="validated scrubbed documents -> token-aware chunks -> MiniLM embeddings -> LanceDB index"),
)


@dataclass(frozen=True)
class Dag:
    name: str
    trigger: str | None  # the asset that starts it; None: the clock (SCHEDULE)
    stages: tuple[Stage, ...]

    @property
    def per_zone(self) -> bool:
        return self.trigger is not None

    def dag_id(self, zone: str) -> str:
        return f"keel_{self.name}_{zone}" if self.per_zone else f"keel_{self.name}"

    def dag_ids(self, zones: Iterable[str]) -> list[str]:
        return sorted({self.dag_id(z) for z in zones})


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no batch stage {name!r}; stages: {[s.name for s in STAGES]}")


def task_id(s: Stage, zone: str) -> str:
    return f"{s.name}_{zone}"


def dags(stages: tuple[Stage, ...] = STAGES) -> list[Dag]:
    """The chain's DAGs, in chain order, by the rules in the module docstring."""
    out: list[Dag] = []
    published: set[str] = set()
    for s in stages:
        if s.reads is None or s.reads in published:
            out.append(Dag(s.name, s.reads, (s,)))
        elif out and out[-1].stages[-1].commits == s.reads:
            out[-1] = Dag(out[-1].name, out[-1].trigger, (*out[-1].stages, s))
        else:
            raise ConfigError(f"batch stage {s.name!r} reads {s.reads!r}: neither an asset an earlier stage "
                              "publishes nor what the stage before it commits")
        if s.publishes:
            published.add(s.publishes)
    return out


def dag_ids(zones: Iterable[str]) -> list[str]:
    """Every DAG id of the chain, in chain order."""
    return [i for d in dags() for i in d.dag_ids(zones)]


def started_by(task: str) -> list[str]:
    """The DAG ids that a successful task `<stage>_<zone>` starts, through the asset its stage publishes."""
    name, zone = task.rsplit("_", 1)
    asset = stage(name).publishes
    return [d.dag_id(zone) for d in dags() if asset and d.trigger == asset]
