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
