import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEEL = str(Path(sys.executable).with_name("keel"))

# Tests must never reach for a hub or the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def install_keys():
    """The default home's own audit and hash keys, as its first `keel up` makes them (nothing signs with
    a constant: without them the gateway, the audit trail and hashed redaction refuse to start)."""
    from keel import secret_keys
    from keel.settings import get_settings, load_settings

    for purpose in secret_keys.PURPOSES:
        secret_keys.ensure(load_settings().state, purpose)
    get_settings.cache_clear()  # settings read before the keys existed must not linger


@pytest.fixture(scope="session")
def engine():
    """The process-wide privacy engine (spaCy + Presidio + Keel recognizers), loaded once."""
    from keel.privacy import get_engine

    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    return get_engine()


def run_keel(*args: str, input: bytes | None = None, env: dict | None = None, timeout: float = 300):
    """Run the installed `keel` console script as a user would."""
    return subprocess.run(
        [KEEL, *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real local Ray head (dashboard + Jobs API), started for the session and stopped by PID."""
    from tests.support.services import start_ray_head

    head = start_ray_head(tmp_path_factory.mktemp("ray"))
    saved = {k: os.environ.get(k) for k in head.env}
    os.environ.update(head.env)  # this process's clients (ray.init, JobSubmissionClient) need the token
    yield head
    import ray

    if ray.is_initialized():
        ray.shutdown()
    head.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_driver(ray_head):
    """This test process connected to the Ray head as a driver, for calling job bodies in-process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head.gcs, logging_level=logging.WARNING, log_to_driver=False)
    return ray_head


@pytest.fixture(scope="session")
def shared_state(tmp_path_factory):
    """One state dir for the session, so derived model files (the ONNX export) are made once."""
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def keel_stack(tmp_path_factory):
    """One `keel up` for the whole session (slow suites only), stopped at its end; see tests/support/stack.py."""
    from tests.support import stack

    s = stack.start(tmp_path_factory.mktemp("stack"))
    yield s
    stack.stop(s)
