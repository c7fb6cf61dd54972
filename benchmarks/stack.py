"""The local stack from a fresh clone: time to the first answered request, and peak memory (PSS).

    python benchmarks/stack.py [--cold]

Clones this repository's HEAD into a temp folder and runs `make up` there, as a newcomer would, on
free ports. Measured:
  - time from the clone to `make install` done, to every service healthy (keel up's own lines), to
    the first chat answered through the gateway, and to the sample corpus loaded;
  - memory of the whole stack as PSS (proportional set size: shared pages split between the processes
    that share them, so the sum is the real footprint; summed RSS would count every shared library
    once per process), sampled every second: the peak (during the corpus load) and at rest after it;
  - sampling goes on through the first evaluation (keel_evaluate, started by the new index) until it
    has logged its run;
  - then `keel down`, and the processes left (goal 0).
pip's wheel cache is used unless --cold (then llama-cpp-python and every wheel come fresh from the
index). Prints a table and writes benchmarks/results/stack.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_report  # noqa: E402
from keel import processes, stack  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "stack.json"


class PssSampler(threading.Thread):
    """Sums PSS over every process in the sessions named by the stack's PID files, once a second."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.samples, self.stop = run_dir, [], threading.Event()

    def now(self) -> dict[str, int]:
        out = {}
        for f in self.run_dir.glob("*.pid"):
            try:
                rec = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            out[f.stem] = processes.pss_bytes(processes.session_members(rec["pid"]))
        return out

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.samples.append((time.monotonic(), self.now()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cold", action="store_true", help="no pip cache: build llama-cpp-python and fetch every wheel")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="keel-stack-bench-"))
    clone = work / "keel"
    ports = {name: processes.free_port() for name in ("gateway", "ray_dashboard", "ray", "mlflow", "airflow")}
    env = {**os.environ, **{f"KEEL_PORTS__{k.upper()}": str(v) for k, v in ports.items()}, "CI": "true"}
    for k in ("KEEL_CONFIG", "KEEL_HOME", "RAY_ADDRESS", "VIRTUAL_ENV"):
        env.pop(k, None)
    if a.cold:
        env["PIP_NO_CACHE_DIR"] = "1"
    report: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()}, "cold_pip_cache": a.cold}
    marks: dict[str, float] = {}
    sampler = PssSampler(clone / ".keel" / "run")
    t0 = time.monotonic()
    try:
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        marks["clone"] = time.monotonic() - t0
        subprocess.run(["make", "install"], cwd=clone, env=env, check=True, stdout=subprocess.DEVNULL)
        marks["make_install"] = time.monotonic() - t0
        sampler.start()
        up = subprocess.Popen(["make", "up"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        first_answer = threading.Thread(target=_first_answer, args=(clone, ports["gateway"], marks, t0), daemon=True)
        first_answer.start()
        log = []
        assert up.stdout is not None  # stdout=PIPE
        for line in up.stdout:
            log.append(line.rstrip())
            if " healthy " in line:
                marks[f"{line.split()[0]}_healthy"] = time.monotonic() - t0
        if up.wait() != 0:
            raise SystemExit("make up failed:\n" + "\n".join(log[-30:]))
        marks["make_up_done"] = time.monotonic() - t0
        first_answer.join(60)
        # The first evaluation (started by the index the load published) runs in the background: its
        # memory counts, so sampling goes on until it has logged its run.
        keel = str(clone / ".venv" / "bin" / "keel")
        while time.monotonic() - t0 < 3600:
            if subprocess.run([keel, "eval", "show"], cwd=clone, env=env, capture_output=True).returncode == 0:
                marks["first_evaluation_done"] = time.monotonic() - t0
                break
            time.sleep(5)
        time.sleep(15)  # at rest: the corpus loaded and evaluated, nothing running
        rest = sampler.now()
        sampler.stop.set()
        peak_t, peak = max(sampler.samples, key=lambda s: sum(s[1].values()))
        report["seconds_from_clone"] = {k: round(v, 1) for k, v in marks.items()}
        report["pss_mib"] = {
            "peak_total": round(sum(peak.values()) / 2**20),
            "peak_by_service": {k: round(v / 2**20) for k, v in peak.items()},
            "peak_at_s": round(peak_t - t0, 1),
            "rest_total": round(sum(rest.values()) / 2**20),
            "rest_by_service": {k: round(v / 2**20) for k, v in rest.items()},
        }
    finally:
        sampler.stop.set()
        down = subprocess.run([str(clone / ".venv" / "bin" / "keel"), "down"], cwd=clone, env=env, capture_output=True,
                              text=True) if (clone / ".venv" / "bin" / "keel").exists() else None
        report["down"] = {"ok": bool(down and down.returncode == 0),
                          "left": processes.processes_naming(clone, stack.ray_temp_dir(clone / ".keel" / "ray"))}
        shutil.rmtree(work, ignore_errors=True)
    s, m = report["seconds_from_clone"], report["pss_mib"]
    print(f"\nKeel local stack from a fresh clone, {os.cpu_count()} CPUs, pip cache {'off' if a.cold else 'on'}")
    for k, v in s.items():
        print(f"  {k:<40} {v:>8} s")
    print(f"  {'peak PSS, whole stack (goal <= 5 GB)':<40} {m['peak_total']:>8} MiB  {m['peak_by_service']}")
    print(f"  {'PSS at rest':<40} {m['rest_total']:>8} MiB  {m['rest_by_service']}")
    print(f"  {'processes left after keel down (goal 0)':<40} {len(report['down']['left']):>8}")
    write_report(report, a.out)
    return 0


def _first_answer(clone: Path, port: int, marks: dict[str, float], t0: float) -> None:
    """Poll until a chat through the gateway answers, with the key `keel up` writes."""
    import httpx

    key_file = clone / ".keel" / "quickstart_api_key"
    body = {"model": "keel/auto", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]}
    while time.monotonic() - t0 < 3600:
        try:
            if key_file.exists():
                r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30,
                               headers={"Authorization": f"Bearer {key_file.read_text().strip()}"})
                if r.status_code == 200:
                    marks["first_answer"] = time.monotonic() - t0
                    return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


if __name__ == "__main__":
    raise SystemExit(main())
