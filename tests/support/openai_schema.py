"""OpenAI's published OpenAPI document (tests/data/openai, vendored unmodified) as a validator of what
the gateway sends: `validate(instance, "CreateChatCompletionResponse")` raises on the first mismatch
and names every one of them."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

SPEC = Path(__file__).resolve().parents[1] / "data" / "openai" / "openapi.json"
URI = "urn:openai-openapi"


@functools.cache
def _registry() -> Any:
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    doc = json.loads(SPEC.read_text())
    assert doc["openapi"].startswith("3.1"), "OpenAPI 3.1 schemas are JSON Schema 2020-12"
    return Registry().with_resource(URI, Resource.from_contents(doc, default_specification=DRAFT202012))


@functools.cache
def _validator(schema: str) -> Any:
    from jsonschema import Draft202012Validator, validators

    # The document says OpenAPI 3.1 but still marks many fields with 3.0's `nullable: true` (a stream
    # chunk's finish_reason and logprobs among them): null is allowed there, as OpenAI's SDKs read it.
    def nullable(keyword: str) -> Any:
        check = Draft202012Validator.VALIDATORS[keyword]

        def allowing_null(validator: Any, value: Any, instance: Any, schema: dict[str, Any]) -> Any:
            if instance is None and schema.get("nullable") is True:
                return
            yield from check(validator, value, instance, schema)

        return allowing_null

    cls = validators.extend(Draft202012Validator, {"type": nullable("type"), "enum": nullable("enum")})
    return cls({"$ref": f"{URI}#/components/schemas/{schema}"}, registry=_registry())


def errors(instance: Any, schema: str) -> list[str]:
    """Every way `instance` breaks the schema, as "path: message"."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in _validator(schema).iter_errors(instance)]


def validate(instance: Any, schema: str) -> None:
    if found := errors(instance, schema):
        raise AssertionError(f"not a valid {schema}: " + "; ".join(found[:10]))
