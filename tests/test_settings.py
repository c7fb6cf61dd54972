"""Settings: one object from keel.yaml + environment; bad configs name file, field and reason."""

import textwrap

import pytest

from keel.settings import EXAMPLE_CONFIG, ConfigError, load_settings

from .conftest import run_keel


def test_example_config_loads_with_fixed_default_ports():
    s = load_settings(EXAMPLE_CONFIG)
    assert s.host == "127.0.0.1"
    assert (s.ports.gateway, s.ports.ray_dashboard, s.ports.mlflow, s.ports.airflow) == (8000, 8265, 5000, 8080)
    assert set(s.policy.zones) == {"us", "eu"}
    assert s.policy.zones["eu"].region == "eu-west-1"


def test_environment_overrides_file(monkeypatch):
    monkeypatch.setenv("KEEL_PORTS__GATEWAY", "9100")
    monkeypatch.setenv("KEEL_PRIVACY__HASH_KEY", "from-env")
    s = load_settings(EXAMPLE_CONFIG)
    assert s.ports.gateway == 9100 and s.ports.mlflow == 5000
    assert s.privacy.hash_key.get_secret_value() == "from-env"
    assert "from-env" not in repr(s)  # secrets never print


def test_keel_config_env_selects_the_file(tmp_path, monkeypatch):
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(EXAMPLE_CONFIG.read_text().replace("gateway: 8000", "gateway: 8123"))
    monkeypatch.setenv("KEEL_CONFIG", str(cfg))
    assert load_settings().ports.gateway == 8123


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("default_class: internal", "default_class: secret"), ["policy.tenants.0.default_class", "Input should be 'public'"]),
        (("phi:      {allowed_zones: [us]", "phi:      {allowed_zones: [apac]"), ["policy", "unknown zone 'apac'"]),
        (("uri: data/sample/us/clinical, zone: us", "uri: data/sample/us/clinical, zone: eu"),
         ["pipeline.sources.1", "'phi' may not be stored in zone 'eu'"]),
        (("gateway: 8000", "gateway: 99999"), ["ports.gateway", "less than or equal to 65535"]),
        (("chunk_overlap: 200", "chunk_overlap: 200\n  chunk_overlpa: 3"), ["privacy.chunk_overlpa", "Extra inputs are not permitted"]),
        (("host: 127.0.0.1", "host: [127.0.0.1"), ["invalid YAML", "line"]),
    ],
)
def test_bad_config_names_file_field_and_reason(tmp_path, edit, expected):
    cfg = tmp_path / "keel.yaml"
    text = EXAMPLE_CONFIG.read_text()
    assert edit[0] in text
    cfg.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    msg = str(e.value)
    assert str(cfg) in msg
    for part in expected:
        assert part in msg


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_cli_config_check(tmp_path):
    ok = run_keel("config", "check", "--config", str(EXAMPLE_CONFIG))
    assert ok.returncode == 0, ok.stderr
    assert b"ok" in ok.stdout and b"us (us-east-1" in ok.stdout
    bad = tmp_path / "keel.yaml"
    bad.write_text(textwrap.dedent("""
        policy:
          zones: {us: {region: us-east-1, storage: /tmp/us}}
          data_classes:
            public: {allowed_zones: [us]}
            internal: {allowed_zones: [us]}
            pii: {allowed_zones: [us]}
            phi: {allowed_zones: [us]}
          tenants:
            - {name: a, api_key_hashes: [hunter2], allowed_classes: [public], default_class: public}
    """))
    r = run_keel("config", "check", "--config", str(bad))
    assert r.returncode == 2
    err = r.stderr.decode()
    assert str(bad) in err and "policy.tenants.0.api_key_hashes" in err and "stored hashed" in err


def test_cli_version():
    r = run_keel("version")
    assert r.returncode == 0 and r.stdout.decode().startswith("keel ")
