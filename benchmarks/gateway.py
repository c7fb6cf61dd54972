"""Gateway overhead, throughput, routing cost, breaker reaction and tokens/s: all in one run.

On a local Ray head, one Serve application holds the Keel gateway with four targets:
  echo, echo2    external OpenAI-compatible echo servers (tests/support/fault_server.py, answers at once)
  echo-handle    an in-cluster echo deployment called through a DeploymentHandle
  smollm2        the real llama.cpp target (SmolLM2-135M, CPU)
and a second application, /bare, is the baseline for the routing cost: a bare FastAPI ingress
that forwards the same body to the same echo deployment through a handle and returns its answer.

Measured (medians and p99 of sequential requests, the two sides of each comparison alternating
request by request so that drift hits both alike; also the median of the paired differences):
  1. overhead: through Keel to `echo` minus straight to the echo server; and max req/s through Keel
  2. routing cost: Keel to `echo-handle` minus /bare; plus an in-process microbenchmark of the
     per-request pure path (parse, complexity, routing)
  3. breaker: time from SIGKILL of `echo` (under steady traffic) to its breaker opening, with the
     client errors seen meanwhile (goal 0: the traffic fails over to echo2)
  4. tokens/s through the gateway vs llama.cpp alone in this process, on the same prompts
  5. tracing: Keel to `echo-handle` with every request traced (to a real MLflow server) minus the same
     gateway with tracing off (a second application, /untraced); and, after the throughput run, the
     share of its requests whose trace reached MLflow (dropped and failed traces are counted), the
     CPU MLflow spent ingesting them (it shares the 2 cores here), and the exporter thread's own work
     per trace (an in-process microbenchmark)

The PII guard is off here (guard.enabled: false): this measures routing and failover; the guard's own
cost per request is measured by benchmarks/guard.py, beside a model's latency.
Usage: python benchmarks/gateway.py [--requests 300]
Prints a table and writes benchmarks/results/gateway.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import latency, ms, write_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gateway.json"
BODY = {"model": "echo", "messages": [{"role": "user", "content": "What is the refund policy for annual plans?"}],
        "max_tokens": 64}
PROMPTS = ["Say hello to the team.", "What is the capital of France?", "List three colors.",
           "Give me a title for a blog post about gardening.", "Write one sentence about the sea."]


def sequential(url: str, body: dict[str, Any], n: int, headers: dict[str, str]) -> list[float]:
    out = []
    with httpx.Client(timeout=30, headers=headers) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.post(url, json=body)
            out.append(time.perf_counter() - t0)
            r.raise_for_status()
    return out


def paired(a: tuple[str, dict[str, Any], dict[str, str]], b: tuple[str, dict[str, Any], dict[str, str]],
           n: int) -> tuple[list[float], list[float]]:
    """n requests to each side, alternating A B / B A, so that machine drift hits both alike."""
    out: tuple[list[float], list[float]] = ([], [])
    with httpx.Client(timeout=30, headers=a[2]) as ca, httpx.Client(timeout=30, headers=b[2]) as cb:
        sides = ((ca, a, out[0]), (cb, b, out[1]))
        for i in range(n):
            for c, (url, body, _), xs in sides if i % 2 == 0 else sides[::-1]:
                t0 = time.perf_counter()
                r = c.post(url, json=body)
                xs.append(time.perf_counter() - t0)
                r.raise_for_status()
    return out


def throughput(url: str, body: dict[str, Any], headers: dict[str, str], seconds: float,
               concurrency: int) -> dict[str, Any]:
    """Closed-loop load from `concurrency` workers on aiohttp (a lighter client leaves the 2 cores to the server)."""
    import aiohttp

    async def run() -> tuple[int, int]:
        ok = err = 0
        stop = time.perf_counter() + seconds
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=concurrency)) as c:
            async def worker() -> None:
                nonlocal ok, err
                while time.perf_counter() < stop:
                    async with c.post(url, json=body) as r:
                        await r.read()
                        ok, err = (ok + 1, err) if r.status == 200 else (ok, err + 1)
            await asyncio.gather(*[worker() for _ in range(concurrency)])
        return ok, err

    t0 = time.perf_counter()
    ok, err = asyncio.run(run())
    took = time.perf_counter() - t0
    return {"req_per_s": round(ok / took, 1), "ok": ok, "errors": err, "concurrency": concurrency,
            "seconds": round(took, 2)}


def trace_count(mlflow_url: str) -> int:
    """Traces in MLflow's keel-traces experiment (ids only: no spans are read)."""
    from mlflow import MlflowClient

    c = MlflowClient(mlflow_url)
    exp = c.get_experiment_by_name("keel-traces")
    if exp is None:
        return 0
    n, token = 0, None
    while True:
        page = c.search_traces(locations=[exp.experiment_id], max_results=500, page_token=token,
                               include_spans=False)
        n += len(page)
        if not (token := page.token):
            return n


def traces_arrived(mlflow_url: str, before: int, sent: int, wait_s: float = 120) -> dict[str, Any]:
    """How many of the throughput run's `sent` requests have their trace in MLflow, once the exporters
    have drained (the count stops growing), and how long that took after the load ended."""
    t0, last, arrived = time.perf_counter(), -1, 0
    while time.perf_counter() - t0 < wait_s:
        arrived = trace_count(mlflow_url) - before
        if arrived >= sent or arrived == last:
            break
        last = arrived
        time.sleep(3)
    return {"sent": sent, "arrived": arrived, "share": round(arrived / sent, 4) if sent else None,
            "drained_s": round(time.perf_counter() - t0, 1)}


def routing_microbench(settings: Any, model: str, n: int = 20000) -> float:
    """Per-request pure work of the gateway: parse + target body + complexity (when used) + plan, in µs."""
    from keel.routing import (
        ALIASES,
        DEFAULT_MAX_TOKENS,
        Candidate,
        LatencyStats,
        RouteRequest,
        Weights,
        complexity_score,
        estimate_tokens,
        plan,
        uses_complexity,
    )
    from serving import api
    from serving.api import target_body

    raw = json.dumps({**BODY, "model": model}).encode()
    cands = [Candidate(t, True, LatencyStats()) for t in settings.policy.targets]
    weights = Weights()
    t0 = time.perf_counter()
    for _ in range(n):
        req = api.parse(raw, api.ChatRequest)
        body, text, ask = target_body("chat", req)
        strategy, pinned = (ALIASES[req.model] or "blend", None) if req.model in ALIASES else ("blend", req.model)
        score = complexity_score(ask) if uses_complexity(strategy, pinned, weights) else 0.0
        rr = RouteRequest(estimate_tokens(text), req.max_tokens or DEFAULT_MAX_TOKENS, frozenset(), None, score)
        plan(cands, rr, strategy, pinned=pinned, weights=weights)
    return (time.perf_counter() - t0) / n * 1e6


def exporter_microbench(n: int = 2048) -> dict[str, float]:
    """The exporter thread's work per trace, in µs: building a traced request's spans (a stage per
    span, one attempt, usage and cost) and encoding them, in batches of 512, as OTLP protobuf."""
    from keel.telemetry.otlp import encode
    from serving.request.trace import Snapshot, request_trace

    stages = ("authenticate", "parse", "scope", "admit", "prompt", "ground", "route", "protect", "generate",
              "check", "record")
    now = time.monotonic()
    attrs = {"keel.request_id": "req-bench", "keel.endpoint": "chat", "keel.status": 200, "mlflow.spanType": "CHAIN",
             "keel.model": "echo", "keel.data_class": "internal", "keel.zones": ["us"],
             "keel.route.strategy": "pinned", "keel.route.ranked": ["echo"], "keel.target": "echo",
             "keel.failovers": 0, "keel.model_ms": 8.0, "keel.ttft_ms": 3.0}
    snap = Snapshot("req-bench", now - 0.012, now, time.time_ns(), dict.fromkeys(stages, 0.0005),
                    [("echo", now - 0.010, now - 0.002, None)], attrs, "demo",
                    {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32}, 0.0001, None)
    t0 = time.perf_counter()
    traces = [request_trace(snap) for _ in range(n)]
    t1 = time.perf_counter()
    for i in range(0, n, 512):
        encode(traces[i:i + 512], "keel-gateway").SerializeToString()
    t2 = time.perf_counter()
    return {"build": round((t1 - t0) / n * 1e6, 1), "encode": round((t2 - t1) / n * 1e6, 1)}


def llama_alone(n_threads: int, max_tokens: int) -> float:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from serving.targets.llama_cpp import model_path

    llm = Llama(model_path=model_path({}), n_ctx=2048, n_threads=n_threads, verbose=False)
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos, bos)
    tokens, t0 = 0, time.perf_counter()
    for p in PROMPTS:
        prompt = fmt(messages=[{"role": "user", "content": p}]).prompt
        for part in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stop=[eos], stream=True,
                                          repeat_penalty=1.1):
            tokens += 1 if part["choices"][0]["text"] else 0  # type: ignore[index]
    rate = tokens / (time.perf_counter() - t0)
    del llm
    return rate


def llama_gateway(base: str, headers: dict[str, str], max_tokens: int) -> float:
    tokens, t0 = 0, time.perf_counter()
    with httpx.Client(timeout=120, headers=headers) as c:
        for p in PROMPTS:
            body = {"model": "smollm2", "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": p}]}
            r = c.post(f"{base}/v1/chat/completions", json=body)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]
    return tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="sequential requests per side and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--load-seconds", type=float, default=15)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per answer in the tokens/s comparison")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)

    from tests.support.services import Service, free_port, start_mlflow, start_ray_head, write_config

    work = Path(tempfile.mkdtemp(prefix="keel-gw-bench-"))
    head = start_ray_head(work / "ray")
    os.environ.update(head.env)  # before Ray is imported: it reads its auth mode once

    import ray
    from ray import serve

    from keel import processes
    from keel.keys import KeyStore
    from keel.settings import load_settings
    from serving.gateway import Gateway
    from serving.targets import deployment_for

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    class EchoModel:
        """Answers at once, in the LlamaCppModel stream protocol."""

        async def stream(self, kind: str, body: dict[str, Any]):  # type: ignore[no-untyped-def]
            yield {"text": "echo", "finish_reason": None}
            yield {"text": "", "finish_reason": "stop", "usage": {"prompt_tokens": 8, "completion_tokens": 1,
                                                                   "total_tokens": 9}}

    bare_api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    @serve.ingress(bare_api)
    class Bare:
        def __init__(self, echo: Any) -> None:
            self.echo = echo.options(stream=True)

        @bare_api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> JSONResponse:
            body = await request.json()
            text = "".join([p["text"] async for p in self.echo.stream.remote("chat", body)])
            return JSONResponse({"choices": [{"message": {"role": "assistant", "content": text}}]})

    report: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()}}
    echoes = {}
    for name in ("echo", "echo2"):
        port = free_port()
        echoes[name] = (Service(name, [sys.executable, "-m", "tests.support.fault_server", "--port", str(port)], {},
                                work / f"{name}.log", cwd=ROOT), f"http://127.0.0.1:{port}")
        echoes[name][0].wait_http(echoes[name][1] + "/v1/models", timeout=30)
    mlflow_svc, mlflow_url = start_mlflow(work / "mlflow")
    try:
        cfg = write_config(work / "cfg", mlflow_tracking_uri=mlflow_url)
        doc = yaml.safe_load(cfg.read_text())
        gw_port = free_port()
        doc["ports"]["gateway"] = gw_port
        doc["gateway"] = {"max_in_flight_per_replica": 256, "max_in_flight_per_target": 256,
                          "breaker_failures": 3, "breaker_cooldown_s": 30}
        doc["guard"] = {"enabled": False}  # measured on its own by benchmarks/guard.py
        ext = {"kind": "openai", "zone": "us", "price_per_1k_input": 0.0, "price_per_1k_output": 0.0,
               "tier": "small", "max_context": 8192}
        doc["policy"]["targets"] = [
            {"name": "echo", **ext, "options": {"base_url": echoes["echo"][1] + "/v1"}},
            {"name": "echo2", **ext, "options": {"base_url": echoes["echo2"][1] + "/v1"}},
            {"name": "echo-handle", **ext, "kind": "llama_cpp", "tier": "large"},
            {"name": "smollm2", **ext, "kind": "llama_cpp", "tier": "large", "max_context": 2048,
             "options": {"n_threads": 2, "n_ctx": 2048}},
        ]
        cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
        settings = load_settings(cfg)
        key, _ = KeyStore(settings).create("demo", "bench")
        auth = {"Authorization": f"Bearer {key}"}
        ray.init(address=head.gcs, logging_level=logging.WARNING, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": gw_port})
        echo_dep = EchoModel.bind()
        llama = deployment_for(settings.policy.targets[3])
        serve.run(Gateway.options(max_ongoing_requests=300).bind(settings, {"echo-handle": echo_dep, "smollm2": llama}),
                  name="keel", route_prefix="/")
        serve.run(Bare.bind(EchoModel.options(name="EchoBare").bind()), name="bare", route_prefix="/bare")
        # The same gateway, its traces off: the baseline for tracing's cost (no llama.cpp: not measured there).
        untraced = settings.model_copy(update={
            "telemetry": settings.telemetry.model_copy(update={"traces": False}),
            "policy": settings.policy.model_copy(update={"targets": settings.policy.targets[:3]})})
        serve.run(Gateway.options(name="GatewayUntraced", max_ongoing_requests=300).bind(
            untraced, {"echo-handle": EchoModel.options(name="EchoUntraced").bind()}),
            name="untraced", route_prefix="/untraced")
        base = f"http://127.0.0.1:{gw_port}"
        keel_url, echo_url = f"{base}/v1/chat/completions", echoes["echo"][1] + "/v1/chat/completions"
        handle_body = {**BODY, "model": "echo-handle"}
        bare_url, untraced_url = f"{base}/bare/v1/chat/completions", f"{base}/untraced/v1/chat/completions"
        for url, body in ((keel_url, BODY), (echo_url, BODY), (keel_url, handle_body), (bare_url, BODY),
                          (untraced_url, handle_body)):
            sequential(url, body, 50, auth)  # warm up every path
        samples: dict[str, list[float]] = {"direct": [], "keel": [], "keel_handle": [], "bare_handle": [],
                                           "untraced_handle": [], "traced_handle": []}
        # paired: request i of one side minus request i of the other
        diffs: dict[str, list[float]] = {"overhead": [], "routing": [], "tracing": []}
        for _ in range(a.rounds):
            direct, keel = paired((echo_url, BODY, {}), (keel_url, BODY, auth), a.requests)
            bare, keel_handle = paired((f"{base}/bare/v1/chat/completions", BODY, {}), (keel_url, handle_body, auth),
                                       a.requests)
            untraced_handle, traced_handle = paired((untraced_url, handle_body, auth), (keel_url, handle_body, auth),
                                                    a.requests)
            for k, v in (("direct", direct), ("keel", keel), ("bare_handle", bare), ("keel_handle", keel_handle),
                         ("untraced_handle", untraced_handle), ("traced_handle", traced_handle)):
                samples[k] += v
            diffs["overhead"] += [k - d for k, d in zip(keel, direct, strict=True)]
            diffs["routing"] += [k - b for k, b in zip(keel_handle, bare, strict=True)]
            diffs["tracing"] += [t - u for t, u in zip(traced_handle, untraced_handle, strict=True)]
        lat = {k: latency(v) for k, v in samples.items()}
        report["latency"] = lat
        report["overhead_ms"] = {"p50": round(lat["keel"]["p50_ms"] - lat["direct"]["p50_ms"], 2),
                                 "p99": round(lat["keel"]["p99_ms"] - lat["direct"]["p99_ms"], 2)}
        report["routing_cost_ms"] = {"p50": round(lat["keel_handle"]["p50_ms"] - lat["bare_handle"]["p50_ms"], 2),
                                     "p99": round(lat["keel_handle"]["p99_ms"] - lat["bare_handle"]["p99_ms"], 2),
                                     "median_of_paired_differences": ms(statistics.median(diffs["routing"]))}
        report["overhead_ms"]["median_of_paired_differences"] = ms(statistics.median(diffs["overhead"]))
        report["tracing_cost_ms"] = {
            "p50": round(lat["traced_handle"]["p50_ms"] - lat["untraced_handle"]["p50_ms"], 2),
            "p99": round(lat["traced_handle"]["p99_ms"] - lat["untraced_handle"]["p99_ms"], 2),
            "median_of_paired_differences": ms(statistics.median(diffs["tracing"]))}
        report["routing_microbench_us"] = {"named_target": round(routing_microbench(settings, "echo-handle"), 1),
                                           "keel_auto": round(routing_microbench(settings, "keel/auto"), 1)}
        print(json.dumps(report, indent=1), flush=True)
        time.sleep(3)  # the paired rounds' last traces leave their replica's exporter within a second
        def mlflow_cpu_s() -> float:  # the server and its workers: the session it leads
            return processes.cpu_seconds(processes.session_members(mlflow_svc.proc.pid))

        before, mlflow_cpu = trace_count(mlflow_url), [mlflow_cpu_s()]
        report["throughput"] = {
            "keel": throughput(keel_url, BODY, auth, a.load_seconds, a.concurrency),
            "direct": throughput(echo_url, BODY, {}, a.load_seconds, a.concurrency),
            # The same gateway with traces off, to the in-cluster echo both have (MLflow idles meanwhile).
            "keel_handle_untraced": throughput(untraced_url, handle_body, auth, a.load_seconds, a.concurrency),
        }
        mlflow_cpu.append(mlflow_cpu_s())
        report["throughput"]["keel_handle_traced"] = throughput(keel_url, handle_body, auth, a.load_seconds,
                                                                a.concurrency)
        mlflow_cpu.append(mlflow_cpu_s())
        sent = sum(report["throughput"][k]["ok"] + report["throughput"][k]["errors"]
                   for k in ("keel", "keel_handle_traced"))  # the traced runs
        report["traces_under_load"] = arrived = traces_arrived(mlflow_url, before, sent)
        # MLflow's ingestion on the same cores: its CPU per trace (from the first traced run until every
        # trace arrived) and the cores it took during the traced run to the in-cluster echo.
        arrived["mlflow_cpu_ms_per_trace"] = round(
            (mlflow_cpu_s() - mlflow_cpu[0]) * 1000 / max(arrived["arrived"], 1), 2)
        arrived["mlflow_cores_during_traced_run"] = round(
            (mlflow_cpu[2] - mlflow_cpu[1]) / report["throughput"]["keel_handle_traced"]["seconds"], 2)
        report["exporter_us_per_trace"] = exporter_microbench()
        print(json.dumps(report["throughput"]), flush=True)

        # 3. breaker: kill `echo` under steady traffic and time its breaker opening.
        errors, done = [0], threading.Event()

        def traffic() -> None:
            with httpx.Client(timeout=30, headers=auth) as c:
                while not done.is_set():
                    if c.post(keel_url, json=BODY).status_code != 200:
                        errors[0] += 1

        t = threading.Thread(target=traffic)
        t.start()
        time.sleep(1.0)
        os.killpg(echoes["echo"][0].proc.pid, signal.SIGKILL)
        killed = time.perf_counter()
        opened = None
        with httpx.Client(timeout=5) as c:
            while time.perf_counter() - killed < 30:
                if c.get(f"{base}/healthz").json()["targets"]["echo"]["breaker"] == "open":
                    opened = time.perf_counter()
                    break
                time.sleep(0.002)
        time.sleep(1.0)
        done.set()
        t.join()
        report["breaker"] = {"death_to_open_ms": ms(opened - killed) if opened else None, "client_errors": errors[0]}
        print(json.dumps(report["breaker"]), flush=True)

        # 4. tokens/s: llama.cpp through the gateway vs alone (the Serve replica idles meanwhile).
        gw_runs, alone_runs = [], []
        for _ in range(3):  # interleaved, so machine noise hits both sides alike
            gw_runs.append(llama_gateway(base, auth, a.max_tokens))
            alone_runs.append(llama_alone(2, a.max_tokens))
        gw_rate, alone = statistics.median(gw_runs), statistics.median(alone_runs)
        report["tokens_per_s"] = {"gateway": round(gw_rate, 1), "llama_alone": round(alone, 1),
                                  "ratio": round(gw_rate / alone, 3)}
    finally:
        with contextlib.suppress(Exception):  # best effort; the head goes next
            serve.shutdown()
        ray.shutdown()
        head.stop()
        for svc, _ in echoes.values():
            svc.stop()
        mlflow_svc.stop()
        shutil.rmtree(work, ignore_errors=True)
    lat, o, r = report["latency"], report["overhead_ms"], report["routing_cost_ms"]
    rows = [
        ("straight to the echo server, p50 / p99 ms", f"{lat['direct']['p50_ms']} / {lat['direct']['p99_ms']}"),
        ("through Keel to the echo server, p50 / p99 ms", f"{lat['keel']['p50_ms']} / {lat['keel']['p99_ms']}"),
        ("  overhead p50 / p99 ms (goal <= 10 / 25)", f"{o['p50']} / {o['p99']}"),
        ("  overhead, median of paired differences, ms", f"{o['median_of_paired_differences']}"),
        ("max req/s through Keel (goal >= 150)", f"{report['throughput']['keel']['req_per_s']}"),
        ("  max req/s straight to the echo server", f"{report['throughput']['direct']['req_per_s']}"),
        ("  max req/s to the in-cluster echo, traced / untraced",
         f"{report['throughput']['keel_handle_traced']['req_per_s']} / "
         f"{report['throughput']['keel_handle_untraced']['req_per_s']}"),
        ("bare Serve ingress + handle hop, p50 / p99 ms",
         f"{lat['bare_handle']['p50_ms']} / {lat['bare_handle']['p99_ms']}"),
        ("Keel ingress + handle hop, p50 / p99 ms", f"{lat['keel_handle']['p50_ms']} / {lat['keel_handle']['p99_ms']}"),
        ("  routing cost p50 / p99 ms (goal p50 <= 0.5)", f"{r['p50']} / {r['p99']}"),
        ("  routing cost, median of paired differences, ms", f"{r['median_of_paired_differences']}"),
        ("  pure per-request path in process, us: named / keel/auto",
         f"{report['routing_microbench_us']['named_target']} / {report['routing_microbench_us']['keel_auto']}"),
        ("tracing cost, traced - untraced, p50 ms (goal <= 0.3)", f"{report['tracing_cost_ms']['p50']}"),
        ("  tracing cost, median of paired differences, ms",
         f"{report['tracing_cost_ms']['median_of_paired_differences']}"),
        ("traces in MLflow / requests, throughput run", f"{report['traces_under_load']['arrived']} / {sent}"),
        ("  MLflow's CPU per trace ingested, ms; cores it took, traced run",
         f"{report['traces_under_load']['mlflow_cpu_ms_per_trace']}; "
         f"{report['traces_under_load']['mlflow_cores_during_traced_run']}"),
        ("  exporter thread per trace, us: build / encode",
         f"{report['exporter_us_per_trace']['build']} / {report['exporter_us_per_trace']['encode']}"),
        ("target death -> breaker open, ms", f"{report['breaker']['death_to_open_ms']}"),
        ("  client errors meanwhile (goal 0)", f"{report['breaker']['client_errors']}"),
        ("tokens/s through the gateway / llama.cpp alone",
         f"{report['tokens_per_s']['gateway']} / {report['tokens_per_s']['llama_alone']}"),
        ("  ratio (goal >= 0.9)", f"{report['tokens_per_s']['ratio']}"),
    ]
    print(f"\nKeel gateway, {os.cpu_count()} CPUs")
    for name, v in rows:
        print(f"  {name:<52} {v:>16}")
    write_report(report, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
