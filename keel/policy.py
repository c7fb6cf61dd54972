"""The policy model: zones, data classes, model targets and tenants.

Pure data and pure decisions, no I/O: the router, the batch jobs and the gateway all ask
this one object where data may live, where it may be sent and who may send it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from keel.errors import DataClassNotAllowedError, ZoneNotAllowedError
from keel.target_kinds import Feature, is_external


class DataClass(StrEnum):
    """Data classes, declared from least to most sensitive."""

    public = "public"
    internal = "internal"
    pii = "pii"
    phi = "phi"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, DataClass):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, DataClass):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, DataClass):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, DataClass):
            return NotImplemented
        return self.rank >= other.rank


_RANK = {dc: i for i, dc in enumerate(DataClass)}

_NAME = r"^[a-z][a-z0-9-]{0,31}$"
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
# The request headers a caller narrows its scope with: the parameter named by a refusal.
_CLASS_HEADER, _ZONE_HEADER = "x-keel-data-class", "x-keel-zone"
API_KEY_PREFIX = "keel-"


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in keel.yaml must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Zone(_Strict):
    """A geographic zone: where data of a class may be stored and processed."""

    region: str = Field(description="Cloud region, e.g. us-east-1", min_length=1)
    storage: str = Field(description="Storage root: a local path or s3://bucket/prefix", min_length=1)
    s3_endpoint: str | None = Field(default=None, description="S3 endpoint URL for this zone, if not AWS")

    @field_validator("storage")
    @classmethod
    def _storage_scheme(cls, v: str) -> str:
        if "://" in v and not v.startswith(("s3://", "file://")):
            raise ValueError("storage must be a local path, file:// or s3:// URI")
        return v


# What public and internal requests keep as sent by default: places (countries, cities). A place alone
# identifies no one, and pseudonymized it costs answers about the world; next to a person's name it
# could, which is why pii and phi keep nothing.
KEPT_ENTITIES = ("LOCATION",)


class DataClassRule(_Strict):
    allowed_zones: list[str] = Field(min_length=1)
    # How the batch pipeline redacts this class: irreversible typed tokens ([PERSON]) or keyed-hash
    # tokens ([PERSON:7f3a9c01]) that keep "same person" linkage for analytics without being reversible.
    redaction: Literal["typed", "hashed"] = "typed"
    # Which model targets get this class pseudonymized (PII swapped for placeholders, restored in the
    # answer). External targets always do; "external_targets" lets in-cluster ones see the text as
    # sent, for classes declared free of personal data. pii and phi must stay "all_targets".
    pseudonymize: Literal["all_targets", "external_targets"] = "all_targets"
    # Content parts the guard cannot read (images, audio, files) where this class is pseudonymized:
    # refused (403), or sent as they are, which only a class declared free of personal data may do.
    unreadable_parts: Literal["refuse", "send"] = "refuse"
    # Entity types left as sent where this class is pseudonymized: general knowledge a model needs to
    # answer at all ("the capital of <LOCATION_1>" has no answer). None: the class's default,
    # KEPT_ENTITIES (measured in benchmarks/guard_quality.py). pii and phi keep none.
    keep_entities: list[str] | None = None
    # Whether a tenant may keep this class's exchanges (pseudonymized) for a fine-tuning dataset
    # (Tenant.retain_exchanges). None: every class but phi; phi only where set true here.
    retainable: bool | None = None

    def retains(self, data_class: DataClass) -> bool:
        return self.retainable if self.retainable is not None else data_class < DataClass.phi


class ModelTarget(_Strict):
    """A model the gateway can route to."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$")
    # A declared target kind (keel.target_kinds); checked, with `options`, where targets are built
    # and by `keel config check`, not here: loading a policy must not load the serving stack.
    kind: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    zone: str  # where the model runs: data of a class is routed here only if the class may live here
    price_per_1k_input: float = Field(ge=0)
    price_per_1k_output: float = Field(ge=0)
    tier: Literal["small", "large"]
    max_context: int = Field(gt=0)
    # Request features this target honours; a request using another gets a clear 400 from it.
    supports: list[Feature] = Field(default_factory=list)
    # Backend-specific settings (model path, base_url, engine args), validated by the kind's options schema.
    options: dict[str, object] = Field(default_factory=dict)
    # A new target: it enters automatic routing only after its first passing evaluation, then with a
    # share of the traffic that grows while evaluations keep passing (settings.evaluation.canary_*).
    canary: bool = False

    def cost(self, usage: Mapping[str, int] | None) -> float:
        """What an answer cost at this target's prices, in the prices' currency (USD by convention)."""
        if not usage:
            return 0.0
        return (usage.get("prompt_tokens", 0) * self.price_per_1k_input
                + usage.get("completion_tokens", 0) * self.price_per_1k_output) / 1000


class Tenant(_Strict):
    name: str = Field(pattern=_NAME)
    api_key_hashes: list[str] = Field(default_factory=list)
    allowed_classes: list[DataClass] = Field(min_length=1)
    default_class: DataClass
    # Zones this tenant's data may go to, within what each class allows; None: every zone.
    allowed_zones: list[str] | None = None
    # Per-tenant rate limits, split evenly across gateway replicas; None: unlimited.
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    # evaluation: Keel's own evaluation client (keel.evaluation); its requests are marked as such in
    # the audit trail, and its rate limits are its own, apart from the users'.
    purpose: Literal["serving", "evaluation"] = "serving"
    # Classes whose exchanges (the prompt and answer as the model saw them: placeholders, never the
    # caller's values) are kept for the fine-tuning dataset, until feedback.retention_days. Opt-in.
    retain_exchanges: list[DataClass] = Field(default_factory=list)

    @field_validator("api_key_hashes")
    @classmethod
    def _hashes(cls, v: list[str]) -> list[str]:
        for h in v:
            if not _KEY_HASH.match(h):
                raise ValueError("API keys are stored hashed: expected 'sha256:<64 hex>', never the key itself")
        return v

    @model_validator(mode="after")
    def _default_allowed(self) -> Tenant:
        if self.default_class not in self.allowed_classes:
            raise ValueError(f"default_class {self.default_class.value!r} is not in allowed_classes")
        return self


class Policy(_Strict):
    zones: dict[str, Zone]
    data_classes: dict[DataClass, DataClassRule]
    targets: list[ModelTarget] = Field(default_factory=list)
    tenants: list[Tenant] = Field(default_factory=list)

    @field_validator("zones")
    @classmethod
    def _zone_names(cls, v: dict[str, Zone]) -> dict[str, Zone]:
        if not v:
            raise ValueError("at least one zone is required")
        for name in v:
            if not re.match(_NAME, name):
                raise ValueError(f"zone name {name!r} must be short lowercase, e.g. 'us' or 'eu'")
        return v

    @model_validator(mode="after")
    def _references(self) -> Policy:
        missing = [dc.value for dc in DataClass if dc not in self.data_classes]
        if missing:
            raise ValueError(f"data_classes must define every class; missing: {missing}")
        for dc, rule in self.data_classes.items():
            for z in rule.allowed_zones:
                if z not in self.zones:
                    raise ValueError(f"data_classes.{dc.value}.allowed_zones: unknown zone {z!r}")
            if dc >= DataClass.pii and rule.pseudonymize != "all_targets":
                raise ValueError(f"data_classes.{dc.value}.pseudonymize: personal data is pseudonymized for every "
                                 "target; only public and internal may use 'external_targets'")
            if dc >= DataClass.pii and rule.keep_entities:
                raise ValueError(f"data_classes.{dc.value}.keep_entities: personal data is pseudonymized whole; "
                                 "only public and internal may keep entity types as sent")
            if dc >= DataClass.pii and rule.unreadable_parts != "refuse":
                raise ValueError(f"data_classes.{dc.value}.unreadable_parts: images, audio and files of personal "
                                 "data cannot be pseudonymized, so they are refused; only public and internal may "
                                 "'send' them")
        names = [t.name for t in self.targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"targets: duplicate names {dupes}")
        for t in self.targets:
            if t.zone not in self.zones:
                raise ValueError(f"targets.{t.name}.zone: unknown zone {t.zone!r}")
        for tenant in self.tenants:
            for z in tenant.allowed_zones or ():
                if z not in self.zones:
                    raise ValueError(f"tenants.{tenant.name}.allowed_zones: unknown zone {z!r}")
        for tenant in self.tenants:
            for dc in tenant.retain_exchanges:
                if not self.data_classes[dc].retains(dc):
                    raise ValueError(f"tenants.{tenant.name}.retain_exchanges: data class {dc.value!r} is never "
                                     f"retained unless data_classes.{dc.value}.retainable is true")
        tenants = [t.name for t in self.tenants]
        if len(set(tenants)) != len(tenants):
            raise ValueError("tenants: duplicate names")
        hashes = [h for t in self.tenants for h in t.api_key_hashes]
        if len(set(hashes)) != len(hashes):
            raise ValueError("tenants: the same API key hash is given to more than one tenant")
        return self

    # -- decisions ---------------------------------------------------------------------------

    def zones_for(self, data_class: DataClass) -> list[str]:
        """Zones where data of this class may be stored or processed."""
        return list(self.data_classes[data_class].allowed_zones)

    def zone_allows(self, zone: str, data_class: DataClass) -> bool:
        return zone in self.data_classes[data_class].allowed_zones

    def request_zones(self, tenant: Tenant, data_class: DataClass, asked: str | None = None) -> list[str]:
        """Zones a request's data may go to: its class's zones, within the tenant's, within the one
        the caller asked for (x-keel-zone). Raises ZoneNotAllowedError naming why none is left."""
        zones = [z for z in self.zones_for(data_class) if tenant.allowed_zones is None or z in tenant.allowed_zones]
        if asked is not None:
            if asked not in self.zones:
                raise ZoneNotAllowedError(f"unknown zone {asked!r}; zones: {sorted(self.zones)}", param=_ZONE_HEADER)
            if asked not in zones:
                raise ZoneNotAllowedError(f"data class {data_class.value!r} of tenant {tenant.name!r} may not go to "
                                          f"zone {asked!r} (allowed: {zones})", param=_ZONE_HEADER)
            zones = [asked]
        if not zones:
            raise ZoneNotAllowedError(f"tenant {tenant.name!r} has no zone where data class {data_class.value!r} "
                                      "may go", param=_ZONE_HEADER)
        return zones

    def readable_classes(self, tenant: Tenant, data_class: DataClass, zones: Iterable[str]) -> list[DataClass]:
        """Classes of stored data (retrieved chunks) a request may carry to a model: no more sensitive
        than the request's own class, allowed to its tenant, and allowed in every zone it may be sent to
        (failover may pick any of them)."""
        zones = list(zones)
        return [c for c in DataClass if c <= data_class and c in tenant.allowed_classes
                and all(self.zone_allows(z, c) for z in zones)]

    def kept_entities(self, data_class: DataClass) -> frozenset[str]:
        """Entity types a pseudonymized request of this class keeps as sent."""
        kept = self.data_classes[data_class].keep_entities
        return frozenset(kept if kept is not None else KEPT_ENTITIES if data_class < DataClass.pii else ())

    def retains(self, tenant: Tenant, data_class: DataClass) -> bool:
        """Whether a request's exchange is kept for the fine-tuning dataset: its tenant opted in for its class."""
        return data_class in tenant.retain_exchanges and self.data_classes[data_class].retains(data_class)

    def pseudonymizes(self, data_class: DataClass, target_kinds: Iterable[str]) -> bool:
        """Whether a request of this class is pseudonymized before these targets (any of which may
        answer it, by failover): always for external ones (an undeclared kind counts as external), and
        for every one when the class says so."""
        kinds = set(target_kinds)
        return any(is_external(k) for k in kinds) or (
            bool(kinds) and self.data_classes[data_class].pseudonymize == "all_targets")


def hash_api_key(api_key: str) -> str:
    """SHA-256 suffices for API keys: they are long random secrets, not guessable passwords."""
    return "sha256:" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def resolve_class(tenant: Tenant, requested: DataClass | None) -> DataClass:
    """The data class a request runs under.

    A request may ask for stricter handling than its key's default, never for a class
    the tenant is not allowed, and never for a laxer one than its default.
    """
    if requested is None:
        return tenant.default_class
    if requested not in tenant.allowed_classes:
        raise DataClassNotAllowedError(f"tenant {tenant.name!r} is not allowed data class {requested.value!r}",
                                       param=_CLASS_HEADER)
    if requested < tenant.default_class:
        raise DataClassNotAllowedError(
            f"data class {requested.value!r} is below tenant {tenant.name!r}'s default {tenant.default_class.value!r}",
            param=_CLASS_HEADER,
        )
    return requested
