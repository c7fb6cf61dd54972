"""The policy model: pure decisions over plain data, no servers."""

import pytest
from pydantic import ValidationError

from keel.errors import DataClassNotAllowedError, ZoneNotAllowedError
from keel.policy import DataClass, Policy, hash_api_key, new_api_key, resolve_class

FREE = {"price_per_1k_input": 0, "price_per_1k_output": 0, "tier": "small", "max_context": 8192}


def target(**fields) -> dict:
    return {"name": "x", "kind": "llama_cpp", "zone": "us", **FREE, **fields}


def policy(**over) -> Policy:
    doc = {
        "zones": {"us": {"region": "us-east-1", "storage": "/data/us"},
                  "eu": {"region": "eu-west-1", "storage": "s3://keel-eu/data"}},
        "data_classes": {
            "public": {"allowed_zones": ["us", "eu"]},
            "internal": {"allowed_zones": ["us", "eu"]},
            "pii": {"allowed_zones": ["eu"]},
            "phi": {"allowed_zones": ["us"]},
        },
        "targets": [
            target(name="small-us"),
            target(name="large-eu", kind="openai", zone="eu", price_per_1k_input=0.5, price_per_1k_output=1.5,
                   tier="large", max_context=128000),
        ],
        "tenants": [
            {"name": "acme", "api_key_hashes": [hash_api_key("keel-acme-key")],
             "allowed_classes": ["public", "internal", "pii"], "default_class": "internal"},
        ],
    }
    doc.update(over)
    return Policy.model_validate(doc)


def test_data_classes_are_ordered_by_sensitivity():
    assert DataClass.public < DataClass.internal < DataClass.pii < DataClass.phi
    assert sorted([DataClass.phi, DataClass.public, DataClass.pii]) == [DataClass.public, DataClass.pii, DataClass.phi]
    assert max(DataClass) == DataClass.phi


def test_residency_decisions():
    p = policy()
    assert p.zones_for(DataClass.pii) == ["eu"]
    assert p.zone_allows("us", DataClass.phi) and not p.zone_allows("eu", DataClass.phi)


def test_api_keys_are_stored_by_hash_only():
    p = policy()
    assert p.tenants[0].api_key_hashes == [hash_api_key("keel-acme-key")]
    assert "keel-acme-key" not in p.model_dump_json()
    key = new_api_key()
    assert key.startswith("keel-") and len(key) > 40 and new_api_key() != key


def test_request_class_may_be_stricter_never_laxer_or_unallowed():
    acme = policy().tenants[0]
    assert resolve_class(acme, None) == DataClass.internal
    assert resolve_class(acme, DataClass.pii) == DataClass.pii
    with pytest.raises(DataClassNotAllowedError, match="below") as below:
        resolve_class(acme, DataClass.public)
    with pytest.raises(DataClassNotAllowedError, match="not allowed") as unallowed:
        resolve_class(acme, DataClass.phi)
    assert below.value.param == unallowed.value.param == "x-keel-data-class"
    assert below.value.code == "data_class_not_allowed"


def test_request_zones_narrow_by_class_tenant_and_ask():
    p = policy()
    acme = p.tenants[0]
    assert p.request_zones(acme, DataClass.internal) == ["us", "eu"]
    assert p.request_zones(acme, DataClass.pii) == ["eu"]
    assert p.request_zones(acme, DataClass.internal, "eu") == ["eu"]
    with pytest.raises(ZoneNotAllowedError, match="may not go to zone 'us'") as refused:
        p.request_zones(acme, DataClass.pii, "us")
    assert refused.value.param == "x-keel-zone" and refused.value.code == "zone_not_allowed"
    with pytest.raises(ZoneNotAllowedError, match="unknown zone 'mars'"):
        p.request_zones(acme, DataClass.pii, "mars")
    eu_only = acme.model_copy(update={"allowed_zones": ["eu"]})
    assert p.request_zones(eu_only, DataClass.internal) == ["eu"]
    with pytest.raises(ZoneNotAllowedError, match="no zone"):
        p.request_zones(eu_only, DataClass.phi)


def test_pseudonymization_policy_by_class_and_target_kind():
    relaxed = {"allowed_zones": ["us", "eu"], "pseudonymize": "external_targets"}
    p = policy(data_classes={"public": relaxed, "internal": {"allowed_zones": ["us", "eu"]},
                             "pii": {"allowed_zones": ["eu"]}, "phi": {"allowed_zones": ["us"]}})
    assert p.pseudonymizes(DataClass.phi, ["llama_cpp"]) and p.pseudonymizes(DataClass.internal, ["vllm"])
    assert not p.pseudonymizes(DataClass.public, ["llama_cpp", "vllm"])
    assert p.pseudonymizes(DataClass.public, ["llama_cpp", "openai"])  # any target of the route may answer
    with pytest.raises(ValidationError, match="personal data is pseudonymized for every target"):
        policy(data_classes={"public": relaxed, "internal": relaxed, "pii": {**relaxed, "allowed_zones": ["eu"]},
                             "phi": {"allowed_zones": ["us"]}})


def test_exchanges_are_kept_only_where_a_tenant_opted_in_and_phi_only_where_its_class_allows():
    tenant = {"name": "keep", "allowed_classes": ["internal", "pii", "phi"], "default_class": "internal",
              "retain_exchanges": ["pii"]}
    p = policy(tenants=[tenant])
    keep = p.tenants[0]
    assert p.retains(keep, DataClass.pii) and not p.retains(keep, DataClass.internal)
    assert not policy().retains(policy().tenants[0], DataClass.pii)  # off by default
    with pytest.raises(ValidationError, match="never retained unless data_classes.phi.retainable"):
        policy(tenants=[{**tenant, "retain_exchanges": ["phi"]}])
    classes = policy().model_dump(mode="json")["data_classes"]
    classes["phi"]["retainable"] = True
    allowed = policy(tenants=[{**tenant, "retain_exchanges": ["phi"]}], data_classes=classes)
    assert allowed.retains(allowed.tenants[0], DataClass.phi)


@pytest.mark.parametrize(
    ("override", "field", "reason"),
    [
        ({"targets": [target(zone="mars", max_context=1)]}, None, "unknown zone 'mars'"),
        ({"data_classes": {"public": {"allowed_zones": ["us"]}}}, None, "missing"),
        ({"tenants": [{"name": "t", "api_key_hashes": ["keel-plaintext"], "allowed_classes": ["public"],
                       "default_class": "public"}]}, "api_key_hashes", "stored hashed"),
        ({"tenants": [{"name": "t", "allowed_classes": ["public"], "default_class": "phi"}]}, None,
         "not in allowed_classes"),
        ({"tenants": [{"name": "t", "allowed_classes": ["public"], "default_class": "public",
                       "allowed_zones": ["mars"]}]}, None, "unknown zone 'mars'"),
        ({"zones": {"US East": {"region": "us-east-1", "storage": "/x"}}}, "zones", "short lowercase"),
        ({"zones": {"us": {"region": "us-east-1", "storage": "/x", "bucket": "typo"}}}, "bucket",
         "Extra inputs are not permitted"),
        ({"targets": [target(price_per_1k_input=-1, max_context=1)]}, "price_per_1k_input",
         "greater than or equal to 0"),
        ({"targets": [target(kind="Llama CPP")]}, "kind", "String should match pattern"),
    ],
)
def test_invalid_policy_is_rejected_with_field_and_reason(override, field, reason):
    with pytest.raises(ValidationError) as e:
        policy(**override)
    text = str(e.value)
    assert reason in text
    if field:
        assert field in text
