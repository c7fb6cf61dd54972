"""Deploying the gateway (`keel serve`, `keel up`): the stack's Ray head is found with its token, and
targets are checked and their keys resolved before anything reaches the cluster."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from pydantic import SecretStr

from keel import stack
from keel.errors import ConfigError, StackError
from keel.processes import start_time
from keel.settings import KeelSettings, load_settings
from tests.support.services import write_config

OPENAI = {"name": "gpt-x", "kind": "openai", "zone": "us", "price_per_1k_input": 0.1, "price_per_1k_output": 0.2,
          "tier": "large", "max_context": 8000,
          "options": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "KEEL_TEST_GPT_KEY"}}


def with_target(settings: KeelSettings, **overrides: object) -> KeelSettings:
    policy = settings.policy.model_dump(mode="json")
    policy["targets"].append(OPENAI | overrides)
    return settings.model_copy(update={"policy": type(settings.policy).model_validate(policy)})


@pytest.fixture
def local(tmp_path):
    cfg = write_config(tmp_path)
    return stack.LocalStack(load_settings(cfg), cfg)


def test_no_running_head_is_one_clear_line(local):
    with pytest.raises(StackError) as e:
        local.gateway_deployment()
    assert "no Ray head of this stack is running" in str(e.value) and "keel up" in str(e.value)
    assert "\n" not in str(e.value)


def test_the_stack_head_is_found_with_its_token(local, monkeypatch):
    # This process stands in for the head `keel up` recorded; its dashboard answers.
    local.run_dir.mkdir(parents=True)
    (local.run_dir / "ray.pid").write_text(json.dumps({"pid": os.getpid(), "start": start_time(os.getpid())}))
    stack.ray_token(local.token)
    monkeypatch.setattr(local, "healthy", lambda name: name == "ray")
    cmd, env = local.gateway_deployment()
    assert cmd[:3] == [sys.executable, "-m", "serving.app"]  # a process of its own: the core never imports serving
    assert cmd[cmd.index("--address") + 1] == f"127.0.0.1:{local.s.ports.ray}"  # the head's address, not the host's
    assert cmd[cmd.index("--config") + 1] == str(local.config)
    assert env["RAY_AUTH_TOKEN_PATH"] == str(local.token) and env["RAY_AUTH_MODE"] == "token"
    assert env["KEEL_HOME"] == str(local.s.home)


def test_another_cluster_gets_the_callers_token(local, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "theirs")
    cmd, env = local.gateway_deployment("10.0.0.5:6379")
    assert cmd[cmd.index("--address") + 1] == "10.0.0.5:6379"
    assert "RAY_AUTH_TOKEN_PATH" not in env
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    stack.ray_token(local.token)  # the address of this stack's own head: its token goes along
    assert local.gateway_deployment("127.0.0.1:6379")[1]["RAY_AUTH_TOKEN_PATH"] == str(local.token)


def test_target_keys_resolve_from_the_environment_or_a_secret_file(tmp_path, monkeypatch):
    from serving.app import with_target_secrets

    settings = with_target(load_settings(write_config(tmp_path)))
    monkeypatch.delenv("KEEL_TEST_GPT_KEY", raising=False)
    monkeypatch.delenv("KEEL_SECRETS_DIR", raising=False)
    with pytest.raises(ConfigError) as e:
        with_target_secrets(settings)
    assert str(e.value) == ("targets.gpt-x.options.api_key_env: KEEL_TEST_GPT_KEY is not set here "
                            "(nor a file KEEL_TEST_GPT_KEY in $KEEL_SECRETS_DIR)")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "KEEL_TEST_GPT_KEY").write_text("sk-from-file\n")
    monkeypatch.setenv("KEEL_SECRETS_DIR", str(secrets))
    assert _key(with_target_secrets(settings)) == "sk-from-file"
    monkeypatch.setenv("KEEL_TEST_GPT_KEY", "sk-from-env")
    resolved = with_target_secrets(settings)
    assert _key(resolved) == "sk-from-env"
    assert "sk-from-env" not in repr(resolved) and "sk-from-env" not in resolved.model_dump_json()


def test_a_key_written_into_keel_yaml_is_refused(tmp_path, monkeypatch):
    from serving.app import with_target_secrets

    monkeypatch.setenv("KEEL_TEST_GPT_KEY", "sk-x")
    settings = with_target(load_settings(write_config(tmp_path)),
                           options={"base_url": "http://127.0.0.1:9/v1", "api_key": "sk-in-yaml"})
    with pytest.raises(ConfigError, match=r"targets\.gpt-x\.options\.api_key: .*keys never live in keel\.yaml"):
        with_target_secrets(settings)


def test_a_bad_target_fails_before_anything_reaches_the_cluster(tmp_path, monkeypatch):
    import ray

    from serving import app

    monkeypatch.delenv("KEEL_TEST_GPT_KEY", raising=False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("connected to Ray with a bad config"))
    with pytest.raises(ConfigError, match="targets.gpt-x.options.api_key_env"):
        app.deploy(with_target(load_settings(write_config(tmp_path))), "127.0.0.1:1")


def _key(settings: KeelSettings) -> str:
    [target] = [t for t in settings.policy.targets if t.name == "gpt-x"]
    key = target.options["api_key"]
    assert isinstance(key, SecretStr)
    return key.get_secret_value()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_keel_serve_deploys_to_the_stack_head_with_a_key_from_this_shell(tmp_path):
    """The new user's path: a head that `keel up` started (here: started the same way), a key set only in
    the shell that runs `keel serve`. A missing key is one line, and the gateway already serving stays."""
    import subprocess
    import urllib.request

    import yaml

    from keel.processes import free_port, stop_session
    from tests.conftest import KEEL

    cfg = write_config(tmp_path)
    doc = yaml.safe_load(cfg.read_text())
    doc["ports"] |= {"ray": free_port(), "ray_dashboard": free_port(), "gateway": free_port(),
                     "ray_metrics": free_port()}
    doc["guard"]["enabled"] = False  # no PII engine to load: this is about deploying
    doc["policy"]["targets"] = [OPENAI]
    cfg.write_text(yaml.safe_dump(doc))
    local = stack.LocalStack(load_settings(cfg), cfg)
    stack.ray_token(local.token)
    local._start("ray", *local._commands()["ray"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KEEL_"))}  # nothing set by hand
    try:
        deadline = time.monotonic() + 180
        while not local.healthy("ray") and time.monotonic() < deadline:
            time.sleep(1)
        missing = subprocess.run([KEEL, "serve", "-c", str(cfg)], capture_output=True, env=env, timeout=300)
        assert missing.returncode != 0
        assert missing.stderr.decode().strip().splitlines()[-1] == (
            "keel gateway not deployed: targets.gpt-x.options.api_key_env: KEEL_TEST_GPT_KEY is not set here "
            "(nor a file KEEL_TEST_GPT_KEY in $KEEL_SECRETS_DIR)")
        served = subprocess.run([KEEL, "serve", "-c", str(cfg)], capture_output=True, timeout=300,
                                env=env | {"KEEL_TEST_GPT_KEY": "sk-only-in-this-shell"})
        assert served.returncode == 0, served.stderr.decode()[-3000:]
        assert b"sk-only-in-this-shell" not in served.stdout + served.stderr
        healthz = f"http://127.0.0.1:{doc['ports']['gateway']}/healthz"
        with urllib.request.urlopen(healthz, timeout=10) as r:
            assert r.status == 200
        again = subprocess.run([KEEL, "serve", "-c", str(cfg)], capture_output=True, env=env, timeout=300)
        assert again.returncode != 0  # refused before deploying: the running gateway keeps serving
        with urllib.request.urlopen(healthz, timeout=10) as r:
            assert r.status == 200
        logs = b"".join(p.read_bytes() for p in local.ray_temp.rglob("*.log") if p.is_file())
        assert b"sk-only-in-this-shell" not in logs  # not in Ray's logs either (a runtime_env would be)
    finally:
        if (pid := local.pid("ray")) is not None:
            stop_session(pid)
