"""The shipped observability configuration: infra/prometheus (scrape config, rules), the Grafana dashboard in
infra/grafana and docs/metrics.md agree with each other and with the names Ray gives the gateway's metrics.

Ray's naming (ray 2.60, OpenTelemetry exporter, the default): every metric gets the prefix `ray_`
(ray/_private/telemetry/open_telemetry_metric_recorder.py: NAMESPACE = "ray", name=f"{NAMESPACE}_{name}");
counters end in `_total` and histograms export `_bucket`/`_sum`/`_count` (OpenTelemetry's Prometheus exporter).
The fast tests pin the prefix in Ray's source and check every query with promtool; the slow one exports the
gateway's metric names from a real Ray actor and queries them back through a real Prometheus.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_YML = ROOT / "infra" / "prometheus" / "prometheus.yml"
RULES_YML = ROOT / "infra" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "keel-gateway.json"
PROVISIONING = ROOT / "infra" / "grafana" / "provisioning"
DOC = ROOT / "docs" / "metrics.md"
SERVING_METRICS = ROOT / "serving" / "metrics.py"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package "
                                    "`prometheus`; .ci/run installs it)")

# The gateway's metrics (base name -> kind, labels): the contract serving/metrics.py declares through
# ray.util.metrics. The tests read serving/metrics.py's own declarations, held to this list by
# test_the_gateway_declares_the_metrics_the_dashboards_are_built_on; the list stands in only while
# serving/metrics.py does not use ray.util.metrics.
CONTRACT: dict[str, tuple[str, tuple[str, ...]]] = {
    "keel_gateway_requests": ("counter", ("endpoint", "status")),
    "keel_gateway_request_seconds": ("histogram", ("endpoint",)),
    "keel_gateway_ttft_seconds": ("histogram", ()),
    "keel_gateway_failovers": ("counter", ("target", "error")),
    "keel_gateway_target_served": ("counter", ("target",)),
    "keel_gateway_tokens": ("counter", ("target", "direction")),
    "keel_gateway_cost": ("counter", ("target",)),
    "keel_gateway_guard_actions": ("counter", ("action",)),
    "keel_gateway_pii_findings": ("counter", ("entity_type",)),
    "keel_gateway_feedback": ("counter", ("rating",)),
    "keel_gateway_breaker_transitions": ("counter", ("target", "to")),
    "keel_gateway_breaker_state": ("gauge", ("target",)),
    "keel_gateway_in_flight": ("gauge", ()),
    "keel_gateway_audit_failures": ("counter", ()),
    "keel_gateway_feedback_link_failures": ("counter", ()),
    "keel_gateway_traces": ("counter", ("outcome",)),
    "keel_gateway_target_standing": ("gauge", ("target", "state")),
}

# Ray Serve's own metrics the dashboard and docs use: base name -> kind, labels, and where ray 2.60 declares it
# (file under ray/serve/_private/, the text of its name there). Serve adds application/deployment/replica to
# the metrics of its replicas and controller.
SERVE: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "serve_num_http_requests": ("counter", ("route", "method", "application", "status_code"),
                                "request_ingress_metrics.py", 'f"serve_num_{protocol_name}_requests"'),
    "serve_num_http_error_requests": ("counter", ("route", "error_code", "method", "application"),
                                      "request_ingress_metrics.py", 'f"serve_num_{protocol_name}_error_requests"'),
    "serve_http_request_latency_ms": ("histogram", ("method", "route", "application", "status_code"),
                                      "request_ingress_metrics.py", 'f"serve_{protocol_name}_request_latency_ms"'),
    "serve_deployment_replica_healthy": ("gauge", ("deployment", "replica", "application"),
                                         "deployment_state.py", '"serve_deployment_replica_healthy"'),
    "serve_replica_processing_queries": ("gauge", ("deployment", "replica", "application"),
                                         "replica.py", '"serve_replica_processing_queries"'),
    "serve_deployment_processing_latency_ms": ("histogram", ("route", "deployment", "replica", "application"),
                                               "replica.py", '"serve_deployment_processing_latency_ms"'),
    "serve_deployment_error_counter": ("counter", ("route", "exception_type", "deployment", "replica",
                                                   "application"), "replica.py", '"serve_deployment_error_counter"'),
    "serve_deployment_queued_queries": ("gauge", ("deployment", "application", "handle", "actor_id"),
                                        "router.py", '"serve_deployment_queued_queries"'),
    "serve_num_ongoing_requests_at_replicas": ("gauge", ("deployment", "application", "handle", "actor_id"),
                                               "router.py", '"serve_num_ongoing_requests_at_replicas"'),
}

# Labels Ray's metrics agent puts on every series it exports, and Prometheus's own.
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId"}
PROMETHEUS_LABELS = {"instance", "job", "le", "__name__"}
PROMETHEUS_METRICS = {"up": ()}  # target health, one series per scraped endpoint


def _declared_in_serving() -> dict[str, tuple[str, tuple[str, ...]]] | None:
    """serving/metrics.py's declarations (name -> kind, labels), or None while it does not use ray.util.metrics
    yet. Reads calls of Counter/Gauge/Histogram (or a thin wrapper named like them, `_Counter`) whose name is a
    string: `Counter("keel_...", doc, tag_keys=(...))` or `_Counter("keel_...", doc, "label", ...)`."""
    source = SERVING_METRICS.read_text()
    if "ray.util.metrics" not in source:
        return None
    tree = ast.parse(source)
    constants = {t.id: n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                 for t in n.targets if isinstance(t, ast.Name)}

    def text(node: ast.expr | None) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return constants.get(node.id) if isinstance(node, ast.Name) else None

    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        kind = str(getattr(call.func, "id", None) or getattr(call.func, "attr", "")).lstrip("_").lower()
        if kind not in ("counter", "gauge", "histogram"):
            continue
        kwargs = {k.arg: k.value for k in call.keywords}
        name = text(call.args[0] if call.args else kwargs.get("name"))
        if not name or not name.startswith("keel_"):
            continue
        tags = kwargs.get("tag_keys")
        labels = getattr(tags, "elts", []) if tags else call.args[2:]  # after the name and the description
        found[name] = (kind, tuple(t for t in map(text, labels) if t))
    return found


def gateway_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    return _declared_in_serving() or CONTRACT


def exported(base: str, kind: str) -> set[str]:
    """The names Ray's agent exports for a ray.util.metrics metric (Serve's included)."""
    name = f"ray_{base}"
    if kind == "counter":
        return {f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


def known_metrics() -> dict[str, set[str]]:
    """Every metric name a query may use -> the labels its series carry."""
    known: dict[str, set[str]] = {}
    for base, (kind, labels, *_) in [*gateway_metrics().items(), *SERVE.items()]:
        for name in exported(base, kind):
            known[name] = {*labels, *RAY_LABELS, *PROMETHEUS_LABELS}
    for name, labels in PROMETHEUS_METRICS.items():
        known[name] = {*labels, *PROMETHEUS_LABELS}
    return known


# -- reading PromQL ------------------------------------------------------------------------------------

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\{([^}]*)\}")
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or numbers)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    e = MATCHERS.sub(" ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = GROUPING.sub(" ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if m.group() in KEYWORDS or e[m.end():].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def label_names(expr: str) -> set[str]:
    """The label names an expression groups or matches on."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    labels = {label.strip() for m in GROUPING.finditer(e) for label in m.group(2).split(",") if label.strip()}
    for m in MATCHERS.finditer(e):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", m.group(1)))
    return labels


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [q for p in panels for q in [p, *_panels(p.get("panels", []))]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, panel, target) for every query of every panel."""
    return [(f"panel {p['id']} {p.get('title')!r} target {t.get('refId')}", p, t)
            for p in _panels(dashboard()["panels"]) for t in p.get("targets", [])]


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES_YML.read_text())["groups"] for r in g["rules"]]


def recorded() -> dict[str, set[str]]:
    """Recording rules' names -> the labels they keep (those of their outer `by`, else any known)."""
    out = {}
    for r in rules():
        if "record" in r:
            m = re.match(r"\s*\w+\s+by\s*\(([^)]*)\)", r["expr"])
            out[r["record"]] = {s.strip() for s in m.group(1).split(",")} if m else set()
    return out


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


# -- the tests ---------------------------------------------------------------------------------------------


def test_rays_metric_naming_is_what_the_configuration_assumes():
    """Ray's prefix is pinned in its source; Serve's metrics are declared where the list above says."""
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations
    ray_dir = Path(next(iter(spec.submodule_search_locations)))
    recorder = (ray_dir / "_private" / "telemetry" / "open_telemetry_metric_recorder.py").read_text()
    assert 'NAMESPACE = "ray"' in recorder and 'name=f"{NAMESPACE}_{name}"' in recorder
    for base, (_, _, file, needle) in SERVE.items():
        assert needle in (ray_dir / "serve" / "_private" / file).read_text(), f"{base}: {needle} not in {file}"
    # Ray writes the file_sd file prometheus.yml reads under its temp dir, by this name.
    constants = (ray_dir / "_private" / "ray_constants.py").read_text()
    assert 'PROMETHEUS_SERVICE_DISCOVERY_FILE = "prom_metrics_service_discovery.json"' in constants


def test_the_gateway_declares_the_metrics_the_dashboards_are_built_on():
    """Once serving/metrics.py declares its metrics through ray.util.metrics, it is the list every other test
    here reads; it must hold the contract's names, kinds and labels."""
    declared = _declared_in_serving()
    if declared is None:
        pytest.skip("serving/metrics.py does not use ray.util.metrics yet: the tests read CONTRACT instead")
    assert {n: (k, set(ls)) for n, (k, ls) in declared.items()} == \
        {n: (k, set(ls)) for n, (k, ls) in CONTRACT.items()}


@needs_promtool
def test_promtool_accepts_the_scrape_config_with_its_rules(tmp_path):
    # As shipped: valid, and it loads rules.yml (a missing file_sd file is only a warning).
    shipped = promtool("check", "config", str(PROMETHEUS_YML))
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    assert "1 rule files found" in shipped.stdout
    # With the file_sd file present, in the shape Ray writes it: promtool checks its targets too.
    sd = tmp_path / "prom_metrics_service_discovery.json"
    sd.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": ["127.0.0.1:8090"]}]))
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    [ray_job] = [j for j in config["scrape_configs"] if j["job_name"] == "ray"]
    assert ray_job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]  # noqa: S108
    ray_job["file_sd_configs"][0]["files"] = [str(sd)]
    shutil.copy(RULES_YML, tmp_path / "rules.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "WARNING" not in checked.stdout + checked.stderr


@needs_promtool
def test_promtool_accepts_the_rules():
    checked = promtool("check", "rules", str(RULES_YML))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path):
    queries = dashboard_queries()
    assert len(queries) >= 25
    as_rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{p['id']}_{t['refId']}", "expr": grafana_to_promql(t["expr"])}
        for _, p, t in queries]}]}
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(as_rules))
    checked = promtool("check", "rules", str(tmp_path / "dashboard-rules.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(queries)} rules found" in checked.stdout


def test_the_dashboard_and_rules_use_only_known_metrics_and_their_labels():
    known = known_metrics()
    known.update(recorded())
    exprs = [(w, t["expr"], t.get("legendFormat", "")) for w, _, t in dashboard_queries()]
    exprs += [(r.get("record") or r["alert"], r["expr"], "") for r in rules()]
    used = set()
    for where, expr, legend in exprs:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        unknown = names - set(known)
        assert not unknown, f"{where}: unknown metrics {unknown} in {expr}"
        used |= names
        labels = set().union(*(known[n] for n in names))
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        stray = (label_names(expr) | legend_labels) - labels
        assert not stray, f"{where}: labels {stray} are not on {names}"
    # Every gateway metric is on the dashboard, under its exported name.
    for base, (kind, _) in gateway_metrics().items():
        assert exported(base, kind) & used, f"{base} is on no panel and in no rule"


def test_the_dashboard_is_importable_with_a_datasource_variable():
    d = dashboard()
    assert d["uid"] == "keel-gateway" and d["title"] and d["schemaVersion"] >= 36
    panels = _panels(d["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    [var] = [v for v in d["templating"]["list"] if v["name"] == "datasource"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    for where, p, t in dashboard_queries():
        for ds in (p["datasource"], t["datasource"]):
            assert ds == {"type": "prometheus", "uid": "${datasource}"}, where
    ref_ids = [(p["id"], t["refId"]) for _, p, t in dashboard_queries()]
    assert len(ref_ids) == len(set(ref_ids))
    # No two panels overlap on Grafana's 24-column grid.
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['id']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = p["id"]


def test_grafana_provisioning_points_at_the_dashboard_folder_and_a_prometheus():
    [provider] = yaml.safe_load((PROVISIONING / "dashboards" / "keel.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    [source] = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")


def test_the_docs_name_every_exported_metric_and_alert():
    doc = DOC.read_text()
    for base, (kind, labels) in gateway_metrics().items():
        name = sorted(exported(base, kind))[0] if kind != "histogram" else f"ray_{base}_bucket"
        assert name in doc, f"docs/metrics.md does not name {name}"
        for label in labels:
            assert f"`{label}`" in doc, f"docs/metrics.md does not name the label {label} (of {base})"
    for r in rules():
        if "alert" in r:
            assert r["alert"] in doc, f"docs/metrics.md does not name the alert {r['alert']}"
    for q in re.findall(r"```promql\n(.*?)```", doc, re.S):
        for name in metric_names(q):
            assert name in known_metrics() or name in recorded(), f"docs/metrics.md queries unknown {name}"


@needs_promtool
def test_the_docs_example_queries_are_valid_promql(tmp_path):
    doc = DOC.read_text()
    queries = [q.strip() for q in re.findall(r"```promql\n(.*?)```", doc, re.S)]
    assert len(queries) >= 8
    as_rules = {"groups": [{"name": "docs", "rules": [{"record": f"docs:example_{i}", "expr": q}
                                                      for i, q in enumerate(queries)]}]}
    (tmp_path / "docs-rules.yml").write_text(yaml.safe_dump(as_rules))
    checked = promtool("check", "rules", str(tmp_path / "docs-rules.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- a real Prometheus scraping a real Ray ------------------------------------------------------------


def _emit_gateway_metrics(metrics: dict[str, tuple[str, tuple[str, ...]]]) -> Any:
    """Declare and record every gateway metric from a Ray actor, as the gateway's replicas do: counters and
    histograms once, gauges every half second (Ray's agent forgets a gauge not set for two report intervals).
    Returns the actor."""
    import ray
    from ray.util import metrics as rm

    @ray.remote(num_cpus=0)
    class Emitter:
        def emit(self, declared: dict[str, tuple[str, tuple[str, ...]]]) -> None:
            import threading

            gauges = []
            for name, (kind, labels) in declared.items():
                tags = {label: "x" for label in labels}
                if kind == "counter":
                    rm.Counter(name, description=name, tag_keys=labels).inc(2, tags=tags)
                elif kind == "histogram":
                    rm.Histogram(name, description=name, boundaries=[0.1, 1.0], tag_keys=labels).observe(
                        0.5, tags=tags)
                else:
                    gauges.append((rm.Gauge(name, description=name, tag_keys=labels), tags))

            def keep_setting() -> None:
                while True:
                    for gauge, tags in gauges:
                        gauge.set(0, tags=tags)
                    time.sleep(0.5)

            threading.Thread(target=keep_setting, daemon=True).start()

    emitter = Emitter.remote()  # type: ignore[attr-defined]
    ray.get(emitter.emit.remote(metrics))
    return emitter


def _query(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed (Debian package "
                    "`prometheus`; .ci/run installs it)")
def test_a_real_prometheus_with_the_shipped_config_scrapes_ray_and_evaluates_every_rule(ray_driver, tmp_path):
    import ray

    from keel.processes import free_port

    metrics = gateway_metrics()
    emitter = _emit_gateway_metrics(metrics)
    # The file_sd file the head writes (under its session folder; Ray links it from its temp dir).
    node = ray._private.worker.global_worker.node
    sd = Path(node.get_session_dir_path()) / "prom_metrics_service_discovery.json"
    deadline = time.monotonic() + 30
    while not sd.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sd.exists(), f"Ray wrote no {sd}"

    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    [ray_job] = [j for j in config["scrape_configs"] if j["job_name"] == "ray"]
    ray_job["file_sd_configs"][0]["files"] = [str(sd)]
    shutil.copy(RULES_YML, tmp_path / "rules.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        want = set().union(*(exported(n, k) for n, (k, _) in metrics.items()))
        names: set[str] = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # not listening yet
                names = set(_query(base, "/api/v1/label/__name__/values"))
            if want <= names:
                break
            time.sleep(1)
        assert want <= names, f"not scraped: {sorted(want - names)}\n{(tmp_path / 'prometheus.log').read_text()}"
        [series] = _query(base, "/api/v1/series", **{"match[]": "ray_keel_gateway_requests_total"})
        assert set(series) >= RAY_LABELS and series["job"] == "ray"
        assert not [label for label in series if label.startswith("otel_scope_")], "labeldrop did not apply"

        time.sleep(3)  # a few evaluations of every rule
        groups = _query(base, "/api/v1/rules")["groups"]
        evaluated = [r for g in groups for r in g["rules"]]
        assert len(evaluated) == len(rules())
        for r in evaluated:
            assert r["health"] == "ok", r
        # The standing gauge is 0 (see _emit_gateway_metrics), so the exclusion alert is pending or firing.
        assert any(r["name"] == "KeelTargetExcluded" and r["state"] in ("pending", "firing") for r in evaluated)
        for _, _, t in dashboard_queries():
            _query(base, "/api/v1/query", query=grafana_to_promql(t["expr"]))  # success, or it says why
    finally:
        ray.kill(emitter)
        server.terminate()
        server.wait(10)
        log.close()
