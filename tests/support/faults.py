"""Fault servers (tests.support.fault_server) run as real processes: failing providers and capture servers."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from tests.support.services import Service, free_port


class Fault:
    def __init__(self, name: str, root: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name, self.root = name, root
        self.start()

    def start(self) -> None:
        command = [sys.executable, "-m", "tests.support.fault_server", "--port", str(self.port)]
        self.proc = Service(self.name, command, {},
                            self.root / f"{self.name}.log", cwd=Path(__file__).resolve().parents[2])
        self.proc.wait_http(f"{self.url}/v1/models", timeout=30)

    def kill(self) -> None:
        import os
        import signal

        os.killpg(self.proc.proc.pid, signal.SIGKILL)
        self.proc.proc.wait(10)

    def control(self, **kw) -> None:
        httpx.post(f"{self.url}/_control", json=kw).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_reset").raise_for_status()

    def requests(self) -> list[dict]:
        return httpx.get(f"{self.url}/_requests").json()

    def raw(self) -> bytes:
        """Every byte the server received on its model endpoints since the last reset."""
        return httpx.get(f"{self.url}/_raw").content
