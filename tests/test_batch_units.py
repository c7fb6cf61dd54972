"""Pure parts of the batch pipeline: failure kinds, document parsing, chunking, snapshots, embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from keel import audit
from keel.errors import ConfigError, DataQualityError, FailureKind, classify
from keel.orchestration import chain
from keel.pipeline.chunking import chunk_text
from keel.pipeline.documents import decode, document_id, html_to_text, split_file
from keel.pipeline.snapshots import SnapshotStore, snapshot_key
from keel.settings import load_settings
from keel.storage import ZoneStorage
from ray_jobs._audit import audited
from tests.support.services import write_config


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (DataQualityError("x"), FailureKind.DATA_QUALITY),
        (ConnectionRefusedError("refused"), FailureKind.TRANSIENT),
        (TimeoutError(), FailureKind.TRANSIENT),
        (RuntimeError("HTTP 429 Too Many Requests"), FailureKind.RATE_LIMIT),
        (RuntimeError("quota exceeded for project"), FailureKind.RATE_LIMIT),
        (KeyError("doc_id"), FailureKind.BUG),
        ("ray.exceptions.ActorDiedError: The actor died unexpectedly", FailureKind.TRANSIENT),
        ("keel.errors.DataQualityError: zone us: ... failed validation", FailureKind.DATA_QUALITY),
        ("TypeError: unsupported operand", FailureKind.BUG),
        (None, FailureKind.BUG),
    ],
)
def test_failures_are_classified(error, kind):
    assert classify(error) is kind
    assert kind.retryable == (kind in (FailureKind.TRANSIENT, FailureKind.RATE_LIMIT))


def test_a_failed_ray_job_carries_the_kind_its_log_names():
    from keel.orchestration.ray_jobs import RayJobError

    log = "Traceback (most recent call last):\n  ...\nkeel.errors.SourceNotFoundError: landing source 'docs': /x"
    assert classify(log) is FailureKind.BUG
    assert classify("ray_jobs.index: keel.errors.TransientError: store busy") is FailureKind.TRANSIENT
    failed = RayJobError("Ray job keel-ingest_us-1 FAILED", classify("ConnectionResetError: peer"))
    assert classify(failed) is FailureKind.TRANSIENT and failed.code == "ray_job_failed"
    assert RayJobError("x", FailureKind.BUG).kind is FailureKind.BUG  # each instance its own kind


def test_classify_follows_the_exception_chain():
    try:
        try:
            raise ConnectionResetError("peer reset")
        except ConnectionResetError as e:
            raise RuntimeError("job submission failed") from e
    except RuntimeError as outer:
        assert classify(outer) is FailureKind.TRANSIENT


def test_jsonl_records_get_stable_ids_and_keep_their_bytes():
    data = b'{"id": "a", "text": "x"}\n\n{"id": "a", "text": "y"}\nnot json\n'
    recs = split_file("file:///l/t.jsonl", data)
    assert [r.source for r in recs] == ["file:///l/t.jsonl#a", "file:///l/t.jsonl#a@L3", "file:///l/t.jsonl#L4"]
    assert recs[2].payload == b"not json"
    assert recs[0].doc_id == document_id("file:///l/t.jsonl#a", b'{"id": "a", "text": "x"}')
    assert split_file("file:///l/t.jsonl", data)[0].doc_id == recs[0].doc_id  # same bytes, same source: same id
    assert split_file("file:///m/t.jsonl", data)[0].doc_id != recs[0].doc_id  # another source: another document


def test_decode_gives_text_or_a_reason():
    assert decode("text", "héllo".encode(), 100).text == "héllo"
    assert decode("text", b"\xc3\x28", 100).error == "invalid UTF-8 at byte 0"
    assert decode("markdown", b"   \n", 100).error == "empty text"
    assert decode("text", b"x" * 101, 100).error == "document is 101 bytes, above the limit of 100"
    assert decode("jsonl", b'{"id": 1, "text": 5}', 100).error == "wrong schema: missing 'text' or not a string"
    assert decode("jsonl", b'{"id": 1, "text": "hi", "title": "T"}', 100).title == "T"


def test_html_text_drops_markup_scripts_and_keeps_the_title():
    text, title = html_to_text("<html><head><title>Offer</title><style>p{}</style></head>"
                               "<body><p>Dear Ana,</p><script>x()</script><p>Welcome &amp; hi</p></body></html>")
    assert title == "Offer" and text == "Dear Ana,\n\nWelcome & hi"


def test_chunks_are_token_windows_with_overlap_and_exact_substrings():
    text = " ".join(f"word{i}" for i in range(400))
    chunks = chunk_text("d1", text, size=100, overlap=20)
    assert len(chunks) > 3
    for c in chunks:
        assert text[c.start : c.end] == c.text
    assert all(b.start < a.end for a, b in zip(chunks, chunks[1:], strict=False))  # consecutive windows overlap
    assert chunks[-1].end == len(text)
    assert chunk_text("d1", text, 100, 20) == chunks  # deterministic ids and cuts
    assert chunk_text("d1", "   ", 100, 20) == []


def test_snapshot_commit_is_atomic_and_idempotent(tmp_path):
    storage = ZoneStorage("us", f"file://{tmp_path}")
    store = SnapshotStore(storage, "scrubbed", keep=2)
    key = snapshot_key("scrubbed", "input", "v1")
    assert key == snapshot_key("scrubbed", "input", "v1") != snapshot_key("scrubbed", "input", "v2")
    st = store.begin(key)
    st.write_bytes(b"rows", "documents/part-00000.parquet")
    assert store.current() is None  # staged is not committed
    m = store.commit(st, {"counts": {"n": 1}})
    assert store.current() == m == store.committed(key)
    assert m["files"]["documents/part-00000.parquet"]["bytes"] == 4
    # The same key committed again (a concurrent or repeated run) keeps the first, equal, snapshot.
    st2 = store.begin(key)
    st2.write_bytes(b"rows", "documents/part-00000.parquet")
    assert store.commit(st2, {"counts": {"n": 1}}) == m
    # Old snapshots are pruned down to `keep`.
    for i in range(3):
        s = store.begin(f"k{i}")
        s.write_bytes(b"x", "f")
        store.commit(s, {})
    assert len(storage.listdir("scrubbed", "snapshots")) == 2 and store.current()["key"] == "k2"


def test_a_job_run_is_audited_with_its_ray_and_airflow_ids_and_an_s3_zones_record_is_spooled(tmp_path, monkeypatch):
    settings = load_settings(write_config(tmp_path))
    # What the Ray Jobs API hands a job submitted by keel.orchestration.stages.
    meta = {"job_submission_id": "keel-scrub_us-0123abcd-try2", "airflow_dag_id": "keel_scrub_us",
            "airflow_run_id": "asset_triggered__2026-11-26T00:00:00+00:00", "airflow_task_id": "scrub_us"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": meta}))
    with pytest.raises(KeyError), audited(settings, "scrubbed", "us") as run:
        run.input = {"stage": "raw", "key": "k", "sha256": "0" * 64}
        raise KeyError("doc_id")
    root = ZoneStorage.for_zone(settings, "us").audit_root()
    [rec] = audit.records(root)
    assert rec["writer"] == "job-scrubbed-keel-scrub_us-0123abcd-try2" and rec["job_id"] == meta["job_submission_id"]
    assert (rec["airflow_dag_id"], rec["airflow_run_id"]) == (meta["airflow_dag_id"], meta["airflow_run_id"])
    assert (rec["status"], rec["error_kind"], rec["output"]) == ("failed", "bug", None)
    assert audit.verify(root, settings.audit_keys()).ok

    doc = yaml.safe_load(write_config(tmp_path / "s3").read_text())
    doc["policy"]["zones"]["eu"]["storage"] = "s3://keel-eu/storage"
    (tmp_path / "s3.yaml").write_text(yaml.safe_dump(doc))
    s3 = load_settings(tmp_path / "s3.yaml")
    with audited(s3, "raw", "eu"):
        pass  # the job's work: an s3:// zone's record goes to the local spool, never lost
    spool = audit.roots(s3)["eu"]
    assert spool == tmp_path / "s3" / "state" / "audit-spool" / "eu"
    assert [r["zone"] for r in audit.records(spool)] == ["eu"]


def test_onnx_and_torch_embeddings_agree(shared_state):
    from keel.pipeline.embedding import Embedder

    texts = ["refund policy for annual plans", "reset the router", "x" * 3000]
    a = Embedder("onnx", shared_state / "models").encode(texts, batch_size=2)
    b = Embedder("torch").encode(texts)
    assert a.shape == (3, 384) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert np.abs(a - b).max() < 1e-4


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU")
def test_gpu_embeddings_agree_with_cpu(shared_state):
    from keel.pipeline.embedding import Embedder

    texts = ["refund policy for annual plans", "reset the router", "x" * 3000]
    a = Embedder("onnx", shared_state / "models").encode(texts)
    b = Embedder("onnx", device="cuda").encode(texts)
    assert (a * b).sum(1).min() > 0.999


@pytest.mark.parametrize(
    ("device", "resources", "expected"),
    [
        ("auto", {"CPU": 2.0}, ("cpu", 2, 64, {"num_cpus": 1})),
        ("auto", {"CPU": 16.0, "GPU": 1.0}, ("cuda", 1, 512, {"num_cpus": 1, "num_gpus": 1})),
        ("auto", {"CPU": 16.0, "GPU": 4.0}, ("cuda", 2, 512, {"num_cpus": 1, "num_gpus": 1})),
        ("cpu", {"CPU": 16.0, "GPU": 1.0}, ("cpu", 2, 64, {"num_cpus": 1})),
        ("cpu", {"CPU": 1.0}, ("cpu", 1, 64, {"num_cpus": 1})),
    ],
)
def test_embedding_actors_go_to_gpus_when_the_cluster_has_them(device, resources, expected):
    from keel.settings import load_settings
    from ray_jobs.index import placement

    s = load_settings()
    s.pipeline.embedding_device = device
    assert placement(s, resources) == expected


def test_embedding_on_cuda_without_a_gpu_is_a_clear_error():
    from keel.settings import load_settings
    from ray_jobs.index import placement

    s = load_settings()
    s.pipeline.embedding_device = "cuda"
    with pytest.raises(ConfigError, match="no GPU"):
        placement(s, {"CPU": 2.0})


def test_alerts_reach_the_log_and_a_real_webhook(caplog):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from keel import alerts

    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    alert = alerts.Alert("transient", "keel_ingest", "ingest_us", "r1", 1, True, "connection reset")
    try:
        with caplog.at_level("ERROR", logger="keel.alerts"):
            alerts.send(alert, f"http://127.0.0.1:{server.server_address[1]}/hook")
            alerts.send(alert, "http://127.0.0.1:9/unreachable")  # a dead webhook is logged, never raised
    finally:
        server.shutdown()
    assert received == [{"keel_alert": {**alert.__dict__}}]
    assert "KEEL ALERT" in caplog.text and "alert webhook http://127.0.0.1:9/unreachable failed" in caplog.text


def test_the_chain_is_declared_once_and_the_dags_follow_from_it():
    dags = chain.dags()
    assert [(d.name, d.trigger, [s.name for s in d.stages]) for d in dags] == [
        ("ingest", None, ["ingest"]), ("scrub", "raw", ["scrub", "validate"]), ("index", "scrubbed", ["index"])]
    assert chain.dag_ids(["us", "eu"]) == ["keel_ingest", "keel_scrub_eu", "keel_scrub_us", "keel_index_eu",
                                           "keel_index_us"]
    # What a successful task starts downstream: only a stage that publishes an asset starts anything.
    assert chain.started_by("ingest_us") == ["keel_scrub_us"]
    assert chain.started_by("scrub_us") == [] and chain.started_by("index_eu") == []
    assert chain.started_by("validate_eu") == ["keel_index_eu"]
    # A stage that reads neither a published asset nor what the stage before it commits is refused.
    stray = chain.Stage("evaluate", "ray_jobs.evaluate", "validation", "evaluation", None, "")
    with pytest.raises(ConfigError, match="'evaluate' reads 'validation'"):
        chain.dags((*chain.STAGES, stray))
    evaluate = chain.Stage("evaluate", "ray_jobs.evaluate", "index", "evaluation", "evaluation", "")
    assert chain.dags((*chain.STAGES, evaluate))[-1] == chain.Dag("evaluate", "index", (evaluate,))


def test_the_run_summary_line_round_trips_without_the_manifest():
    from keel.orchestration.job_result import format_result, parse_result

    line = format_result({"stage": "raw", "key": "k", "manifest": {"files": {}}, "counts": {"documents": 3}})
    logs = f"starting\nKEEL_RESULT {{\"old\": 1}}\nprogress\n{line}\n"
    assert parse_result(logs) == {"stage": "raw", "key": "k", "counts": {"documents": 3}}
    assert parse_result("no summary here") is None


def _stage_task(monkeypatch, name: str, result: dict, before: dict | None = None):
    """Run one stage task's body with a fake Ray job that returns `result`; the outlet events it set."""
    from collections import defaultdict
    from types import SimpleNamespace

    from keel.orchestration import ray_jobs, stages
    from keel.settings import get_settings

    submitted = []
    monkeypatch.setattr(ray_jobs, "run_job", lambda address, entrypoint, **kw: submitted.append(entrypoint) or result)
    stage = chain.stage(name)
    outlet = stages.asset(get_settings(), "us", stage.publishes) if stage.publishes else None
    events: defaultdict = defaultdict(lambda: SimpleNamespace(extra=None))
    context = {"ti": SimpleNamespace(dag_id="keel_scrub_us", task_id=f"{name}_us", run_id="manual__1", try_number=1),
               "outlet_events": events, "logical_date": None,
               "dag_run": SimpleNamespace(run_after=__import__("datetime").datetime(2026, 11, 26))}
    try:
        return stages.run_stage(stage, "us", context, before, None, outlet), events, submitted
    finally:
        events.default_factory = None


def test_a_stage_publishes_the_snapshot_it_committed_or_approved(monkeypatch):
    summary, events, [cmd] = _stage_task(monkeypatch, "validate", {
        "stage": "validation", "key": "v1", "input": {"scrubbed": "s1"}, "success": True, "manifest": {}},
        before={"key": "s1"})
    assert cmd[-4:] == ["--zone", "us", "--input-key", "s1"]  # the snapshot scrub committed, before it in the DAG
    [event] = events.values()
    assert event.extra["key"] == "s1" and event.extra["stage"] == "validation"  # the scrubbed snapshot that passed
    assert "manifest" not in summary
    _, events, [cmd] = _stage_task(monkeypatch, "ingest", {"stage": "raw", "key": "r1", "counts": {}, "manifest": {}})
    assert cmd[-4:] == ["--zone", "us", "--run-time", "2026-11-26T00:00:00"]
    assert [e.extra["key"] for e in events.values()] == ["r1"]


def test_a_stage_that_found_its_output_committed_ends_skipped_and_publishes_nothing(monkeypatch):
    from airflow.sdk.exceptions import AirflowSkipException

    found = {"stage": "raw", "key": "r1", "skipped": "already committed", "manifest": {}}
    with pytest.raises(AirflowSkipException, match="already committed: nothing new for keel_us_raw"):
        _stage_task(monkeypatch, "ingest", found)
    # A stage without an outlet succeeds instead, so the stage after it in its DAG still decides.
    summary, events, _ = _stage_task(monkeypatch, "scrub", {**found, "stage": "scrubbed", "input": {"raw": "r0"}})
    assert summary["skipped"] == "already committed" and not events
